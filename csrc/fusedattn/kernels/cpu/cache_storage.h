#pragma once
// A KV cache stored in fewer bytes than the model's type (params.h's CacheStorage): rows
// quantized on the append and read back in fp32 by the decode tasks (converted in registers
// for a few query rows, a dequantized key block for more). The
// arithmetic is the one ops/kv_cache.cpp's ATen path writes (the tests compare the two):
// bf16/fp16 round to nearest even; int8 per row: scale = max|x| / 127 in fp32, q =
// round-half-even(x / scale) (|q| <= 127), x' = q * scale; a zero row has scale 0 (q 0), a row
// holding a NaN or inf has scale NaN (it reads back as NaN, so the output shows it).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "fusedattn/kernels/cpu/params.h"
#include "fusedattn/kernels/cpu/vec.h"

FUSEDATTN_TIER_NS_BEGIN

inline int64_t storage_bytes(CacheStorage s, int64_t model_bytes) {
  switch (s) {
    case CacheStorage::Int8: return 1;
    case CacheStorage::BFloat16:
    case CacheStorage::Half: return 2;
    default: return model_bytes;
  }
}

// Up to kStoredRegisterRows query rows (the GQA group x the new tokens) take their products
// straight from the stored rows, converted in registers: no fp32 block is written (the
// dequantize-then-GEMM path wrote 256 x E floats per block, past L1, and called a GEMV per
// block). More rows (a prefill into the cache) dequantize a block and use the GEMMs.
constexpr int kStoredRegisterRows = 8;

// One stored element in fp32 (int8 unscaled).
template <CacheStorage S>
inline float stored_value(const void* row, int64_t c) {
  if constexpr (S == CacheStorage::Int8) {
    return float(static_cast<const int8_t*>(row)[c]);
  } else if constexpr (S == CacheStorage::BFloat16) {
    return bits_to_float(uint32_t(static_cast<const uint16_t*>(row)[c]) << 16);
  } else {
    return half_to_float(static_cast<const uint16_t*>(row)[c]);
  }
}

// 16 stored values from element c of a row, in fp32 (int8 unscaled), by the tier's own
// conversions (vpmovsxbd + vcvtdq2ps, vpmovzxwd + shift, vcvtph2ps): GCC left the portable
// vectors' int8 -> float conversion scalar (vcvtsi2ss per element: an int8 decode step 1.3x
// slower than fp32's).
template <CacheStorage S>
FUSEDATTN_VINLINE vf load_stored(const void* row, int64_t c) {
#if defined(FUSEDATTN_AVX512)
  __m512 r;
  if constexpr (S == CacheStorage::Int8) {
    r = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(row) + c))));
  } else {
    const __m256i h =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + c));
    if constexpr (S == CacheStorage::BFloat16) {
      r = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      r = _mm512_cvtph_ps(h);
    }
  }
  return __builtin_bit_cast(vf, r);
#elif defined(__AVX2__)
  __m256 lo, hi;
  if constexpr (S == CacheStorage::Int8) {
    const int8_t* x = static_cast<const int8_t*>(row) + c;
    lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x))));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + 8))));
  } else {
    const uint16_t* x = static_cast<const uint16_t*>(row) + c;
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8));
    if constexpr (S == CacheStorage::BFloat16) {
      lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16));
      hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
    } else {
      lo = _mm256_cvtph_ps(a);
      hi = _mm256_cvtph_ps(b);
    }
  }
  vf r;
  std::memcpy(&r, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&r) + 32, &hi, 32);
  return r;
#else
  vf r;
  for (int l = 0; l < kLanes; ++l) r[l] = stored_value<S>(row, c + l);
  return r;
#endif
}

