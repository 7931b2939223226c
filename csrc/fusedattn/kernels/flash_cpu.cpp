// Flash-style attention kernels for the CPU (see flash_cpu.h). Block products go through
// BLAS (blas.h), or for a bf16/fp16 forward and a bf16 backward through the caller's packed
// GEMM (PackedGemm); the softmax arithmetic in between is written on 16-lane vectors in
// functions that GCC compiles for AVX-512, AVX2 and baseline x86-64 and picks at load time
// (target_clones), or in AVX-512 intrinsics where the CPU has them.
#include "fusedattn/kernels/flash_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "fusedattn/kernels/blas.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define FUSEDATTN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FUSEDATTN_CLONES
#endif

namespace fusedattn::kernels {
namespace {

constexpr float kNegInfF = -std::numeric_limits<float>::infinity();

// Block sizes. Forward: a 64 x 512 fp32 score block is 128 KiB and stays in L2 (2 MiB per
// core here) next to the K/V blocks; backward keeps two 64 x 256 blocks (P and dP).
constexpr int64_t kFwdBlockQ = 64, kFwdBlockK = 512;
constexpr int64_t kBwdBlockQ = 64, kBwdBlockK = 256;
// n rounded up to whole 64-column panels of the packed layout.
constexpr int64_t round64(int64_t n) { return (n + 63) / 64 * 64; }

// ------------------------------------------------------------------ storage types
struct bf16 { uint16_t x; };
struct fp16 { uint16_t x; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(bf16 v) { return bits_to_float(uint32_t(v.x) << 16); }
inline float to_acc(fp16 v) { _Float16 h; std::memcpy(&h, &v.x, 2); return float(h); }

inline void store(float f, float* d) { *d = f; }
inline void store(double f, double* d) { *d = f; }
inline void store(float f, bf16* d) {  // round to nearest even; NaN stays NaN
  const uint32_t u = float_to_bits(f);
  d->x = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40u)
                                          : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline void store(float f, fp16* d) { const _Float16 h = _Float16(f); std::memcpy(&d->x, &h, 2); }

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> constexpr bool kIsHalf = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

// ------------------------------------------------------------------ vector loops (fp32)
// Written on GCC's 16-lane vector type, which each target_clones clone lowers to its own
// registers (one zmm, two ymm, four xmm). GCC's auto-vectoriser left the lane-array form of
// these reductions scalar (vmaxss/vaddss: row_max alone was 6% of a forward); explicit vectors
// also keep IEEE semantics without -ffast-math, which would assume away masking's infinities.
// Helpers are always_inline so that each clone compiles them for its own target (the -Wpsabi
// note about passing 64-byte vectors by value never applies: no such call survives).
#pragma GCC diagnostic ignored "-Wpsabi"
#define FUSEDATTN_VINLINE inline __attribute__((always_inline))
constexpr int64_t kLanes = 16;
using vf = float __attribute__((vector_size(4 * kLanes)));
using vi = int32_t __attribute__((vector_size(4 * kLanes)));
using vh = uint16_t __attribute__((vector_size(2 * kLanes)));

FUSEDATTN_VINLINE vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
FUSEDATTN_VINLINE void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
FUSEDATTN_VINLINE vf vsplat(float x) { return vf{} + x; }
FUSEDATTN_VINLINE float hmax(vf v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = m < v[l] ? v[l] : m;
  return m;
}
FUSEDATTN_VINLINE float hsum(vf v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// 2^t; exp(y) = 2^(y log2(e)), with y = x * mul - sub formed first: folding log2(e) into mul
// and sub instead saves a multiply but adds |x * mul| * 6e-8 of error (Gaussian-kernel scores
// reach |x * mul| ~ 500: the weights then sum to 1 +- 1e-5). t = n + f with n = round(t), f in
// [-1/2, 1/2]; 2^f is a degree-5 polynomial (coefficients fitted here, minimax in relative
// error: 2.3e-7, about 2 ulp, measured in fp32 arithmetic over [-1/2, 1/2]); 2^n goes into the
// exponent bits. t < -126 (and -inf) gives exactly 0, NaN stays NaN; t is clamped at 127
// (softmax only exponentiates s - max <= 0 and s - lse <= ~0). About 15 vector operations,
// against 22 for the Cephes exp this replaced (measured: see PERFORMANCE.md, entry 3b).
// kShort: degree 3 (7.5e-5, fitted the same way) for probabilities that are rounded to bf16
// next, whose 8-bit mantissa rounds at 2e-3 anyway; two fewer FMAs per 16 elements.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
template <bool kShort = false>
FUSEDATTN_VINLINE vf vexp2(vf t) {
  const vf lo = vsplat(-126.f), hi = vsplat(127.f);
  vf tc = t < lo ? lo : t;
  tc = tc > hi ? hi : tc;
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
  res = t < lo ? vf{} : res;
  return t != t ? t : res;
}
FUSEDATTN_VINLINE vf vexp(vf x) { return vexp2(x * kLog2e); }
FUSEDATTN_VINLINE float exp_approx(float x) {
  float buf[kLanes] = {x};
  return vexp(vload(buf))[0];
}

FUSEDATTN_CLONES float row_max(const float* x, int64_t n) {
  vf m = vsplat(kNegInfF);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf v = vload(x + i);
    m = m < v ? v : m;
  }
  float r = hmax(m);
  for (; i < n; ++i) r = r < x[i] ? x[i] : r;
  return r;
}
// Portable versions (GCC vectors, one clone per ISA), for CPUs without AVX-512; the
// dispatchers below pick the AVX-512 ones where the CPU has it.
// x = exp(x * mul - sub); returns the row's sum.
FUSEDATTN_CLONES float exp_sum_row_vec(float* x, int64_t n, float mul, float sub) {
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
}
// x = exp(x * mul - sub), no sum (probabilities from a known lse).
FUSEDATTN_CLONES void exp_rows_vec(float* x, int64_t n, float mul, float sub) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) vstore(x + i, vexp(vload(x + i) * mul - sub));
  for (; i < n; ++i) x[i] = exp_approx(x[i] * mul - sub);
}
// bf16 bits of x, round to nearest even; NaN stays NaN (quiet).
FUSEDATTN_VINLINE vi bf16_bits(vf x) {
  const vi u = __builtin_bit_cast(vi, x);
  const vi rounded = (u + 0x7fff + ((u >> 16) & 1)) >> 16;
  const vi nan = (u >> 16) | 0x40;
  return ((u & 0x7fffffff) > 0x7f800000 ? nan : rounded) & 0xffff;
}
// y = bf16(exp(x * mul - sub)), x untouched; returns the sum of the fp32 values.
FUSEDATTN_CLONES float exp_sum_bf16_row_vec(const float* x, bf16* y, int64_t n, float mul, float sub) {
  vf acc{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf e = vexp2<true>((vload(x + i) * mul - sub) * kLog2e);
    acc += e;
    const vh b = __builtin_convertvector(bf16_bits(e), vh);
    std::memcpy(y + i, &b, sizeof b);
  }
  float s = hsum(acc);
  for (; i < n; ++i) {
    const float e = exp_approx(x[i] * mul - sub);
    s += e;
    store(e, y + i);
  }
  return s;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// AVX-512 versions in intrinsics. 2^t as 2^n * p(f), f = t - n, with f from one vreduceps
// (AVX512-DQ: the fraction left after rounding, exact) and 2^n applied by vscalefps, which
// takes floor(n) of any n. The short (degree-3) form rounds down: f in [0, 1), scalef takes t
// itself, and p is vexp2's degree-3 fit on [-1/2, 1/2] re-expanded around 1/2 (same relative
// error, 7.5e-5); the long (degree-5) form rounds to nearest and forms n = t - f (exact),
// keeping vexp2's polynomial as it is. Lanes with t < -126 (-inf included) are zeroed by the
// scalef's mask, NaN stays NaN (the mask's compare is unordered-true), t > 128 gives inf.
// Measured (perf, bf16 forward, L=1024): the portable loop was 25 instructions per 16
// elements, 23 of them on the two vector ports, and 26% of the forward; vrndscaleps + subtract
// made it 12; vreduceps (one uop where vrndscaleps is two) 1.75 vs 2.1 ns per 16 in a loop of
// exp alone.
// GCC 12's AVX-512 headers build unmasked intrinsics on _mm512_undefined_*(), which its own
// -Wmaybe-uninitialized then reports (GCC bug 105593): silenced for this section only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FUSEDATTN_ZMM __attribute__((target("avx512f,avx512dq")))
#define FUSEDATTN_ZMM_INLINE FUSEDATTN_ZMM inline __attribute__((always_inline))
template <bool kShort>
FUSEDATTN_ZMM_INLINE __m512 exp2_zmm(__m512 t, __mmask16 keep = 0xffff) {
  const __mmask16 live = _mm512_mask_cmp_ps_mask(keep, t, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);
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
// For every 16-lane chunk of a row of n: e = exp(x * mul - sub) (the product formed first, as
// in vexp), then sink(i, lanes, e); returns the sum of e over the row if kSum.
template <bool kShort, bool kSum, typename Sink>
FUSEDATTN_ZMM_INLINE float exp_row_zmm(const float* x, int64_t n, float mul, float sub, Sink sink) {
  const __m512 vm = _mm512_set1_ps(mul), vs = _mm512_set1_ps(sub), l2e = _mm512_set1_ps(kLog2e);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += kLanes) {
    const __mmask16 lanes = n - i >= kLanes ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(lanes, x + i);
    const __m512 e = exp2_zmm<kShort>(_mm512_mul_ps(_mm512_fmsub_ps(v, vm, vs), l2e));
    if constexpr (kSum) acc = _mm512_mask_add_ps(acc, lanes, acc, e);
    sink(i, lanes, e);
  }
  return kSum ? _mm512_reduce_add_ps(acc) : 0.f;
}
#define FUSEDATTN_STORE_F32 \
  [x](int64_t i, __mmask16 lanes, __m512 e) FUSEDATTN_ZMM { _mm512_mask_storeu_ps(x + i, lanes, e); }
FUSEDATTN_ZMM float exp_sum_row_zmm(float* x, int64_t n, float mul, float sub) {
  return exp_row_zmm<false, true>(x, n, mul, sub, FUSEDATTN_STORE_F32);
}
FUSEDATTN_ZMM void exp_rows_zmm(float* x, int64_t n, float mul, float sub) {
  exp_row_zmm<false, false>(x, n, mul, sub, FUSEDATTN_STORE_F32);
}
FUSEDATTN_ZMM float exp_sum_row_short_zmm(float* x, int64_t n, float mul, float sub) {
  return exp_row_zmm<true, true>(x, n, mul, sub, FUSEDATTN_STORE_F32);
}
#undef FUSEDATTN_STORE_F32
// bf16 rounding in one instruction (vcvtneps2bf16: nearest even, NaN stays a quiet NaN) where
// the CPU has AVX512-BF16.
#define FUSEDATTN_ZMM_BF16 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16")))
FUSEDATTN_ZMM_BF16 float exp_sum_bf16_row_zmm(const float* x, bf16* y, int64_t n, float mul,
                                              float sub) {
  return exp_row_zmm<true, true>(
      x, n, mul, sub, [y](int64_t i, __mmask16 lanes, __m512 e) FUSEDATTN_ZMM_BF16 {
        _mm256_mask_storeu_epi16(y + i, lanes, __m256i(_mm512_cvtneps_pbh(e)));
      });
}
// y = bf16(x * a), one pass.
FUSEDATTN_ZMM_BF16 void scale_narrow_row_zmm(const float* x, float a, bf16* y, int64_t n) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += kLanes) {
    const __mmask16 lanes = n - i >= kLanes ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + i), va);
    _mm256_mask_storeu_epi16(y + i, lanes, __m256i(_mm512_cvtneps_pbh(v)));
  }
}
// Column i of a column-major fp32 block into a bf16 row of n: x points at element (0, i),
// element (r, i) is at x + r * ld, and stride holds l * ld in lane l. y = x[., i] * a, one
// gather and one rounding per 16 elements; nt: the whole 32-byte pieces of an aligned y by
// non-temporal stores (see store_out_row). Needs 15 * ld < 2^31.
FUSEDATTN_ZMM_BF16 void column_to_bf16_row(const float* x, int64_t ld, __m512i stride, int64_t n,
                                           __m512 a, bf16* y, bool nt) {
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 in = __mmask16((1u << std::min<int64_t>(n - c, 16)) - 1);
    const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, stride, x + c * ld, 4);
    const __m256i r = __m256i(_mm512_cvtneps_pbh(_mm512_mul_ps(v, a)));
    if (nt && in == 0xffff) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(y + c), r);
    } else {
      _mm256_mask_storeu_epi16(y + c, in, r);
    }
  }
}
// Picked once (function-local statics: __builtin_cpu_supports is ready by then).
bool has_zmm() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  return yes;
}
bool has_zmm_bf16() {
  static const bool yes = has_zmm() && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return yes;
}
float exp_sum_row(float* x, int64_t n, float mul, float sub) {
  return has_zmm() ? exp_sum_row_zmm(x, n, mul, sub) : exp_sum_row_vec(x, n, mul, sub);
}
void exp_rows(float* x, int64_t n, float mul, float sub) {
  has_zmm() ? exp_rows_zmm(x, n, mul, sub) : exp_rows_vec(x, n, mul, sub);
}
float exp_sum_bf16_row(const float* x, bf16* y, int64_t n, float mul, float sub) {
  return has_zmm_bf16() ? exp_sum_bf16_row_zmm(x, y, n, mul, sub)
                        : exp_sum_bf16_row_vec(x, y, n, mul, sub);
}
// exp_sum_row for probabilities that are rounded to a half type next (vexp2's kShort).
float exp_sum_row_short(float* x, int64_t n, float mul, float sub) {
  return has_zmm() ? exp_sum_row_short_zmm(x, n, mul, sub) : exp_sum_row_vec(x, n, mul, sub);
}
#pragma GCC diagnostic pop
#else
float exp_sum_row_short(float* x, int64_t n, float mul, float sub) { return exp_sum_row_vec(x, n, mul, sub); }
float exp_sum_row(float* x, int64_t n, float mul, float sub) { return exp_sum_row_vec(x, n, mul, sub); }
void exp_rows(float* x, int64_t n, float mul, float sub) { exp_rows_vec(x, n, mul, sub); }
float exp_sum_bf16_row(const float* x, bf16* y, int64_t n, float mul, float sub) {
  return exp_sum_bf16_row_vec(x, y, n, mul, sub);
}
#endif
FUSEDATTN_CLONES void scale_row(float* x, int64_t n, float a) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}
FUSEDATTN_CLONES void add_row(float* x, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += b[i];
}
// x += a * b
FUSEDATTN_CLONES void add_scaled_row(float* x, const float* b, int64_t n, float a) {
  for (int64_t i = 0; i < n; ++i) x[i] += a * b[i];
}
// x += a * widen(b): a head's rounded weights into the fp32 average. The scalar loop (SSE,
// one bf16 at a time) and the final narrowing were 19% of a bf16 forward with averaged
// weights at L = 128 (perf).
FUSEDATTN_CLONES void add_scaled_row(float* x, const bf16* b, int64_t n, float a) {
  for (int64_t i = 0; i < n; ++i) x[i] += a * bits_to_float(uint32_t(b[i].x) << 16);
}
void add_scaled_row(float* x, const fp16* b, int64_t n, float a) {
  for (int64_t i = 0; i < n; ++i) x[i] += a * to_acc(b[i]);
}
// sum_i a[i] b[i] in fp32 (bf16 widened), for softmax's backward term D = rowsum(dO * O):
// 16 partial sums, where the scalar loop was one serial FMA chain, 38% of the bf16 keys-as-
// rows backward task's own time at L = 128 (perf).
FUSEDATTN_CLONES float dot_row(const float* a, const float* b, int64_t n) {
  vf acc{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += vload(a + i) * vload(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
FUSEDATTN_VINLINE vf widen(const bf16* x) {
  vh h;
  std::memcpy(&h, x, sizeof h);
  return __builtin_bit_cast(vf, __builtin_convertvector(h, vi) << 16);
}
FUSEDATTN_CLONES float dot_row(const bf16* a, const bf16* b, int64_t n) {
  vf acc{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += widen(a + i) * widen(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += to_acc(a[i]) * to_acc(b[i]);
  return s;
}
template <typename T>
typename AccOf<T>::type dot_row(const T* a, const T* b, int64_t n) {  // fp64, fp16
  typename AccOf<T>::type s = 0;
  for (int64_t i = 0; i < n; ++i) s += to_acc(a[i]) * to_acc(b[i]);
  return s;
}
// dp = p * (dp - d + glse): softmax's backward plus lse's own gradient, one row.
FUSEDATTN_CLONES void softmax_grad_row(float* dp, const float* p, int64_t n, float d, float glse) {
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - d + glse);
}
FUSEDATTN_CLONES void narrow_row(const float* x, bf16* y, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vh b = __builtin_convertvector(bf16_bits(vload(x + i)), vh);
    std::memcpy(y + i, &b, sizeof b);
  }
  for (; i < n; ++i) store(x[i], y + i);
}
void narrow_row(const float* x, fp16* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(x[i], y + i);
}
// y = x * a rounded to the half type, one pass.
void scale_narrow_row(const float* x, float a, bf16* y, int64_t n) {
#ifdef FUSEDATTN_ZMM_BF16
  if (has_zmm_bf16()) return scale_narrow_row_zmm(x, a, y, n);
#endif
  for (int64_t i = 0; i < n; ++i) store(x[i] * a, y + i);
}
void scale_narrow_row(const float* x, float a, fp16* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(x[i] * a, y + i);
}
// Accumulators (fp32/fp64) into an output row of type T: rounded through the vector paths
// above for the half types (the scalar store() loops compile to SSE here: 10% of a bf16
// forward with weights at L = 128, perf). y = x * a, and y = x.
template <typename A, typename T>
void store_scaled_row(const A* x, A a, T* y, int64_t n) {
  if constexpr (std::is_same_v<A, T>) {
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * a;
  } else {
    scale_narrow_row(x, a, y, n);
  }
}
// Rows of the outputs and gradients, which a call writes once and never reads back: y = x * a
// by non-temporal stores where y and n make whole aligned vectors (64 bytes fp32, 32 bf16), so
// that the writes skip the read-for-ownership of lines that are not cached (the gradients of
// MultiheadAttention's packed projections, 24 MiB at the encoder size; PERFORMANCE.md 10a).
// A task that wrote rows this way ends with out_rows_done() (sfence: the stores are weakly
// ordered, and the next reader may be another thread).
#ifdef FUSEDATTN_ZMM
FUSEDATTN_ZMM void stream_scaled_row_f32(const float* x, float a, float* y, int64_t n) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), va));
}
#endif
#ifdef FUSEDATTN_ZMM_BF16
FUSEDATTN_ZMM_BF16 void stream_scaled_row_bf16(const float* x, float a, bf16* y, int64_t n) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += 16) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(y + i),
                        __m256i(_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(x + i), va))));
  }
}
#endif
template <typename A, typename T>
void store_out_row(const A* x, A a, T* y, int64_t n) {
  const auto at = reinterpret_cast<uintptr_t>(y);
#ifdef FUSEDATTN_ZMM
  if constexpr (std::is_same_v<T, float>) {
    if (has_zmm() && at % 64 == 0 && n % 16 == 0) return stream_scaled_row_f32(x, a, y, n);
  }
#endif
#ifdef FUSEDATTN_ZMM_BF16
  if constexpr (std::is_same_v<T, bf16>) {
    if (has_zmm_bf16() && at % 32 == 0 && n % 16 == 0) return stream_scaled_row_bf16(x, a, y, n);
  }
#endif
  (void)at;
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
template <typename A, typename T>
void store_row(const A* x, T* y, int64_t n) {
  if constexpr (std::is_same_v<A, T>) {
    std::copy(x, x + n, y);
  } else {
    narrow_row(x, y, n);
  }
}

// fp64 versions: plain loops with std::exp (correctness over speed).
double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = m < x[i] ? x[i] : m;
  return m;
}
void exp_rows(double* x, int64_t n, double mul, double sub) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i] * mul - sub);
}
double exp_sum_row(double* x, int64_t n, double mul, double sub) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] * mul - sub));
  return s;
}
void scale_row(double* x, int64_t n, double a) { for (int64_t i = 0; i < n; ++i) x[i] *= a; }
void add_row(double* x, const double* b, int64_t n) { for (int64_t i = 0; i < n; ++i) x[i] += b[i]; }
void add_scaled_row(double* x, const double* b, int64_t n, double a) {
  for (int64_t i = 0; i < n; ++i) x[i] += a * b[i];
}
void softmax_grad_row(double* dp, const double* p, int64_t n, double d, double glse) {
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - d + glse);
}
// The rescale factor, once per row and block: libm (exp_approx widens to 16 lanes: 3.7% of a
// bf16 forward in perf, for one value).
inline float exp_scalar(float x) { return std::exp(x); }
inline double exp_scalar(double x) { return std::exp(x); }

