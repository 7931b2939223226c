#include "fusedattn/ops/layers.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <cmath>
#include <limits>

#include "fusedattn/ops/attention.h"
#include "fusedattn/ops/op_handle.h"

namespace fusedattn {
namespace {

void check_padding_mask(const std::optional<at::Tensor>& m, const at::Tensor& x, int64_t T,
                        const char* fn) {
  if (!m) return;
  TORCH_CHECK(m->scalar_type() == at::kBool, fn, ": key_padding_mask must be bool (True = padding), got ",
              m->scalar_type());
  TORCH_CHECK(m->dim() == 2 && m->size(0) == x.size(0) && m->size(1) == T, fn,
              ": key_padding_mask must have shape (N, T) = (", x.size(0), ", ", T, "), got ",
              m->sizes());
}

}  // namespace

namespace ops {

std::tuple<at::Tensor, at::Tensor> self_attention(
    const at::Tensor& x, const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias,
    const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, bool need_weights) {
  static auto op = detail::op_handle<decltype(self_attention)>("fusedattn::self_attention");
  return op.call(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, key_padding_mask,
                 is_causal, need_weights);
}

std::tuple<at::Tensor, at::Tensor> attention_pooling(
    const at::Tensor& h, c10::string_view score, const at::Tensor& score_weight,
    const std::optional<at::Tensor>& query_weight, const std::optional<at::Tensor>& score_vector,
    const at::Tensor& output_weight, const std::optional<at::Tensor>& key_padding_mask) {
  static auto op = detail::op_handle<decltype(attention_pooling)>("fusedattn::attention_pooling");
  return op.call(h, score, score_weight, query_weight, score_vector, output_weight,
                 key_padding_mask);
}

std::tuple<at::Tensor, at::Tensor> gaussian_kernel_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& bandwidth, bool need_weights) {
  static auto op =
      detail::op_handle<decltype(gaussian_kernel_attention)>("fusedattn::gaussian_kernel_attention");
  return op.call(query, key, value, bandwidth, need_weights);
}

}  // namespace ops