FUSEDATTN_VINLINE float tree_sum(vf v) {
  using v8f = float __attribute__((vector_size(32)));
  using v4f = float __attribute__((vector_size(16)));
  const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// n stored rows (x, row stride ld elements) -> contiguous fp32 rows of cols; int8 rows times
// scale[r * scale_ld].
template <CacheStorage S>
void dequantize_rows(const void* x, int64_t ld, int64_t n, int64_t cols, const float* scale,
                     int64_t scale_ld, float* y) {
  constexpr int64_t es = S == CacheStorage::Int8 ? 1 : 2;
  const int64_t full = cols / kLanes * kLanes;
  for (int64_t r = 0; r < n; ++r) {
    const void* row = static_cast<const char*>(x) + r * ld * es;
    const float a = S == CacheStorage::Int8 ? scale[r * scale_ld] : 1.f;
    float* out = y + r * cols;
    for (int64_t c = 0; c < full; c += kLanes) vstore(out + c, load_stored<S>(row, c) * a);
    for (int64_t c = full; c < cols; ++c) out[c] = stored_value<S>(row, c) * a;
  }
}
inline void dequantize_rows(CacheStorage s, const void* x, int64_t ld, int64_t n, int64_t cols,
                            const float* scale, int64_t scale_ld, float* y) {
  switch (s) {
    case CacheStorage::Int8:
      return dequantize_rows<CacheStorage::Int8>(x, ld, n, cols, scale, scale_ld, y);
    case CacheStorage::BFloat16:
      return dequantize_rows<CacheStorage::BFloat16>(x, ld, n, cols, scale, scale_ld, y);
    default:
      return dequantize_rows<CacheStorage::Half>(x, ld, n, cols, scale, scale_ld, y);
  }
}

// s (R x bk, row stride bk) = q (R x E fp32, contiguous) . stored key rows j < bk (row stride
// ld elements of S, base k), times the rows' int8 scales (scale[j * scale_ld]). R is a
// compile-time count so that the accumulators stay in registers (a run-time count kept them
// on the stack: 3x slower).
template <CacheStorage S, int R>
void stored_scores(const void* k, int64_t ld, int64_t bk, int64_t E, const float* scale,
                   int64_t scale_ld, const float* q, float* s) {
  constexpr int64_t es = S == CacheStorage::Int8 ? 1 : 2;
  const int64_t full = E / kLanes * kLanes;
  for (int64_t j = 0; j < bk; ++j) {
    const void* row = static_cast<const char*>(k) + j * ld * es;
    vf acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vf{};
    for (int64_t c = 0; c < full; c += kLanes) {
      const vf kv = load_stored<S>(row, c);
      for (int r = 0; r < R; ++r) acc[r] += kv * vload(q + r * E + c);
    }
    const float a = S == CacheStorage::Int8 ? scale[j * scale_ld] : 1.f;
    for (int r = 0; r < R; ++r) {
      float t = tree_sum(acc[r]);
      for (int64_t c = full; c < E; ++c) t += stored_value<S>(row, c) * q[r * E + c];
      s[r * bk + j] = t * a;
    }
  }
}

// acc (R x Ev fp32, contiguous) += p (R x bk, row stride bk) . stored value rows j < bk, each
// times its int8 scale.
template <CacheStorage S, int R>
void stored_values(const void* v, int64_t ld, int64_t bk, int64_t Ev, const float* scale,
                   int64_t scale_ld, const float* p, float* acc) {
  constexpr int64_t es = S == CacheStorage::Int8 ? 1 : 2;
  const int64_t full = Ev / kLanes * kLanes;
  for (int64_t j = 0; j < bk; ++j) {
    const void* row = static_cast<const char*>(v) + j * ld * es;
    const float a = S == CacheStorage::Int8 ? scale[j * scale_ld] : 1.f;
    float w[R];
    for (int r = 0; r < R; ++r) w[r] = p[r * bk + j] * a;
    for (int64_t c = 0; c < full; c += kLanes) {
      const vf vv = load_stored<S>(row, c);
      for (int r = 0; r < R; ++r) {
        float* o = acc + r * Ev + c;
        vstore(o, vload(o) + vv * w[r]);
      }
    }
    for (int64_t c = full; c < Ev; ++c) {
      const float x = stored_value<S>(row, c);
      for (int r = 0; r < R; ++r) acc[r * Ev + c] += x * w[r];
    }
  }
}

// The two above for a storage and a row count (1 to kStoredRegisterRows) known at run time.
template <CacheStorage S, int R = 1>
void stored_products(bool values, int64_t rows, const void* x, int64_t ld, int64_t bk,
                     int64_t cols, const float* scale, int64_t scale_ld, const float* in,
                     float* out) {
  if constexpr (R < kStoredRegisterRows) {
    if (rows > R) {
      return stored_products<S, R + 1>(values, rows, x, ld, bk, cols, scale, scale_ld, in, out);
    }
  }
  if (values) {
    stored_values<S, R>(x, ld, bk, cols, scale, scale_ld, in, out);
  } else {
    stored_scores<S, R>(x, ld, bk, cols, scale, scale_ld, in, out);
  }
}
// values false: out (rows x bk) = in (rows x cols queries) . stored keys; true: out (rows x
// cols) += in (rows x bk probabilities) . stored values.
inline void stored_products(CacheStorage s, bool values, int64_t rows, const void* x, int64_t ld,
                            int64_t bk, int64_t cols, const float* scale, int64_t scale_ld,
                            const float* in, float* out) {
  switch (s) {
    case CacheStorage::Int8:
      return stored_products<CacheStorage::Int8>(values, rows, x, ld, bk, cols, scale, scale_ld,
                                                 in, out);
    case CacheStorage::BFloat16:
      return stored_products<CacheStorage::BFloat16>(values, rows, x, ld, bk, cols, scale,
                                                     scale_ld, in, out);
    default:
      return stored_products<CacheStorage::Half>(values, rows, x, ld, bk, cols, scale, scale_ld,
                                                 in, out);
  }
}

// One fp32 row of cols into its storage (y); int8 writes the row's scale to *scale.
inline void quantize_row(CacheStorage s, const float* x, int64_t cols, void* y, float* scale) {
  if (s == CacheStorage::BFloat16) {
    bf16* out = static_cast<bf16*>(y);
    for (int64_t c = 0; c < cols; ++c) store(x[c], out + c);
  } else if (s == CacheStorage::Half) {
    fp16* out = static_cast<fp16*>(y);
    for (int64_t c = 0; c < cols; ++c) store(x[c], out + c);
  } else {  // Int8
    int8_t* out = static_cast<int8_t*>(y);
    float amax = 0.f;
    bool finite = true;
    for (int64_t c = 0; c < cols; ++c) {
      finite = finite && std::isfinite(x[c]);
      amax = std::max(amax, std::fabs(x[c]));
    }
    const float a = finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
    *scale = a;
    for (int64_t c = 0; c < cols; ++c) {
      const float q = (finite && a > 0.f) ? std::nearbyint(x[c] / a) : 0.f;
      out[c] = static_cast<int8_t>(std::clamp(q, -127.f, 127.f));
    }
  }
}

FUSEDATTN_TIER_NS_END
