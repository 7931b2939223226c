#pragma once
// The CPU kernels' parameters (torch-free): backends/cpu/attention_cpu.cpp fills FlashParams from
// tensors and the GEMM hooks it has, plan.cpp decides the path and the tier once per call
// (FlashParams::path), and the tier's kernels run the tasks.
//
// Layout: every tensor is seen as (B, H, rows, cols) with B the flattened batch dims; q, k,
// v, out and grad_out have a contiguous last dim and arbitrary (b, h, row) strides, masks
// arbitrary strides (0 where they broadcast); the gradients arbitrary (b, h, row) strides;
// lse and weights are contiguous.
#include <cstdint>

#include "fusedattn/kernels/cpu/gemm.h"
#include "fusedattn/kernels/common/types.h"

namespace fusedattn::kernels {

// Which loops run a call; chosen by plan.cpp alone.
enum class ForwardPath : uint8_t {
  QueryRows,        // blocks of 64 queries x 512 keys, online softmax along the rows
  KeysAsRows,       // bf16 on packed (AMX) GEMMs: S^T = K Q^T, softmax down the columns
  Weights,          // the weights returned: scores against every key in the weights' rows
  AveragedWeights,  // the same, summed over the heads into a (B, L, S) mean
};
enum class BackwardPath : uint8_t {
  QueryRows,   // dK, dV per key block against blocks of 64 queries, on Gemms
  KeysAsRows,  // keys as the GEMMs' rows: bf16 on packed GEMMs, fp32 on the JIT GEMM
};

struct FlashParams : ProblemParams {  // out: written by the forward, read by the backward
  double scale = 1.0;
  void* lse = nullptr;      // (B, H, L) contiguous, float (double for Double)
  // lse's (and dlse's) stride between heads, in elements; 0: L. Packed sequences set it to
  // the packed length: their lse is (H, total_q) and each sequence's rows a column range.
  int64_t lse_sh = 0;

  // (B, H, L, S) contiguous, query's dtype, or null: set, the forward also writes the
  // weights (the probabilities before dropout), in the same pass. average_weights: weights is
  // (B, L, S), their mean over the H heads (nn.MultiheadAttention's default), summed in fp32
  // (fp64 for fp64) and rounded once; the per-head rows are never stored.
  void* weights = nullptr;
  bool average_weights = false;

  // Backward inputs and outputs.
  const void* dout = nullptr;  // (B, H, L, Ev)
  int64_t do_sb = 0, do_sh = 0, do_sr = 0;
  const void* dlse = nullptr;  // (B, H, L) contiguous, lse's type, or null
  // Gradients, written whole: (B, H, L, E), (B, Hk, S, E), (B, Hk, S, Ev), contiguous last
  // dim, (b, h, row) strides as given (rows of different (b, h) must not overlap).
  void* dq = nullptr;
  int64_t dq_sb = 0, dq_sh = 0, dq_sr = 0;
  void* dk = nullptr;
  int64_t dk_sb = 0, dk_sh = 0, dk_sr = 0;
  void* dv = nullptr;
  int64_t dv_sb = 0, dv_sh = 0, dv_sr = 0;
  // With rel_bias: its gradient per batch, (B, H, 2 rel_max + 1) contiguous in the accumulate
  // type, zeroed by the caller; each (b, hk) task adds its heads' rows (no two tasks share
  // one), the caller sums over b.
  void* d_rel_bias = nullptr;

  // GEMM back-ends. gemm is required; packed and fgemm are offers (null: none): the plan
  // keeps them where they pay and clears them elsewhere.
  const Gemms* gemm = nullptr;
  // bf16/fp16 forwards (and the bf16 keys-as-rows backward) on packed operands: the K^T and
  // V blocks packed into packed_ws by the pack tasks, then the forward tasks.
  const PackedGemm* packed = nullptr;
  // fp32 on the JIT GEMM: the forward's K^T per key block in packed_ws (pack tasks); the
  // keys-as-rows backward's products.
  FloatGemm fgemm = nullptr;
  void* packed_ws = nullptr;  // packed_elems elements of the input type (see plan.h)

