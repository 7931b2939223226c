// CPU implementations of `_attention_forward` and `_attention_backward`: the fused kernels
// (kernels/cpu/, planned by kernels/cpu/plan.cpp) for every call they cover, the ATen
// reference for the rest.
//
// The fused path covers fp64/fp32/bf16/fp16, every mask kind (read through strides, never
// expanded), causal in both alignments, GQA, dropout, lse and returned weights. The
// backward falls back to the reference when a gradient is asked of a float mask or of the
// returned weights (both need the L x S gradient of the scores anyway).
// FUSEDATTN_CPU_KERNEL=reference in the environment sends every call to the reference;
// FUSEDATTN_CPU_KERNEL=unpacked keeps bf16/fp16 forwards and backwards off the packed (AMX
// brgemm) GEMMs and fp32 off brgemm (MKL's sgemm for every product).
// FUSEDATTN_CPU_CAPABILITY caps the instruction-set tier (kernels/cpu/capability.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "fusedattn/cpu/gemm_hooks.h"
#include "fusedattn/cpu/launch.h"
#include "fusedattn/kernels/cpu/plan.h"
#include "fusedattn/kernels/cpu/scratch.h"
#include "fusedattn/ops/attention.h"
#include "fusedattn/ops/checks.h"
#include "fusedattn/ops/reference.h"

