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
  // Decoding over a KV cache: append tasks (B * Hk) when kn is set, then decode tasks
  // (B * Hk * splits), then merge tasks (B * H) when splits > 1.
  void (*decode_append)(const DecodeParams& p, int64_t begin, int64_t end);
  void (*decode)(const DecodeParams& p, int64_t begin, int64_t end);
  void (*decode_merge)(const DecodeParams& p, int64_t begin, int64_t end);
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

struct DecodePlan {
  DecodeParams p;  // the caller's, with the split and half_on_f32 set
  const KernelTable* kernels = nullptr;
  int64_t append_tasks = 0, tasks = 0, merge_tasks = 0;
  int64_t partial_elems = 0;  // accumulate-type elements for p.partial (0: no split)
};
// max_len: the longest lengths[b] of the call (what the split divides).
DecodePlan plan_decode(const DecodeParams& p, int64_t max_len);

}  // namespace fusedattn::kernels::cpu