// The bf16 forward with keys as the rows of its GEMMs (Flash::forward_task_kr) writes the
// packed B operand of its second product itself, in the VNNI layout: a k x n matrix (k even)
// as k/2 rows of n pairs {B[2r][j], B[2r+1][j]}, row stride 2 * round_up(n, 16). Checked once
// against the caller's pack(); any other layout keeps the query-rows path.
#ifdef FUSEDATTN_ZMM_BF16
bool packed_layout_is_vnni(const PackedGemm& g) {
  constexpr int64_t k = 4;
  for (const int64_t n : {48, 64}) {
    std::vector<uint16_t> in(k * n), out(k * 64, 0);
    for (int64_t i = 0; i < k * n; ++i) in[i] = uint16_t(0x3f80 + i);  // finite bf16 values
    g.pack(k, n, n, in.data(), out.data());
    const int64_t ldb = (n + 15) / 16 * 16;
    for (int64_t r = 0; r < k; ++r)
      for (int64_t j = 0; j < n; ++j)
        if (out[(r / 2) * 2 * ldb + 2 * j + r % 2] != in[r * n + j]) return false;
  }
  return true;
}
#endif
// What the keys-as-rows paths (Flash::forward_task_kr, Flash::backward_task_kr) need: bf16,
// packed GEMMs (AMX) whose layout is the one they write, AVX512-BF16, no attn_mask and no
// dropout (those keep the query-rows paths, which read masks row by row).
bool keys_as_rows_eligible(const FlashParams& p) {
#ifdef FUSEDATTN_ZMM_BF16
  if (p.dtype != DType::BFloat16 || p.packed == nullptr || p.mask_kind != MaskKind::None ||
      p.dropout || !has_zmm_bf16())
    return false;
  static const bool vnni = packed_layout_is_vnni(*p.packed);  // bf16's hooks: one object
  return vnni;
#else
  (void)p;
  return false;
#endif
}
// The forward, also not with weights (Flash::forward_weights_task, which packs K^T).
bool keys_as_rows(const FlashParams& p) { return p.weights == nullptr && keys_as_rows_eligible(p); }
// The backward: bf16 with even head dims (both are product depths of packed operands there),
// or fp32 on p.fgemm (plain row-major operands) with AVX-512, also without attn_mask/dropout.
bool keys_as_rows_backward(const FlashParams& p) {
#ifdef FUSEDATTN_ZMM
  if (p.dtype == DType::Float) {
    return p.fgemm != nullptr && p.mask_kind == MaskKind::None && !p.dropout && has_zmm();
  }
#endif
  return p.E % 2 == 0 && p.Ev % 2 == 0 && keys_as_rows_eligible(p);
}

