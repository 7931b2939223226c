#include "fusedattn/kernels/blas.h"

#include <algorithm>
#include <cstring>
#include <vector>

extern "C" {
// Fortran BLAS, exported by libtorch_cpu (weak: absent on a build without BLAS).
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's CBLAS mixed-precision GEMMs (layout 101 = row major, 111/112 = no/transpose).
void cblas_gemm_bf16bf16f32(int layout, int ta, int tb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int ta, int tb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc) __attribute__((weak));
}

namespace fusedattn::kernels {
namespace {

template <typename T>
void gemm_loop(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        acc += (ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
      }
      c[i * ldc + j] = alpha * acc + (beta == T(0) ? T(0) : beta * c[i * ldc + j]);
    }
  }
}

// BLAS rejects (and then skips: C keeps its old values) a leading dimension below the stored
// row length, even for a single row, whose ld is never used to step. Stored shapes: A is
// (ta ? k x m : m x k), B is (tb ? n x k : k x n), C is m x n. legal_ld() repairs the
// single-row case; blas_can() says whether the rest is acceptable (else: the loop, which takes
// any strides, e.g. 0 for an expanded gradient; the CPU op copies such inputs first).
int64_t legal_ld(int64_t rows, int64_t cols, int64_t ld) {
  return rows <= 1 ? std::max<int64_t>(ld, std::max<int64_t>(cols, 1)) : ld;
}
struct Lds {
  int64_t a, b, c;
  bool ok;
};
Lds blas_lds(bool ta, bool tb, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
             int64_t ldc) {
  const int64_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
  Lds l{legal_ld(ar, ac, lda), legal_ld(br, bc, ldb), legal_ld(m, n, ldc), true};
  constexpr int64_t kMaxInt = 2147483647;
  l.ok = l.a >= std::max<int64_t>(ac, 1) && l.b >= std::max<int64_t>(bc, 1) &&
         l.c >= std::max<int64_t>(n, 1) && std::max({m, n, k, l.a, l.b, l.c}) <= kMaxInt;
  return l;
}

}  // namespace

namespace {
template <typename T>
using FortranGemm = void(const char*, const char*, const int*, const int*, const int*, const T*,
                         const T*, const int*, const T*, const int*, const T*, T*, const int*);

// Row-major C (m x n) = column-major C^T (n x m) = op(B)^T op(A)^T: swap the operands.
// `blas` is null when LibTorch carries no BLAS (weak symbol): then the loop.
template <typename T>
void fortran_gemm(FortranGemm<T>* blas, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                  T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                  int64_t ldc) {
  if (m == 0 || n == 0) return;
  const Lds l = blas_lds(ta, tb, m, n, k, lda, ldb, ldc);
  if (!blas || k == 0 || !l.ok) return gemm_loop(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = int(m), in = int(n), ik = int(k), ilda = int(l.a), ildb = int(l.b), ildc = int(l.c);
  blas(&cb, &ca, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
}
}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  fortran_gemm<float>(sgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  fortran_gemm<double>(dgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

namespace {
float half_to_float(Half16 kind, uint16_t x) {
  if (kind == Half16::BFloat16) {
    const uint32_t u = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  _Float16 h;
  std::memcpy(&h, &x, 2);
  return float(h);
}
// op(X) of a row-major rows x cols matrix (row stride ld) as a dense fp32 rows x cols copy.
std::vector<float> widen(Half16 kind, const uint16_t* x, int64_t rows, int64_t cols, int64_t ld) {
  std::vector<float> out(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = half_to_float(kind, x[r * ld + c]);
  return out;
}
}  // namespace

void gemm(Half16 kind, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
          const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  if (m == 0 || n == 0) return;
  auto* native = kind == Half16::BFloat16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  const Lds l = blas_lds(ta, tb, m, n, k, lda, ldb, ldc);
  if (native && k > 0 && l.ok) {
    return native(101, ta ? 112 : 111, tb ? 112 : 111, int(m), int(n), int(k), alpha, a,
                  int(l.a), b, int(l.b), beta, c, int(l.c));
  }
  // Stored shapes: A is (ta ? k x m : m x k), B is (tb ? n x k : k x n).
  auto wa = widen(kind, a, ta ? k : m, ta ? m : k, lda);
  auto wb = widen(kind, b, tb ? n : k, tb ? k : n, ldb);
  gemm(ta, tb, m, n, k, alpha, wa.data(), ta ? m : k, wb.data(), tb ? k : n, beta, c, ldc);
}

const char* gemm_backend() { return sgemm_ ? "blas" : "loop"; }

}  // namespace fusedattn::kernels
