#pragma once
// Row operations of the softmax and of the output stores: max, exp, sums, scaling, rounding
// to the half types, and the stores of outputs that are not read back. Each picks its tier's
// vocabulary at compile time (vec_avx512.h, vec_avx2.h, else vec.h's portable vectors); fp64
// rows are plain loops with libm (correctness over speed).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "fusedattn/kernels/cpu/vec.h"
#include "fusedattn/kernels/cpu/vec_avx2.h"
#include "fusedattn/kernels/cpu/vec_avx512.h"

FUSEDATTN_TIER_NS_BEGIN

// The row's max; NaN if any element is NaN (so that a NaN score reaches the output).
inline float row_max(const float* x, int64_t n) {
#ifdef FUSEDATTN_AVX512
  return row_max_zmm(x, n);
#elif defined(FUSEDATTN_AVX2)
  return row_max_ymm(x, n);
#endif
  vf m = vsplat(kNegInfF);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) m = vmax_nan(m, vload(x + i));
  float r = hmax(m);
  for (; i < n; ++i) r = max_nan(r, x[i]);
  return r;
}
inline double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = max_nan(m, x[i]);
  return m;
}

// x = exp(x * mul - sub); returns the row's sum. kShort: for probabilities that are rounded
// to a half type next (vexp2's degree-3 form).
template <bool kShort = false>
inline float exp_sum_row(float* x, int64_t n, float mul, float sub) {
#ifdef FUSEDATTN_AVX512
  return exp_row_zmm<kShort, true>(x, n, mul, sub, [x](int64_t i, __mmask16 lanes, __m512 e) {
    _mm512_mask_storeu_ps(x + i, lanes, e);
  });
#elif defined(FUSEDATTN_AVX2)
  return exp_row_ymm<kShort, true>(x, n, mul, sub, [x](int64_t i, __m256i lanes, __m256 e) {
    _mm256_maskstore_ps(x + i, lanes, e);
  });
#else
  vf acc{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf e = vexp(vload(x + i) * mul - sub);
    vstore(x + i, e);
    acc += e;
  }
  float s = hsum(acc);
  for (; i < n; ++i) s += (x[i] = exp_approx(x[i] * mul - sub));
  return s;
#endif
}
inline float exp_sum_row_short(float* x, int64_t n, float mul, float sub) {
  return exp_sum_row<true>(x, n, mul, sub);
}
// x = exp(x * mul - sub), no sum (probabilities from a known lse).
inline void exp_rows(float* x, int64_t n, float mul, float sub) {
#ifdef FUSEDATTN_AVX512
  exp_row_zmm<false, false>(x, n, mul, sub, [x](int64_t i, __mmask16 lanes, __m512 e) {
    _mm512_mask_storeu_ps(x + i, lanes, e);
  });
#elif defined(FUSEDATTN_AVX2)
  exp_row_ymm<false, false>(x, n, mul, sub, [x](int64_t i, __m256i lanes, __m256 e) {
    _mm256_maskstore_ps(x + i, lanes, e);
  });
#else
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) vstore(x + i, vexp(vload(x + i) * mul - sub));
  for (; i < n; ++i) x[i] = exp_approx(x[i] * mul - sub);
#endif
}
// y = bf16(exp(x * mul - sub)), x untouched; returns the sum of the fp32 values.
inline float exp_sum_bf16_row(const float* x, bf16* y, int64_t n, float mul, float sub) {
#ifdef FUSEDATTN_AVX512_BF16
  return exp_row_zmm<true, true>(x, n, mul, sub, [y](int64_t i, __mmask16 lanes, __m512 e) {
    _mm256_mask_storeu_epi16(y + i, lanes, to_bf16_zmm(e));
  });
#elif defined(FUSEDATTN_AVX2)
  return exp_row_ymm<true, true>(x, n, mul, sub, [y, n](int64_t i, __m256i, __m256 e) {
    const __m128i b = to_bf16_ymm(e);
    if (i + 8 <= n) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), b);
    } else {
      alignas(16) uint16_t w[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(w), b);
      for (int64_t c = 0; c < n - i; ++c) y[i + c].x = w[c];
    }
  });
#else
  vf acc{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf e = vexp2<true>((vload(x + i) * mul - sub) * kLog2e);
    acc += e;
    store_bf16(y + i, e);
  }
  float s = hsum(acc);
  for (; i < n; ++i) {
    const float e = exp_approx(x[i] * mul - sub);
    s += e;
    store(e, y + i);
  }
  return s;