// ------------------------------------------------------------------ the kernel
// Scores are S = Q K^T straight from the inputs (no copies: the GEMMs read q, k, v, dout
// through their row strides). The softmax scale is folded into the exponent,
// exp(s * scale - m * scale), unless an additive mask has to be added to scaled scores (or
// the scale is not positive): then the masking pass scales S first and the exponent's
// multiplier is 1. Accumulation is in A (fp32, fp64 for fp64 inputs); for bf16/fp16 the
// probabilities and dS are rounded to the input type for their GEMMs, as FlashAttention does.
template <typename T>
struct Flash {
  using A = typename AccOf<T>::type;
  static constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const FlashParams& p;
  int64_t group;     // query heads per key/value head
  bool fold;         // scale folded into the exponent
  A mul;             // the exponent's multiplier: scale if fold, else 1
  bool mask_pass;    // apply_masks has work to do
  bool kr;           // bf16 forward with keys as GEMM rows (keys_as_rows)
  bool fk;           // fp32 forward on p.fgemm, K^T in packed_ws (pack())

  explicit Flash(const FlashParams& params) : p(params), group(params.H / params.Hk) {
    fold = p.scale > 0 && p.mask_kind != MaskKind::Additive && p.kpm_kind != MaskKind::Additive;
    mul = fold ? A(p.scale) : A(1);
    mask_pass = !fold || p.mask_kind != MaskKind::None || p.kpm_kind != MaskKind::None || p.causal;
    kr = keys_as_rows(p);
    fk = std::is_same_v<T, float> && p.fgemm != nullptr;
  }
  // p.fgemm for T = float (the calls above are compiled for every T, taken only when fk).
  template <typename X, typename Y>
  void fgemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
             const X* a, const Y* b, A* c) const {
    if constexpr (std::is_same_v<T, float>) p.fgemm(m, n, k, lda, ldb, ldc, add_c, a, b, c);
  }

  // Row-major C = alpha op(A) op(B) + beta C with A, B in the input type.
  static void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, A beta, A* c, int64_t ldc) {
    if constexpr (kIsHalf<T>) {
      gemm(std::is_same_v<T, bf16> ? Half16::BFloat16 : Half16::Float16, ta, tb, m, n, k, alpha,
           reinterpret_cast<const uint16_t*>(a), lda, reinterpret_cast<const uint16_t*>(b), ldb,
           beta, c, ldc);
    } else {
      gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
  }
  // An accumulator block as a GEMM operand: itself, or rounded into buf for half types.
  static const T* operand(const A* x, int64_t n, T* buf) {
    if constexpr (kIsHalf<T>) {
      narrow_row(x, buf, n);
      return buf;
    } else {
      (void)buf, (void)n;
      return x;
    }
  }

  const T* q_rows(int64_t b, int64_t h, int64_t i) const {
    return static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + i * p.q_sr;
  }
  const T* k_rows(int64_t b, int64_t hk, int64_t j) const {
    return static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + j * p.k_sr;
  }
  const T* v_rows(int64_t b, int64_t hk, int64_t j) const {
    return static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + j * p.v_sr;
  }
  const T* dout_rows(int64_t b, int64_t h, int64_t i) const {
    return static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + i * p.do_sr;
  }
  A* lse_row(int64_t b, int64_t h) const { return static_cast<A*>(p.lse) + (b * p.H + h) * p.L; }

  // One past the last key that any of the queries up to i_last may see.
  int64_t visible_end(int64_t i_last) const {
    return p.causal ? std::clamp<int64_t>(i_last + p.causal_offset + 1, 0, p.S) : p.S;
  }
  // One past the last key of batch b that key_padding_mask leaves visible (bool: 0; float: not
  // -inf). The keys after it are hidden from every query of the batch and, like the keys past
  // the causal frontier, skipped: trailing padding is how batches of unequal lengths come, and
  // its share of the work goes. O(S) per call.
  int64_t key_end(int64_t b) const {
    int64_t j = p.S;
    if (p.kpm_kind == MaskKind::Bool) {
      const uint8_t* m = static_cast<const uint8_t*>(p.kpm) + b * p.p_sb;
      while (j > 0 && m[(j - 1) * p.p_sc] != 0) --j;
    } else if (p.kpm_kind == MaskKind::Additive) {
      const T* m = static_cast<const T*>(p.kpm) + b * p.p_sb;
      while (j > 0 && A(to_acc(m[(j - 1) * p.p_sc])) == kNegInf) --j;
    }
    return j;
  }
  // One past the last key that any of the queries up to i_last of batch b sees.
  int64_t kv_end(int64_t b, int64_t i_last) const { return std::min(visible_end(i_last), key_end(b)); }

  // key_padding_mask of keys j0 .. j0 + bk - 1 as an additive bias (-inf: padding); none: 0.
  void key_bias(int64_t b, int64_t j0, int64_t bk, A* bias) const {
    for (int64_t c = 0; c < bk; ++c) {
      const int64_t off = b * p.p_sb + (j0 + c) * p.p_sc;
      bias[c] = p.kpm_kind == MaskKind::None ? A(0)
                : p.kpm_kind == MaskKind::Bool
                    ? (static_cast<const uint8_t*>(p.kpm)[off] ? kNegInf : A(0))
                    : A(to_acc(static_cast<const T*>(p.kpm)[off]));
    }
  }

  // Scores block s (bq x bk, row stride ld) for queries i0.. and keys j0..: scale unless
  // folded, then every mask.
  void apply_masks(A* s, int64_t ld, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0,
                   int64_t bk, A* col_bias) const {
    if (!mask_pass) return;
    key_bias(b, j0, bk, col_bias);
    for (int64_t r = 0; r < bq; ++r) {
      A* row = s + r * ld;
      const int64_t i = i0 + r;
      if (!fold) scale_row(row, bk, A(p.scale));
      if (p.mask_kind != MaskKind::None) {
        const int64_t base = b * p.m_sb + h * p.m_sh + i * p.m_sr + j0 * p.m_sc;
        if (p.mask_kind == MaskKind::Bool) {
          const uint8_t* m = static_cast<const uint8_t*>(p.mask) + base;
          for (int64_t c = 0; c < bk; ++c) row[c] = m[c * p.m_sc] ? row[c] : kNegInf;
        } else {
          const T* m = static_cast<const T*>(p.mask) + base;
          for (int64_t c = 0; c < bk; ++c) row[c] += A(to_acc(m[c * p.m_sc]));
        }
      }
      if (p.kpm_kind != MaskKind::None) add_row(row, col_bias, bk);
      if (p.causal) {
        const int64_t first_hidden = std::max<int64_t>(i + p.causal_offset + 1 - j0, 0);
        for (int64_t c = first_hidden; c < bk; ++c) row[c] = kNegInf;
      }
    }
  }

  // Dropout on one row of probabilities: kept ones scaled by 1 / (1 - p), others 0.
  void drop_row(A* row, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t bk) const {
    const uint64_t base = uint64_t(((b * p.H + h) * p.L + i) * p.S + j0);
    const A ks = A(p.drop.keep_scale);
    for (int64_t c = 0; c < bk; ++c) row[c] = p.drop.keep(base + uint64_t(c)) ? row[c] * ks : A(0);
  }

  // Rows of s -> exp(s * mul - lse) from the forward's lse; rows with no visible key: 0.
  void probabilities(A* s, int64_t bq, int64_t bk, const A* lse) const {
    for (int64_t r = 0; r < bq; ++r) {
      A* row = s + r * bk;
      if (lse[r] == kNegInf) {
        std::fill(row, row + bk, A(0));
      } else {
        exp_rows(row, bk, mul, lse[r]);
      }
    }
  }

  struct FwdWork {
    std::vector<A> s, acc, m, l, bias;
    // Scores against all keys (weights): half types', or every type's when averaging.
    std::vector<A> rows;
    std::vector<A> avg;                    // averaging, half types: the heads' weights summed
    std::vector<T> head;                   // averaging, half types: one head's rounded weights
    std::vector<T> narrow, qt, qt_packed;  // the last two: Q^T of the keys-as-rows path
    std::vector<uint16_t> keep;            // its lane masks per key
    explicit FwdWork(const FlashParams& p)
        : s(kFwdBlockQ * kFwdBlockK), acc(kFwdBlockQ * p.Ev), m(kFwdBlockQ), l(kFwdBlockQ),
          bias(kFwdBlockK),
          rows(p.weights && (kIsHalf<T> || p.average_weights) ? kFwdBlockQ * p.S : 0),
          avg(kIsHalf<T> && p.weights && p.average_weights ? kFwdBlockQ * p.S : 0),
          head(avg.size()),
          narrow(kIsHalf<T> ? kFwdBlockQ * kFwdBlockK : 0),
          qt(keys_as_rows(p) ? p.E * kFwdBlockQ : 0), qt_packed(qt.size()),
          keep(keys_as_rows(p) ? 4 * kFwdBlockK : 0) {}
  };

  int64_t q_blocks() const { return (p.L + kFwdBlockQ - 1) / kFwdBlockQ; }

  // Forward task t: batch-head bh = (b, h), key/value head hk, queries [i0, i0 + bq).
  struct QTask { int64_t bh, b, h, hk, i0, bq; };
  QTask q_task(int64_t t) const {
    const int64_t nqb = q_blocks(), bh = t / nqb, h = bh % p.H;
    const int64_t i0 = (t % nqb) * kFwdBlockQ;
    return {bh, bh / p.H, h, h / group, i0, std::min(kFwdBlockQ, p.L - i0)};
  }

  void forward(int64_t begin, int64_t end) const {
    FwdWork w(p);
    for (int64_t t = begin; t < end; ++t) {
      if (p.weights && p.average_weights) {
        averaged_weights_task(t, w);
      } else {
        forward_task(t, w);
      }
    }
    if (p.packed) p.packed->release();
  }

  // Task t = (b, block of queries) with head-averaged weights: the heads' weights tasks in
  // turn, each adding its rows / H into the sum (64 x S, in L2 across the heads): the output
  // rows themselves for fp32/fp64, w.avg for half types, rounded once at the end.
  void averaged_weights_task(int64_t t, FwdWork& w) const {
    const int64_t nqb = q_blocks(), b = t / nqb, qb = t % nqb;
    const int64_t i0 = qb * kFwdBlockQ, bq = std::min(kFwdBlockQ, p.L - i0);
    T* wout = static_cast<T*>(p.weights) + (b * p.L + i0) * p.S;
    A* avg;
    if constexpr (std::is_same_v<T, A>) {
      avg = wout;
    } else {
      avg = w.avg.data();
    }
    std::fill(avg, avg + bq * p.S, A(0));
    for (int64_t h = 0; h < p.H; ++h) forward_weights_task((b * p.H + h) * nqb + qb, w, avg);
    if constexpr (kIsHalf<T>) {
      store_row(avg, wout, bq * p.S);
    }
  }

  // Packed workspace: per (b, hk, key block jb) a slot of packed_slot(p) elements, K^T
  // (E x bk) first, then V (bkp x Ev) with bkp = bk rounded up to even (zero row appended):
  // the packed layout pairs rows along the product's depth, which must be even. A packed
  // k x n matrix takes up to k * round_up(n, 64) elements (kFwdBlockK is a multiple of 64).
  static int64_t key_blocks(const FlashParams& q) { return (q.S + kFwdBlockK - 1) / kFwdBlockK; }
  // Keys a slot is sized for: a whole block, or all S keys rounded up to 64 when fewer (a
  // multiple of 64 either way, so packed panels fit). Sized for 512 keys at S = 128, the
  // workspace was 4x too large, 32 MiB of fresh pages a call at B=32, H=8: their first-touch
  // faults (clear_page) took 15% of a bf16 forward with weights (perf).
  static int64_t slot_keys(const FlashParams& q) { return std::min(kFwdBlockK, round64(q.S)); }
  static int64_t packed_slot(const FlashParams& q) {
    if (q.fgemm) return q.E * slot_ld_kt(q);
    return keys_as_rows(q) ? q.Ev * slot_ld_vt(q) : slot_keys(q) * (q.E + round64(q.Ev));
  }
  // fp32 on p.fgemm: the slot holds K^T (E x bk, row stride slot_ld_kt, 16 floats more than the
  // block: at a power-of-two stride the product's B rows would share L1 sets).
  static int64_t slot_ld_kt(const FlashParams& q) { return slot_keys(q) + 16; }
  // Keys-as-rows path: the slot holds V^T (Ev x bkp, row stride slot_ld_vt; column bk zero when bk
  // is odd), the A operand of O^T += V^T P^T. The stride is a cache line more than the block
  // (see pack()). bf16 only; packed_slot is T-free.
  static int64_t slot_ld_vt(const FlashParams& q) { return slot_keys(q) + 32; }
  T* packed_vt(int64_t b, int64_t hk, int64_t jb) const { return packed_kt(b, hk, jb); }
  T* packed_kt(int64_t b, int64_t hk, int64_t jb) const {
    return static_cast<T*>(p.packed_ws) + ((b * p.Hk + hk) * key_blocks(p) + jb) * packed_slot(p);
  }
  T* packed_v(int64_t b, int64_t hk, int64_t jb) const {
    return packed_kt(b, hk, jb) + slot_keys(p) * p.E;
  }
  // The depth packed V of the key block starting at j0 was packed with (its bkp): a causal
  // product that stops early still steps over V's panels with it.
  int64_t v_depth(int64_t j0) const {
    const int64_t bk = std::min(kFwdBlockK, p.S - j0);
    return bk + (bk & 1);
  }
  void pack(int64_t begin, int64_t end) const {
    if (kr) return pack_vt(begin, end);
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t nb = key_blocks(p), jb = t % nb, b = t / nb / p.Hk, hk = t / nb % p.Hk;
        const int64_t j0 = jb * kFwdBlockK, bk = std::min(kFwdBlockK, p.S - j0);
        transpose_any(k_rows(b, hk, j0), p.k_sr, bk, p.E, packed_kt(b, hk, jb), slot_ld_kt(p));
      }
      return;
    }
    // K^T's row stride in tmp: one cache line more than the block, so that the transposing
    // stores (a column of K^T per row of K) do not all fall into the same few L1 sets; at a
    // power-of-two stride (1 KiB) they did, and the transpose was 10% of a bf16 forward (perf).
    constexpr int64_t kLdT = kFwdBlockK + 64 / sizeof(T);
    std::vector<T> tmp(kLdT * std::max(p.E, p.Ev));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = key_blocks(p), jb = t % nb, b = t / nb / p.Hk, hk = t / nb % p.Hk;
      const int64_t j0 = jb * kFwdBlockK, bk = std::min(kFwdBlockK, p.S - j0), bkp = bk + (bk & 1);
      const T* k = k_rows(b, hk, j0);
      transpose_any(k, p.k_sr, bk, p.E, tmp.data(), kLdT);
      p.packed->pack(p.E, bk, kLdT, tmp.data(), packed_kt(b, hk, jb));
      const T* v = v_rows(b, hk, j0);
      if (bkp == bk) {
        p.packed->pack(bk, p.Ev, p.v_sr, v, packed_v(b, hk, jb));
      } else {
        for (int64_t r = 0; r < bk; ++r) std::copy(v + r * p.v_sr, v + r * p.v_sr + p.Ev, &tmp[r * p.Ev]);
        std::fill(&tmp[bk * p.Ev], &tmp[bkp * p.Ev], T{});
        p.packed->pack(bkp, p.Ev, p.Ev, tmp.data(), packed_v(b, hk, jb));
      }
    }
  }

  void pack_vt(int64_t begin, int64_t end) const {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = key_blocks(p), jb = t % nb, b = t / nb / p.Hk, hk = t / nb % p.Hk;
      const int64_t j0 = jb * kFwdBlockK, bk = std::min(kFwdBlockK, p.S - j0);
      const T* v = v_rows(b, hk, j0);
      T* vt = packed_vt(b, hk, jb);
      const int64_t ldvt = slot_ld_vt(p);
      transpose_any(v, p.v_sr, bk, p.Ev, vt, ldvt);
      if (bk & 1)
        for (int64_t c = 0; c < p.Ev; ++c) vt[c * ldvt + bk] = T{};
    }
  }

  // y (cols x rows, row stride ldy) = x^T, x rows x cols with row stride ldx.
  static void transpose(const T* x, int64_t ldx, int64_t rows, int64_t cols, T* y, int64_t ldy) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) y[c * ldy + r] = x[r * ldx + c];
  }
  // The same, by gathers (transpose_zmm) for 16-bit types where the CPU and the indices allow.
  static void transpose_any(const T* x, int64_t ldx, int64_t rows, int64_t cols, T* y,
                            int64_t ldy) {
#ifdef FUSEDATTN_ZMM_BF16
    if constexpr (kIsHalf<T>) {
      if (has_zmm_bf16() && 15 * ldx + cols < (int64_t(1) << 30))
        return transpose_zmm(x, ldx, rows, cols, y, ldy);
    }
#endif
#ifdef FUSEDATTN_ZMM
    if constexpr (std::is_same_v<T, float>) {
      if (has_zmm() && 15 * ldx + cols < (int64_t(1) << 31))
        return transpose_zmm_f32(x, ldx, rows, cols, y, ldy);
    }
#endif
    transpose(x, ldx, rows, cols, y, ldy);
  }
