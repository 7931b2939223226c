#pragma once
// The GEMM back-ends the CPU kernels multiply their blocks with, as hooks the caller fills
// (backends/cpu/gemm_hooks.cpp, from LibTorch: its BLAS and at::native::cpublas). The kernels hold no
// GEMM of their own. All row-major.
#include <cstdint>

namespace fusedattn::kernels {

// C = alpha op(A) op(B) + beta C; op(X) = X^T where t* is set. Stored shapes: A is
// (ta ? k x m : m x k), B is (tb ? n x k : k x n), C is m x n; any leading dimensions.
// Half types come as raw 16-bit storage (bf16 or fp16 by `bf16`), accumulated in fp32.
struct Gemms {
  void (*f32)(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
              int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) = nullptr;
  void (*f64)(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
              int64_t lda, const double* b, int64_t ldb, double beta, double* c,
              int64_t ldc) = nullptr;
  void (*half)(bool bf16, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
               const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta,
               float* c, int64_t ldc) = nullptr;
};

// bf16/fp16 block products whose B operand is packed once per call into the layout of the
// CPU's matrix unit (AMX: pairs of rows interleaved; LibTorch's cpublas::pack / brgemm).
// MKL's gemm_bf16bf16f32 packs B on every call instead: 13% of a bf16 forward (perf).
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
  // A portable implementation (no matrix unit): the plan keeps it at every tier whose kernels
  // use packed products, not only where the CPU has AMX. For tests; slow.
  bool portable = false;
};

// fp32 block products on a JIT GEMM (LibTorch's cpublas::brgemm: oneDNN's AVX-512 kernels,
// 12-18% faster than MKL's sgemm at a 64 x 512 x 64 block on one core, measured on a Xeon
// with AMX): C (m x n, row stride ldc) = A B (+ C if add_c), A row-major m x k (row stride
// lda), B row-major k x n (row stride ldb); no transposes, so K^T is formed once per call.
using FloatGemm = void (*)(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                           int64_t ldc, bool add_c, const float* a, const float* b, float* c);

}  // namespace fusedattn::kernels
