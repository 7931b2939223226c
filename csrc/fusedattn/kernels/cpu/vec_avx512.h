#pragma once
// The AVX-512 vocabulary (tiers avx512 and up): exp2 on zmm, row loops with masked tails,
// transposes (fp32 in registers, 16-bit types by gathers), bf16 rounding in one instruction
// (avx512_bf16).
#include <algorithm>
#include <cstdint>
#include <limits>

#include "fusedattn/kernels/cpu/vec.h"

#ifdef FUSEDATTN_AVX512
// GCC 12's AVX-512 headers build unmasked intrinsics on _mm512_undefined_*(), which its own
// -Wmaybe-uninitialized then reports (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

FUSEDATTN_TIER_NS_BEGIN

FUSEDATTN_VINLINE __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
}
FUSEDATTN_VINLINE __m512i lane_index() {
  return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
}

// 2^t as 2^n * p(f), f = t - n, with f from one vreduceps (the fraction left after
// rounding, exact) and 2^n applied by vscalefps, which takes floor(n) of any n. The short
// (degree-3) form rounds down: f in [0, 1), scalef takes t itself, and p is vexp2's degree-3
// fit re-expanded around 1/2 (same relative error, 7.5e-5); the long (degree-5) form rounds
// to nearest and forms n = t - f (exact), keeping vexp2's polynomial. Lanes with t < kExpCut
// (-inf included) or outside `keep` are zeroed by the scalef's mask, NaN stays NaN (the
// mask's compare is unordered-true), t > 128 gives inf. Measured (perf, bf16 forward,
// L=1024): the portable loop was 25 instructions per 16 elements and 26% of the forward;
// vreduceps (one uop where vrndscaleps is two) 1.75 vs 2.1 ns per 16 in a loop of exp alone.
template <bool kShort>
FUSEDATTN_VINLINE __m512 exp2_zmm(__m512 t, __mmask16 keep = 0xffff) {
  const __mmask16 live = _mm512_mask_cmp_ps_mask(keep, t, _mm512_set1_ps(kExpCut), _CMP_NLT_UQ);
  if constexpr (kShort) {
    const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(7.8024521470e-2f), f, _mm512_set1_ps(2.2606718540e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9583350420e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.9992519617e-1f));
    return _mm512_maskz_scalef_ps(live, y, t);
  } else {
    const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(1.327647129073739e-3f), f,
                               _mm512_set1_ps(9.675540961325169e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.550713092088699e-2f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022120237350464e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.931469440460205e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0000001192092896f));
    return _mm512_maskz_scalef_ps(live, y, _mm512_sub_ps(t, f));
  }
}
// The row's max, NaN if any element is (vmaxps drops NaN operands: they are tracked apart, by
// an unordered compare). Four accumulators: the single-chain max with a NaN select, then a
// lane-by-lane scalar reduction, was 12% of an fp32 forward at L = 4096 (perf, AMD EPYC).
inline float row_max_zmm(const float* x, int64_t n) {
  const __m512 lo = _mm512_set1_ps(kNegInfF);
  __m512 m0 = lo, m1 = lo, m2 = lo, m3 = lo;
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    const __m512 c = _mm512_loadu_ps(x + i + 32), d = _mm512_loadu_ps(x + i + 48);
    m0 = _mm512_max_ps(m0, a), m1 = _mm512_max_ps(m1, b);
    m2 = _mm512_max_ps(m2, c), m3 = _mm512_max_ps(m3, d);
    nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(c, d, _CMP_UNORD_Q);
  }
  for (; i < n; i += 16) {
    const __m512 a = _mm512_mask_loadu_ps(lo, tail_mask(n - i), x + i);
    m0 = _mm512_max_ps(m0, a);
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}
// For every 16-lane chunk of a row of n: e = exp(x * mul - sub) (the product formed first, as
// in vexp), then sink(i, lanes, e); returns the sum of e over the row if kSum.
template <bool kShort, bool kSum, typename Sink>
FUSEDATTN_VINLINE float exp_row_zmm(const float* x, int64_t n, float mul, float sub, Sink sink) {
  const __m512 vm = _mm512_set1_ps(mul), vs = _mm512_set1_ps(sub), l2e = _mm512_set1_ps(kLog2e);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += kLanes) {
    const __mmask16 lanes = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(lanes, x + i);
    const __m512 e = exp2_zmm<kShort>(_mm512_mul_ps(_mm512_fmsub_ps(v, vm, vs), l2e));
    if constexpr (kSum) acc = _mm512_mask_add_ps(acc, lanes, acc, e);
    sink(i, lanes, e);
  }
  return kSum ? _mm512_reduce_add_ps(acc) : 0.f;
}

// a[j] = column j of the 16 x 16 block whose rows are a[0..15]: 64 shuffles (pairs of rows
// interleaved, then pairs of pairs, then 128-bit lanes gathered from four registers).
FUSEDATTN_VINLINE void transpose16x16_zmm(__m512 (&a)[16]) {
  __m512 t[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]);
  }
  // u[4g + c], 128-bit lane L: column 4L + c of rows 4g .. 4g + 3.
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {
    const __m512d lo0 = _mm512_castps_pd(t[4 * g]), hi0 = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d lo1 = _mm512_castps_pd(t[4 * g + 2]), hi1 = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xee);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xee);
    a[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    a[4 + c] = _mm512_shuffle_f32x4(v0, w0, 0xdd);
    a[8 + c] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    a[12 + c] = _mm512_shuffle_f32x4(v1, w1, 0xdd);
  }
}

