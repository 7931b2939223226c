#pragma once
// Fused (flash-style) attention on the CPU: tiled online softmax over blocks of queries and
// keys, never holding an L x S score matrix. Free of torch types: the launcher in
// cpu/attention_cpu.cpp fills FlashParams from tensors and runs the tasks in parallel.
//
// Layout: every tensor is seen as (B, H, rows, cols) with B the flattened batch dims; q, k,
// v, out and grad_out have a contiguous last dim and arbitrary (b, h, row) strides, masks
// arbitrary strides (0 where they broadcast); the gradients arbitrary (b, h, row) strides;
// lse and weights are contiguous.
#include <cstdint>

#include "fusedattn/kernels/dropout.h"
#include "fusedattn/kernels/types.h"

namespace fusedattn::kernels {

// Optional bf16/fp16 block products whose B operand is packed once per call into the layout of
// the CPU's matrix unit (AMX: pairs of rows interleaved), supplied by the caller's BLAS
// (LibTorch's cpublas::pack / brgemm). MKL's gemm_bf16bf16f32 packs B on every call instead:
// 13% of a bf16 forward (perf).
struct PackedGemm {
  // out (k x n, packed; at most k * round_up(n, 64) elements) from the row-major k x n matrix
  // `in` with row stride ld_in; k even.
  void (*pack)(int64_t k, int64_t n, int64_t ld_in, const void* in, void* out) = nullptr;
  // C (m x n, row stride ldc) = A B (+ C if add_c): A row-major m x k (row stride lda), B
  // the first k rows and n columns of a matrix that `pack` packed with depth kb >= k (its
  // 64-column panels lie kb * 64 elements apart); k and kb even.
  void (*gemm)(int64_t m, int64_t n, int64_t k, int64_t kb, int64_t lda, int64_t ldc,
               bool add_c, const void* a, const void* b, float* c) = nullptr;
  void (*release)() = nullptr;  // end of a thread's run of gemm calls (AMX tile state)
};

// fp32 block products on the caller's JIT GEMM (LibTorch's cpublas::brgemm: oneDNN's AVX-512
// kernels, 12-18% faster than MKL's sgemm at a 64 x 512 x 64 block on one core, measured):
// C (m x n, row stride ldc) = A B (+ C if add_c), A row-major m x k (row stride lda), B
// row-major k x n (row stride ldb); no transposes, so K^T is formed once per call.
using FloatGemm = void (*)(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                           int64_t ldc, bool add_c, const float* a, const float* b, float* c);

struct FlashParams : ProblemParams {  // out: written by the forward, read by the backward
  double scale = 1.0;
  void* lse = nullptr;      // (B, H, L) contiguous, float (double for Double)

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
  // Forward with packed K^T and V blocks (half types, E even): set `packed` and a workspace of
  // flash_packed_elems(p) elements of the input type, run the flash_pack_cpu tasks, then the
  // forward tasks. Null: the forward multiplies the inputs in place through blas.h. A bf16
  // backward given `packed` (no workspace) runs its products on it, keys as rows.
  const PackedGemm* packed = nullptr;
  void* packed_ws = nullptr;
  // fp32 forward on `fgemm`: set it and a workspace of flash_packed_elems(p) floats, run the
  // flash_pack_cpu tasks (K^T per key block), then the forward tasks.
  FloatGemm fgemm = nullptr;
};

// Forward: one task per (b, h, block of queries), or per (b, block of queries) looping over
// the heads when average_weights; writes out, lse and (if set) weights.
int64_t flash_forward_tasks(const FlashParams& p);
void flash_forward_cpu(const FlashParams& p, int64_t task_begin, int64_t task_end);
// Packing for the forward: one task per (b, key/value head, block of keys).
int64_t flash_pack_tasks(const FlashParams& p);
int64_t flash_packed_elems(const FlashParams& p);
void flash_pack_cpu(const FlashParams& p, int64_t task_begin, int64_t task_end);
// Backward: one task per (b, key/value head), looping over the heads that share it, so dk
// and dv are summed without atomics; dq, dk, dv are fully written.
int64_t flash_backward_tasks(const FlashParams& p);
void flash_backward_cpu(const FlashParams& p, int64_t task_begin, int64_t task_end);

}  // namespace fusedattn::kernels
