// CPU implementations of `_attention_forward`, `_attention_backward` and the modules'
// `_attention_projected_*`: the fused kernels (kernels/cpu/, planned by kernels/cpu/plan.cpp)
// for every call they cover, the ATen reference for the rest (and for every call under
// FUSEDATTN_CPU_KERNEL=reference, backends/cpu/config.h). Each entry turns its schema arguments into
// AttentionParams once (ops/params.h); everything below takes the struct.
//
// The fused path covers fp64/fp32/bf16/fp16, every mask kind (read through strides, never
// expanded), causal in both alignments, GQA, dropout, lse and returned weights. The
// backward falls back to the reference when a gradient is asked of a float mask or of the
// returned weights (both need the L x S gradient of the scores anyway).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "fusedattn/backends/cpu/config.h"
#include "fusedattn/backends/cpu/gemm_hooks.h"
#include "fusedattn/backends/cpu/launch.h"
#include "fusedattn/kernels/cpu/plan.h"
#include "fusedattn/ops/attention.h"
#include "fusedattn/ops/kernel_args.h"
#include "fusedattn/ops/reference.h"

namespace fusedattn::cpu {

namespace {

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

Launch prepare(const AttentionParams& params) {
  const AttentionProblem& pb = params.problem;
  Launch l;
  auto& p = l.p;
  p.dtype = kernel_dtype(pb.dtype);
  p.B = pb.batch_size, p.H = pb.heads, p.Hk = pb.kv_heads;
  p.L = pb.q_len, p.S = pb.kv_len, p.E = pb.head_dim, p.Ev = pb.v_head_dim;
  p.scale = pb.scale;
  p.bf16_products = pb.dtype == at::kFloat && fp32_matmul_allows_bf16();
  l.q = as_4d(params.query, p.B), l.k = as_4d(params.key, p.B), l.v = as_4d(params.value, p.B);
  p.gemm = &torch_gemms();
  fill_operands(l.q, l.k, l.v, p);
  std::tie(l.mask, l.kpm) = fill_mask_params(params, p);
  if (params.dropout_p > 0.0) {
    p.dropout = true;
    p.drop = kernels::DropoutParams::make(reference::dropout_seed_value(params.dropout_seed),
                                          params.dropout_p);
  }
  return l;
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
std::tuple<at::Tensor, at::Tensor> forward_into(const AttentionParams& params,
                                                const at::Tensor& out4) {
  const AttentionProblem& pb = params.problem;
  const auto options = params.query.options();
  auto launch = prepare(params);
  auto& p = launch.p;
  auto lse = at::empty(pb.lse_shape(), options.dtype(accumulate_type(pb.dtype)));
  p.out = out4.data_ptr(), p.o_sb = out4.stride(0), p.o_sh = out4.stride(1), p.o_sr = out4.stride(2);
  p.out_f32 = out4.scalar_type() != pb.dtype;  // params.fp32_out's fp32 out of half inputs
  p.lse = lse.data_ptr();
  at::Tensor weights = at::empty({0}, options);
  if (params.return_weights) {
    auto shape = pb.weights_shape();  // (..., H, L, S); averaged: (..., L, S)
    if (params.average_weights) shape.erase(shape.end() - 3);
    weights = at::empty(shape, options);
    advise_huge_pages(weights);
    p.weights = weights.data_ptr();
    p.average_weights = params.average_weights;
  }
  if (pb.heads == 0) {
    // No heads: every output is empty but the head-averaged weights (N, L, S), which average
    // nothing and are 0, as in the reference path; the kernels' group H / Hk is undefined.
    if (params.return_weights) weights.zero_();
    return {lse, weights};
  }
  offer_gemms(p, pb.dtype);
  auto plan = plan_or_error(kernels::cpu::plan_forward, p);
  at::Tensor packed_ws;  // holds a workspace too large to keep
  if (plan.packed_elems > 0) {
    plan.p.packed_ws = packed_workspace(plan.packed_elems, options, packed_ws);
    run_tasks(plan.pack_tasks, plan.p, plan.kernels->pack);
  }
  run_tasks(plan.tasks, plan.p, plan.kernels->forward);
  return {lse, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(const AttentionParams& params) {
  if (kernel_switches().reference) return reference::attention_forward(params);
  const AttentionProblem& pb = params.problem;
  auto out = at::empty(pb.out_shape(), params.query.options().dtype(params.out_dtype()));
  auto [lse, weights] =
      forward_into(params, out.view({pb.batch_size, pb.heads, pb.q_len, pb.v_head_dim}));
  return {out, lse, weights};
}

// Whether a backward takes the reference: asked to, or asked for a float mask's or the
// weights' gradient (each an L x S gradient of the scores anyway).
bool reference_backward(const AttentionParams& params, const AttentionGrads& grads) {
  const auto& mask = params.attn_mask;
  const auto& kpm = params.key_padding_mask;
  return kernel_switches().reference || (grads.attn_mask_grad && mask && mask->is_floating_point()) ||
         (grads.key_padding_mask_grad && kpm && kpm->is_floating_point()) ||
         (grads.grad_weights && grads.grad_weights->numel() > 0);
}

// The fused backward, the gradients written into dq4, dk4, dv4: (B, H|Hk, rows, cols) views
// with a contiguous last dim whose (b, h) rows do not overlap; rel_bias's per-batch rows into
// d_rel_partial (B, H, 2 D + 1) where the call has one.
void backward_into(const AttentionParams& params, const AttentionGrads& grads,
                   const at::Tensor& dq4, const at::Tensor& dk4, const at::Tensor& dv4,
                   const at::Tensor& d_rel_partial = {}) {
  const AttentionProblem& pb = params.problem;
  const auto &grad_out = grads.grad_out, &out = grads.out, &lse = grads.lse;
  TORCH_CHECK(grad_out.sizes().equals(pb.out_shape()) && out.sizes().equals(pb.out_shape()),
              "attention backward: grad_out and out must have shape ",
              c10::IntArrayRef(pb.out_shape()), ", got ", grad_out.sizes(), " and ", out.sizes());
  const bool out_f32 = check_backward_dtypes(pb.dtype, grad_out, out, "attention");
  const auto acc = accumulate_type(pb.dtype);
  TORCH_CHECK(lse.sizes().equals(pb.lse_shape()) && lse.scalar_type() == acc,
              "attention backward: lse must be ", acc, " of shape ",
              c10::IntArrayRef(pb.lse_shape()), ", got ", lse.scalar_type(), " ", lse.sizes());
  auto launch = prepare(params);
  auto& p = launch.p;
  auto out4 = as_4d(out, p.B), dout4 = as_4d(grad_out, p.B);
  auto lse_c = lse.contiguous();
  at::Tensor dlse;
  if (grads.grad_lse && grads.grad_lse->numel() > 0) dlse = grads.grad_lse->to(acc).contiguous();
  p.out = out4.data_ptr(), p.o_sb = out4.stride(0), p.o_sh = out4.stride(1), p.o_sr = out4.stride(2);
  p.out_f32 = out_f32;
  p.dout = dout4.data_ptr(), p.do_sb = dout4.stride(0), p.do_sh = dout4.stride(1),
  p.do_sr = dout4.stride(2);
  p.lse = lse_c.data_ptr();
  p.dlse = dlse.defined() ? dlse.data_ptr() : nullptr;
  p.dq = dq4.data_ptr(), p.dq_sb = dq4.stride(0), p.dq_sh = dq4.stride(1), p.dq_sr = dq4.stride(2);
  p.dk = dk4.data_ptr(), p.dk_sb = dk4.stride(0), p.dk_sh = dk4.stride(1), p.dk_sr = dk4.stride(2);
  p.dv = dv4.data_ptr(), p.dv_sb = dv4.stride(0), p.dv_sh = dv4.stride(1), p.dv_sr = dv4.stride(2);
  if (d_rel_partial.defined()) p.d_rel_bias = d_rel_partial.data_ptr();
  if (pb.heads == 0) return;  // no heads: the gradients are empty
  offer_gemms(p, pb.dtype);
  if (kernels::cpu::backward_widened(p)) {
    // The same call on fp32 copies (a float key padding mask widened with them).
    const auto wide = [](const at::Tensor& t) { return t.to(at::kFloat); };
    const auto wide_grad = [](const at::Tensor& g) {
      return at::empty(g.sizes(), g.options().dtype(at::kFloat));
    };
    AttentionParams pf = params;
    pf.problem.dtype = at::kFloat;
    pf.query = wide(params.query), pf.key = wide(params.key), pf.value = wide(params.value);
    const auto& kpm = params.key_padding_mask;
    if (kpm && kpm->is_floating_point()) pf.key_padding_mask = wide(*kpm);
    AttentionGrads gf = grads;
    gf.grad_out = wide(grad_out), gf.out = wide(out);
    const auto dqf = wide_grad(dq4), dkf = wide_grad(dk4), dvf = wide_grad(dv4);
    backward_into(pf, gf, dqf, dkf, dvf, d_rel_partial);
    dq4.copy_(dqf);
    dk4.copy_(dkf);
    dv4.copy_(dvf);
    return;
  }
  const auto plan = plan_or_error(kernels::cpu::plan_backward, p);
  run_tasks(plan.tasks, plan.p, plan.kernels->backward);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const AttentionParams& params, const AttentionGrads& grads) {
  if (reference_backward(params, grads)) return reference::attention_backward(params, grads);
  const AttentionProblem& pb = params.problem;
  const auto& rel = params.mods.rel_bias;
  at::Tensor d_rel;  // (B, H, 2 D + 1), written by the tasks
  if (rel.defined()) d_rel = at::zeros({pb.batch_size, pb.heads, rel.size(1)}, rel.options());
  const auto &query = params.query, &key = params.key, &value = params.value;
  auto dq = at::empty(query.sizes(), query.options());
  auto dk = at::empty(key.sizes(), key.options());
  auto dv = at::empty(value.sizes(), value.options());
  backward_into(params, grads, as_4d(dq, pb.batch_size), as_4d(dk, pb.batch_size),
                as_4d(dv, pb.batch_size), d_rel);
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
    bool return_weights, bool average_weights, bool fp32_out) {
  const auto [q, k, v] = detail::split_projected(query, key, value, num_heads, seq_first);
  auto params = make_attention_params(q, k, v, attn_mask, key_padding_mask, dropout_seed,
                                      dropout_p, is_causal, /*bottom_right=*/false, std::nullopt,
                                      /*enable_gqa=*/false);
  params.return_weights = return_weights, params.average_weights = average_weights;
  params.fp32_out = fp32_out;
  const AttentionProblem& pb = params.problem;
  auto out = at::empty({query.size(0), query.size(1), pb.heads * pb.v_head_dim},
                       query.options().dtype(params.out_dtype()));
  const auto out4 = detail::split_heads(out, num_heads, seq_first);  // (N, H, L, Dv) view
  if (kernel_switches().reference) {
    auto [o, lse, weights] = reference::attention_forward(params);
    out4.copy_(o);
    return {out, lse, weights};
  }
  auto [lse, weights] = forward_into(params, out4);
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
  const auto params = make_attention_params(q, k, v, attn_mask, key_padding_mask, dropout_seed,
                                            dropout_p, is_causal, /*bottom_right=*/false,
                                            std::nullopt, /*enable_gqa=*/false);
  AttentionGrads grads;
  grads.grad_out = detail::split_heads(grad_out, num_heads, seq_first);
  grads.out = detail::split_heads(out, num_heads, seq_first);
  grads.lse = lse;
  grads.grad_weights = grad_weights, grads.grad_lse = grad_lse;
  grads.attn_mask_grad = attn_mask_grad, grads.key_padding_mask_grad = key_padding_mask_grad;
  auto empty = [&] { return at::empty({0}, query.options()); };
  auto d_query = at::empty(query.sizes(), query.options());
  auto d_key = key ? at::empty(key->sizes(), key->options()) : empty();
  auto d_value = value ? at::empty(value->sizes(), value->options()) : empty();
  const auto [dq4, dk4, dv4] = detail::split_projected(
      d_query, key ? std::optional<at::Tensor>(d_key) : std::nullopt,
      value ? std::optional<at::Tensor>(d_value) : std::nullopt, num_heads, seq_first);
  if (reference_backward(params, grads)) {
    auto [dq, dk, dv, d_mask, d_kpm, d_rel] = reference::attention_backward(params, grads);
    dq4.copy_(dq), dk4.copy_(dk), dv4.copy_(dv);
    return {d_query, d_key, d_value, d_mask, d_kpm};
  }
  backward_into(params, grads, dq4, dk4, dv4);
  return {d_query, d_key, d_value, empty(), empty()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("_attention_forward", &attention_forward_entry<attention_forward>);
  m.impl("_attention_backward", &attention_backward_entry<attention_backward>);
  m.impl("_attention_projected_forward", &attention_projected_forward);
  m.impl("_attention_projected_backward", &attention_projected_backward);
}

}  // namespace fusedattn::cpu