#endif
}
inline void exp_rows(double* x, int64_t n, double mul, double sub) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i] * mul - sub);
}
template <bool kShort = false>
inline double exp_sum_row(double* x, int64_t n, double mul, double sub) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] * mul - sub));
  return s;
}
// The rescale factor, once per row and block: libm (exp_approx widens to 16 lanes: 3.7% of a
// bf16 forward in perf, for one value).
inline float exp_scalar(float x) { return std::exp(x); }
inline double exp_scalar(double x) { return std::exp(x); }

template <typename A> inline void scale_row(A* x, int64_t n, A a) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}
template <typename A> inline void add_row(A* x, const A* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += b[i];
}
// x += a * b; b in a half type: a head's rounded weights into the fp32 average (the scalar
// SSE loop and the final narrowing were 19% of a bf16 forward with averaged weights at
// L = 128, perf).
template <typename A> inline void add_scaled_row(A* x, const A* b, int64_t n, A a) {
  for (int64_t i = 0; i < n; ++i) x[i] += a * b[i];
}
inline void add_scaled_row(float* x, const bf16* b, int64_t n, float a) {
  for (int64_t i = 0; i < n; ++i) x[i] += a * bits_to_float(uint32_t(b[i].x) << 16);
}
inline void add_scaled_row(float* x, const fp16* b, int64_t n, float a) {
  for (int64_t i = 0; i < n; ++i) x[i] += a * to_acc(b[i]);
}
// sum_i a[i] b[i] in the accumulator type, for softmax's backward term D = rowsum(dO * O):
// 16 partial sums, where the scalar loop was one serial FMA chain, 38% of the bf16 keys-as-
// rows backward task's own time at L = 128 (perf).
inline float dot_row(const float* a, const float* b, int64_t n) {
  vf acc{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += vload(a + i) * vload(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
inline float dot_row(const bf16* a, const bf16* b, int64_t n) {
  vf acc{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += widen(a + i) * widen(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += to_acc(a[i]) * to_acc(b[i]);
  return s;
}
// An fp32 row against a bf16 one (O kept in fp32, dO in bf16).
inline float dot_row(const float* a, const bf16* b, int64_t n) {
  vf acc{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += vload(a + i) * widen(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * to_acc(b[i]);
  return s;
}
inline float dot_row(const float* a, const fp16* b, int64_t n) {
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * to_acc(b[i]);
  return s;
}
template <typename T>
typename AccOf<T>::type dot_row(const T* a, const T* b, int64_t n) {  // fp64, fp16
  typename AccOf<T>::type s = 0;
  for (int64_t i = 0; i < n; ++i) s += to_acc(a[i]) * to_acc(b[i]);
  return s;
}
// dp = p * (dp - d + glse): softmax's backward plus lse's own gradient, one row.
template <typename A>
inline void softmax_grad_row(A* dp, const A* p, int64_t n, A d, A glse) {
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - d + glse);
}

// How far from 1 a probability may be and still be taken for the whole softmax of a query
// that sees one key: the forward's own rounding (its lse sat up to 5.3e-7 from that key's
// score on the AVX-512 fp32 paths, measured; kExactOneTol), and the degree-3 exp of the bf16
// keys-as-rows backward (kExactOneTolShort). An lse from elsewhere
// (the merged lse of a ring of sequence shards, where this call sees a part of the keys)
// gives a smaller p, and the general formula.
constexpr float kExactOneTol = 4e-6f, kExactOneTolShort = 1e-3f;
template <typename A>
inline bool is_whole_softmax(A p) {
  return std::abs(p - A(1)) <= A(std::is_same_v<A, double> ? 1e-12 : kExactOneTol);
}

// The same for a query that sees one key (Masks::sees_one_key): where p is 1 there (the lse
// is this key's own) D = dp at that key and p * (dp - D) is exactly 0, not the rounding gap
// between D = rowsum(dO * O) and the GEMM's dp; formed as dp - dp, so that a NaN or inf in
// dp stays NaN. Otherwise softmax_grad_row's formula with D = d.
template <typename A>
inline void one_key_grad_row(A* dp, const A* p, int64_t n, A d, A glse) {
  for (int64_t i = 0; i < n; ++i)
    dp[i] = p[i] * ((is_whole_softmax(p[i]) ? dp[i] - dp[i] : dp[i] - d) + glse);
}

// n rows of x (row stride ld) widened to contiguous fp32 rows of `cols` (the half types'
// operands for fp32 products).
template <typename T>
inline void widen_rows(const T* x, int64_t ld, int64_t n, int64_t cols, float* y) {
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < cols; ++c) y[r * cols + c] = float(to_acc(x[r * ld + c]));
  }
}

inline void narrow_row(const float* x, bf16* y, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store_bf16(y + i, vload(x + i));
  for (; i < n; ++i) store(x[i], y + i);
}
inline void narrow_row(const float* x, fp16* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(x[i], y + i);
}
// y = x * a rounded to the half type, one pass.
inline void scale_narrow_row(const float* x, float a, bf16* y, int64_t n) {
#ifdef FUSEDATTN_AVX512_BF16
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += kLanes) {
    const __mmask16 lanes = tail_mask(n - i);
    _mm256_mask_storeu_epi16(y + i, lanes, to_bf16_zmm(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + i), va)));
  }
#else
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store_bf16(y + i, vload(x + i) * a);
  for (; i < n; ++i) store(x[i] * a, y + i);
#endif
}
inline void scale_narrow_row(const float* x, float a, fp16* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(x[i] * a, y + i);
}
// Accumulators (fp32/fp64) into an output row of type T: y = x * a, and y = x.
template <typename A, typename T>
void store_scaled_row(const A* x, A a, T* y, int64_t n) {
  if constexpr (std::is_same_v<A, T>) {
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * a;
  } else {
    scale_narrow_row(x, a, y, n);
  }
}
template <typename A, typename T>
void store_row(const A* x, T* y, int64_t n) {
  if constexpr (std::is_same_v<A, T>) {
    std::copy(x, x + n, y);
  } else {
    narrow_row(x, y, n);
  }
}

// Rows of the outputs and gradients, which a call writes once and never reads back: y = x * a
// by non-temporal stores where y and n make whole aligned vectors (64 bytes fp32, 32 bf16), so
// that the writes skip the read-for-ownership of lines that are not cached (the gradients of
// MultiheadAttention's packed projections, 24 MiB at the encoder size: the fp32 backward
// 1.14-1.25x faster, PERFORMANCE.md). A task that wrote rows this way ends with
// out_rows_done() (sfence: the stores are weakly ordered, and the next reader may be another
// thread).
template <typename A, typename T>
void store_out_row(const A* x, A a, T* y, int64_t n) {
#ifdef FUSEDATTN_AVX512
  const auto at = reinterpret_cast<uintptr_t>(y);
  if constexpr (std::is_same_v<T, float>) {
    if (at % 64 == 0 && n % 16 == 0) {
      const __m512 va = _mm512_set1_ps(a);
      for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), va));
      return;
    }
  }
