#include "fusedattn/ops/attention.h"

#include <ATen/ATen.h>

#include <limits>
#include <vector>

#include "fusedattn/ops/checks.h"
#include "fusedattn/ops/op_handle.h"
#include "fusedattn/ops/params.h"
#include "fusedattn/ops/route.h"

namespace fusedattn {
namespace {

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace

namespace ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    std::optional<double> scale, bool enable_gqa, const std::optional<at::Tensor>& key_padding_mask,
    c10::string_view causal_alignment, bool return_weights, bool return_lse,
    bool average_weights, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, const std::optional<at::Tensor>& sinks) {
  static auto op = detail::op_handle<decltype(attention)>("fusedattn::attention");
  return op.call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                 key_padding_mask, causal_alignment, return_weights, return_lse, average_weights,
                 window, alibi_slopes, softcap, rel_bias, sinks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, bool enable_gqa, bool return_weights,
    bool average_weights, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, bool fp32_out) {
  static auto op = detail::op_handle<decltype(attention_forward)>("fusedattn::_attention_forward");
  return op.call(query, key, value, attn_mask, key_padding_mask, dropout_seed, dropout_p,
                 is_causal, bottom_right, scale, enable_gqa, return_weights, average_weights,
                 window, alibi_slopes, softcap, rel_bias, fp32_out);
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
  static auto op = detail::op_handle<decltype(attention_backward)>("fusedattn::_attention_backward");
  return op.call(grad_out, grad_weights, grad_lse, query, key, value, out, lse, attn_mask,
                 key_padding_mask, dropout_seed, dropout_p, is_causal, bottom_right, scale,
                 enable_gqa, attn_mask_grad, key_padding_mask_grad, window, alibi_slopes, softcap, rel_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_projected_forward(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, int64_t num_heads, bool seq_first,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool return_weights, bool average_weights, bool fp32_out) {
  static auto op = detail::op_handle<decltype(attention_projected_forward)>(
      "fusedattn::_attention_projected_forward");
  return op.call(query, key, value, num_heads, seq_first, attn_mask, key_padding_mask,
                 dropout_seed, dropout_p, is_causal, return_weights, average_weights, fp32_out);
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
  static auto op = detail::op_handle<decltype(attention_projected_backward)>(
      "fusedattn::_attention_projected_backward");
  return op.call(grad_out, grad_weights, grad_lse, query, key, value, out, lse, num_heads,
                 seq_first, attn_mask, key_padding_mask, dropout_seed, dropout_p, is_causal,
                 attn_mask_grad, key_padding_mask_grad);
}

}  // namespace ops

AttentionResult attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const AttentionOptions& o) {
  at::OptionalIntArrayRef window;
  if (!o.window().empty()) window = o.window();
  auto [out, weights, lse] =
      ops::attention(query, key, value, opt(o.attn_mask()), o.dropout_p(), o.is_causal(),
                     o.scale(), o.enable_gqa(), opt(o.key_padding_mask()), o.causal_alignment(),
                     o.return_weights(), o.return_lse(), o.average_weights(), window,
                     opt(o.alibi_slopes()), o.softcap(), opt(o.rel_bias()), opt(o.sinks()));
  AttentionResult r;
  r.out = std::move(out);
  if (o.return_weights()) r.weights = std::move(weights);
  if (o.return_lse()) r.lse = std::move(lse);
  return r;
}

namespace detail {

std::optional<at::Tensor> draw_dropout_seed(double dropout_p, c10::Device device) {
  if (dropout_p <= 0.0) return std::nullopt;
  return at::randint(std::numeric_limits<int64_t>::max(), {1},
                     at::TensorOptions().dtype(at::kLong).device(device));
}

at::Tensor split_heads(const at::Tensor& x, int64_t heads, bool seq_first) {
  const c10::SymInt a = x.sym_size(0), b = x.sym_size(1), d = x.sym_size(2) / heads;
  auto v = x.view_symint({a, b, c10::SymInt(heads), d});
  return seq_first ? v.permute({1, 2, 0, 3}) : v.permute({0, 2, 1, 3});
}

namespace {
// x (A, B, parts * heads * d) -> its parts as (N, H, seq, d) views.
std::vector<at::Tensor> split_parts(const at::Tensor& x, int64_t parts, int64_t heads,
                                    bool seq_first, const char* name) {
  TORCH_CHECK(x.dim() == 3, "attention_projected: ", name, " must be 3-D (A, B, ", parts,
              " * num_heads * head_dim), got shape ", x.sym_sizes());
  TORCH_SYM_CHECK((x.sym_size(2) % (parts * heads)).sym_eq(0), "attention_projected: ", name,
                  "'s last dim must be a multiple of ", parts, " * num_heads = ", parts * heads,
                  ", got shape ", x.sym_sizes());
  std::vector<at::Tensor> out;
  for (const auto& part : x.chunk(parts, -1)) out.push_back(split_heads(part, heads, seq_first));
  return out;
}
}  // namespace

std::array<at::Tensor, 3> split_projected(const at::Tensor& query,
                                          const std::optional<at::Tensor>& key,
                                          const std::optional<at::Tensor>& value, int64_t heads,
                                          bool seq_first) {
  TORCH_CHECK(heads > 0, "attention_projected: num_heads must be positive, got ", heads);
  TORCH_CHECK(key || !value, "attention_projected: value without key: pass key and value, "
              "key alone (packed key|value) or neither (packed query|key|value)");
  if (!key) {
    auto qkv = split_parts(query, 3, heads, seq_first, "query");
    return {qkv[0], qkv[1], qkv[2]};
  }
  auto q = split_parts(query, 1, heads, seq_first, "query")[0];
  if (!value) {
    auto kv = split_parts(*key, 2, heads, seq_first, "key");
    return {q, kv[0], kv[1]};
  }
  return {q, split_parts(*key, 1, heads, seq_first, "key")[0],
          split_parts(*value, 1, heads, seq_first, "value")[0]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_composite(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    std::optional<double> scale, bool enable_gqa, const std::optional<at::Tensor>& key_padding_mask,
    c10::string_view causal_alignment, bool return_weights, bool return_lse,
    bool average_weights, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(!average_weights || return_weights,
              "attention: average_weights=True averages the returned weights: it needs "
              "return_weights=True");
  TORCH_CHECK(causal_alignment == "top_left" || causal_alignment == "bottom_right",
              "attention: causal_alignment must be \"top_left\" or \"bottom_right\", got \"",
              std::string(causal_alignment), "\"");
  // The devices here, so that the call reaches query's backend; that backend checks the rest
  // once (make_attention_params).
  check_attention_devices(query, key, value, attn_mask, key_padding_mask, alibi_slopes, rel_bias);
  const bool variants = window || alibi_slopes || softcap || rel_bias;
  if (attention_route(query, attn_mask, key_padding_mask, return_weights, return_lse, variants,
                      sinks.has_value())
          .torch) {
    // torch's kernels and torch's autograd; no weights or lse were asked for.
    auto out = attention_torch(query, key, value, attn_mask, key_padding_mask, dropout_p,
                               is_causal, causal_alignment == "bottom_right", scale, enable_gqa);
    // Two distinct empty tensors: outputs must not alias each other.
    return {out, at::empty({0}, query.options()),
            at::empty({0}, query.options().dtype(accumulate_type(query.scalar_type())))};
  }
  // The seed is drawn with an ATen op (not by reading the generator directly) so that
  // torch.compile records the draw instead of baking one seed into the graph; on the query's
  // device, so a CUDA call draws from torch's CUDA generator and the kernel reads the seed
  // from device memory: a captured CUDA graph draws a fresh one on every replay.
  auto seed = draw_dropout_seed(dropout_p, query.device());
  // With sinks the weights are averaged after each head's own scaling.
  const bool average_in_kernel = average_weights && !sinks;
  auto [out, lse, weights] =
      ops::attention_forward(query, key, value, attn_mask, key_padding_mask, seed, dropout_p,
                             is_causal, causal_alignment == "bottom_right", scale, enable_gqa,
                             return_weights, average_in_kernel, window, alibi_slopes, softcap,
                             rel_bias);
  (void)return_lse;  // lse is always computed (the backward needs it); the caller picks.
  if (!sinks) return {out, weights, lse};
  auto [factor, lse_sinks] = sink_factor("attention", lse, *sinks, query.sym_size(-3), query);
  auto row_factor = factor.unsqueeze(-1);
  out = (out * row_factor).to(out.scalar_type());
  if (return_weights) {
    weights = (weights * row_factor).to(weights.scalar_type());
    if (average_weights) weights = weights.mean(-3);
  }
  return {out, weights, lse_sinks};
}

std::pair<at::Tensor, at::Tensor> sink_factor(const char* op, const at::Tensor& lse,
                                              const at::Tensor& sinks, const c10::SymInt& heads,
                                              const at::Tensor& query) {
  TORCH_CHECK(sinks.dim() == 1, op, ": sinks must be 1-D (H,) with H = query's heads = ", heads,
              ", got shape ", sinks.sym_sizes());
  TORCH_SYM_CHECK(sinks.sym_size(0).sym_eq(heads), op, ": sinks must have shape (H,) = (", heads,
                  ",), query's heads, got ", sinks.sym_sizes());
  TORCH_CHECK(at::isFloatingType(sinks.scalar_type()), op,
              ": sinks must be a floating-point tensor, got ", sinks.scalar_type());
  TORCH_CHECK(sinks.device() == query.device(), op, ": sinks must be on query's device (",
              query.device(), "), got ", sinks.device());
  // (H, 1) against lse's (..., H, L); in the lse's accumulate type.
  auto sink = sinks.to(lse.scalar_type()).unsqueeze(-1);
  auto lse_sinks = at::logaddexp(lse, sink);
  // A row whose keys are all masked has lse = -inf: factor 0 (out stays 0), lse the sink's.
  return {at::exp(lse - lse_sinks), lse_sinks};
}

}  // namespace detail
}  // namespace fusedattn
