#pragma once
// Element and mask kinds shared by the CPU and CUDA kernels' parameter structs (torch-free).
#include <cstdint>

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
};

}  // namespace fusedattn::kernels
