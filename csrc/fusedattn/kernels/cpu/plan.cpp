// Planning a CPU call (see plan.h): every path choice and threshold of the CPU kernels.
#include "fusedattn/kernels/cpu/plan.h"

#include <algorithm>
#include <type_traits>
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
// fp32 forward on the JIT GEMM: each thread transposes the K blocks its tasks reach, into
// buffers it keeps (layout::kt_in_tasks), which pays from 4 queries per key/value head (AMD
// EPYC, B=4, H=8, S=1024-4096, against MKL's sgemm reading K in place: 1 query 0.8x, 4
// queries 1.0-1.3x, 8-32 queries 1.2-1.6x, L=128-384 2.0x); the keys-as-rows fp32 backward
// needs 128.
constexpr int64_t kFloatGemmForwardMinQueries = 4;
constexpr int64_t kFloatGemmBackwardMinQueries = 128;

// Half types on fp32 products (p.half_on_f32): the query-rows forward (K and V widened by the
// pack tasks, once per call) and backward (Backward::query_rows_body<float>) run p.gemm->f32
// on widened operands, for fp16 everywhere and for bf16 below this tier: there the half GEMMs
// convert their operands on every call (MKL without bf16 dot products). Xeon (AMX), B=4 H=8:
// capped to AVX2, forward L=1024 bf16 55-62 -> 53-54 ms (causal 34 -> 29-31), fp16 59-66 ->
// 52-57; fwd+bwd L=512 with a bool mask bf16 68-78 -> 63-64 ms, fp16 63-69 -> 50-53. On AMX
// fp16 forward 46-51 -> 36-40 ms, fwd+bwd 53-58 -> 36-40; but bf16 fwd+bwd 18 -> 28 ms (MKL's
// bf16 GEMM runs on AMX), so bf16 keeps its half GEMMs on amx. Below it, AVX512-BF16 without
// AMX (AMD EPYC, 2026-12-07), MKL's bf16 GEMM is its slow generic code: one decoding step
// (B=4, 12 heads over 3 kv heads, 1 query, 1024 keys) 2300 -> 280 us, the causal forward at
// L=1024 (B=4, H=16, Hk=4) 63 -> 59 ms on fp32 products. The fp32 products also keep P and dS
// unrounded, as PyTorch's CPU kernel does.
constexpr Capability kBf16GemmTier = Capability::Amx;

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

// Where the packed (AMX) GEMMs run: the amx tier, or a portable offer from avx512_bf16 up
// (where the keys-as-rows kernels are compiled).
bool packed_tier(const FlashParams& p, Capability tier) {
  return p.packed != nullptr &&
         (tier == Capability::Amx || (p.packed->portable && tier >= Capability::Avx512Bf16));
}

// fp32 on bf16 products (torch's fp32 matmul precision at bf16; the caller offers the bf16
// packed GEMM): where torch's own fp32 products become bf16's under that setting. oneDNN rounds
// them only on AMX: on AVX512-BF16 without it (AMD EPYC, torch 2.15, 2026-12-07) a "medium"
// matmul of 1 + 2^-12 by 1 keeps the 2^-12 and SDPA's fp32 error stays at highest's (6.8e-7 vs
// 3.9e-7 at B=4, H=8, L=1024, E=64; bf16 products give ~1e-3), so fusedattn keeps fp32 there
// too. On the packed path's tiers (amx, or the portable offer in tests).
bool bf16_products(const FlashParams& p, Capability tier) {
  return p.bf16_products && p.dtype == DType::Float && packed_tier(p, tier);
}

// Packed (AMX) GEMMs for a half-type call or fp32 on bf16 products: on the packed tiers, even
// head dims, enough queries.
bool keep_packed(const FlashParams& p, Capability tier, bool backward) {
  return (is_half(p) || bf16_products(p, tier)) && packed_tier(p, tier) && p.S > 0 &&
         p.E % 2 == 0 && (!backward || p.Ev % 2 == 0) &&
         queries_per_kv_head(p) >= kPackedMinQueries;
}
// What the keys-as-rows bf16 paths need beyond packed GEMMs: no attn_mask or dropout (those
// keep the query-rows paths), the VNNI layout. The variants (window, ALiBi, softcap, rel_bias)
// run on them, 16 queries to a vector (Masks' ScoreModsZmm).
bool keys_as_rows_bf16(const FlashParams& p) {
  if (p.dtype != DType::BFloat16 || p.packed == nullptr || p.mask_kind != MaskKind::None ||
      p.dropout)
    return false;
  static const bool vnni = packed_layout_is_vnni(*p.packed);  // the bf16 hooks: one object
  return vnni;
}