#ifdef FUSEDATTN_ZMM
  // fp32, 16 rows at a time: one gather per column of x fetches it for the 16 rows, one store
  // writes them as a run of y's row (the scalar loop's strided stores were 5-7% of an fp32
  // backward). Needs 15 * ldx + cols < 2^31 (32-bit indices). stream: y is an output that
  // is not read back: whole aligned vectors by non-temporal stores (see store_out_row).
  FUSEDATTN_ZMM static void transpose_zmm_f32(const float* x, int64_t ldx, int64_t rows,
                                              int64_t cols, float* y, int64_t ldy,
                                              bool stream = false) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i row_off = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int32_t(ldx)));
    stream = stream && reinterpret_cast<uintptr_t>(y) % 64 == 0 && ldy % 16 == 0;
    for (int64_t r = 0; r < rows; r += 16) {
      const __mmask16 in = __mmask16((1u << std::min<int64_t>(rows - r, 16)) - 1);
      const float* xr = x + r * ldx;
      for (int64_t c = 0; c < cols; ++c) {
        const __m512 col = _mm512_mask_i32gather_ps(
            _mm512_setzero_ps(), in, _mm512_add_epi32(row_off, _mm512_set1_epi32(int32_t(c))), xr, 4);
        if (stream && in == 0xffff) {
          _mm512_stream_ps(y + c * ldy + r, col);
        } else {
          _mm512_mask_storeu_ps(y + c * ldy + r, in, col);
        }
      }
    }
    if (stream) _mm_sfence();
  }
#endif

