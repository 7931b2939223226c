#pragma once
// The one place that plans a CPU call: from the parameters and the tier in use it picks the
// path (FlashParams::forward_path / backward_path), keeps or clears the GEMM offers, sizes
// the workspace and the task counts, and hands out that tier's entry points. Every threshold
// and eligibility rule of the CPU kernels is in plan.cpp.
#include <cstdint>
#include <vector>

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
// Whether a half-type backward should run as fp32's on widened copies (the caller widens Q,
// K, V, O, dO and a floating key padding mask once, plans the fp32 call and narrows the
// gradients): where half types take fp32 products anyway and the fp32 keys-as-rows backward
// applies. bf16 without AMX (AMD EPYC, avx512_bf16, B=4, H=12 over 3 kv heads, L=1024,
// causal): fwd+bwd 154 -> 85 ms, the copies included (fp32 at the same shape: 94 ms).
bool backward_widened(const FlashParams& p);

struct DecodePlan {
  DecodeParams p;  // the caller's, with the split and half_on_f32 set
  const KernelTable* kernels = nullptr;
  int64_t append_tasks = 0, tasks = 0, merge_tasks = 0;
  int64_t partial_elems = 0;  // accumulate-type elements for p.partial (0: no split)
};
// max_len: the longest lengths[b] of the call (what the split divides).
DecodePlan plan_decode(const DecodeParams& p, int64_t max_len);

// Packed variable-length sequences (FlashAttention's varlen layout) in one call: sequence s
// is rows [cu_q[s], cu_q[s + 1]) of the packed q, out, dout, dq and [cu_k[s], cu_k[s + 1])
// of k, v, dk, dv. The packed call's FlashParams describe the whole packed tensors as B = 1
// (rows = the packed lengths, lse (H, total_q) with lse_sh = total_q, alibi's al_sb stepping
// per sequence, d_rel_bias (batch, H, 2 D + 1)); each sequence runs as its own B = 1 call on
// views of them, planned on its own (its path, its GEMM offers, its share of the workspace),
// and its tasks are work items of one parallel run.
struct VarlenParams {
  const int64_t* cu_q = nullptr;  // (batch + 1,) offsets, checked by the caller
  const int64_t* cu_k = nullptr;
  int64_t batch = 0;
  bool bottom_right = false;  // the causal / window diagonal per sequence: S_s - L_s
};

// A contiguous range of one sequence's tasks.
struct VarlenItem { int64_t seq, begin, end, cost; };  // cost: scores computed, about

struct VarlenPlan {
  std::vector<Plan> seqs;  // per sequence: its view of the packed call, planned
  std::vector<int64_t> packed_offset;  // per sequence: its workspace's first element
  int64_t packed_elems = 0;            // the whole workspace, elements of the input type
  // Pack items run first (forward), then items: largest first, for whichever thread is free
  // (sequences of 32 to 1024 keys differ 1000x in cost; static halves would leave a thread idle).
  std::vector<VarlenItem> pack_items, items;
};
VarlenPlan plan_varlen_forward(const FlashParams& packed, const VarlenParams& v, int64_t threads);
VarlenPlan plan_varlen_backward(const FlashParams& packed, const VarlenParams& v);
// The sequences' workspaces inside ws (packed_elems elements of the input type).
void set_varlen_workspace(VarlenPlan& plan, void* ws);

}  // namespace fusedattn::kernels::cpu
