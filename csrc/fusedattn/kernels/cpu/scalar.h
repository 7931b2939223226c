#pragma once
// Storage types of the CPU kernels and their conversions to and from the accumulator type
// (fp32; fp64 for fp64), without compiler extensions (_Float16 is not in Clang 14 on x86).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "fusedattn/kernels/cpu/tier.h"

FUSEDATTN_TIER_NS_BEGIN

struct bf16 { uint16_t x; };
struct fp16 { uint16_t x; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// IEEE half <-> float: F16C where the tier has it, else exact bit arithmetic (round to
// nearest even, NaN stays NaN, overflow to inf, subnormals kept).
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf, NaN
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float f = float(man) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
#endif
}
inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  const uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN, quiet
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half (or zero), man = round(|f| * 2^24)
    const float m = bits_to_float(a) * 16777216.f;  // exact: a power-of-two scale
    const float r = std::nearbyint(m);              // the default mode: nearest even
    return uint16_t(sign | uint32_t(r));
  }
  // Normal: drop 13 mantissa bits, round to nearest even (a carry into the exponent is right).
  const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
#endif
}

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(bf16 v) { return bits_to_float(uint32_t(v.x) << 16); }
inline float to_acc(fp16 v) { return half_to_float(v.x); }

inline void store(float f, float* d) { *d = f; }
inline void store(double f, double* d) { *d = f; }
inline void store(float f, bf16* d) {  // round to nearest even; NaN stays NaN
  const uint32_t u = float_to_bits(f);
  d->x = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40u)
                                          : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline void store(float f, fp16* d) { d->x = float_to_half(f); }

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> constexpr bool kIsHalf = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

constexpr float kNegInfF = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
// The vector exps' 2^t is exactly 0 for t < kExpCut. A probability under 2^-64 of its row's
// largest is below fp32's resolution of their sum; above 2^-126 it was kept, and P V's products
// with |v| < 1 then came out denormal, microcode assists on Intel cores: fp32 ALiBi (whose far
// keys' probabilities fall that low) took 1.32-1.38x the plain causal call's time at L = 1024,
// 1.05x with the cut (Xeon, avx512_bf16 tier, 2026-12-06); AMD's cores showed 1.07x without it.
constexpr float kExpCut = -64.f;

FUSEDATTN_TIER_NS_END
