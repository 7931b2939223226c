// The CPU kernels' GEMM hooks on LibTorch (see gemm_hooks.h).
#include "fusedattn/backends/cpu/gemm_hooks.h"

#include "fusedattn/backends/cpu/config.h"

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

extern "C" {
// Fortran BLAS and MKL's CBLAS mixed-precision GEMMs, exported by libtorch_cpu where it carries
// them (weak: absent on a build without BLAS; then torch's matmul serves).
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// layout 101 = row major, 111/112 = no/transpose
void cblas_gemm_bf16bf16f32(int layout, int ta, int tb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
// MKL's per-thread thread count, by value (0 clears it; mkl_set_num_threads_local is the
// Fortran entry, by pointer); returns the previous per-thread setting.
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int ta, int tb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc) __attribute__((weak));
}

namespace fusedattn::cpu {
namespace {

using at::native::TransposeType;

// BLAS rejects (and then skips: C keeps its old values) a leading dimension below the stored
// row length, even for a single row, whose ld is never used to step. Stored shapes: A is
// (ta ? k x m : m x k), B is (tb ? n x k : k x n), C is m x n. legal_ld() repairs the
// single-row case; ok says whether the rest is acceptable to BLAS (else cpublas's GEMM, which
// takes any strides, e.g. 0 for an expanded gradient; the CPU op copies such inputs first).
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
  l.ok = k > 0 && l.a >= std::max<int64_t>(ac, 1) && l.b >= std::max<int64_t>(bc, 1) &&
         l.c >= std::max<int64_t>(n, 1) && std::max({m, n, k, l.a, l.b, l.c}) <= kMaxInt;
  return l;
}

template <typename T>
using FortranGemm = void(const char*, const char*, const int*, const int*, const int*, const T*,
                         const T*, const int*, const T*, const int*, const T*, T*, const int*);

// Without BLAS (or for what BLAS refuses): torch's own matmul on views of the blocks.
template <typename T>
void torch_mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
              const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* x, int64_t rows, int64_t cols, int64_t ld, bool t) {
    auto v = at::from_blob(const_cast<T*>(x), {rows, cols}, {ld, 1}, opts);
    return t ? v.t() : v;
  };
  auto cm = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  const auto am = view(a, ta ? k : m, ta ? m : k, lda, ta);
  const auto bm = view(b, tb ? n : k, tb ? k : n, ldb, tb);
  cm.addmm_(am, bm, beta, alpha);  // beta == 0: C's old values (even NaN) are ignored
}