#ifdef FUSEDATTN_AVX512_BF16
  if constexpr (std::is_same_v<T, bf16>) {
    if (at % 32 == 0 && n % 16 == 0) {
      const __m512 va = _mm512_set1_ps(a);
      for (int64_t i = 0; i < n; i += 16) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(y + i),
                            to_bf16_zmm(_mm512_mul_ps(_mm512_loadu_ps(x + i), va)));
      }
      return;
    }
  }
#endif
#endif
  store_scaled_row(x, a, y, n);
}
// The forward's output rows: non-temporal for fp32 only (the encoder-size forward 1.10x in
// both allocation modes; bf16 rows, two 32-byte halves a line, measured 0.97-1.02x).
template <typename A, typename T>
void store_fwd_row(const A* x, A a, T* y, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    store_out_row(x, a, y, n);
  } else {
    store_scaled_row(x, a, y, n);
  }
}
inline void out_rows_done() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#endif
}

// y (cols x rows, row stride ldy) = x^T, x rows x cols with row stride ldx; on AVX-512 by
// registers (fp32) or gathers (16-bit types, where the 32-bit indices allow; vec_avx512.h).
template <typename T>
void transpose_plain(const T* x, int64_t ldx, int64_t rows, int64_t cols, T* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) y[c * ldy + r] = x[r * ldx + c];
}
template <typename T>
void transpose(const T* x, int64_t ldx, int64_t rows, int64_t cols, T* y, int64_t ldy) {
#ifdef FUSEDATTN_AVX512
  if constexpr (kIsHalf<T>) {
    if (15 * ldx + cols < (int64_t(1) << 30)) return transpose16_zmm(x, ldx, rows, cols, y, ldy);
  }
  if constexpr (std::is_same_v<T, float>) {
    return transpose_zmm(x, ldx, rows, cols, y, ldy);
  }
#endif
  transpose_plain(x, ldx, rows, cols, y, ldy);
}

FUSEDATTN_TIER_NS_END