#ifdef FUSEDATTN_ZMM_BF16
#pragma GCC diagnostic push  // (see FUSEDATTN_ZMM)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
  // The same for 16-bit elements, 16 rows at a time: each 32-bit gather fetches the pairs
  // x[r][c], x[r][c + 1] of 16 rows (byte offsets: no alignment needed), whose low and high
  // halves are rows c and c + 1 of y. Needs 15 * ldx + cols < 2^30 (32-bit indices).
  FUSEDATTN_ZMM_BF16 static void transpose_zmm(const T* x, int64_t ldx, int64_t rows, int64_t cols,
                                               T* y, int64_t ldy) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i row_off = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int32_t(ldx)));
    for (int64_t r = 0; r < rows; r += 16) {
      const int64_t n = std::min<int64_t>(rows - r, 16);
      const __mmask16 in = __mmask16((1u << n) - 1);
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
#pragma GCC diagnostic pop  // (see FUSEDATTN_ZMM)

#pragma GCC diagnostic push  // (see FUSEDATTN_ZMM)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
  // vpermw indices that interleave the two halves of 32 bf16 (lane k of vector 2 i is lane i
  // of the low half, of 2 i + 1 the high half): two rows of keys into the packed pair layout.
  alignas(64) static constexpr uint16_t kInterleave[32] = {
      0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  // causal_offset clamped so that the lane cuts computed from it fit int32 (any cut <= -16 or
  // >= 32 acts the same).
  int64_t causal_shift() const {
    return p.causal ? std::clamp<int64_t>(p.causal_offset, -(1 << 30), 1 << 30) : 0;
  }

  // bf16 forward, keys as the GEMMs' rows. S^T (bk x bq) = K Q^T takes K's rows straight
  // from the input as the A operand and Q^T, packed once per task, as B (one panel: bq <= 64);
  // the softmax then runs down S^T's columns, 16 queries to a vector (running max and sum as
  // vectors: no horizontal reductions, no call per row), and its exp pass writes P^T in the
  // packed layout itself (pairs of keys interleaved: vcvtne2ps2bf16 + vpermw), the B operand
  // of O^T (Ev x bq) += V^T P^T. Two brgemm calls per block where the query-rows path makes
  // nine (S in 64-column panels, then P V), and no packing of K.
  // Everything is in log2 units (scale and the key bias pre-multiplied by log2(e)), so that
  // the exponent needs no multiply. Per 16 elements of S: load + multiply (FMA with a key
  // bias) + masked max; then one FMA (s * scale - max; with a bias, + bias - max), exp2 (6
  // ops), add, and half a convert/permute/store. Masks: key padding as a per-key bias (-inf:
  // the key is skipped), causal as lane masks. The scores enter as fma(s, scale, bias - max),
  // so a large |s * scale| costs no extra rounding (scale's own, 6e-8 relative, is far below
  // the bf16 rounding of P).
  // Measured against the query-rows path: perf/bench entries 4c-4d in PERFORMANCE.md; log2
  // units, vreduceps and the bias-free loops: 8a-8b.
  FUSEDATTN_ZMM_BF16 void forward_task_kr(int64_t t, FwdWork& w) const {
    static_assert(kFwdBlockQ <= 64, "Q^T must be one packed panel");
    constexpr int64_t kLd = kFwdBlockQ;  // row stride of S^T and O^T
    constexpr float kInf = std::numeric_limits<float>::infinity();
    const auto [bh, b, h, hk, i0, bq] = q_task(t);
    const int64_t nc = (bq + 15) / 16, ldb = 16 * nc;  // vectors of queries; P^T's pair stride
    // Scores enter in log2 units: s * scale * log2(e) + bias_j * log2(e).
    const __m512 scale = _mm512_set1_ps(float(p.scale * double(kLog2e)));
    const bool has_bias = p.kpm_kind != MaskKind::None;
    const __m512 ninf = _mm512_set1_ps(-kInf), zero = _mm512_setzero_ps();
    __m512 m[4], l[4];  // per 16 queries: running max (of the scores in log2 units) and sum
    __mmask16 qmask[4];  // lanes that are queries of this task
    for (int c = 0; c < 4; ++c) {
      m[c] = ninf, l[c] = zero;
      const int64_t n = std::clamp<int64_t>(bq - 16 * c, 0, 16);
      qmask[c] = __mmask16((1u << n) - 1);
    }
    // Key j is hidden from query i < j - causal_offset.
    const int64_t causal_shift = this->causal_shift();
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i inter = _mm512_load_si512(kInterleave);

    const T* q = q_rows(b, h, i0);
    if (15 * p.q_sr + p.E < (int64_t(1) << 30)) {
      // Packed Q^T straight from Q: word (r, i) of the layout (checked by
      // packed_layout_is_vnni) is the element pair Q[i][2r], Q[i][2r + 1], gathered for 16
      // queries at a time (the pairs need no alignment: byte offsets, scale 2).
      int32_t* qt = reinterpret_cast<int32_t*>(w.qt_packed.data());
      const __m512i rows = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int32_t(p.q_sr)));
      for (int c = 0; c < nc; ++c) {
        const T* qc = q + 16 * c * p.q_sr;
        for (int64_t r = 0; r < p.E / 2; ++r) {
          const __m512i idx = _mm512_add_epi32(rows, _mm512_set1_epi32(int32_t(2 * r)));
          _mm512_storeu_si512(qt + r * ldb + 16 * c,
                              _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), qmask[c], idx, qc, 2));
        }
      }
    } else {  // row stride too large for 32-bit gather indices: transpose, then pack
      transpose(q, p.q_sr, bq, p.E, w.qt.data(), kLd);
      p.packed->pack(p.E, bq, kLd, w.qt.data(), w.qt_packed.data());
    }
    float* ot = w.acc.data();
    std::fill(ot, ot + p.Ev * kLd, 0.f);


    const int64_t kv_end = this->kv_end(b, i0 + bq - 1);
    for (int64_t j0 = 0; j0 < kv_end; j0 += kFwdBlockK) {
      const int64_t bk = std::min(kFwdBlockK, kv_end - j0), bkp = bk + (bk & 1);
      float* st = w.s.data();
      p.packed->gemm(bk, bq, p.E, p.E, p.k_sr, kLd, false, k_rows(b, hk, j0), w.qt_packed.data(), st);
      float* bias = w.bias.data();
      key_bias(b, j0, bk, bias);
      if (has_bias)
        for (int64_t j = 0; j < bk; ++j) bias[j] *= kLog2e;

      // keep[c * kFwdBlockK + j]: the lanes of query vector c that see key j (causal; padding,
      // a bias of -inf, hides a key from all), 16 keys at a time.
      uint16_t* keep = w.keep.data();
      for (int64_t j = 0; j < bk; j += 16) {
        const __mmask16 in = __mmask16((1u << std::min<int64_t>(bk - j, 16)) - 1);
        const __m512 bj = _mm512_maskz_loadu_ps(in, bias + j);
        const __mmask16 alive = _mm512_mask_cmp_ps_mask(in, bj, ninf, _CMP_NEQ_UQ);
        // Lanes below cut(j) = j - offset - i0 - 16 c are hidden by causality.
        const __m512i cut0 = _mm512_add_epi32(_mm512_set1_epi32(int32_t(j0 + j - causal_shift - i0)), lane);
        for (int c = 0; c < nc; ++c) {
          __m512i k = _mm512_set1_epi32(qmask[c]);
          if (p.causal) {
            const __m512i cut = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(cut0, _mm512_set1_epi32(16 * c)),
                                                                  _mm512_setzero_si512()), _mm512_set1_epi32(16));
            k = _mm512_and_si512(k, _mm512_sllv_epi32(_mm512_set1_epi32(0xffff), cut));
          }
          _mm512_mask_cvtepi32_storeu_epi16(keep + c * kFwdBlockK + j, in, _mm512_maskz_mov_epi32(alive, k));
        }
      }
      T* pt = w.narrow.data();
      // One vector of queries at a time, so that its max and sum stay in registers.
      for (int c = 0; c < nc; ++c, keep += kFwdBlockK) {
        const float* col = st + 16 * c;
        __m512 mb0 = ninf, mb1 = ninf;  // two chains: vmaxps' latency, not its throughput
        int64_t j = 0;
        if (has_bias) {
          for (; j + 1 < bk; j += 2) {
            const __m512 v0 = _mm512_fmadd_ps(_mm512_loadu_ps(col + j * kLd), scale, _mm512_set1_ps(bias[j]));
            const __m512 v1 = _mm512_fmadd_ps(_mm512_loadu_ps(col + (j + 1) * kLd), scale,
                                              _mm512_set1_ps(bias[j + 1]));
            mb0 = _mm512_mask_max_ps(mb0, keep[j], mb0, v0);
            mb1 = _mm512_mask_max_ps(mb1, keep[j + 1], mb1, v1);
          }
        } else {
          for (; j + 1 < bk; j += 2) {
            mb0 = _mm512_mask_max_ps(mb0, keep[j], mb0, _mm512_mul_ps(_mm512_loadu_ps(col + j * kLd), scale));
            mb1 = _mm512_mask_max_ps(mb1, keep[j + 1], mb1,
                                     _mm512_mul_ps(_mm512_loadu_ps(col + (j + 1) * kLd), scale));
          }
        }
        if (j < bk) {
          const __m512 v0 = _mm512_fmadd_ps(_mm512_loadu_ps(col + j * kLd), scale, _mm512_set1_ps(bias[j]));
          mb0 = _mm512_mask_max_ps(mb0, keep[j], mb0, v0);
        }
        // The new max, and where it is still -inf (no visible key yet) 0 for the exponents,
        // so that exp(-inf - 0) = 0 instead of NaN.
        const __m512 mn = _mm512_max_ps(m[c], _mm512_max_ps(mb0, mb1));
        const __m512 ms = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mn, ninf, _CMP_EQ_OQ), mn, zero);
        const __m512 alpha = exp2_zmm<false>(_mm512_sub_ps(m[c], ms));
        m[c] = mn;
        for (int64_t r = 0; r < p.Ev; ++r) {
          float* o = ot + r * kLd + 16 * c;
          _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), alpha));
        }
        // 2^(s * scale + bias_j - m) for keys j, j + 1, rounded and interleaved in pairs.
        __m512 sum = _mm512_mul_ps(l[c], alpha);
        T* pc = pt + 32 * c;
        const __m512 neg_ms = _mm512_sub_ps(zero, ms);
        const auto exps = [&](auto biased) FUSEDATTN_ZMM_BF16 {
          for (int64_t j = 0; j < bk; j += 2) {
            const __m512 b0 = biased ? _mm512_add_ps(_mm512_set1_ps(bias[j]), neg_ms) : neg_ms;
            const __m512 e0 = exp2_zmm<true>(_mm512_fmadd_ps(_mm512_loadu_ps(col + j * kLd), scale, b0), keep[j]);
            __m512 e1 = zero;  // the zero key that pads an odd block
            if (j + 1 < bk) {
              const __m512 b1 = biased ? _mm512_add_ps(_mm512_set1_ps(bias[j + 1]), neg_ms) : neg_ms;
              e1 = exp2_zmm<true>(_mm512_fmadd_ps(_mm512_loadu_ps(col + (j + 1) * kLd), scale, b1), keep[j + 1]);
            }
            sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
            const __m512i pair = _mm512_permutexvar_epi16(inter, __m512i(_mm512_cvtne2ps_pbh(e1, e0)));
            _mm512_storeu_si512(pc + (j / 2) * 2 * ldb, pair);
          }
        };
        if (has_bias) {
          exps(std::true_type{});
        } else {
          exps(std::false_type{});
        }
        l[c] = sum;
      }
      p.packed->gemm(p.Ev, bq, bkp, bkp, slot_ld_vt(p), kLd, true, packed_vt(b, hk, j0 / kFwdBlockK), pt, ot);
    }
    alignas(64) float mf[64], lf[64];
    for (int c = 0; c < nc; ++c) _mm512_store_ps(mf + 16 * c, m[c]), _mm512_store_ps(lf + 16 * c, l[c]);
    T* out = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + i0 * p.o_sr;
    A* lse = lse_row(b, h) + i0;
    const __m512i cols = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int32_t(kLd)));
    for (int64_t i = 0; i < bq; ++i) {  // row i of the output is column i of O^T: gathered
      const __m512 inv = _mm512_set1_ps(lf[i] > 0.f ? 1.f / lf[i] : 0.f);  // no visible key: 0
      column_to_bf16_row(ot + i, kLd, cols, p.Ev, inv, out + i * p.o_sr, /*nt=*/false);
      lse[i] = lf[i] > 0.f ? mf[i] * kLn2 + std::log(lf[i]) : (lf[i] == 0.f ? -kInf : lf[i]);
    }
  }
