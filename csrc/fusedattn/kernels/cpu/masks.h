#pragma once
// Which keys a query sees: attn_mask (bool or additive, read through its strides),
// key_padding_mask (as a per-key bias), causal in either alignment, and the keys past the
// last visible one that every loop skips.
#include <algorithm>
#include <cstdint>
#include <limits>

#include "fusedattn/kernels/cpu/params.h"
#include "fusedattn/kernels/cpu/rows.h"

FUSEDATTN_TIER_NS_BEGIN

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
    fold = p.scale > 0 && p.mask_kind != MaskKind::Additive && p.kpm_kind != MaskKind::Additive;
    mul = fold ? A(p.scale) : A(1);
    mask_pass = !fold || p.mask_kind != MaskKind::None || p.kpm_kind != MaskKind::None || p.causal;
  }

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
    for (int64_t j = 0; j < end && seen < 2; ++j) {
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
};

FUSEDATTN_TIER_NS_END
