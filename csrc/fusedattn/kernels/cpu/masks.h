#pragma once
// Which keys a query sees and what is added to its scores: attn_mask (bool or additive, read
// through its strides), key_padding_mask (as a per-key bias), causal in either alignment, the
// sliding window, ALiBi and soft-capping, and the keys outside the visible range that every
// loop skips.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "fusedattn/kernels/cpu/params.h"
#include "fusedattn/kernels/cpu/rows.h"

FUSEDATTN_TIER_NS_BEGIN

#ifdef FUSEDATTN_AVX512
// softcap * tanh(x / softcap) of 16 scaled scores, from e = exp(-2 |x| / softcap) (no
// overflow): tanh = (1 - e) / (1 + e), the reciprocal by vrcp14ps and one Newton step (about
// 2^-28 relative; vdivps is several times its cost). k = -2 log2(e) / softcap. d (or null):
// the derivative 1 - tanh^2. NaN stays NaN; +-inf becomes +-softcap.
FUSEDATTN_VINLINE __m512 soft_cap_zmm(__m512 x, __m512 cap, __m512 k, __m512* d) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 e = exp2_zmm<false>(_mm512_mul_ps(_mm512_abs_ps(x), k));
  const __m512 den = _mm512_add_ps(one, e);
  __m512 r = _mm512_rcp14_ps(den);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, _mm512_set1_ps(2.f)));
  const __m512 th = _mm512_mul_ps(_mm512_sub_ps(one, e), r);
  if (d) *d = _mm512_fnmadd_ps(th, th, one);
  return _mm512_or_ps(_mm512_mul_ps(cap, th), _mm512_and_ps(x, _mm512_set1_ps(-0.f)));
}
#endif

template <typename T>
struct Masks {
  using A = typename AccOf<T>::type;
  static constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const FlashParams& p;
  // The softmax scale is folded into the exponent, exp(s * scale - m * scale), unless an
  // additive mask has to be added to scaled scores (or the scale is not positive): then the
  // masking pass scales S first and the exponent's multiplier is 1.
  bool fold;
  A mul;           // the exponent's multiplier: scale if fold, else 1
  bool mask_pass;  // apply_masks has work to do

  explicit Masks(const FlashParams& params) : p(params) {
    fold = p.scale > 0 && p.mask_kind != MaskKind::Additive && p.kpm_kind != MaskKind::Additive &&
           !(p.softcap > 0);
    mul = fold ? A(p.scale) : A(1);
    mask_pass = !fold || p.mask_kind != MaskKind::None || p.kpm_kind != MaskKind::None ||
                p.causal || p.score_mods();
  }