#pragma GCC diagnostic pop  // (see FUSEDATTN_ZMM)
#endif

  void forward_task(int64_t t, FwdWork& w) const {
    if (p.weights) return forward_weights_task(t, w);
#ifdef FUSEDATTN_ZMM_BF16
    if constexpr (std::is_same_v<T, bf16>) {
      if (kr) return forward_task_kr(t, w);
    }
#endif
    const auto [bh, b, h, hk, i0, bq] = q_task(t);
    const T* q = q_rows(b, h, i0);
    std::fill(w.m.begin(), w.m.end(), kNegInf);  // running max, in units of raw s
    std::fill(w.l.begin(), w.l.end(), A(0));
    std::fill(w.acc.begin(), w.acc.end(), A(0));
    const int64_t kv_end = this->kv_end(b, i0 + bq - 1);
    const bool packed = kIsHalf<T> && p.packed != nullptr;
    for (int64_t j0 = 0; j0 < kv_end; j0 += kFwdBlockK) {
      // Packed: the block's columns up to kv_end rounded up to whole 64-column panels of the
      // packed layout (the causal mask hides the extra ones); a prefix of a packed V block is
      // a valid packed operand. bkp is P's row stride and the P V product's depth, even for
      // the packed layout (when odd, the block is S's last: P's extra column is 0, and so is
      // the extra row packed with V).
      int64_t bk = std::min(kFwdBlockK, kv_end - j0);
      if (packed) bk = std::min(std::min(kFwdBlockK, p.S - j0), round64(bk));
      const int64_t bkp = packed ? bk + (bk & 1) : bk;
      A* s = w.s.data();
      if (packed) {
        p.packed->gemm(bq, bk, p.E, p.E, p.q_sr, bk, false, q, packed_kt(b, hk, j0 / kFwdBlockK),
                       reinterpret_cast<float*>(s));
      } else if (fk) {
        fgemm(bq, bk, p.E, p.q_sr, slot_ld_kt(p), bk, false, q, packed_kt(b, hk, j0 / kFwdBlockK), s);
      } else {
        mm(false, true, bq, bk, p.E, A(1), q, p.q_sr, k_rows(b, hk, j0), p.k_sr, A(0), s, bk);
      }
      apply_masks(s, bk, b, h, i0, bq, j0, bk, w.bias.data());
      // P for the P V product: s itself, or (half types) rounded into w.narrow row by row
      // while the row is still in L1.
      T* pn = kIsHalf<T> ? w.narrow.data() : nullptr;
      for (int64_t r = 0; r < bq; ++r) {
        A* row = s + r * bk;
        if constexpr (kIsHalf<T>) {
          if (bkp != bk) pn[r * bkp + bk] = T{};
        }
        const A m_new = std::max(w.m[r], row_max(row, bk));
        if (m_new == kNegInf) {  // this row has seen no visible key yet
          std::fill(row, row + bk, A(0));
          if constexpr (kIsHalf<T>) narrow_row(row, pn + r * bkp, bk);
          continue;
        }
        A block_sum;
        if constexpr (std::is_same_v<T, bf16>) {
          if (!p.dropout) {  // one pass: exp, sum, round to bf16
            block_sum = exp_sum_bf16_row(row, pn + r * bkp, bk, mul, m_new * mul);
          } else {
            block_sum = exp_sum_row(row, bk, mul, m_new * mul);
            drop_row(row, b, h, i0 + r, j0, bk);
            narrow_row(row, pn + r * bkp, bk);
          }
        } else {
          block_sum = exp_sum_row(row, bk, mul, m_new * mul);
          if (p.dropout) drop_row(row, b, h, i0 + r, j0, bk);
          if constexpr (kIsHalf<T>) narrow_row(row, pn + r * bkp, bk);
        }
        const A alpha = exp_scalar((w.m[r] - m_new) * mul);  // 0 when m was -inf
        w.l[r] = w.l[r] * alpha + block_sum;  // normaliser of the probabilities before dropout
        if (alpha != A(1)) scale_row(w.acc.data() + r * p.Ev, p.Ev, alpha);
        w.m[r] = m_new;
      }
      if (packed) {
        p.packed->gemm(bq, p.Ev, bkp, v_depth(j0), bkp, p.Ev, true, pn,
                       packed_v(b, hk, j0 / kFwdBlockK), reinterpret_cast<float*>(w.acc.data()));
      } else if (fk) {
        fgemm(bq, p.Ev, bk, bk, p.v_sr, p.Ev, true, s, v_rows(b, hk, j0), w.acc.data());
      } else {
        const T* pv = nullptr;
        if constexpr (kIsHalf<T>) pv = pn; else pv = s;
        mm(false, false, bq, p.Ev, bk, A(1), pv, bk, v_rows(b, hk, j0), p.v_sr, A(1),
           w.acc.data(), p.Ev);
      }
    }
    T* out = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + i0 * p.o_sr;
    A* lse = lse_row(b, h) + i0;
    for (int64_t r = 0; r < bq; ++r) {
      const A inv = w.l[r] > A(0) ? A(1) / w.l[r] : A(0);  // no visible key: output 0
      const A* a = w.acc.data() + r * p.Ev;
      store_fwd_row(a, inv, out + r * p.o_sr, p.Ev);
      // l == 0: no visible key, lse = -inf; l NaN (NaN input) stays NaN.
      lse[r] = w.l[r] > A(0) ? w.m[r] * mul + std::log(w.l[r]) : (w.l[r] == A(0) ? kNegInf : w.l[r]);
    }
    out_rows_done();
  }

  // Forward that also returns the weights (p.weights, (B, H, L, S)). The weights are an
  // L x S output anyway, so the block's scores against every visible key are formed at once
  // in the weights' own rows (fp32/fp64) or in w.rows (half types: fp32, row stride ns),
  // exponentiated and normalised there with the row's exact max and sum, and those rows are
  // P in O = P V: two GEMMs and one exp per score, the flash forward's count, where a
  // flash forward followed by a pass rebuilding the weights from the lse took three and two.
  // Returned weights are the probabilities before dropout; O uses the dropped ones.
  // avg set (averaging): this head's weights go to per-task buffers (w.rows, and w.head for
  // half types) and are added into avg (bq x S) instead of stored.
  void forward_weights_task(int64_t t, FwdWork& w, A* avg = nullptr) const {
    const auto [bh, b, h, hk, i0, bq] = q_task(t);
    const T* q = q_rows(b, h, i0);
    T* wout = static_cast<T*>(p.weights) + (bh * p.L + i0) * p.S;
    if (avg) {
      if constexpr (std::is_same_v<T, A>) {
        wout = w.rows.data();
      } else {
        wout = w.head.data();
      }
    }
    T* out = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + i0 * p.o_sr;
    A* lse = lse_row(b, h) + i0;
    const bool packed = kIsHalf<T> && p.packed != nullptr;
    // Columns formed: the visible ones; packed, up to whole 64-column panels of packed K^T
    // (the causal mask hides the extra ones). Columns ns.. of the weights are 0.
    int64_t ns = kv_end(b, i0 + bq - 1);
    if (packed) ns = std::min(p.S, round64(ns));
    A* s;
    int64_t lds;
    if constexpr (std::is_same_v<T, A>) {
      s = wout, lds = p.S;
    } else {
      s = w.rows.data(), lds = ns;
    }
    if (ns == 0) {  // no query of the block sees a key
      for (int64_t r = 0; r < bq; ++r) {
        if (!avg) std::fill(wout + r * p.S, wout + (r + 1) * p.S, T{});
        std::fill(out + r * p.o_sr, out + r * p.o_sr + p.Ev, T{});
        lse[r] = kNegInf;
      }
      return;
    }
    if (packed) {
      for (int64_t j0 = 0; j0 < ns; j0 += kFwdBlockK) {
        p.packed->gemm(bq, std::min(kFwdBlockK, ns - j0), p.E, p.E, p.q_sr, lds, false, q,
                       packed_kt(b, hk, j0 / kFwdBlockK), reinterpret_cast<float*>(s + j0));
      }
    } else if (fk) {
      for (int64_t j0 = 0; j0 < ns; j0 += kFwdBlockK) {
        fgemm(bq, std::min(kFwdBlockK, ns - j0), p.E, p.q_sr, slot_ld_kt(p), lds, false, q,
              packed_kt(b, hk, j0 / kFwdBlockK), s + j0);
      }
    } else {
      mm(false, true, bq, ns, p.E, A(1), q, p.q_sr, k_rows(b, hk, 0), p.k_sr, A(0), s, lds);
    }
    for (int64_t j0 = 0; j0 < ns; j0 += kFwdBlockK) {
      apply_masks(s + j0, lds, b, h, i0, bq, j0, std::min(kFwdBlockK, ns - j0), w.bias.data());
    }
    // Rows of s end normalised, except for half types without dropout: there the weights are
    // rounded from exp * (1 / sum) in one pass, and w.l keeps 1 / sum for the odd block below.
    // Averaging fp32/fp64 (out_scaled): the rows stay exp, avg takes exp * (1 / sum) / H in
    // one pass, and O = exp V is scaled by w.l = 1 / sum once formed (a pass fewer per score).
    const bool out_scaled = avg != nullptr && std::is_same_v<T, A>;
    const bool s_normalised = (std::is_same_v<T, A> && !out_scaled) || (kIsHalf<T> && p.dropout);
    const A inv_h = A(1) / A(p.H);
    for (int64_t r = 0; r < bq; ++r) {
      A* row = s + r * lds;
      T* wrow = wout + r * p.S;
      const A m = row_max(row, ns);
      A sum = 0;
      if (m == kNegInf) {  // no visible key: weights 0, output 0, lse -inf
        std::fill(row, row + ns, A(0));
      } else if constexpr (kIsHalf<T>) {
        sum = exp_sum_row_short(row, ns, mul, m * mul);
      } else {
        sum = exp_sum_row(row, ns, mul, m * mul);
      }
      const A inv = m == kNegInf ? A(0) : A(1) / sum;  // a NaN score: the sum, so the row, NaN
      if constexpr (!std::is_same_v<T, A>) {
        if (s_normalised) {
          scale_row(row, ns, inv);
          narrow_row(row, wrow, ns);
        } else {
          scale_narrow_row(row, inv, wrow, ns);
          w.l[r] = inv;
        }
      } else if (out_scaled) {
        w.l[r] = inv;
        add_scaled_row(avg + r * p.S, row, ns, inv * inv_h);
      } else {
        scale_row(row, ns, inv);
      }
      if (!avg) {
        std::fill(wrow + ns, wrow + p.S, T{});
      } else if constexpr (kIsHalf<T>) {  // this head's weights as returned (rounded), / H
        A* arow = avg + r * p.S;
        add_scaled_row(arow, wrow, ns, inv_h);
      }
      lse[r] = sum > A(0) ? m * mul + std::log(sum) : (sum == A(0) ? kNegInf : sum);
    }
    // O = P V, P the normalised rows (for half types the rounded weights themselves), in one
    // product, or key block by key block: packed V is one slot per block, and dropout
    // multiplies a copy of P.
    A* acc = w.acc.data();
    for (int64_t j0 = 0, bk = 0; j0 < ns; j0 += bk) {
      bk = p.dropout || packed ? std::min(kFwdBlockK, ns - j0) : ns - j0;
      // The packed product's depth must be even; bk is odd only in S's last block (ns < S is
      // a multiple of 64): P gets a zero column there, as packed V has a zero row.
      const int64_t bkp = packed ? bk + (bk & 1) : bk;
      const T* pa = wout + j0;
      int64_t lda = p.S;
      if (p.dropout || bkp != bk) {
        A* pd = w.s.data();  // bq x bkp
        for (int64_t r = 0; r < bq; ++r) {
          std::copy(s + r * lds + j0, s + r * lds + j0 + bk, pd + r * bkp);
          if (!s_normalised && !out_scaled) scale_row(pd + r * bkp, bk, w.l[r]);
          if (p.dropout) drop_row(pd + r * bkp, b, h, i0 + r, j0, bk);
          if (bkp != bk) pd[r * bkp + bk] = A(0);
        }
        pa = operand(pd, bq * bkp, w.narrow.data()), lda = bkp;
      }
      if (packed) {
        p.packed->gemm(bq, p.Ev, bkp, v_depth(j0), lda, p.Ev, j0 > 0, pa,
                       packed_v(b, hk, j0 / kFwdBlockK), reinterpret_cast<float*>(acc));
      } else if (fk) {
        fgemm(bq, p.Ev, bk, lda, p.v_sr, p.Ev, j0 > 0, pa, v_rows(b, hk, j0), acc);
      } else {
        mm(false, false, bq, p.Ev, bk, A(1), pa, lda, v_rows(b, hk, j0), p.v_sr,
           A(j0 > 0 ? 1 : 0), acc, p.Ev);
      }
    }
    for (int64_t r = 0; r < bq; ++r) {
      store_fwd_row(acc + r * p.Ev, out_scaled ? w.l[r] : A(1), out + r * p.o_sr, p.Ev);
    }
    out_rows_done();
  }

  // Keys-as-rows backward (backward_task_kr): blocks of kBwdBlockK keys against chunks of up
  // to kKrQ queries (64-query panels); Lp = L rounded up to 64.
  static constexpr int64_t kKrQ = 256;
  static int64_t l_pad(const FlashParams& q) { return round64(q.L); }
  static int64_t ld_kt(const FlashParams& q) { return (q.S + 1) / 2 * 2 + 32; }  // K^T's row stride
  // fp32: the row stride of Q^T, dO^T and dQ^T, 16 floats more than Lp (at Lp = 1024, a 4 KiB
  // stride put the products' B rows into the same L1 sets: 146 ms, 120 with the + 16).
  static int64_t ld_qt(const FlashParams& q) { return l_pad(q) + 16; }

  struct BwdWork {
    std::vector<A> s, dp, dq, dk, dv, d, bias, lse;
    std::vector<T> narrow_s, narrow_dp, ds_packed, kt, qt, dot, qp, dop, tmp;
    explicit BwdWork(const FlashParams& p, bool kr)
        : s((kr ? kKrQ : kBwdBlockQ) * kBwdBlockK), dp(s.size()),
          dq((kr ? ld_qt(p) : p.L) * p.E), dk(p.S * p.E), dv(p.S * p.Ev), d(kr ? l_pad(p) : p.L),
          bias(kBwdBlockK), lse(kr ? l_pad(p) : 0),
          narrow_s(kIsHalf<T> ? s.size() : 0), narrow_dp(narrow_s.size()),
          ds_packed(kr && kIsHalf<T> ? s.size() : 0), kt(kr ? p.E * ld_kt(p) : 0),
          qt(kr ? p.E * ld_qt(p) : 0), dot(kr ? p.Ev * ld_qt(p) : 0),
          qp(kr && kIsHalf<T> ? l_pad(p) * round64(p.E) : 0),
          dop(kr && kIsHalf<T> ? l_pad(p) * round64(p.Ev) : 0),
          tmp(kr && kIsHalf<T> ? l_pad(p) * std::max(p.E, p.Ev) : 0) {}
  };

  void backward(int64_t begin, int64_t end) const {
    const bool kr_bwd = keys_as_rows_backward(p);
    BwdWork w(p, kr_bwd);
#ifdef FUSEDATTN_ZMM_BF16
    if constexpr (std::is_same_v<T, bf16>) {
      if (kr_bwd) {
        for (int64_t t = begin; t < end; ++t) backward_task_kr(t, w);
        p.packed->release();
        return;
      }
    }
#endif
#ifdef FUSEDATTN_ZMM
    if constexpr (std::is_same_v<T, float>) {
      if (kr_bwd) {
        for (int64_t t = begin; t < end; ++t) backward_task_kr(t, w);
        return;
      }
    }
#endif
    for (int64_t t = begin; t < end; ++t) backward_task(t, w);
  }

  void backward_task(int64_t t, BwdWork& w) const {
    const int64_t b = t / p.Hk, hk = t % p.Hk, ke = key_end(b);
    std::fill(w.dk.begin(), w.dk.end(), A(0));
    std::fill(w.dv.begin(), w.dv.end(), A(0));
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const A* lse = lse_row(b, h);
      const A* dlse = p.dlse ? static_cast<const A*>(p.dlse) + (b * p.H + h) * p.L : nullptr;
      for (int64_t i = 0; i < p.L; ++i) w.d[i] = out_dot_dout(b, h, i);
      std::fill(w.dq.begin(), w.dq.end(), A(0));
      for (int64_t j0 = 0; j0 < ke; j0 += kBwdBlockK) {
        const int64_t bk = std::min(kBwdBlockK, ke - j0);
        // Queries that see any key of this block: i >= j0 - causal_offset.
        const int64_t i_first = p.causal ? std::max<int64_t>(j0 - p.causal_offset, 0) : 0;
        const T* k = k_rows(b, hk, j0);
        const T* v = v_rows(b, hk, j0);
        for (int64_t i0 = i_first / kBwdBlockQ * kBwdBlockQ; i0 < p.L; i0 += kBwdBlockQ) {
          const int64_t bq = std::min(kBwdBlockQ, p.L - i0);
          const T* q = q_rows(b, h, i0);
          const T* dout = dout_rows(b, h, i0);
          A* s = w.s.data();
          A* dp = w.dp.data();
          mm(false, true, bq, bk, p.E, A(1), q, p.q_sr, k, p.k_sr, A(0), s, bk);
          apply_masks(s, bk, b, h, i0, bq, j0, bk, w.bias.data());
          probabilities(s, bq, bk, lse + i0);
          // dP = dO V^T. With dropout the forward used P * M: dP picks up M here, and dV
          // takes P * M below, once dS (which needs P itself) is formed.
          mm(false, true, bq, bk, p.Ev, A(1), dout, p.do_sr, v, p.v_sr, A(0), dp, bk);
          if (p.dropout) {
            for (int64_t r = 0; r < bq; ++r) drop_row(dp + r * bk, b, h, i0 + r, j0, bk);
          }
          for (int64_t r = 0; r < bq; ++r) {
            softmax_grad_row(dp + r * bk, s + r * bk, bk, w.d[i0 + r], dlse ? dlse[i0 + r] : A(0));
          }
          if (p.dropout) {
            for (int64_t r = 0; r < bq; ++r) drop_row(s + r * bk, b, h, i0 + r, j0, bk);
          }
          mm(true, false, bk, p.Ev, bq, A(1), operand(s, bq * bk, w.narrow_s.data()), bk, dout,
             p.do_sr, A(1), w.dv.data() + j0 * p.Ev, p.Ev);
          // dS is in dp: dQ += scale dS K, dK += scale dS^T Q.
          const T* ds = operand(dp, bq * bk, w.narrow_dp.data());
          mm(false, false, bq, p.E, bk, A(p.scale), ds, bk, k, p.k_sr, A(1),
             w.dq.data() + i0 * p.E, p.E);
          mm(true, false, bk, p.E, bq, A(p.scale), ds, bk, q, p.q_sr, A(1),
             w.dk.data() + j0 * p.E, p.E);
        }
      }
      T* dq = dq_rows(b, h);
      for (int64_t i = 0; i < p.L; ++i) store_out_row(w.dq.data() + i * p.E, A(1), dq + i * p.dq_sr, p.E);
    }
    store_dk_dv(b, hk, w);
  }

  // D_i = rowsum(dO * O) for query i: softmax's backward term.
  A out_dot_dout(int64_t b, int64_t h, int64_t i) const {
    const T* o = static_cast<const T*>(p.out) + b * p.o_sb + h * p.o_sh + i * p.o_sr;
    return dot_row(o, dout_rows(b, h, i), p.Ev);
  }
  // The gradients' rows of one (b, head): row i at + i * d*_sr.
  T* dq_rows(int64_t b, int64_t h) const { return static_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh; }
  // The task's accumulated dK, dV (fp32/fp64) into the outputs.
  void store_dk_dv(int64_t b, int64_t hk, const BwdWork& w) const {
    T* dk = static_cast<T*>(p.dk) + b * p.dk_sb + hk * p.dk_sh;
    T* dv = static_cast<T*>(p.dv) + b * p.dv_sb + hk * p.dv_sh;
    for (int64_t j = 0; j < p.S; ++j) {
      store_out_row(w.dk.data() + j * p.E, A(1), dk + j * p.dk_sr, p.E);
      store_out_row(w.dv.data() + j * p.Ev, A(1), dv + j * p.dv_sr, p.Ev);
    }
    out_rows_done();
  }

  // Keys-as-rows backwards, per query head h: w.lse and w.d for queries 0 .. Lp - 1: lse
  // (+inf where the query sees no key, or is padding past L: exp gives 0) and D =
  // rowsum(dO * O) - dlse (softmax's backward term and lse's own gradient).
  void kr_lse_and_d(int64_t b, int64_t h, BwdWork& w) const {
    const A* lse_in = lse_row(b, h);
    const A* dlse = p.dlse ? static_cast<const A*>(p.dlse) + (b * p.H + h) * p.L : nullptr;
    for (int64_t i = 0; i < l_pad(p); ++i) {
      if (i >= p.L) {
        w.lse[i] = std::numeric_limits<A>::infinity(), w.d[i] = A(0);
        continue;
      }
      w.lse[i] = lse_in[i] == kNegInf ? std::numeric_limits<A>::infinity() : lse_in[i];
      w.d[i] = out_dot_dout(b, h, i) - (dlse ? dlse[i] : A(0));
    }
  }
  void backward_task_kr(int64_t t, BwdWork& w) const;  // bf16 and fp32 (defined below)
};

