#pragma once
// Element and mask kinds shared by the CPU and CUDA kernels' parameter structs (torch-free).
#include <cstdint>

#include "fusedattn/kernels/common/dropout.h"

namespace fusedattn::kernels {

enum class DType : uint8_t { Float, Double, BFloat16, Half };
enum class MaskKind : uint8_t { None, Bool, Additive };  // Bool: 1 byte

// Which keys a query sees, as every kernel's parameter struct carries it (it derives from
// this). Masks are read through their strides, 0 where they broadcast.
struct MaskParams {
  // attn_mask viewed as (B, H, L, S); Bool: nonzero = allowed; Additive: the query's type,
  // added to the scaled scores.
  MaskKind mask_kind = MaskKind::None;
  const void* mask = nullptr;
  int64_t m_sb = 0, m_sh = 0, m_sr = 0, m_sc = 0;
  // key_padding_mask (B, S); Bool: nonzero = padding (torch's MHA convention); Additive: added.
  MaskKind kpm_kind = MaskKind::None;
  const void* kpm = nullptr;
  int64_t p_sb = 0, p_sc = 0;
  // Key j is visible to query i iff j <= i + causal_offset (0 top-left, S - L bottom-right).
  bool causal = false;
  int64_t causal_offset = 0;

  // Variants beyond masks, positions relative to query i's diagonal i + pos_offset (0
  // top-left, S - L bottom-right, as causal). Sliding window: key j is visible iff
  // i + pos_offset - window_left <= j <= i + pos_offset + window_right; a side < 0 is unbounded.
  int64_t pos_offset = 0;
  int64_t window_left = -1, window_right = -1;
  // ALiBi: -alibi[b * al_sb + h * al_sh] * |i + pos_offset - j| added to the scaled scores.
  const float* alibi = nullptr;
  int64_t al_sb = 0, al_sh = 0;
  // Soft-capping: the scaled score s becomes softcap * tanh(s / softcap), before any bias or
  // mask is added; 0 = none.
  double softcap = 0;
  // Learned relative position bias: rel_bias[h * (2 rel_max + 1) + clamp(j - i - pos_offset,
  // -rel_max, rel_max) + rel_max] added to the scaled scores; contiguous (H, 2 rel_max + 1) in
  // the accumulate type (float; double for Double).
  const void* rel_bias = nullptr;
  int64_t rel_max = 0;

  bool windowed() const { return window_left >= 0 || window_right >= 0; }
  bool score_mods() const {
    return windowed() || alibi != nullptr || softcap > 0 || rel_bias != nullptr;
  }
};

// The sizes and operands every kernel's parameter struct carries (it derives from this). Each
// tensor is seen as (B, heads, rows, cols) with a contiguous last dim and (b, h, row) strides.
struct ProblemParams : MaskParams {
  DType dtype = DType::Float;
  int64_t B = 0, H = 0, Hk = 0;         // batch, query heads, key/value heads (H % Hk == 0)
  int64_t L = 0, S = 0, E = 0, Ev = 0;  // query length, key length, head dims of q/k and v
  const void* q = nullptr;  // (B, H, L, E)
  int64_t q_sb = 0, q_sh = 0, q_sr = 0;
  const void* k = nullptr;  // (B, Hk, S, E)
  int64_t k_sb = 0, k_sh = 0, k_sr = 0;
  const void* v = nullptr;  // (B, Hk, S, Ev)
  int64_t v_sb = 0, v_sh = 0, v_sr = 0;
  void* out = nullptr;      // (B, H, L, Ev)
  int64_t o_sb = 0, o_sh = 0, o_sr = 0;
  // Dropout on the probabilities; element index ((b * H + h) * L + i) * S + j, as the
  // reference, so every backend draws the same mask from the same seed.
  bool dropout = false;
  DropoutParams drop;
};

}  // namespace fusedattn::kernels
