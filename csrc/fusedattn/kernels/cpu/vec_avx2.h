#pragma once
// The AVX2 vocabulary (tier avx2): exp2 and the softmax's row loops on 8-lane ymm intrinsics.
// The portable 16-lane loops of vec.h, lowered by GCC 12 for AVX2, spilled their selects and
// NaN-keeping max to the stack lane by lane (perf: row_max inlined into the forward's task
// and exp_sum_row were 44% of an fp32 forward at L=1024, at 0.42x SDPA).
#include <cstdint>

#include "fusedattn/kernels/cpu/vec.h"

#if defined(__AVX2__) && defined(__FMA__) && !defined(FUSEDATTN_AVX512)
#define FUSEDATTN_AVX2 1

FUSEDATTN_TIER_NS_BEGIN

// 2^t as vexp2 in vec.h (same polynomials, same special values: t < kExpCut -> 0, NaN -> NaN,
// t clamped at 127). vmaxps/vminps return their second operand when either is NaN: with t
// second, a NaN passes the clamp and the polynomial, and no blend is needed to restore it.
template <bool kShort = false>
FUSEDATTN_VINLINE __m256 exp2_ymm(__m256 t) {
  const __m256 lo = _mm256_set1_ps(kExpCut);
  const __m256 tc = _mm256_min_ps(_mm256_set1_ps(127.f), _mm256_max_ps(lo, t));
  const __m256 n = _mm256_round_ps(tc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(tc, n);
  __m256 y;
  if constexpr (kShort) {
    y = _mm256_fmadd_ps(_mm256_set1_ps(5.517166853e-2f), f, _mm256_set1_ps(2.426111400e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(6.932609677e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(9.999280572e-1f));
  } else {
    y = _mm256_fmadd_ps(_mm256_set1_ps(1.327647129073739e-3f), f, _mm256_set1_ps(9.675540961325169e-3f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(5.550713092088699e-2f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.4022120237350464e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(6.931469440460205e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0000001192092896f));
  }
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 res = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(_mm256_cmp_ps(t, lo, _CMP_LT_OQ), res);
}
FUSEDATTN_VINLINE __m256i tail_mask8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
FUSEDATTN_VINLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
FUSEDATTN_VINLINE float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// The row's max, NaN if any element is (vmaxps drops NaN operands: they are tracked apart).
inline float row_max_ymm(const float* x, int64_t n) {
  __m256 m0 = _mm256_set1_ps(kNegInfF), m1 = m0, nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    m0 = _mm256_max_ps(m0, a), m1 = _mm256_max_ps(m1, b);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
  }
  for (; i < n; i += 8) {
    const __m256i in = tail_mask8(n - i);
    const __m256 a = _mm256_blendv_ps(_mm256_set1_ps(kNegInfF), _mm256_maskload_ps(x + i, in),
                                      _mm256_castsi256_ps(in));
    m0 = _mm256_max_ps(m0, a);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan)) return std::numeric_limits<float>::quiet_NaN();
  return hmax8(_mm256_max_ps(m0, m1));
}
// For every 8-lane chunk of a row of n: e = exp(x * mul - sub) (the product formed first, as
// in vexp), then sink(i, lanes, e) with lanes the chunk's mask; returns the sum of e if kSum.
template <bool kShort, bool kSum, typename Sink>
FUSEDATTN_VINLINE float exp_row_ymm(const float* x, int64_t n, float mul, float sub, Sink sink) {
  const __m256 vm = _mm256_set1_ps(mul), vs = _mm256_set1_ps(sub), l2e = _mm256_set1_ps(kLog2e);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 e0 = exp2_ymm<kShort>(_mm256_mul_ps(_mm256_fmsub_ps(_mm256_loadu_ps(x + i), vm, vs), l2e));
    const __m256 e1 = exp2_ymm<kShort>(_mm256_mul_ps(_mm256_fmsub_ps(_mm256_loadu_ps(x + i + 8), vm, vs), l2e));
    if constexpr (kSum) acc0 = _mm256_add_ps(acc0, e0), acc1 = _mm256_add_ps(acc1, e1);
    sink(i, all, e0);
    sink(i + 8, all, e1);
  }
  for (; i < n; i += 8) {
    const __m256i in = tail_mask8(n - i);
    const __m256 v = _mm256_maskload_ps(x + i, in);
    const __m256 e = _mm256_and_ps(
        exp2_ymm<kShort>(_mm256_mul_ps(_mm256_fmsub_ps(v, vm, vs), l2e)), _mm256_castsi256_ps(in));
    if constexpr (kSum) acc0 = _mm256_add_ps(acc0, e);
    sink(i, in, e);
  }
  return kSum ? hsum8(_mm256_add_ps(acc0, acc1)) : 0.f;
}
// bf16 bits of 8 floats, round to nearest even, NaN stays NaN (quiet), as 8 x 16 bits.
FUSEDATTN_VINLINE __m128i to_bf16_ymm(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i r = _mm256_castps_si256(_mm256_blendv_ps(
      _mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet), _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: 4 words, twice
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

FUSEDATTN_TIER_NS_END
#endif