namespace detail {

std::tuple<at::Tensor, at::Tensor> self_attention_composite(
    const at::Tensor& x, const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias,
    const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, bool need_weights) {
  constexpr const char* fn = "SelfAttention";
  TORCH_CHECK(x.dim() == 3 || x.dim() == 2, fn, ": input must be (N, T, in_dim) or (T, in_dim), got ",
              x.sizes());
  const bool batched = x.dim() == 3;
  auto xb = batched ? x : x.unsqueeze(0);
  TORCH_CHECK(xb.size(2) == q_weight.size(1), fn, ": input must have in_dim = ", q_weight.size(1),
              " features in its last dim, got shape ", x.sizes());
  TORCH_CHECK(at::autocast::is_autocast_enabled(x.device().type()) ||
                  x.scalar_type() == q_weight.scalar_type(),
              fn, ": input must have the module's parameter dtype (", q_weight.scalar_type(),
              "), got ", x.scalar_type(), "; convert the input, or the module with .to(dtype)");
  auto kpm = key_padding_mask;
  if (kpm && !batched) kpm = kpm->unsqueeze(0);
  check_padding_mask(kpm, xb, xb.size(1), fn);
  // One head: (N, 1, T, d).
  auto q = at::linear(xb, q_weight, q_bias).unsqueeze(1);
  auto k = at::linear(xb, k_weight, k_bias).unsqueeze(1);
  auto v = at::linear(xb, v_weight, v_bias).unsqueeze(1);
  auto [out, weights, lse] = ops::attention(q, k, v, std::nullopt, 0.0, is_causal, std::nullopt,
                                            false, kpm, "top_left", need_weights, false);
  (void)lse;
  out = out.squeeze(1);
  weights = need_weights ? weights.squeeze(1) : weights;
  if (!batched) {
    out = out.squeeze(0);
    if (need_weights) weights = weights.squeeze(0);
  }
  return {out, weights};
}

std::tuple<at::Tensor, at::Tensor> attention_pooling_composite(
    const at::Tensor& h, c10::string_view score, const at::Tensor& score_weight,
    const std::optional<at::Tensor>& query_weight, const std::optional<at::Tensor>& score_vector,
    const at::Tensor& output_weight, const std::optional<at::Tensor>& key_padding_mask) {
  constexpr const char* fn = "AttentionPooling";
  TORCH_CHECK(score == "luong" || score == "bahdanau", fn,
              ": score must be \"luong\" or \"bahdanau\", got \"", std::string(score), "\"");
  TORCH_CHECK(h.dim() == 3, fn, ": input must be (N, T, input_dim), got ", h.sizes());
  const int64_t N = h.size(0), T = h.size(1), D = h.size(2);
  TORCH_CHECK(T > 0, fn, ": input must have at least one time step");
  TORCH_CHECK(score_weight.dim() == 2 && score_weight.size(1) == D, fn,
              ": input must have input_dim = ", score_weight.size(1),
              " features in its last dim, got shape ", h.sizes());
  check_padding_mask(key_padding_mask, h, T, fn);
  // The query: the last step, or with padding the last step that is not padding.
  at::Tensor h_t;
  if (key_padding_mask) {
    auto valid = key_padding_mask->logical_not();
    auto steps = at::arange(T, h.options().dtype(at::kLong)).expand({N, T});
    // A sequence that is all padding takes step 0 as its query, sees no key, and gets
    // weights 0 (and a context of 0) rather than NaN.
    auto last = at::where(valid, steps, at::zeros_like(steps)).amax(1);  // (N)
    h_t = h.gather(1, last.view({N, 1, 1}).expand({N, 1, D})).squeeze(1);
  } else {
    h_t = h.select(1, T - 1);
  }
  at::Tensor context, weights;
  if (score == "luong") {
    // score_j = h_t . (W h_j): the fused op with one query, unscaled.
    auto k = at::linear(h, score_weight).unsqueeze(1);  // (N, 1, T, D)
    auto [ctx, w, lse] = ops::attention(h_t.view({N, 1, 1, D}), k, h.unsqueeze(1), std::nullopt,
                                        0.0, false, 1.0, false, key_padding_mask, "top_left",
                                        true, false);
    (void)lse;
    context = ctx.view({N, D});
    weights = w.view({N, T});
  } else {
    TORCH_CHECK(query_weight && score_vector, fn,
                ": the bahdanau score needs query_weight (W1) and score_vector (v)");
    // score_j = v . tanh(W1 h_t + W2 h_j): not a dot product, so plain ATen (N x T).
    auto e = at::tanh(at::linear(h_t, *query_weight).unsqueeze(1) + at::linear(h, score_weight));
    auto s = at::matmul(e, *score_vector);  // (N, T)
    if (key_padding_mask) {
      s = s.masked_fill(*key_padding_mask, -std::numeric_limits<double>::infinity());
    }
    weights = at::softmax(s, -1);
    if (key_padding_mask) {  // all-padding rows: 0, not softmax's NaN
      weights = at::where(key_padding_mask->logical_not().any(-1, true), weights,
                          at::zeros_like(weights));
    }
    context = at::matmul(weights.unsqueeze(1), h).squeeze(1);
  }
  TORCH_CHECK(output_weight.dim() == 2 && output_weight.size(1) == 2 * D, fn,
              ": output_weight must have shape (units, 2 * input_dim) = (units, ", 2 * D,
              "), got ", output_weight.sizes());
  auto out = at::tanh(at::linear(at::cat({context, h_t}, -1), output_weight));
  return {out, weights};
}

std::tuple<at::Tensor, at::Tensor> gaussian_kernel_attention_composite(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& bandwidth, bool need_weights) {
  constexpr const char* fn = "gaussian_kernel_attention";
  TORCH_CHECK(query.is_floating_point() && key.is_floating_point() && value.is_floating_point() &&
                  bandwidth.is_floating_point(),
              fn, ": query, key, value and bandwidth must be floating point, got ",
              query.scalar_type(), ", ", key.scalar_type(), ", ", value.scalar_type(), " and ",
              bandwidth.scalar_type());
  TORCH_CHECK(bandwidth.numel() == 1, fn, ": bandwidth must have one element, got shape ",
              bandwidth.sizes());
  // Its value where it has one (not a meta, fake or functional tensor under tracing): 0, NaN or
  // one whose 1/b^2 overflows the dtype gave weights of 0 or NaN without a word.
  const auto keys = bandwidth.key_set();
  if (!bandwidth.is_meta() && !keys.has(c10::DispatchKey::Python) &&
      !keys.has(c10::DispatchKey::Functionalize)) {
    const double b = bandwidth.item<double>();
    const double inv_b2 = 1.0 / (b * b);
    const double limit = query.scalar_type() == at::kHalf ? 65504.0
                         : query.scalar_type() == at::kDouble ? std::numeric_limits<double>::max()
                                                              : std::numeric_limits<float>::max();
    TORCH_CHECK(b > 0 && std::isfinite(b) && inv_b2 <= limit, fn,
                ": bandwidth must be positive and finite, with 1/bandwidth^2 finite in ",
                query.scalar_type(), ", got ", b);
  }
  const bool points = query.dim() == 1;  // scalar points: (L), (S), (S)
  TORCH_CHECK(key.dim() == query.dim(), fn, ": query and key must have as many dims, got ",
              query.sizes(), " and ", key.sizes());
  auto q = points ? query.unsqueeze(-1) : query;
  auto k = points ? key.unsqueeze(-1) : key;
  auto v = value.dim() == 1 ? value.unsqueeze(-1) : value;
  TORCH_CHECK(q.dim() >= 2 && q.size(-1) == k.size(-1), fn,
              ": query (..., L, D) and key (..., S, D) must share D, got ", query.sizes(), " and ",
              key.sizes());
  TORCH_CHECK(v.dim() == k.dim() && v.size(-2) == k.size(-2), fn,
              ": value must have shape (..., S, Dv) with S = ", k.size(-2), ", got ", value.sizes());
  // Distances do not move with the origin: both point sets are centred on the keys' mean
  // (detached: its gradient is zero, the softmax below cancels it exactly), so that q.k and
  // |k|^2 below stay the size of the points' spread. Uncentred, points near 1e4 with bandwidth
  // 0.5 cancelled to an fp32 error of 0.73 against the direct formula's 1e-7.
  if (k.size(-2) > 0) {
    const auto centre = k.mean(-2, /*keepdim=*/true).detach();
    q = q - centre;
    k = k - centre;
  }
  // -|q - k|^2 / (2 b^2) = q.k / b^2 - |k|^2 / (2 b^2) - |q|^2 / (2 b^2); the last term is
  // the same for every key of a query and cancels in the softmax. The rest is one dot
  // product of q' = [q / b^2, -1 / (2 b^2)] with k' = [k, |k|^2], so the fused op computes it
  // without an L x S distance matrix, and gradients reach the bandwidth through q'.
  auto inv_b2 = bandwidth.reshape({}).to(q.scalar_type()).pow(-2);
  auto q_aug = at::cat({q * inv_b2, (-0.5 * inv_b2).expand_as(q.narrow(-1, 0, 1))}, -1);
  auto k_aug = at::cat({k, (k * k).sum(-1, true)}, -1);
  auto [out, weights, lse] =
      ops::attention(q_aug.unsqueeze(-3), k_aug.unsqueeze(-3), v.unsqueeze(-3), std::nullopt, 0.0,
                     false, 1.0, false, std::nullopt, "top_left", need_weights, false);
  (void)lse;
  out = out.squeeze(-3);
  if (need_weights) weights = weights.squeeze(-3);
  if (value.dim() == 1) out = out.squeeze(-1);
  return {out, weights};
}

}  // namespace detail
}  // namespace fusedattn
