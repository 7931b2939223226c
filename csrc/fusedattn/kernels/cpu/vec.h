#pragma once
// The portable vector vocabulary: 16 fp32 lanes in GCC/Clang vector extensions, which each
// tier's flags lower to its own registers (four xmm at scalar, two ymm at avx2, one zmm at
// avx512). GCC's auto-vectoriser left the lane-array form of these reductions scalar
// (vmaxss/vaddss: row_max alone was 6% of a forward); explicit vectors also keep IEEE
// semantics without -ffast-math, which would assume away masking's infinities. Selects are
// written as bit operations (Clang 14 has no ?: on vectors in C++).
#include <cstdint>
#include <cstring>

#include "fusedattn/kernels/cpu/scalar.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors by value: always inlined
#endif
#define FUSEDATTN_VINLINE inline __attribute__((always_inline))

FUSEDATTN_TIER_NS_BEGIN

constexpr int64_t kLanes = 16;
using vf = float __attribute__((vector_size(4 * kLanes)));
using vi = int32_t __attribute__((vector_size(4 * kLanes)));
using vh = uint16_t __attribute__((vector_size(2 * kLanes)));

FUSEDATTN_VINLINE vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
FUSEDATTN_VINLINE void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
FUSEDATTN_VINLINE vf vsplat(float x) { return vf{} + x; }
// m ? a : b, lane by lane (m: all ones or zero per lane, as comparisons give).
FUSEDATTN_VINLINE vf vsel(vi m, vf a, vf b) {
  return __builtin_bit_cast(vf, (m & __builtin_bit_cast(vi, a)) | (~m & __builtin_bit_cast(vi, b)));
}
FUSEDATTN_VINLINE vi vsel(vi m, vi a, vi b) { return (m & a) | (~m & b); }
// max that keeps NaN: a lane that has seen a NaN stays NaN (a NaN score must reach the
// output, not be dropped as a comparison's false).
FUSEDATTN_VINLINE vf vmax_nan(vf m, vf v) { return vsel((v > m) | (v != v), v, m); }
FUSEDATTN_VINLINE float max_nan(float m, float v) { return (v > m || v != v) ? v : m; }
FUSEDATTN_VINLINE double max_nan(double m, double v) { return (v > m || v != v) ? v : m; }
FUSEDATTN_VINLINE float hmax(vf v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = max_nan(m, v[l]);
  return m;
}
FUSEDATTN_VINLINE float hsum(vf v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// 2^t. t = n + f with n = round(t), f in [-1/2, 1/2]; 2^f is a degree-5 polynomial
// (coefficients fitted for this kernel, minimax in relative error: 2.3e-7, about 2 ulp,
// measured in fp32 arithmetic over [-1/2, 1/2]); 2^n goes into the exponent bits. t < kExpCut
// (and -inf) gives exactly 0, NaN stays NaN; t is clamped at 127 (softmax only exponentiates
// s - max <= 0 and s - lse <= ~0). About 15 vector operations, against 22 for the Cephes exp
// it replaced. kShort: degree 3 (7.5e-5, fitted the same way) for probabilities that are
// rounded to bf16 next, whose 8-bit mantissa rounds at 2e-3 anyway; two fewer FMAs.
template <bool kShort = false>
FUSEDATTN_VINLINE vf vexp2(vf t) {
  const vf lo = vsplat(kExpCut), hi = vsplat(127.f);
  vf tc = vsel(t < lo, lo, t);
  tc = vsel(tc > hi, hi, tc);
  const vf n = (tc + 12582912.f) - 12582912.f;  // round to nearest (|tc| < 2^22)
  const vf f = tc - n;
  vf y;
  if constexpr (kShort) {
    y = vsplat(5.517166853e-2f);
    y = y * f + 2.426111400e-1f;
    y = y * f + 6.932609677e-1f;
    y = y * f + 9.999280572e-1f;
  } else {
    y = vsplat(1.327647129073739e-3f);
    y = y * f + 9.675540961325169e-3f;
    y = y * f + 5.550713092088699e-2f;
    y = y * f + 2.4022120237350464e-1f;
    y = y * f + 6.931469440460205e-1f;
    y = y * f + 1.0000001192092896f;
  }
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf res = y * __builtin_bit_cast(vf, e);
  res = vsel(t < lo, vf{}, res);
  return vsel(t != t, t, res);
}
// exp(y) = 2^(y log2(e)), y formed by the caller first: folding log2(e) into the caller's
// multiplier and offset saves a multiply but adds |x * mul| * 6e-8 of error (Gaussian-kernel
// scores reach |x * mul| ~ 500: the weights then sum to 1 +- 1e-5).
FUSEDATTN_VINLINE vf vexp(vf x) { return vexp2(x * kLog2e); }
FUSEDATTN_VINLINE float exp_approx(float x) {
  float buf[kLanes] = {x};
  return vexp(vload(buf))[0];
}
// bf16 bits of x, round to nearest even; NaN stays NaN (quiet).
FUSEDATTN_VINLINE vi bf16_bits(vf x) {
  const vi u = __builtin_bit_cast(vi, x);
  const vi rounded = (u + 0x7fff + ((u >> 16) & 1)) >> 16;
  const vi nan = (u >> 16) | 0x40;
  return vsel((u & 0x7fffffff) > 0x7f800000, nan, rounded) & 0xffff;
}
FUSEDATTN_VINLINE void store_bf16(bf16* y, vf x) {
  const vh b = __builtin_convertvector(bf16_bits(x), vh);
  std::memcpy(y, &b, sizeof b);
}
FUSEDATTN_VINLINE vf widen(const bf16* x) {
  vh h;
  std::memcpy(&h, x, sizeof h);
  return __builtin_bit_cast(vf, __builtin_convertvector(h, vi) << 16);
}

FUSEDATTN_TIER_NS_END
