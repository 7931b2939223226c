#pragma once
// The one place that plans a CPU call: from the parameters and the tier in use it picks the
// path (FlashParams::forward_path / backward_path), keeps or clears the GEMM offers, sizes
// the workspace and the task counts, and hands out that tier's entry points. Every threshold
// and eligibility rule of the CPU kernels is in plan.cpp.
#include <cstdint>

#include "fusedattn/kernels/cpu/capability.h"
#include "fusedattn/kernels/cpu/params.h"

namespace fusedattn::kernels::cpu {

// A tier's entry points (tier_table.cpp, compiled once per tier). Each runs tasks
// [begin, end) of its kind; tasks of one kind are independent (the caller runs them in
// parallel).
struct KernelTable {
  void (*pack)(const FlashParams& p, int64_t begin, int64_t end);
  void (*forward)(const FlashParams& p, int64_t begin, int64_t end);
  void (*backward)(const FlashParams& p, int64_t begin, int64_t end);
};

struct Plan {
  FlashParams p;            // the caller's, with the path set and the unused offers cleared
  const KernelTable* kernels = nullptr;
  Capability tier = Capability::Scalar;
  int64_t pack_tasks = 0;    // run kernels->pack over these first (forward only)
  int64_t packed_elems = 0;  // workspace for them, elements of the input type (0: none)
  int64_t tasks = 0;         // then kernels->forward or kernels->backward over these
};

Plan plan_forward(const FlashParams& p);
Plan plan_backward(const FlashParams& p);

}  // namespace fusedattn::kernels::cpu