// The caller's parameters with the tier's table, the packed offer kept only where it pays;
// bf16_products kept where the tier takes it (the paths narrow it further).
Plan start(const FlashParams& in, bool backward) {
  Plan r;
  r.p = in;
  r.tier = capability();
  r.kernels = &table_for(r.tier);
  r.p.bf16_products = bf16_products(r.p, r.tier);
  if (!keep_packed(r.p, r.tier, backward)) r.p.packed = nullptr;
  return r;
}

}  // namespace

// The keys a block of kFwdBlockQ queries sees under a sliding window (its left side plus the
// block plus its right side, or none right of the diagonal with causal), or -1: unbounded.
int64_t window_span(const FlashParams& p) {
  if (p.window_left < 0) return -1;
  const int64_t right = p.window_right >= 0 ? p.window_right : (p.causal ? 0 : -1);
  return right < 0 ? -1 : p.window_left + layout::kFwdBlockQ + right;
}

Plan plan_forward(const FlashParams& in) {
  Plan r = start(in, /*backward=*/false);
  FlashParams& p = r.p;
  // A window narrower than a key block: the in-place products start at its exact left edge;
  // the JIT GEMM's K^T blocks would start at the block's (about 2x the window's work).
  const int64_t span = window_span(p);
  const bool narrow_window = span >= 0 && span <= layout::kFwdBlockK;
  if (p.weights) {
    p.forward_path = p.average_weights ? ForwardPath::AveragedWeights : ForwardPath::Weights;
  } else {
    p.forward_path = keys_as_rows_bf16(p) ? ForwardPath::KeysAsRows : ForwardPath::QueryRows;
  }
  // fp32 on bf16 products: the query-rows forward on packed operands; the weights paths, odd
  // head dims and short calls (no packed offer kept) keep fp32 products.
  p.bf16_products = p.bf16_products && p.packed != nullptr &&
                    p.forward_path == ForwardPath::QueryRows;
  if (p.dtype == DType::Float && !p.bf16_products) p.packed = nullptr;
  p.half_on_f32 = p.forward_path == ForwardPath::QueryRows && p.packed == nullptr && p.S > 0 &&
                  half_on_f32(p, r.tier);
  // The JIT GEMM takes fp32 products: fp32's, and the half types' widened ones (K^T widened by
  // the pack tasks). bf16 without AMX (AMD EPYC, avx512_bf16, B=4, H=12 over 3 kv heads,
  // L=1024, causal): 44 -> 25 ms on it, against MKL's sgemm on the widened rows (fp32: 23-30
  // ms in the same runs). fp16 takes it on every tier (not timed on AMX).
  if ((p.dtype != DType::Float && !p.half_on_f32) || p.bf16_products || p.S == 0 || p.E == 0 ||
      p.Ev == 0 || queries_per_kv_head(p) < kFloatGemmForwardMinQueries || narrow_window)
    p.fgemm = nullptr;
  if ((p.packed || p.fgemm || p.half_on_f32) && !layout::kt_in_tasks(p)) {
    r.pack_tasks = layout::pack_tasks(p);
    r.packed_elems = r.pack_tasks * layout::packed_slot(p);
  }
  const int64_t heads = p.forward_path == ForwardPath::AveragedWeights ? 1 : p.H;
  r.tasks = p.B * heads * layout::q_blocks(p);
  return r;
}

namespace {
// The fp32 keys-as-rows backward (on p.fgemm, from avx512 up; no attn_mask or dropout). It
// applies the variants in its own pass: ALiBi, softcap and rel_bias fwd+bwd at L = 1024-2048
// went from 1.5-1.7x the plain causal call's time (query-rows backward) to 1.02-1.07x (AMD
// EPYC, 2 threads). bf16's keys-as-rows path has them too.
bool float_keys_as_rows(const FlashParams& p, Capability tier) {
  return p.fgemm != nullptr && p.mask_kind == MaskKind::None && !p.dropout && p.S > 0 &&
         p.E > 0 && p.Ev > 0 && tier >= Capability::Avx512 &&
         queries_per_kv_head(p) >= kFloatGemmBackwardMinQueries;
}
}  // namespace

