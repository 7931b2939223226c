#pragma once
// Row-major GEMM, C = alpha * op(A) * op(B) + beta * C, on the BLAS that LibTorch carries
// (its sgemm_/dgemm_, MKL in the PyPI wheels), with a plain loop where none is exported.
#include <cstdint>

namespace fusedattn::kernels {

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc);
// C (fp32) = alpha * op(A) * op(B) + beta * C with A, B in bfloat16 or float16 (raw 16-bit
// storage): MKL's gemm_bf16bf16f32 / gemm_f16f16f32 (AMX or AVX-512 where the CPU has
// them), else both operands converted to fp32 for gemm above.
enum class Half16 : uint8_t { BFloat16, Float16 };
void gemm(Half16 kind, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
          int64_t ldc);

// Which one serves: "blas" or "loop" (for the benchmark's record).
const char* gemm_backend();

}  // namespace fusedattn::kernels