#ifdef FUSEDATTN_ZMM_BF16
#pragma GCC diagnostic push  // (see FUSEDATTN_ZMM)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// bf16 backward with keys as the GEMMs' rows, the forward_task_kr layout. One task per key/value
// head (dK, dV summed over its query heads, no atomics). Per query head: Q^T and dO^T packed in
// 64-query panels (B of S^T = K Q^T and dP^T = V dO^T, whose A are K's and V's rows straight
// from the inputs), Q and dO packed whole (B of dK += dS^T Q and dV += P^T dO, any 64-aligned
// run of rows), dQ^T (E x Lp, fp32) accumulated by dQ^T += K^T dS^T, K^T transposed once per
// task. Per block of kBwdBlockK keys and chunk of up to kKrQ queries: two products; one pass
// over S^T and dP^T, 16 queries to a vector (lse and D per lane, causal as lane masks, key
// padding per row), writing P^T and dS^T row-major (A operands) and dS^T packed in key pairs
// (B); three products. The query-rows backward's MKL calls transpose P and dS for dV and dK
// and pack every B per call: 56% of a bf16 backward in MKL, a fifth of it copies (perf,
// L=1024). Chunks of 256 queries rather than 64: dV's and dK's products then run 256 deep
// per load of their accumulators (measured: PERFORMANCE.md, entries 6c-6d).
template <>
FUSEDATTN_ZMM_BF16 void Flash<bf16>::backward_task_kr(int64_t t, BwdWork& w) const {
  using T = bf16;
  const int64_t b = t / p.Hk, hk = t % p.Hk, Lp = l_pad(p), ldkt = ld_kt(p);
  // Keys past key_end are skipped; an odd end inside S is rounded up to a padded key, so that
  // the dQ^T product's depth (bkp) never reaches a K^T column that is not zero or padding.
  const int64_t ke_visible = key_end(b), ke = std::min(p.S, ke_visible + (ke_visible & 1));
  const __m512 scale = _mm512_set1_ps(float(p.scale)), l2e = _mm512_set1_ps(kLog2e);
  const __m512 zero = _mm512_setzero_ps();
  const __m512i inter = _mm512_load_si512(kInterleave);
  const int64_t causal_shift = this->causal_shift();

  // K^T (E x S, row stride ldkt; column S zero, so that an odd last block has an even depth).
  T* kt = w.kt.data();
  transpose_any(k_rows(b, hk, 0), p.k_sr, p.S, p.E, kt, ldkt);
  for (int64_t e = 0; e < p.E; ++e) std::fill(kt + e * ldkt + p.S, kt + (e + 1) * ldkt, T{});
  std::fill(w.dk.begin(), w.dk.end(), 0.f);
  std::fill(w.dv.begin(), w.dv.end(), 0.f);
  T* tmp = w.tmp.data();
  // C (m x n, row stride n) += A (m x k, row stride k) times rows i0 .. i0 + k of x, packed
  // whole (Lp x n): panel c (64 columns, the last round16(w) wide) at Lp * 64 * c, its pair
  // rows 2 * round16(w) apart.
  const auto rows_product = [&](int64_t m, int64_t n, int64_t k, const T* a, const T* x_packed,
                                int64_t i0, float* c) FUSEDATTN_ZMM_BF16 {
    for (int64_t c0 = 0; c0 < n; c0 += 64) {
      const int64_t wc = std::min<int64_t>(64, n - c0), ldb = (wc + 15) / 16 * 16;
      p.packed->gemm(m, wc, k, k, k, n, true, a, x_packed + Lp * c0 + i0 * ldb, c + c0);
    }
  };
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    kr_lse_and_d(b, h, w);
    // This head's packed operands (rows past L zero).
    for (const bool is_q : {true, false}) {
      const T* x = is_q ? q_rows(b, h, 0) : dout_rows(b, h, 0);
      const int64_t ld = is_q ? p.q_sr : p.do_sr, n = is_q ? p.E : p.Ev;
      T* xt = is_q ? w.qt.data() : w.dot.data();
      for (int64_t i0 = 0; i0 < p.L; i0 += 64) {  // x^T by 64-query panels (n x 64 each)
        std::fill(tmp, tmp + n * 64, T{});
        transpose_any(x + i0 * ld, ld, std::min<int64_t>(64, p.L - i0), n, tmp, 64);
        p.packed->pack(n, 64, 64, tmp, xt + i0 * n);
      }
      for (int64_t r = 0; r < Lp; ++r) {  // x whole (Lp x n)
        if (r < p.L) std::copy(x + r * ld, x + r * ld + n, tmp + r * n);
        else std::fill(tmp + r * n, tmp + (r + 1) * n, T{});
      }
      p.packed->pack(Lp, n, n, tmp, is_q ? w.qp.data() : w.dop.data());
    }
    float* dqt = w.dq.data();  // E x Lp
    std::fill(dqt, dqt + p.E * Lp, 0.f);

    for (int64_t j0 = 0; j0 < ke; j0 += kBwdBlockK) {
      const int64_t bk = std::min(kBwdBlockK, ke - j0), bkp = bk + (bk & 1);
      float* bias = w.bias.data();
      key_bias(b, j0, bk, bias);
      // Queries that see any key of this block: i >= j0 - causal_offset.
      const int64_t i_first = p.causal ? std::max<int64_t>(j0 - p.causal_offset, 0) : 0;
      for (int64_t i0 = i_first / 64 * 64; i0 < p.L; i0 += kKrQ) {
        const int64_t nq = std::min(kKrQ, Lp - i0), nv = nq / 16;  // columns; query vectors
        float* st = w.s.data();   // S^T, bk x nq
        float* dpt = w.dp.data(); // dP^T, bk x nq
        p.packed->gemm(bk, nq, p.E, p.E, p.k_sr, nq, false, k_rows(b, hk, j0),
                       w.qt.data() + i0 * p.E, st);
        p.packed->gemm(bk, nq, p.Ev, p.Ev, p.v_sr, nq, false, v_rows(b, hk, j0),
                       w.dot.data() + i0 * p.Ev, dpt);
        T* pt = w.narrow_s.data();    // P^T, bk x nq
        T* dst = w.narrow_dp.data();  // dS^T * scale, bk x nq
        T* dsp = w.ds_packed.data();  // the same packed (pairs of keys), panel c at c * bkp * 64
        const float* lse = w.lse.data() + i0;
        const float* dd = w.d.data() + i0;
        for (int64_t j = 0; j < bkp; j += 2) {
          for (int64_t c = 0; c < nv; ++c) {
            __m512 ds2[2];
            for (int u = 0; u < 2; ++u) {
              const int64_t jj = j + u;
              if (jj >= bk) {  // the zero key that pads an odd block
                ds2[u] = zero;
                continue;
              }
              __mmask16 keep = bias[jj] == kNegInfF ? 0 : 0xffff;
              if (p.causal) {  // query i0 + 16 c + l sees key j0 + jj iff l >= cut
                const int64_t cut = std::clamp<int64_t>(j0 + jj - causal_shift - i0 - 16 * c, 0, 16);
                keep &= __mmask16(0xffffu << cut);
              }
              const __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(st + jj * nq + 16 * c), scale,
                                               _mm512_sub_ps(_mm512_set1_ps(bias[jj]),
                                                             _mm512_loadu_ps(lse + 16 * c)));
              const __m512 pr = exp2_zmm<true>(_mm512_mul_ps(x, l2e), keep);
              const __m512 dp = _mm512_loadu_ps(dpt + jj * nq + 16 * c);
              const __m512 ds = _mm512_mul_ps(
                  _mm512_mul_ps(pr, _mm512_sub_ps(dp, _mm512_loadu_ps(dd + 16 * c))), scale);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(pt + jj * nq + 16 * c),
                                  __m256i(_mm512_cvtneps_pbh(pr)));
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + jj * nq + 16 * c),
                                  __m256i(_mm512_cvtneps_pbh(ds)));
              ds2[u] = ds;
            }
            const __m512i pair = _mm512_permutexvar_epi16(inter, __m512i(_mm512_cvtne2ps_pbh(ds2[1], ds2[0])));
            _mm512_storeu_si512(dsp + (c / 4) * bkp * 64 + (j / 2) * 128 + (c % 4) * 32, pair);
          }
        }
        rows_product(bk, p.Ev, nq, pt, w.dop.data(), i0, w.dv.data() + j0 * p.Ev);
        rows_product(bk, p.E, nq, dst, w.qp.data(), i0, w.dk.data() + j0 * p.E);
        p.packed->gemm(p.E, nq, bkp, bkp, ldkt, Lp, true, kt + j0, dsp, dqt + i0);
      }
    }
    // dQ^T back to dQ's rows: 16 dims a gather, rounded, by non-temporal stores where
    // aligned (was a scalar loop, one element a store).
    T* dq = dq_rows(b, h);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i dims = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int32_t(Lp)));
    const bool nt = reinterpret_cast<uintptr_t>(dq) % 32 == 0 && p.dq_sr % 16 == 0;
    const bool gather = 15 * Lp + p.L < (int64_t(1) << 31);  // 32-bit indices
    for (int64_t i = 0; i < p.L && !gather; ++i) {
      for (int64_t e = 0; e < p.E; ++e) store(dqt[e * Lp + i], dq + i * p.dq_sr + e);
    }
    for (int64_t i = 0; i < p.L && gather; ++i) {
      column_to_bf16_row(dqt + i, Lp, dims, p.E, _mm512_set1_ps(1.f), dq + i * p.dq_sr, nt);
    }
    out_rows_done();
  }
  store_dk_dv(b, hk, w);
}
#pragma GCC diagnostic pop  // (see FUSEDATTN_ZMM)
#endif