  // One past the last key that any of the queries up to i_last may see.
  int64_t visible_end(int64_t i_last) const {
    int64_t end = p.causal ? std::clamp<int64_t>(i_last + p.causal_offset + 1, 0, p.S) : p.S;
    if (p.window_right >= 0)
      end = std::min(end, std::clamp<int64_t>(i_last + p.pos_offset + p.window_right + 1, 0, p.S));
    return end;
  }
  // The first key that any query from i_first on may see (the window's left edge; else 0).
  int64_t visible_begin(int64_t i_first) const {
    return p.window_left >= 0 ? std::clamp<int64_t>(i_first + p.pos_offset - p.window_left, 0, p.S) : 0;
  }
  // The queries that see any key of [j0, j1): [first, last + 1), by causal and the window.
  std::pair<int64_t, int64_t> seeing_queries(int64_t j0, int64_t j1) const {
    int64_t first = p.causal ? std::max<int64_t>(j0 - p.causal_offset, 0) : 0;
    int64_t end = p.L;
    if (p.window_right >= 0) first = std::max<int64_t>(first, j0 - p.pos_offset - p.window_right);
    if (p.window_left >= 0) end = std::clamp<int64_t>(j1 - 1 - p.pos_offset + p.window_left + 1, 0, p.L);
    return {std::min(first, p.L), end};
  }
  // Whether key j is inside query i's window.
  bool in_window(int64_t i, int64_t j) const {
    const int64_t d = j - (i + p.pos_offset);
    return (p.window_left < 0 || d >= -p.window_left) && (p.window_right < 0 || d <= p.window_right);
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
  // causal_offset clamped so that lane cuts computed from it fit int32 (any cut <= -16 or
  // >= 32 acts the same).
  int64_t causal_shift() const {
    return p.causal ? std::clamp<int64_t>(p.causal_offset, -(1 << 30), 1 << 30) : 0;
  }

  // Whether query i (batch b, head h) sees exactly one key: its softmax is then exactly 1 there
  // and 0 elsewhere whatever the scores, and the softmax's part of dS is exactly 0. Hidden:
  // past kv_end, bool masks' false / padding, additive masks' -inf (a NaN counts as seen).
  // Stops at the second key seen: a few reads for most rows.
  bool sees_one_key(int64_t b, int64_t h, int64_t i, int64_t key_end_b) const {
    const int64_t end = std::min(visible_end(i), key_end_b);
    int64_t seen = 0;
    for (int64_t j = visible_begin(i); j < end && seen < 2; ++j) {
      if (p.windowed() && !in_window(i, j)) continue;
      const int64_t kp = b * p.p_sb + j * p.p_sc;
      if (p.kpm_kind == MaskKind::Bool && static_cast<const uint8_t*>(p.kpm)[kp]) continue;
      if (p.kpm_kind == MaskKind::Additive && A(to_acc(static_cast<const T*>(p.kpm)[kp])) == kNegInf)
        continue;
      const int64_t mo = b * p.m_sb + h * p.m_sh + i * p.m_sr + j * p.m_sc;
      if (p.mask_kind == MaskKind::Bool && !static_cast<const uint8_t*>(p.mask)[mo]) continue;
      if (p.mask_kind == MaskKind::Additive && A(to_acc(static_cast<const T*>(p.mask)[mo])) == kNegInf)
        continue;
      ++seen;
    }
    return seen == 1;
  }

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

  // softcap * tanh(row * scale / softcap), in place, from exp of -2|x| (the tier's vector
  // exp, no overflow); d (or null): the derivative 1 - tanh^2, what the backward multiplies dS
  // by; scratch: n values where d is null. NaN stays NaN; +-inf becomes +-softcap. AVX-512: one
  // pass of soft_cap_zmm, the keys-as-rows paths' arithmetic. Its cost is that arithmetic (an
  // exp and a reciprocal per score: the fp32 forward 1.10-1.22x the plain call's time, Xeon),
  // not the passes: four of them over the row in L1 cost the same.
  void soft_cap_row(A* row, int64_t n, A scale, A* d, A* scratch) const {
    const A cap = A(p.softcap), inv = A(1) / cap;
#ifdef FUSEDATTN_AVX512
    if constexpr (std::is_same_v<A, float>) {
      const __m512 vs = _mm512_set1_ps(scale), vc = _mm512_set1_ps(cap);
      const __m512 k = _mm512_set1_ps(-2.f * kLog2e * inv);
      for (int64_t c = 0; c < n; c += 16) {
        const __mmask16 m = tail_mask(n - c);
        __m512 dv;
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + c), vs);
        _mm512_mask_storeu_ps(row + c, m, soft_cap_zmm(x, vc, k, d ? &dv : nullptr));
        if (d) _mm512_mask_storeu_ps(d + c, m, dv);
      }
      return;
    }
#endif
    A* e = d ? d : scratch;
    for (int64_t c = 0; c < n; ++c) {
      row[c] *= scale;
      e[c] = A(-2) * std::abs(row[c]) * inv;
    }
    exp_rows(e, n, A(1), A(0));
    for (int64_t c = 0; c < n; ++c) {
      const A t = (A(1) - e[c]) / (A(1) + e[c]);  // tanh(|x| / cap)
      row[c] = std::copysign(cap * t, row[c]);
      e[c] = A(1) - t * t;
    }
  }
  // ALiBi's -slope * |i + pos_offset - j| for keys j0 .. j0 + n - 1, in the row's units: raw
  // scores when the scale is folded into the exponent (slope / scale), else scaled ones.
  // (An int32 column index and |c - diag| in A: the loop vectorises; int64 -> float
  // conversions do not below AVX-512. Folded and fused so, ALiBi costs one pass over the
  // scores: 1.28x the plain forward's time at L = 1024 unfolded with int64 indices.)
  void add_alibi_row(A* row, int64_t n, int64_t b, int64_t h, int64_t i, int64_t j0) const {
    const A slope = A(p.alibi[b * p.al_sb + h * p.al_sh]) / (fold ? A(p.scale) : A(1));
    const A diag = A(i + p.pos_offset - j0);
    const int32_t cols = static_cast<int32_t>(n);
    for (int32_t c = 0; c < cols; ++c) row[c] -= slope * std::abs(A(c) - diag);
  }

  // The table entry of each key j0 + c of query i: clamp(j0 + c - i - pos_offset, -D, D) + D
  // for c in [0, n) is entry 0 for c < lo, lo's own from lo to hi (consecutive entries), the
  // last from hi on. -> (lo, hi, the entry at lo)
  struct RelSpan { int64_t lo, hi, first; };
  RelSpan rel_span(int64_t n, int64_t i, int64_t j0) const {
    const int64_t d0 = j0 - i - p.pos_offset, D = p.rel_max;  // column c is at d0 + c
    const int64_t lo = std::clamp<int64_t>(-D - d0, 0, n), hi = std::clamp<int64_t>(D - d0 + 1, 0, n);
    return {lo, hi, std::clamp<int64_t>(d0 + lo, -D, D) + D};
  }
  const A* rel_table(int64_t h) const {
    return static_cast<const A*>(p.rel_bias) + h * (2 * p.rel_max + 1);
  }
  // Head h's row of batch b in rel_bias's gradient buffer (FlashParams::d_rel_bias), or null
  // without rel_bias.
  A* rel_grad_row(int64_t b, int64_t h) const {
    return p.rel_bias ? static_cast<A*>(p.d_rel_bias) + (b * p.H + h) * (2 * p.rel_max + 1) : nullptr;
  }
  // rel_bias's entries for keys j0 .. j0 + n - 1, in the row's units (as ALiBi).
  void add_rel_bias_row(A* row, int64_t n, int64_t h, int64_t i, int64_t j0) const {
    const A* t = rel_table(h);
    const A inv = fold ? A(1) / A(p.scale) : A(1);
    const auto [lo, hi, first] = rel_span(n, i, j0);
    const A before = t[0] * inv, after = t[2 * p.rel_max] * inv;
    for (int64_t c = 0; c < lo; ++c) row[c] += before;
    const A* mid = t + first - lo;
    for (int64_t c = lo; c < hi; ++c) row[c] += mid[c] * inv;
    for (int64_t c = std::max(hi, lo); c < n; ++c) row[c] += after;
  }
  // The backward's counterpart: dS of the row (scaled scores) summed into its table entries.
  void rel_bias_grad_row(const A* ds, int64_t n, int64_t i, int64_t j0, A* grad) const {
    const auto [lo, hi, first] = rel_span(n, i, j0);
    A before = 0, after = 0;
    for (int64_t c = 0; c < lo; ++c) before += ds[c];
    A* mid = grad + first - lo;
    for (int64_t c = lo; c < hi; ++c) mid[c] += ds[c];
    for (int64_t c = std::max(hi, lo); c < n; ++c) after += ds[c];
    grad[0] += before;
    grad[2 * p.rel_max] += after;
  }

  // Scores block s (bq x bk, row stride ld) for queries i0.. and keys j0..: scale unless
  // folded, soft-cap, ALiBi, then every mask and the window. cap_grad (bq x bk, row stride
  // bk; the backward's, with softcap only): soft-capping's derivative per score.
  void apply_masks(A* s, int64_t ld, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0,
                   int64_t bk, A* col_bias, A* cap_grad = nullptr) const {
    if (!mask_pass) return;
    key_bias(b, j0, bk, col_bias);
    for (int64_t r = 0; r < bq; ++r) {
      A* row = s + r * ld;
      const int64_t i = i0 + r;
      if (p.softcap > 0) {  // (never folded) scaled and soft-capped in one pass
        soft_cap_row(row, bk, A(p.scale), cap_grad ? cap_grad + r * bk : nullptr,
                     col_bias + bk);  // col_bias has room for 2 bk
      } else if (!fold) {
        scale_row(row, bk, A(p.scale));
      }
      if (p.alibi) add_alibi_row(row, bk, b, h, i, j0);
      if (p.rel_bias) add_rel_bias_row(row, bk, h, i, j0);
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
      if (p.windowed()) {
        const int64_t diag = i + p.pos_offset - j0;  // the block's column of key i + offset
        if (p.window_left >= 0) {
          const int64_t lo = std::clamp<int64_t>(diag - p.window_left, 0, bk);
          std::fill(row, row + lo, kNegInf);
        }
        if (p.window_right >= 0) {
          const int64_t hi = std::clamp<int64_t>(diag + p.window_right + 1, 0, bk);
          std::fill(row + hi, row + bk, kNegInf);
        }
      }
    }
  }
};