  ForwardPath forward_path = ForwardPath::QueryRows;      // set by plan_forward
  BackwardPath backward_path = BackwardPath::QueryRows;   // set by plan_backward
  // bf16/fp16 query-rows forward and backward on fp32 GEMMs (p.gemm->f32): Q, K, V (and dO)
  // widened once, P (and dS) kept in fp32. Set by the plans.
  bool half_on_f32 = false;
  // fp32 on bf16 products (torch's fp32 matmul precision set to bf16, which the caller reads):
  // Q, K, V (and dO) and P (and dS) rounded to bf16 for the products, every sum, the softmax,
  // lse and the outputs in fp32. The caller offers the bf16 packed GEMM in p.packed; the plans
  // keep the flag only where they take it (the forward's query rows on packed operands, the
  // query-rows backward on p.gemm->half) and clear it elsewhere.
  bool bf16_products = false;
  // bf16/fp16 inputs with out in fp32 (the op's fp32_out): the forward stores O unrounded and
  // the backward's D = rowsum(dO * O) reads it, where O rounded to the dtype makes dP - D a
  // cancellation at peaked rows. out's strides count floats then.
  bool out_f32 = false;
};

// Decoding over a KV cache (decode.cpp): T = L new queries per sequence against the first
// lengths[b] positions of a preallocated cache. k, v point at the cache, (B, Hk, S, E|Ev)
// with S its capacity, elements of `storage`; kn, vn (when set) are the T new keys and values,
// (B, Hk, T, E|Ev) in the queries' type, which the append tasks store (rounded or quantized
// to the storage) at positions [lengths[b] - T, lengths[b]) first. Causal (the
// MaskParams' flag): query t sees positions <= lengths[b] - T + t. The key padding mask
// covers positions [0, kpm_len) only (later ones are not padding). The other MaskParams
// (attn_mask, windows, biases) are not used. lse is (B, H, T) contiguous or null.
// How the cache stores its keys and values: in the queries' type (Model), or in fewer bytes,
// dequantized into fp32 per key block inside the kernel (the products then run in fp32):
// bf16 or fp16 rounded from the model's values, or int8 with one fp32 scale per (b, hk,
// position) for keys and one for values: x ~ q * scale, scale = max |x| / 127 over the row (0
// for a zero row, NaN for a row holding a NaN or inf, so that the row reads back as NaN).
enum class CacheStorage : uint8_t { Model, BFloat16, Half, Int8 };

struct DecodeParams : FlashParams {
  CacheStorage storage = CacheStorage::Model;
  // Int8: the scales, float, (B, Hk, S) through these strides (position stride ks_sr).
  float* k_scale = nullptr;
  float* v_scale = nullptr;
  int64_t ks_sb = 0, ks_sh = 0, ks_sr = 0;
  int64_t vs_sb = 0, vs_sh = 0, vs_sr = 0;
  const int64_t* lengths = nullptr;  // (B,) positions valid after the append, <= S
  const void* kn = nullptr;
  int64_t kn_sb = 0, kn_sh = 0, kn_sr = 0;
  const void* vn = nullptr;
  int64_t vn_sb = 0, vn_sh = 0, vn_sr = 0;
  int64_t kpm_len = 0;
  int64_t threads = 1;  // the caller's thread count, which the split is sized for
  // Flash-decoding: each (b, hk) splits its keys into `splits` ranges of split_keys (a
  // multiple of the key block), one task each; with splits > 1 the tasks write their
  // partial softmax state into `partial` and the merge tasks combine them. Set by the plan.
  int64_t splits = 1, split_keys = 0;
  void* partial = nullptr;  // (B, H, T, splits) x (2 + Ev) accumulate-type values
};

}  // namespace fusedattn::kernels