#ifdef FUSEDATTN_ZMM
#pragma GCC diagnostic push  // (see FUSEDATTN_ZMM)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// fp32 backward, keys as the GEMMs' rows: the bf16 version's order of work on p.fgemm, whose
// operands are plain row-major matrices, so nothing is packed and every product reads its
// operands where they are: S^T = K Q^T and dP^T = V dO^T (A: K's and V's rows from the
// inputs; B: Q^T and dO^T, transposed once per head); P^T and dS^T * scale overwrite S^T and
// dP^T in one AVX-512 pass (16 queries to a vector, as in the bf16 pass); then dV += P^T dO and
// dK += dS^T Q (B: dO's and Q's rows from the inputs, the chunk's real queries only) and
// dQ^T += K^T dS^T (A: K^T, transposed once per task). The query-rows backward's MKL calls
// transpose P and dS for dV and dK and copy their B operands on every call.
template <>
FUSEDATTN_ZMM void Flash<float>::backward_task_kr(int64_t t, BwdWork& w) const {
  const int64_t b = t / p.Hk, hk = t % p.Hk, Lp = l_pad(p), ldkt = ld_kt(p), ldq = ld_qt(p);
  const int64_t ke = key_end(b);  // keys past it are padding: skipped
  const __m512 scale = _mm512_set1_ps(float(p.scale)), l2e = _mm512_set1_ps(kLog2e);
  const int64_t causal_shift = this->causal_shift();
  float* kt = w.kt.data();  // K^T, E x S (row stride ldkt)
  transpose_any(k_rows(b, hk, 0), p.k_sr, p.S, p.E, kt, ldkt);
  std::fill(w.dk.begin(), w.dk.end(), 0.f);
  std::fill(w.dv.begin(), w.dv.end(), 0.f);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    kr_lse_and_d(b, h, w);
    // Q^T (E x Lp) and dO^T (Ev x Lp), row stride ldq, columns L.. zero.
    float* qt = w.qt.data();
    float* dot = w.dot.data();
    transpose_any(q_rows(b, h, 0), p.q_sr, p.L, p.E, qt, ldq);
    transpose_any(dout_rows(b, h, 0), p.do_sr, p.L, p.Ev, dot, ldq);
    for (int64_t e = 0; e < p.E; ++e) std::fill(qt + e * ldq + p.L, qt + e * ldq + Lp, 0.f);
    for (int64_t e = 0; e < p.Ev; ++e) std::fill(dot + e * ldq + p.L, dot + e * ldq + Lp, 0.f);
    float* dqt = w.dq.data();  // E x Lp, row stride ldq
    std::fill(dqt, dqt + p.E * ldq, 0.f);

    for (int64_t j0 = 0; j0 < ke; j0 += kBwdBlockK) {
      const int64_t bk = std::min(kBwdBlockK, ke - j0);
      float* bias = w.bias.data();
      key_bias(b, j0, bk, bias);
      // Queries that see any key of this block: i >= j0 - causal_offset.
      const int64_t i_first = p.causal ? std::max<int64_t>(j0 - p.causal_offset, 0) : 0;
      for (int64_t i0 = i_first / 64 * 64; i0 < p.L; i0 += kKrQ) {
        // nq columns (whole vectors, padding queries past L included), kq of them real.
        const int64_t nq = std::min(kKrQ, Lp - i0), nv = nq / 16, kq = std::min(nq, p.L - i0);
        float* st = w.s.data();    // S^T, then P^T; bk x nq
        float* dpt = w.dp.data();  // dP^T, then dS^T * scale
        p.fgemm(bk, nq, p.E, p.k_sr, ldq, nq, false, k_rows(b, hk, j0), qt + i0, st);
        p.fgemm(bk, nq, p.Ev, p.v_sr, ldq, nq, false, v_rows(b, hk, j0), dot + i0, dpt);
        const float* lse = w.lse.data() + i0;
        const float* dd = w.d.data() + i0;
        for (int64_t j = 0; j < bk; ++j) {
          const __m512 bj = _mm512_set1_ps(bias[j]);
          const __mmask16 key = bias[j] == kNegInfF ? 0 : 0xffff;
          for (int64_t c = 0; c < nv; ++c) {
            __mmask16 keep = key;
            if (p.causal) {  // query i0 + 16 c + l sees key j0 + j iff l >= cut
              const int64_t cut = std::clamp<int64_t>(j0 + j - causal_shift - i0 - 16 * c, 0, 16);
              keep &= __mmask16(0xffffu << cut);
            }
            float* sp = st + j * nq + 16 * c;
            float* dp = dpt + j * nq + 16 * c;
            const __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(sp), scale,
                                             _mm512_sub_ps(bj, _mm512_loadu_ps(lse + 16 * c)));
            const __m512 pr = exp2_zmm<false>(_mm512_mul_ps(x, l2e), keep);
            const __m512 ds = _mm512_mul_ps(
                _mm512_mul_ps(pr, _mm512_sub_ps(_mm512_loadu_ps(dp), _mm512_loadu_ps(dd + 16 * c))),
                scale);
            _mm512_storeu_ps(sp, pr);
            _mm512_storeu_ps(dp, ds);
          }
        }
        p.fgemm(bk, p.Ev, kq, nq, p.do_sr, p.Ev, true, st, dout_rows(b, h, i0), w.dv.data() + j0 * p.Ev);
        p.fgemm(bk, p.E, kq, nq, p.q_sr, p.E, true, dpt, q_rows(b, h, i0), w.dk.data() + j0 * p.E);
        p.fgemm(p.E, nq, bk, ldkt, nq, ldq, true, kt + j0, dpt, dqt + i0);
      }
    }
    // dQ^T back to dQ's rows (16 dims a gather), by non-temporal stores where aligned.
    if (15 * ldq + p.L < (int64_t(1) << 31)) {
      transpose_zmm_f32(dqt, ldq, p.E, p.L, dq_rows(b, h), p.dq_sr, /*stream=*/true);
    } else {
      transpose(dqt, ldq, p.E, p.L, dq_rows(b, h), p.dq_sr);
    }
  }
  store_dk_dv(b, hk, w);
}
#pragma GCC diagnostic pop  // (see FUSEDATTN_ZMM)
#endif

template <typename F>
void with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float: return f(float{});
    case DType::Double: return f(double{});
    case DType::BFloat16: return f(bf16{});
    case DType::Half: return f(fp16{});
  }
}

}  // namespace

int64_t flash_forward_tasks(const FlashParams& p) {
  const int64_t heads = p.weights && p.average_weights ? 1 : p.H;  // averaging: loops over them
  return p.B * heads * ((p.L + kFwdBlockQ - 1) / kFwdBlockQ);
}
int64_t flash_backward_tasks(const FlashParams& p) { return p.B * p.Hk; }
int64_t flash_pack_tasks(const FlashParams& p) {
  return p.B * p.Hk * ((p.S + kFwdBlockK - 1) / kFwdBlockK);
}
int64_t flash_packed_elems(const FlashParams& p) {
  return flash_pack_tasks(p) * Flash<float>::packed_slot(p);
}
void flash_pack_cpu(const FlashParams& p, int64_t begin, int64_t end) {
  with_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (kIsHalf<T> || std::is_same_v<T, float>) Flash<T>(p).pack(begin, end);
  });
}

void flash_forward_cpu(const FlashParams& p, int64_t begin, int64_t end) {
  with_type(p.dtype, [&](auto tag) { Flash<decltype(tag)>(p).forward(begin, end); });
}
void flash_backward_cpu(const FlashParams& p, int64_t begin, int64_t end) {
  with_type(p.dtype, [&](auto tag) { Flash<decltype(tag)>(p).backward(begin, end); });
}

}  // namespace fusedattn::kernels