bool backward_widened(const FlashParams& p) {
  const Capability tier = capability();
  return half_on_f32(p, tier) && float_keys_as_rows(p, tier);
}

Plan plan_backward(const FlashParams& in) {
  Plan r = start(in, /*backward=*/true);
  FlashParams& p = r.p;
  // fp32 on bf16 products: the query-rows backward on the bf16 GEMM (p.gemm->half; MKL's
  // runs on AMX), every mask and variant included.
  const bool f32_kr = p.dtype == DType::Float && !p.bf16_products && float_keys_as_rows(p, r.tier);
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
  p.bf16_products = false;  // a few rows against a long cache: memory-bound, fp32 products
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

// Packed sequences: each one a B = 1 view of the packed call (plan.h).
namespace {

int64_t element_bytes(DType t) { return t == DType::Double ? 8 : t == DType::Float ? 4 : 2; }
int64_t accumulate_bytes(DType t) { return t == DType::Double ? 8 : 4; }

template <typename P>
P* advance(P* ptr, int64_t bytes) {
  using Byte = std::conditional_t<std::is_const_v<P>, const char, char>;
  return ptr == nullptr ? nullptr : reinterpret_cast<P*>(reinterpret_cast<Byte*>(ptr) + bytes);
}

// Sequence s of the packed call: rows offset, lengths its own, the diagonal of its
// alignment, its ALiBi row, its rel_bias gradient row, its dropout range (from element
// drop_offset of the packed probabilities, so no two sequences share a draw).
FlashParams sequence_view(const FlashParams& pk, const VarlenParams& v, int64_t s,
                          uint64_t drop_offset) {
  FlashParams p = pk;
  const int64_t q0 = v.cu_q[s], k0 = v.cu_k[s];
  const int64_t es = element_bytes(pk.dtype), as = accumulate_bytes(pk.dtype);
  p.B = 1;
  p.L = v.cu_q[s + 1] - q0;
  p.S = v.cu_k[s + 1] - k0;
  p.q = advance(pk.q, q0 * pk.q_sr * es);
  p.out = advance(pk.out, q0 * pk.o_sr * (pk.out_f32 ? int64_t(sizeof(float)) : es));
  p.dout = advance(pk.dout, q0 * pk.do_sr * es);
  p.dq = advance(pk.dq, q0 * pk.dq_sr * es);
  p.k = advance(pk.k, k0 * pk.k_sr * es);
  p.v = advance(pk.v, k0 * pk.v_sr * es);
  p.dk = advance(pk.dk, k0 * pk.dk_sr * es);
  p.dv = advance(pk.dv, k0 * pk.dv_sr * es);
  p.lse_sh = pk.lse_sh ? pk.lse_sh : pk.L;
  p.lse = advance(pk.lse, q0 * as);
  p.dlse = advance(pk.dlse, q0 * as);
  p.causal_offset = p.pos_offset = v.bottom_right ? p.S - p.L : 0;
  if (pk.alibi) p.alibi = pk.alibi + s * pk.al_sb;
  p.d_rel_bias = advance(pk.d_rel_bias, s * pk.H * (2 * pk.rel_max + 1) * as);
  if (pk.dropout) p.drop = pk.drop.shifted(drop_offset);
  return p;
}

// About the scores a block of queries [i0, i0 + bq) computes: bq times the key range the
// causal frontier and the window leave it (the loops' block granularity aside), plus a
// row's fixed cost.
int64_t block_cost(const FlashParams& p, int64_t i0, int64_t bq) {
  const int64_t last = i0 + bq - 1;
  int64_t begin = 0, end = p.S;
  if (p.causal) end = std::clamp<int64_t>(last + p.causal_offset + 1, 0, p.S);
  if (p.window_right >= 0)
    end = std::min(end, std::clamp<int64_t>(last + p.pos_offset + p.window_right + 1, 0, p.S));
  if (p.window_left >= 0) begin = std::clamp<int64_t>(i0 + p.pos_offset - p.window_left, 0, p.S);
  return bq * (std::max<int64_t>(end - begin, 0) + 1);
}

// All query blocks of one head of a sequence view.
int64_t head_cost(const FlashParams& p) {
  int64_t c = 0;
  for (int64_t i0 = 0; i0 < p.L; i0 += layout::kFwdBlockQ)
    c += block_cost(p, i0, std::min(layout::kFwdBlockQ, p.L - i0));
  return c;
}

// The views and their drop offsets (H L_s S_s elements each), planned by `planner`.
template <typename Planner>
VarlenPlan plan_sequences(const FlashParams& pk, const VarlenParams& v, Planner planner) {
  VarlenPlan r;
  r.seqs.reserve(v.batch);
  uint64_t drop = 0;
  for (int64_t s = 0; s < v.batch; ++s) {
    const FlashParams view = sequence_view(pk, v, s, drop);
    drop += uint64_t(view.H) * uint64_t(view.L) * uint64_t(view.S);
    r.seqs.push_back(planner(view));
  }
  return r;
}

// Largest first (a stable order for equal costs).
void sort_items(std::vector<VarlenItem>& items) {
  std::stable_sort(items.begin(), items.end(),
                   [](const VarlenItem& a, const VarlenItem& b) { return a.cost > b.cost; });
}

}  // namespace

VarlenPlan plan_varlen_forward(const FlashParams& pk, const VarlenParams& v, int64_t threads) {
  VarlenPlan r = plan_sequences(pk, v, plan_forward);
  // Workspace slices 64-element aligned (the packed GEMMs' operands start on cache lines).
  for (int64_t s = 0; s < v.batch; ++s) {
    const Plan& pl = r.seqs[s];
    r.packed_offset.push_back(r.packed_elems);
    r.packed_elems += (pl.packed_elems + 63) / 64 * 64;
    for (int64_t t = 0; t < pl.pack_tasks && pl.packed_elems > 0; t += 8)
      r.pack_items.push_back({s, t, std::min(t + 8, pl.pack_tasks), 8});
  }
  // A task is (h, block of 64 queries) (Forward::q_task with B = 1). Consecutive tasks of a
  // sequence merge into one item up to `cap`, so that short sequences do not pay a task's
  // buffers per 32 x 32 block, while no item outgrows an eighth of a thread's share.
  int64_t total = 0;
  for (const Plan& pl : r.seqs) total += pl.p.H * head_cost(pl.p);
  const int64_t cap = std::max<int64_t>(total / (8 * std::max<int64_t>(threads, 1)),
                                        layout::kFwdBlockQ * layout::kFwdBlockK);
  for (int64_t s = 0; s < v.batch; ++s) {
    const FlashParams& p = r.seqs[s].p;
    const int64_t nqb = layout::q_blocks(p);
    VarlenItem cur{s, 0, 0, 0};
    for (int64_t t = 0; t < r.seqs[s].tasks; ++t) {
      const int64_t i0 = (t % nqb) * layout::kFwdBlockQ;
      const int64_t c = block_cost(p, i0, std::min(layout::kFwdBlockQ, p.L - i0));
      if (cur.end > cur.begin && cur.cost + c > cap) {
        r.items.push_back(cur);
        cur = {s, t, t, 0};
      }
      cur.end = t + 1;
      cur.cost += c;
    }
    if (cur.end > cur.begin) r.items.push_back(cur);
  }
  sort_items(r.pack_items);
  sort_items(r.items);
  return r;
}

VarlenPlan plan_varlen_backward(const FlashParams& pk, const VarlenParams& v) {
  // A task per (sequence, key/value head), as in the plain backward: not split further.
  VarlenPlan r = plan_sequences(pk, v, plan_backward);
  for (int64_t s = 0; s < v.batch; ++s) {
    const Plan& pl = r.seqs[s];
    const int64_t c = (pl.p.H / std::max<int64_t>(pl.p.Hk, 1)) * head_cost(pl.p) + pl.p.S;
    for (int64_t t = 0; t < pl.tasks; ++t) r.items.push_back({s, t, t + 1, c});
  }
  r.packed_offset.assign(v.batch, 0);
  sort_items(r.items);
  return r;
}

void set_varlen_workspace(VarlenPlan& plan, void* ws) {
  for (size_t s = 0; s < plan.seqs.size(); ++s) {
    FlashParams& p = plan.seqs[s].p;
    p.packed_ws = plan.seqs[s].packed_elems > 0
                      ? advance(ws, plan.packed_offset[s] * element_bytes(p.dtype))
                      : nullptr;
  }
}

}  // namespace fusedattn::kernels::cpu