#ifdef FUSEDATTN_AVX512
// The variants on 16 queries of one key at a time, for the keys-as-rows loops (fp32 and
// bf16), whose vectors run down a column of S^T: lane l is query q0 + l, and the key's offset
// from lane l's diagonal (key - query - pos_offset) is base - l with base that of lane 0.
// Masks applies the same formulas row by row; the tests hold the two to each other.
struct ScoreModsZmm {
  const MaskParams& p;
  bool any, capped, scores;  // any variant; soft-capping; a variant that changes scores
  __m512 cap, neg2_cap_l2e, slope, lanes_f;
  __m512i lanes, reverse;
  const float* table;  // this head's rel_bias row (2 D + 1 entries), or null
  int64_t D;

  ScoreModsZmm(const MaskParams& params, int64_t b, int64_t h)
      : p(params), any(params.score_mods()), capped(params.softcap > 0),
        table(params.rel_bias ? static_cast<const float*>(params.rel_bias) + h * (2 * params.rel_max + 1)
                              : nullptr),
        D(params.rel_max) {
    scores = capped || p.alibi != nullptr || table != nullptr;
    cap = _mm512_set1_ps(float(p.softcap));
    neg2_cap_l2e = _mm512_set1_ps(capped ? -2.f * kLog2e / float(p.softcap) : 0.f);
    slope = _mm512_set1_ps(p.alibi ? p.alibi[b * p.al_sb + h * p.al_sh] : 0.f);
    lanes = lane_index();
    lanes_f = _mm512_cvtepi32_ps(lanes);
    reverse = _mm512_sub_epi32(_mm512_set1_epi32(15), lanes);
  }