// y (cols x rows, row stride ldy) = x^T, fp32, by 16 x 16 blocks transposed in registers
// (edges by masked loads and stores). The gathers this replaced (one per column of 16 rows)
// ran at 2 cycles per element: 4% of an fp32 causal forward at L = 1024 (perf, AMD EPYC), and
// the strided scalar stores before them 5-7% of an fp32 backward. stream: y is an output that
// is not read back: whole aligned vectors by non-temporal stores (see rows.h, store_out_row).
inline void transpose_zmm(const float* x, int64_t ldx, int64_t rows, int64_t cols, float* y,
                          int64_t ldy, bool stream = false) {
  stream = stream && reinterpret_cast<uintptr_t>(y) % 64 == 0 && ldy % 16 == 0;
  for (int64_t r = 0; r < rows; r += 16) {
    const int64_t nr = std::min<int64_t>(rows - r, 16);
    const __mmask16 out = tail_mask(nr);
    for (int64_t c = 0; c < cols; c += 16) {
      const int64_t nc = std::min<int64_t>(cols - c, 16);
      const __mmask16 in = tail_mask(nc);
      __m512 a[16];
      for (int i = 0; i < 16; ++i) {  // rows past the end: zeros, read from no address past x
        const float* row = x + (r + std::min<int64_t>(i, nr - 1)) * ldx + c;
        a[i] = _mm512_maskz_loadu_ps(i < nr ? in : __mmask16(0), row);
      }
      transpose16x16_zmm(a);
      for (int64_t j = 0; j < nc; ++j) {
        float* dst = y + (c + j) * ldy + r;
        if (stream && nr == 16) {
          _mm512_stream_ps(dst, a[j]);
        } else {
          _mm512_mask_storeu_ps(dst, out, a[j]);
        }
      }
    }
  }
  if (stream) _mm_sfence();
}
// The same for 16-bit elements, 16 rows at a time: each 32-bit gather fetches the pairs
// x[r][c], x[r][c + 1] of 16 rows (byte offsets: no alignment needed), whose low and high
// halves are rows c and c + 1 of y. Needs 15 * ldx + cols < 2^30 (32-bit indices).
template <typename T>
void transpose16_zmm(const T* x, int64_t ldx, int64_t rows, int64_t cols, T* y, int64_t ldy) {
  static_assert(sizeof(T) == 2, "16-bit elements");
  const __m512i row_off = _mm512_mullo_epi32(lane_index(), _mm512_set1_epi32(int32_t(ldx)));
  for (int64_t r = 0; r < rows; r += 16) {
    const int64_t n = std::min<int64_t>(rows - r, 16);
    const __mmask16 in = tail_mask(n);
    const T* xr = x + r * ldx;
    int64_t c = 0;
    for (; c + 1 < cols; c += 2) {
      const __m512i pairs = _mm512_mask_i32gather_epi32(
          _mm512_setzero_si512(), in, _mm512_add_epi32(row_off, _mm512_set1_epi32(int32_t(c))), xr, 2);
      _mm256_mask_storeu_epi16(y + c * ldy + r, in, _mm512_cvtepi32_epi16(pairs));
      _mm256_mask_storeu_epi16(y + (c + 1) * ldy + r, in,
                               _mm512_cvtepi32_epi16(_mm512_srli_epi32(pairs, 16)));
    }
    if (c < cols)  // an odd last column: its pair would read past the row
      for (int64_t i = 0; i < n; ++i) y[c * ldy + r + i] = xr[i * ldx + c];
  }
}

#ifdef FUSEDATTN_AVX512_BF16
FUSEDATTN_VINLINE __m256i to_bf16_zmm(__m512 v) { return __m256i(_mm512_cvtneps_pbh(v)); }
// Column i of a column-major fp32 block into a bf16 row of n: x points at element (0, i),
// element (r, i) is at x + r * ld, and stride holds l * ld in lane l. y = x[., i] * a, one
// gather and one rounding per 16 elements; nt: the whole 32-byte pieces of an aligned y by
// non-temporal stores. Needs 15 * ld < 2^31.
inline void column_to_bf16_row(const float* x, int64_t ld, __m512i stride, int64_t n, __m512 a,
                               bf16* y, bool nt) {
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 in = tail_mask(n - c);
    const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, stride, x + c * ld, 4);
    const __m256i r = to_bf16_zmm(_mm512_mul_ps(v, a));
    if (nt && in == 0xffff) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(y + c), r);
    } else {
      _mm256_mask_storeu_epi16(y + c, in, r);
    }
  }
}
// The same column into an fp32 row (an output kept in fp32).
inline void column_to_f32_row(const float* x, int64_t ld, __m512i stride, int64_t n, __m512 a,
                              float* y) {
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 in = tail_mask(n - c);
    const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, stride, x + c * ld, 4);
    _mm512_mask_storeu_ps(y + c, in, _mm512_mul_ps(v, a));
  }
}
// vpermw indices that interleave the two halves of 32 bf16 (lane k of vector 2 i is lane i
// of the low half, of 2 i + 1 the high half): two rows of keys into the packed pair layout.
alignas(64) inline constexpr uint16_t kInterleave[32] = {
    0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
#endif

FUSEDATTN_TIER_NS_END
#endif  // FUSEDATTN_AVX512