// Row-major C (m x n) = column-major C^T (n x m) = op(B)^T op(A)^T: swap the operands.
template <typename T>
void row_major_gemm(FortranGemm<T>* blas, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                    T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                    int64_t ldc) {
  if (m == 0 || n == 0) return;
  const Lds l = blas_lds(ta, tb, m, n, k, lda, ldb, ldc);
  if (blas && l.ok) {
    const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    const int im = int(m), in = int(n), ik = int(k), ilda = int(l.a), ildb = int(l.b), ildc = int(l.c);
    return blas(&cb, &ca, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  }
  torch_mm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm_f32(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
              int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  row_major_gemm<float>(sgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void gemm_f64(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
              int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  row_major_gemm<double>(dgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// op(X) of a row-major rows x cols matrix of 16-bit floats (row stride ld) as dense fp32.
std::vector<float> widen(bool bf16, const uint16_t* x, int64_t rows, int64_t cols, int64_t ld) {
  std::vector<float> out(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const uint16_t v = x[r * ld + c];
      out[r * cols + c] = bf16 ? static_cast<float>(c10::BFloat16(v, c10::BFloat16::from_bits()))
                               : static_cast<float>(c10::Half(v, c10::Half::from_bits()));
    }
  }
  return out;
}
// Half types: MKL's mixed-precision GEMM where exported, else both operands widened to fp32
// for gemm_f32.
void gemm_half(bool bf16, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
               const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta,
               float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  auto* native = bf16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  const Lds l = blas_lds(ta, tb, m, n, k, lda, ldb, ldc);
  if (native && l.ok) {
    return native(101, ta ? 112 : 111, tb ? 112 : 111, int(m), int(n), int(k), alpha, a,
                  int(l.a), b, int(l.b), beta, c, int(l.c));
  }
  auto wa = widen(bf16, a, ta ? k : m, ta ? m : k, lda);
  auto wb = widen(bf16, b, tb ? n : k, tb ? k : n, ldb);
  gemm_f32(ta, tb, m, n, k, alpha, wa.data(), ta ? m : k, wb.data(), tb ? k : n, beta, c, ldc);
}

// oneDNN packs B in panels whose row length is 16, 32, 48 or 64 (any other is refused): a
// k x n matrix becomes panels of 64 columns (the last rounded up to 16), panel c at offset
// k * c, and the product loops over them.
int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }
template <typename T>
kernels::PackedGemm cpublas_packed_gemm() {
  kernels::PackedGemm g;
  g.pack = [](int64_t k, int64_t n, int64_t ld_in, const void* in, void* out) {
    constexpr auto dt = c10::CppTypeToScalarType<T>::value;
    for (int64_t c = 0; c < n; c += 64) {
      const int64_t w = std::min<int64_t>(64, n - c);
      at::native::cpublas::pack(k, w, ld_in, round16(w), dt, dt, static_cast<const T*>(in) + c,
                                static_cast<T*>(out) + k * c);
    }
  };
  g.gemm = [](int64_t m, int64_t n, int64_t k, int64_t kb, int64_t lda, int64_t ldc,
              bool add_c, const void* a, const void* b, float* c) {
    for (int64_t p = 0; p < n; p += 64) {
      const int64_t w = std::min<int64_t>(64, n - p);
      at::native::cpublas::brgemm(m, w, k, lda, round16(w), ldc, add_c, static_cast<const T*>(a),
                                  static_cast<const T*>(b) + kb * p, c + p, /*is_vnni=*/true);
    }
  };
  g.release = [] { at::native::cpublas::brgemm_release(/*is_vnni=*/true); };
  return g;
}

// The same layout in plain C++, fp32 sums of exact products (a different order than oneDNN's,
// nothing else): lets the paths written for AMX run, and be tested, on a CPU without it.
// Element (r, j) of panel c (w = min(64, n - c) columns) lies at k * c + (r / 2) * 2 * round16(w)
// + 2 j + r % 2; the columns w .. round16(w) of a panel are zero.
template <typename T>
kernels::PackedGemm reference_packed_gemm() {
  kernels::PackedGemm g;
  g.pack = [](int64_t k, int64_t n, int64_t ld_in, const void* in, void* out) {
    const T* x = static_cast<const T*>(in);
    T* y = static_cast<T*>(out);
    for (int64_t c = 0; c < n; c += 64) {
      const int64_t w = std::min<int64_t>(64, n - c), ldb = round16(w);
      T* panel = y + k * c;
      for (int64_t r = 0; r < k; ++r)
        for (int64_t j = 0; j < ldb; ++j)
          panel[(r / 2) * 2 * ldb + 2 * j + r % 2] = j < w ? x[r * ld_in + c + j] : T(0);
    }
  };
  g.gemm = [](int64_t m, int64_t n, int64_t k, int64_t kb, int64_t lda, int64_t ldc,
              bool add_c, const void* a, const void* b, float* c) {
    const T* x = static_cast<const T*>(a);
    std::vector<float> row(64);
    for (int64_t p = 0; p < n; p += 64) {
      const int64_t w = std::min<int64_t>(64, n - p), ldb = round16(w);
      const T* panel = static_cast<const T*>(b) + kb * p;
      for (int64_t i = 0; i < m; ++i) {
        std::fill(row.begin(), row.end(), 0.f);
        for (int64_t r = 0; r < k; r += 2) {
          const float a0 = float(x[i * lda + r]), a1 = r + 1 < k ? float(x[i * lda + r + 1]) : 0.f;
          const T* pair = panel + (r / 2) * 2 * ldb;
          for (int64_t j = 0; j < w; ++j) row[j] += a0 * float(pair[2 * j]) + a1 * float(pair[2 * j + 1]);
        }
        float* ci = c + i * ldc + p;
        for (int64_t j = 0; j < w; ++j) ci[j] = add_c ? ci[j] + row[j] : row[j];
      }
    }
  };
  g.release = [] {};
  g.portable = true;
  return g;
}

}  // namespace

const kernels::Gemms& torch_gemms() {
  static const kernels::Gemms g{&gemm_f32, &gemm_f64, &gemm_half};
  return g;
}

const kernels::PackedGemm* packed_gemm_offer(at::ScalarType t, bool unpacked) {
  if (unpacked) return nullptr;
  if (kernel_switches().portable_packed_gemm) {
    static const kernels::PackedGemm bf16 = reference_packed_gemm<at::BFloat16>();
    static const kernels::PackedGemm fp16 = reference_packed_gemm<at::Half>();
    return t == at::kBFloat16 ? &bf16 : t == at::kHalf ? &fp16 : nullptr;
  }
  static const bool bf16_ok = at::native::cpublas::could_pack(at::kBFloat16);
  static const bool fp16_ok = at::native::cpublas::could_pack(at::kHalf);
  static const kernels::PackedGemm bf16 = cpublas_packed_gemm<at::BFloat16>();
  static const kernels::PackedGemm fp16 = cpublas_packed_gemm<at::Half>();
  if (t == at::kBFloat16 && bf16_ok) return &bf16;
  if (t == at::kHalf && fp16_ok) return &fp16;
  return nullptr;
}

// cpublas::brgemm runs oneDNN's JIT kernels where the CPU and the build allow and LibTorch's
// gemm otherwise: correct either way. A single row's (or single-depth row's) stride is never
// stepped over, but oneDNN checks it: raised to the row length there.
kernels::FloatGemm float_gemm_offer(bool unpacked) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (unpacked) return nullptr;
  return [](int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
            const float* a, const float* b, float* c) {
    at::native::cpublas::brgemm(m, n, k, m == 1 ? std::max(lda, k) : lda,
                                k == 1 ? std::max(ldb, n) : ldb, ldc, add_c, a, b, c,
                                /*is_vnni=*/false);
  };
#else
  (void)unpacked;
  return nullptr;
#endif
}

void offer_gemms(kernels::FlashParams& p, at::ScalarType dtype) {
  const bool unpacked = kernel_switches().unpacked;
  const bool rounded = p.bf16_products && dtype == at::kFloat;
  p.packed = packed_gemm_offer(rounded ? at::kBFloat16 : dtype, unpacked);
  p.fgemm = float_gemm_offer(unpacked);
}

bool fp32_matmul_allows_bf16() {
  return at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL) ==
         at::Float32Precision::BF16;
}

const char* gemm_backend() { return sgemm_ ? "blas" : "torch.mm"; }

BlasOnThisThread::BlasOnThisThread() {
  if (MKL_Set_Num_Threads_Local) previous_ = MKL_Set_Num_Threads_Local(1);
}
BlasOnThisThread::~BlasOnThisThread() {
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
}

}  // namespace fusedattn::cpu