  // base of lane 0 (query q0) for key j, clamped where it only picks a side (int32 lanes).
  int64_t base(int64_t j, int64_t q0) const {
    constexpr int64_t kFar = int64_t(1) << 29;
    return std::clamp<int64_t>(j - p.pos_offset - q0, -kFar, kFar);
  }
  // The lanes the window leaves: base - right <= l <= base + left.
  __mmask16 window(int64_t base) const {
    uint32_t keep = 0xffffu;
    if (p.window_right >= 0) keep &= 0xffffu << std::clamp<int64_t>(base - p.window_right, 0, 16);
    if (p.window_left >= 0) keep &= 0xffffu >> (16 - std::clamp<int64_t>(base + p.window_left + 1, 0, 16));
    return __mmask16(keep);
  }
  // rel_bias's entry clamp(base - l, -D, D) + D of lane l: one entry for a whole clamped side,
  // 16 consecutive ones (lanes reversed), else a gather.
  __m512 rel_entries(int64_t base) const {
    if (base - 15 >= D) return _mm512_set1_ps(table[2 * D]);
    if (base <= -D) return _mm512_set1_ps(table[0]);
    if (base - 15 >= -D && base <= D) return _mm512_permutexvar_ps(reverse, _mm512_loadu_ps(table + base - 15 + D));
    const __m512i idx = _mm512_add_epi32(
        _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(_mm512_set1_epi32(int32_t(base)), lanes),
                                          _mm512_set1_epi32(int32_t(-D))),
                         _mm512_set1_epi32(int32_t(D))),
        _mm512_set1_epi32(int32_t(D)));
    return _mm512_i32gather_ps(idx, table, 4);
  }
  // Scaled scores xs -> soft-capped, + ALiBi + rel_bias (the order of the op's definition);
  // *cap_d: soft-capping's derivative 1 - tanh^2 (1 without it), what dS is multiplied by.
  __m512 apply(__m512 xs, int64_t base, __m512* cap_d) const {
    *cap_d = _mm512_set1_ps(1.f);
    if (capped) xs = soft_cap_zmm(xs, cap, neg2_cap_l2e, cap_d);
    if (p.alibi) {
      const __m512 dist = _mm512_sub_ps(_mm512_set1_ps(float(base)), lanes_f);
      xs = _mm512_fnmadd_ps(slope, _mm512_abs_ps(dist), xs);
    }
    if (table) xs = _mm512_add_ps(xs, rel_entries(base));
    return xs;
  }
  // rel_bias's gradient: g (d loss / d score of each lane) into the lanes' entries of d_table.
  void add_rel_grad(float* d_table, __m512 g, int64_t base) const {
    if (base - 15 >= D) {
      d_table[2 * D] += _mm512_reduce_add_ps(g);
    } else if (base <= -D) {
      d_table[0] += _mm512_reduce_add_ps(g);
    } else if (base - 15 >= -D && base <= D) {
      float* e = d_table + base - 15 + D;
      _mm512_storeu_ps(e, _mm512_add_ps(_mm512_loadu_ps(e), _mm512_permutexvar_ps(reverse, g)));
    } else {
      alignas(64) float gl[16];
      _mm512_store_ps(gl, g);
      for (int l = 0; l < 16; ++l) d_table[std::clamp<int64_t>(base - l, -D, D) + D] += gl[l];
    }
  }
};
#endif  // FUSEDATTN_AVX512

FUSEDATTN_TIER_NS_END