namespace fusedattn::cpu {

using kernels::FlashParams;

bool reference_requested() {
  const char* v = std::getenv("FUSEDATTN_CPU_KERNEL");
  return v != nullptr && std::strcmp(v, "reference") == 0;
}

bool packing_disabled() {
  const char* v = std::getenv("FUSEDATTN_CPU_KERNEL");
  return v != nullptr && std::strcmp(v, "unpacked") == 0;
}

namespace {

// oneDNN (behind cpublas::brgemm) reads ONEDNN_MAX_CPU_ISA once, at its first kernel: a
// FUSEDATTN_CPU_CAPABILITY cap is handed to it at load time unless the caller set one.
const bool onednn_capped = [] {
  const char* cap = std::getenv("FUSEDATTN_CPU_CAPABILITY");
  if (cap == nullptr || *cap == '\0' || std::getenv("ONEDNN_MAX_CPU_ISA") != nullptr) return false;
  try {
    setenv("ONEDNN_MAX_CPU_ISA", kernels::cpu::onednn_isa_name(kernels::cpu::capability()), 0);
  } catch (const std::invalid_argument&) {  // reported by the first op call
    return false;
  }
  return true;
}();

// (..., X, R, C) -> a (B, X, R, C) view (a copy only where the batch dims cannot merge),
// with a contiguous last dim and rows that do not overlap, as the kernels and BLAS need (an
// expanded tensor, e.g. the gradient of a sum, has row stride 0: copied).
at::Tensor as_4d(const at::Tensor& t, int64_t batch) {
  auto r = t.reshape({batch, t.size(-3), t.size(-2), t.size(-1)});
  const bool inner_ok = r.size(-1) <= 1 || r.stride(-1) == 1;
  const bool rows_ok = r.size(-2) <= 1 || r.stride(-2) >= r.size(-1);
  return (inner_ok && rows_ok) ? r : r.contiguous();
}

}  // namespace

Launch prepare(const AttentionProblem& pb, const at::Tensor& query, const at::Tensor& key,
               const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
               const std::optional<at::Tensor>& key_padding_mask,
               const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
               bool bottom_right, const ScoreMods& mods) {
  Launch l;
  auto& p = l.p;
  p.dtype = kernel_dtype(query.scalar_type());
  p.B = pb.batch_size, p.H = pb.heads, p.Hk = pb.kv_heads;
  p.L = pb.q_len, p.S = pb.kv_len, p.E = pb.head_dim, p.Ev = pb.v_head_dim;
  p.scale = pb.scale;
  l.q = as_4d(query, p.B), l.k = as_4d(key, p.B), l.v = as_4d(value, p.B);
  p.gemm = &torch_gemms();
  fill_operands(l.q, l.k, l.v, p);
  std::tie(l.mask, l.kpm) =
      fill_mask_params(pb, attn_mask, key_padding_mask, is_causal, bottom_right, p, mods);
  if (dropout_p > 0.0) {
    p.dropout = true;
    p.drop = kernels::DropoutParams::make(reference::dropout_seed_value(dropout_seed), dropout_p);
  }
  return l;
}

namespace {

// The returned weights are the one L x S output, written once by the forward. Fresh 4 KiB
// pages cost a fault each on that first write: 512 MiB of weights (B=4, H=8, L=S=2048, fp32)
// took 80 ms of faults, 2 MiB pages 9 ms (measured here, transparent huge pages in "madvise"
// mode; bf16 weights at L=512, 16 MiB: 18.9 -> 13.2 ms a call with every block its own
// mapping, as the benchmark runs). From 4 MiB on (whole 2 MiB pages inside). Advice that
// outlives the tensor (memory the allocator keeps) only makes later pages there huge too.
// A hint: where the kernel declines it, nothing changes. Also given to the forward's K/V
// workspace, which is as large as K (and V) and as fresh.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (t.nbytes() < (size_t(4) << 20)) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// The forward's packed workspace (packed or widened K and V blocks), kept per calling thread
// between calls up to kCachedWorkspaceBytes; larger ones are allocated per call. A fresh one
// is first touched by the pack tasks, a page fault per page: bf16 at B=4, H=8, L=1024 capped
// to AVX2 (16 MiB of fp32 K and V), a causal forward took 44-51 ms instead of 28-29 whenever
// the allocator handed back fresh pages (Xeon). Contents are not kept: each call packs anew.
constexpr size_t kCachedWorkspaceBytes = size_t(64) << 20;
}  // namespace

void* packed_workspace(int64_t elems, const at::TensorOptions& options, at::Tensor& holder) {
  const size_t bytes = size_t(elems) * options.dtype().itemsize();
  thread_local at::Tensor cached;
#ifdef FUSEDATTN_EXACT_ALLOCATIONS
  constexpr bool kCache = false;  // scratch.h: exact-size allocations under ASan
#else
  constexpr bool kCache = true;
#endif
  if (!kCache || bytes > kCachedWorkspaceBytes) {
    holder = at::empty({int64_t(bytes)}, options.dtype(at::kByte));
    advise_huge_pages(holder);
    return holder.data_ptr();
  }
  if (!cached.defined() || cached.nbytes() < bytes) {
    cached = at::Tensor();  // the old one goes first
    cached = at::empty({int64_t(bytes)}, options.dtype(at::kByte));
    advise_huge_pages(cached);
  }
  return cached.data_ptr();
}

namespace {

// Outputs and gradients (O(L E) each) are plain at::empty. With the hint on them (THP and its
// defrag both in "madvise" mode), every other fp32 fwd+bwd at B=4, H=8, L=512 took 70 ms
// instead of 50, its fresh pages faulted in huge (Xeon capped to AVX2; AMX 34-56 vs 32-35 ms),
// and the same calls with THP off for the process were steady; the encoder-size
// MultiheadAttention step (24 MiB of gradients) ran the same with the hint from 4 MiB, from
// 16 MiB or not at all (in-process A/B, 111-124 ms each).

// The fused forward, its output written into out4, a (B, H, L, Ev) view with a contiguous
// last dim (rows of different (b, h) apart). -> (lse, weights)
std::tuple<at::Tensor, at::Tensor> forward_into(
    const AttentionProblem& pb, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, bool return_weights, bool average_weights, const at::Tensor& out4,
    const ScoreMods& mods = ScoreMods()) {
  auto launch = prepare(pb, query, key, value, attn_mask, key_padding_mask, dropout_seed,
                        dropout_p, is_causal, bottom_right, mods);
  auto& p = launch.p;
  auto lse = at::empty(pb.lse_shape(), query.options().dtype(accumulate_type(query.scalar_type())));
  p.out = out4.data_ptr(), p.o_sb = out4.stride(0), p.o_sh = out4.stride(1), p.o_sr = out4.stride(2);
  p.lse = lse.data_ptr();
  at::Tensor weights = at::empty({0}, query.options());
  if (return_weights) {
    auto shape = pb.weights_shape();  // (..., H, L, S); averaged: (..., L, S)
    if (average_weights) shape.erase(shape.end() - 3);
    weights = at::empty(shape, query.options());
    advise_huge_pages(weights);
    p.weights = weights.data_ptr();
    p.average_weights = average_weights;
  }
  if (pb.heads == 0) {
    // No heads: every output is empty but the head-averaged weights (N, L, S), which average
    // nothing and are 0, as in the reference path; the kernels' group H / Hk is undefined.
    if (return_weights) weights.zero_();
    return {lse, weights};
  }
  p.packed = packed_gemm_offer(query.scalar_type(), packing_disabled());
  p.fgemm = float_gemm_offer(packing_disabled());
  auto plan = plan_or_error(kernels::cpu::plan_forward, p);
  at::Tensor packed_ws;  // holds a workspace too large to keep
  if (plan.packed_elems > 0) {
    plan.p.packed_ws = packed_workspace(plan.packed_elems, query.options(), packed_ws);
    run_tasks(plan.pack_tasks, plan.p, plan.kernels->pack);
  }
  run_tasks(plan.tasks, plan.p, plan.kernels->forward);
  return {lse, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, bool enable_gqa, bool return_weights,
    bool average_weights, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias) {
  const auto pb = check_attention_inputs(query, key, value, attn_mask, key_padding_mask,
                                         dropout_p, scale, enable_gqa, window, alibi_slopes,
                                         softcap, rel_bias);
  const auto mods = make_score_mods(pb, window, alibi_slopes, softcap, rel_bias);
  if (reference_requested()) {
    return reference::attention_forward(pb, query, key, value, attn_mask, key_padding_mask,
                                        dropout_seed, dropout_p, is_causal, bottom_right,
                                        return_weights, average_weights, mods);
  }
  auto out = at::empty(pb.out_shape(), query.options());
  auto [lse, weights] =
      forward_into(pb, query, key, value, attn_mask, key_padding_mask, dropout_seed, dropout_p,
                   is_causal, bottom_right, return_weights, average_weights,
                   out.view({pb.batch_size, pb.heads, pb.q_len, pb.v_head_dim}), mods);
  return {out, lse, weights};
}

// Whether a backward takes the reference: asked to, or asked for a float mask's or the
// weights' gradient (each an L x S gradient of the scores anyway).
bool reference_backward(const std::optional<at::Tensor>& grad_weights,
                        const std::optional<at::Tensor>& attn_mask,
                        const std::optional<at::Tensor>& key_padding_mask, bool attn_mask_grad,
                        bool key_padding_mask_grad) {
  return reference_requested() ||
         (attn_mask_grad && attn_mask && attn_mask->is_floating_point()) ||
         (key_padding_mask_grad && key_padding_mask && key_padding_mask->is_floating_point()) ||
         (grad_weights && grad_weights->numel() > 0);
}

// The fused backward, the gradients written into dq4, dk4, dv4: (B, H|Hk, rows, cols) views
// with a contiguous last dim whose (b, h) rows do not overlap.
void backward_into(const AttentionProblem& pb, const at::Tensor& grad_out,
                   const std::optional<at::Tensor>& grad_lse, const at::Tensor& query,
                   const at::Tensor& key, const at::Tensor& value, const at::Tensor& out,
                   const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
                   const std::optional<at::Tensor>& key_padding_mask,
                   const std::optional<at::Tensor>& dropout_seed, double dropout_p,
                   bool is_causal, bool bottom_right, const at::Tensor& dq4,
                   const at::Tensor& dk4, const at::Tensor& dv4,
                   const ScoreMods& mods = ScoreMods(), const at::Tensor& d_rel_partial = {}) {
  TORCH_CHECK(grad_out.sizes().equals(pb.out_shape()) && out.sizes().equals(pb.out_shape()),
              "attention backward: grad_out and out must have shape ",
              c10::IntArrayRef(pb.out_shape()), ", got ", grad_out.sizes(), " and ", out.sizes());
  const auto acc = accumulate_type(query.scalar_type());
  TORCH_CHECK(lse.sizes().equals(pb.lse_shape()) && lse.scalar_type() == acc,
              "attention backward: lse must be ", acc, " of shape ",
              c10::IntArrayRef(pb.lse_shape()), ", got ", lse.scalar_type(), " ", lse.sizes());
  auto launch = prepare(pb, query, key, value, attn_mask, key_padding_mask, dropout_seed,
                        dropout_p, is_causal, bottom_right, mods);
  auto& p = launch.p;
  auto out4 = as_4d(out, p.B), dout4 = as_4d(grad_out, p.B);
  auto lse_c = lse.contiguous();
  at::Tensor dlse;
  if (grad_lse && grad_lse->numel() > 0) dlse = grad_lse->to(acc).contiguous();
  p.out = out4.data_ptr(), p.o_sb = out4.stride(0), p.o_sh = out4.stride(1), p.o_sr = out4.stride(2);
  p.dout = dout4.data_ptr(), p.do_sb = dout4.stride(0), p.do_sh = dout4.stride(1),
  p.do_sr = dout4.stride(2);
  p.lse = lse_c.data_ptr();
  p.dlse = dlse.defined() ? dlse.data_ptr() : nullptr;
  p.dq = dq4.data_ptr(), p.dq_sb = dq4.stride(0), p.dq_sh = dq4.stride(1), p.dq_sr = dq4.stride(2);
  p.dk = dk4.data_ptr(), p.dk_sb = dk4.stride(0), p.dk_sh = dk4.stride(1), p.dk_sr = dk4.stride(2);
  p.dv = dv4.data_ptr(), p.dv_sb = dv4.stride(0), p.dv_sh = dv4.stride(1), p.dv_sr = dv4.stride(2);
  if (d_rel_partial.defined()) p.d_rel_bias = d_rel_partial.data_ptr();
  if (pb.heads == 0) return;  // no heads: the gradients are empty
  p.packed = packed_gemm_offer(query.scalar_type(), packing_disabled());
  p.fgemm = float_gemm_offer(packing_disabled());
  if (kernels::cpu::backward_widened(p)) {
    const auto wide = [](const at::Tensor& t) { return t.to(at::kFloat); };
    const auto wide_grad = [](const at::Tensor& g) {
      return at::empty(g.sizes(), g.options().dtype(at::kFloat));
    };
    std::optional<at::Tensor> kpm;
    if (key_padding_mask)
      kpm = key_padding_mask->is_floating_point() ? wide(*key_padding_mask) : *key_padding_mask;
    AttentionProblem pf = pb;
    pf.dtype = at::kFloat;
    const auto dqf = wide_grad(dq4), dkf = wide_grad(dk4), dvf = wide_grad(dv4);
    backward_into(pf, wide(grad_out), grad_lse, wide(query), wide(key), wide(value), wide(out),
                  lse, attn_mask, kpm, dropout_seed, dropout_p, is_causal, bottom_right, dqf, dkf,
                  dvf, mods, d_rel_partial);
    dq4.copy_(dqf);
    dk4.copy_(dkf);
    dv4.copy_(dvf);
    return;
  }
  const auto plan = plan_or_error(kernels::cpu::plan_backward, p);
  run_tasks(plan.tasks, plan.p, plan.kernels->backward);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, bool enable_gqa, bool attn_mask_grad,
    bool key_padding_mask_grad, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias) {
  if (reference_backward(grad_weights, attn_mask, key_padding_mask, attn_mask_grad,
                         key_padding_mask_grad)) {
    return reference::attention_backward_op(
        grad_out, grad_weights, grad_lse, query, key, value, out, lse, attn_mask,
        key_padding_mask, dropout_seed, dropout_p, is_causal, bottom_right, scale, enable_gqa,
        attn_mask_grad, key_padding_mask_grad, window, alibi_slopes, softcap, rel_bias);
  }
  const auto pb = check_attention_inputs(query, key, value, attn_mask, key_padding_mask,
                                         dropout_p, scale, enable_gqa, window, alibi_slopes,
                                         softcap, rel_bias);
  const auto mods = make_score_mods(pb, window, alibi_slopes, softcap, rel_bias);
  at::Tensor d_rel;  // (B, H, 2 D + 1), written by the tasks
  if (mods.rel_bias.defined())
    d_rel = at::zeros({pb.batch_size, pb.heads, mods.rel_bias.size(1)}, mods.rel_bias.options());
  auto dq = at::empty(query.sizes(), query.options());
  auto dk = at::empty(key.sizes(), key.options());
  auto dv = at::empty(value.sizes(), value.options());
  backward_into(pb, grad_out, grad_lse, query, key, value, out, lse, attn_mask, key_padding_mask,
                dropout_seed, dropout_p, is_causal, bottom_right, as_4d(dq, pb.batch_size),
                as_4d(dk, pb.batch_size), as_4d(dv, pb.batch_size), mods, d_rel);
  auto none = at::empty({0}, query.options());
  // rel_bias: the tasks' per-batch rows, summed.
  return {dq, dk, dv, none, none, d_rel.defined() ? d_rel.sum(0) : none};
}

// Attention on projections in the caller's layout: q, k, v are views of the given tensors,
// the output is written straight into the heads-merged (A, B, H * Dv) layout and each
// gradient whole into a tensor shaped like its input.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_projected_forward(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, int64_t num_heads, bool seq_first,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool return_weights, bool average_weights) {
  const auto [q, k, v] = detail::split_projected(query, key, value, num_heads, seq_first);
  const auto pb = check_attention_inputs(q, k, v, attn_mask, key_padding_mask, dropout_p,
                                         std::nullopt, /*enable_gqa=*/false);
  auto out = at::empty({query.size(0), query.size(1), pb.heads * pb.v_head_dim}, query.options());
  const auto out4 = detail::split_heads(out, num_heads, seq_first);  // (N, H, L, Dv) view
  if (reference_requested()) {
    auto [o, lse, weights] = reference::attention_forward(
        pb, q, k, v, attn_mask, key_padding_mask, dropout_seed, dropout_p, is_causal,
        /*bottom_right=*/false, return_weights, average_weights);
    out4.copy_(o);
    return {out, lse, weights};
  }
  auto [lse, weights] = forward_into(pb, q, k, v, attn_mask, key_padding_mask, dropout_seed,
                                     dropout_p, is_causal, /*bottom_right=*/false,
                                     return_weights, average_weights, out4);
  return {out, lse, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_projected_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& query,
    const std::optional<at::Tensor>& key, const std::optional<at::Tensor>& value,
    const at::Tensor& out, const at::Tensor& lse, int64_t num_heads, bool seq_first,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool attn_mask_grad, bool key_padding_mask_grad) {
  TORCH_CHECK(out.dim() == 3 && grad_out.sizes().equals(out.sizes()),
              "attention_projected backward: grad_out and out must have the same 3-D shape, got ",
              grad_out.sizes(), " and ", out.sizes());
  const auto [q, k, v] = detail::split_projected(query, key, value, num_heads, seq_first);
  const auto out4 = detail::split_heads(out, num_heads, seq_first);
  const auto dout4 = detail::split_heads(grad_out, num_heads, seq_first);
  auto empty = [&] { return at::empty({0}, query.options()); };
  auto d_query = at::empty(query.sizes(), query.options());
  auto d_key = key ? at::empty(key->sizes(), key->options()) : empty();
  auto d_value = value ? at::empty(value->sizes(), value->options()) : empty();
  const auto [dq4, dk4, dv4] = detail::split_projected(
      d_query, key ? std::optional<at::Tensor>(d_key) : std::nullopt,
      value ? std::optional<at::Tensor>(d_value) : std::nullopt, num_heads, seq_first);
  if (reference_backward(grad_weights, attn_mask, key_padding_mask, attn_mask_grad,
                         key_padding_mask_grad)) {
    auto [dq, dk, dv, d_mask, d_kpm, d_rel] = reference::attention_backward_op(
        dout4, grad_weights, grad_lse, q, k, v, out4, lse, attn_mask, key_padding_mask,
        dropout_seed, dropout_p, is_causal, /*bottom_right=*/false, std::nullopt,
        /*enable_gqa=*/false, attn_mask_grad, key_padding_mask_grad, std::nullopt, std::nullopt,
        std::nullopt, std::nullopt);
    dq4.copy_(dq), dk4.copy_(dk), dv4.copy_(dv);
    return {d_query, d_key, d_value, d_mask, d_kpm};
  }
  const auto pb = check_attention_inputs(q, k, v, attn_mask, key_padding_mask, dropout_p,
                                         std::nullopt, /*enable_gqa=*/false);
  backward_into(pb, dout4, grad_lse, q, k, v, out4, lse, attn_mask, key_padding_mask,
                dropout_seed, dropout_p, is_causal, /*bottom_right=*/false, dq4, dk4, dv4);
  return {d_query, d_key, d_value, empty(), empty()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("_attention_forward", &attention_forward);
  m.impl("_attention_backward", &attention_backward);
  m.impl("_attention_projected_forward", &attention_projected_forward);
  m.impl("_attention_projected_backward", &attention_projected_backward);
}

}  // namespace fusedattn::cpu

namespace fusedattn {

std::string cpu_capability() {
  try {
    return kernels::cpu::capability_name(kernels::cpu::capability());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
}

std::vector<std::string> cpu_capabilities_supported() {
  std::vector<std::string> tiers;
  for (int c = 0; c <= int(kernels::cpu::detected_capability()); ++c)
    tiers.emplace_back(kernels::cpu::capability_name(kernels::cpu::Capability(c)));
  return tiers;
}

}  // namespace fusedattn
