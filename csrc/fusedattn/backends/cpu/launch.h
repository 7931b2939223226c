#pragma once
// What the CPU ops' glue shares: the launch parameters of one call (backends/cpu/attention_cpu.cpp),
// the task runner, the forward's packed workspace and huge-page advice (backends/cpu/workspace.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <stdexcept>

#include "fusedattn/backends/cpu/gemm_hooks.h"
#include "fusedattn/kernels/cpu/plan.h"
#include "fusedattn/ops/params.h"

namespace fusedattn::cpu {

// A planner's result, or the op's error where FUSEDATTN_CPU_CAPABILITY asks for a tier this
// CPU cannot run (or names none).
template <typename Planner, typename... Args>
auto plan_or_error(Planner planner, const Args&... args) {
  try {
    return planner(args...);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
}

// Tasks 0 .. tasks - 1 of a kernel, kernel(params, begin, end) over ranges of them on torch's
// threads, each task's BLAS calls single-threaded.
template <typename Params, typename Kernel>
void run_tasks(int64_t tasks, const Params& p, Kernel kernel) {
  if (tasks <= 0) return;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    BlasOnThisThread one_thread;
    kernel(p, begin, end);
  });
}

// Everything but the outputs: sizes, strides and masks of one call. The tensors keep the
// views the pointers point into alive.
struct Launch {
  kernels::FlashParams p;
  at::Tensor q, k, v, mask, kpm;
};
Launch prepare(const AttentionParams& params);

// The forward's packed workspace of `elems` elements of options' dtype: one kept per calling
// thread up to a size, larger ones held by `holder` for the call.
void* packed_workspace(int64_t elems, const at::TensorOptions& options, at::Tensor& holder);
// Transparent huge pages for a large fresh buffer (from 4 MiB): a hint, see workspace.cpp.
void advise_huge_pages(const at::Tensor& t);

}  // namespace fusedattn::cpu
