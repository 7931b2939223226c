// Planning a CPU call (see plan.h): every path choice and threshold of the CPU kernels.
#include "fusedattn/kernels/cpu/plan.h"

#include <vector>

#include "fusedattn/kernels/cpu/layout.h"

namespace fusedattn::kernels::cpu {

// Each tier's table (tier_table.cpp compiled with that tier's flags). CMake defines
// FUSEDATTN_HAS_TIER_<TIER> for the tiers this build compiled (all four on x86-64).
#define FUSEDATTN_DECLARE_TIER(name) namespace name { const KernelTable& kernel_table(); }
FUSEDATTN_DECLARE_TIER(scalar)
#ifdef FUSEDATTN_HAS_TIER_AVX2
FUSEDATTN_DECLARE_TIER(avx2)
#endif
#ifdef FUSEDATTN_HAS_TIER_AVX512
FUSEDATTN_DECLARE_TIER(avx512)
#endif
#ifdef FUSEDATTN_HAS_TIER_AVX512_BF16
FUSEDATTN_DECLARE_TIER(avx512_bf16)
#endif
#undef FUSEDATTN_DECLARE_TIER

namespace {

// The table for a tier: the highest compiled tier at or below it. amx runs the avx512_bf16
// code; what it adds is oneDNN's AMX kernels behind p.packed.
const KernelTable& table_for(Capability c) {
#ifdef FUSEDATTN_HAS_TIER_AVX512_BF16
  if (c >= Capability::Avx512Bf16) return avx512_bf16::kernel_table();
#endif
#ifdef FUSEDATTN_HAS_TIER_AVX512
  if (c >= Capability::Avx512) return avx512::kernel_table();
#endif
#ifdef FUSEDATTN_HAS_TIER_AVX2
  if (c >= Capability::Avx2) return avx2::kernel_table();
#endif
  (void)c;
  return scalar::kernel_table();
}

// Packing K/V costs one pass over them per call; worth it when each packed block serves
// several query blocks: at least this many queries per key/value head (L * H / Hk).
constexpr int64_t kPackedMinQueries = 128;
// fp32 forward on the JIT GEMM: it forms K^T once per call (a workspace the size of K, whose
// first touch costs page faults: at L=128-256 that outweighed the faster products, 3.7 vs
// 2.2 ms with every block its own mapping), so it needs 512 queries per key/value head; the
// keys-as-rows fp32 backward, 128.
constexpr int64_t kFloatGemmForwardMinQueries = 512;
constexpr int64_t kFloatGemmBackwardMinQueries = 128;

// Half types on fp32 products (p.half_on_f32): the query-rows forward (K and V widened by the
// pack tasks, once per call) and backward (Backward::query_rows_body<float>) run p.gemm->f32
// on widened operands, for fp16 everywhere and for bf16 below this tier: there the half GEMMs
// convert their operands on every call (MKL without bf16 dot products). Xeon (AMX), B=4 H=8:
// capped to AVX2, forward L=1024 bf16 55-62 -> 53-54 ms (causal 34 -> 29-31), fp16 59-66 ->
// 52-57; fwd+bwd L=512 with a bool mask bf16 68-78 -> 63-64 ms, fp16 63-69 -> 50-53. On AMX
// fp16 forward 46-51 -> 36-40 ms, fwd+bwd 53-58 -> 36-40; but bf16 fwd+bwd 18 -> 28 ms (MKL's
// bf16 GEMM runs on AMX), so bf16 keeps its half GEMMs from avx512_bf16 up. The fp32 products
// also keep P and dS unrounded, as PyTorch's CPU kernel does.
constexpr Capability kBf16GemmTier = Capability::Avx512Bf16;

int64_t queries_per_kv_head(const FlashParams& p) { return p.Hk > 0 ? p.L * (p.H / p.Hk) : 0; }
bool is_half(const FlashParams& p) { return p.dtype == DType::BFloat16 || p.dtype == DType::Half; }

// The keys-as-rows paths write the packed B operand of their products themselves, in the
// VNNI layout: a k x n matrix (k even) as k/2 rows of n pairs {B[2r][j], B[2r+1][j]}, row
// stride 2 * round_up(n, 16). Checked once against the offered pack(); any other layout
// keeps the query-rows paths.
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

bool half_on_f32(const FlashParams& p, Capability tier) {
  return p.dtype == DType::Half || (p.dtype == DType::BFloat16 && tier < kBf16GemmTier);
}

// Packed (AMX) GEMMs for a half-type call: on the amx tier, even head dims, enough queries.
bool keep_packed(const FlashParams& p, Capability tier, bool backward) {
  return p.packed != nullptr && is_half(p) && tier == Capability::Amx && p.S > 0 &&
         p.E % 2 == 0 && (!backward || p.Ev % 2 == 0) &&
         queries_per_kv_head(p) >= kPackedMinQueries;
}
// What the keys-as-rows bf16 paths need beyond packed GEMMs: no attn_mask, dropout, window,
// ALiBi or softcap (those keep the query-rows paths, whose one masking pass, Masks::apply_masks,
// applies them row by row), the VNNI layout.
bool keys_as_rows_bf16(const FlashParams& p) {
  if (p.dtype != DType::BFloat16 || p.packed == nullptr || p.mask_kind != MaskKind::None ||
      p.dropout || p.score_mods())
    return false;
  static const bool vnni = packed_layout_is_vnni(*p.packed);  // the bf16 hooks: one object
  return vnni;
}

// The caller's parameters with the tier's table, the packed offer kept only where it pays.
Plan start(const FlashParams& in, bool backward) {
  Plan r;
  r.p = in;
  r.tier = capability();
  r.kernels = &table_for(r.tier);
  if (!keep_packed(r.p, r.tier, backward)) r.p.packed = nullptr;
  return r;
}

}  // namespace

Plan plan_forward(const FlashParams& in) {
  Plan r = start(in, /*backward=*/false);
  FlashParams& p = r.p;
  if (p.dtype != DType::Float || p.S == 0 || queries_per_kv_head(p) < kFloatGemmForwardMinQueries)
    p.fgemm = nullptr;
  if (p.weights) {
    p.forward_path = p.average_weights ? ForwardPath::AveragedWeights : ForwardPath::Weights;
  } else {
    p.forward_path = keys_as_rows_bf16(p) ? ForwardPath::KeysAsRows : ForwardPath::QueryRows;
  }
  p.half_on_f32 = p.forward_path == ForwardPath::QueryRows && p.packed == nullptr && p.S > 0 &&
                  half_on_f32(p, r.tier);
  if (p.packed || p.fgemm || p.half_on_f32) {
    r.pack_tasks = layout::pack_tasks(p);
    r.packed_elems = r.pack_tasks * layout::packed_slot(p);
  }
  const int64_t heads = p.forward_path == ForwardPath::AveragedWeights ? 1 : p.H;
  r.tasks = p.B * heads * layout::q_blocks(p);
  return r;
}

Plan plan_backward(const FlashParams& in) {
  Plan r = start(in, /*backward=*/true);
  FlashParams& p = r.p;
  const bool plain = p.mask_kind == MaskKind::None && !p.dropout && !p.score_mods();
  const bool f32_kr = p.dtype == DType::Float && p.fgemm != nullptr && plain && p.S > 0 &&
                      r.tier >= Capability::Avx512 &&
                      queries_per_kv_head(p) >= kFloatGemmBackwardMinQueries;
  if (keys_as_rows_bf16(p) || f32_kr) {
    p.backward_path = BackwardPath::KeysAsRows;
  } else {
    p.backward_path = BackwardPath::QueryRows;
    p.packed = nullptr;
    p.half_on_f32 = half_on_f32(p, r.tier);
  }
  if (!f32_kr) p.fgemm = nullptr;
  r.tasks = p.B * p.Hk;
  return r;
}

// Decoding: few queries per (b, hk) against a long cache. The keys of one (b, hk) are split
// across tasks (flash-decoding) only when B * Hk alone gives fewer than kDecodeTasksPerThread
// tasks per thread, and never into ranges under kDecodeMinSplitKeys (a split's partial state
// and its merge cost about as much as 64 keys).
constexpr int64_t kDecodeTasksPerThread = 2;
constexpr int64_t kDecodeMinSplitKeys = 512;

DecodePlan plan_decode(const DecodeParams& in, int64_t max_len) {
  DecodePlan r;
  r.p = in;
  DecodeParams& p = r.p;
  const Capability tier = capability();
  r.kernels = &table_for(tier);
  p.packed = nullptr;
  p.fgemm = nullptr;
  p.half_on_f32 = half_on_f32(p, tier);
  const int64_t bh = p.B * p.Hk;
  int64_t splits = 1;
  const int64_t want = kDecodeTasksPerThread * std::max<int64_t>(p.threads, 1);
  if (bh > 0 && bh < want && max_len > kDecodeMinSplitKeys) {
    splits = std::min((want + bh - 1) / bh, max_len / kDecodeMinSplitKeys);
    splits = std::max<int64_t>(splits, 1);
  }
  const int64_t block = layout::kDecodeBlockK;
  p.splits = splits;
  p.split_keys = splits == 1 ? std::max<int64_t>(p.S, 1)
                             : ((max_len + splits - 1) / splits + block - 1) / block * block;
  r.append_tasks = p.kn != nullptr ? bh : 0;
  r.tasks = bh * splits;
  r.merge_tasks = splits > 1 ? p.B * p.H : 0;
  r.partial_elems = splits > 1 ? p.B * p.H * p.L * splits * (2 + p.Ev) : 0;
  return r;
}

}  // namespace fusedattn::kernels::cpu
