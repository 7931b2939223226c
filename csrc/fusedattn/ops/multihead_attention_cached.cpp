// The modules' projections into heads and their cached decode step, as ops: the C++ and the
// Python MultiheadAttention call these, so a decode step is one call across the language
// boundary and one implementation.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <tuple>

#include "fusedattn/ops/attention.h"
#include "fusedattn/ops/kv_cache.h"
#include "fusedattn/ops/op_handle.h"
#include "fusedattn/ops/multihead_attention.h"

namespace fusedattn {
namespace {

constexpr const char* kFn = "MultiheadAttention";
using c10::SymInt;

// (A, B, F) in the module's layout, or (T, F) unbatched -> (N, T, F), a view.
at::Tensor batch_first_view(const at::Tensor& x, bool batch_first, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, kFn, ": ", name,
              " must be 3-D (T, N, F), (N, T, F) with batch_first, or 2-D (T, F), got shape ",
              x.sym_sizes());
  if (x.dim() == 2) return x.unsqueeze(0);
  return batch_first ? x : x.transpose(0, 1);
}

}  // namespace

namespace ops {
std::tuple<at::Tensor, at::Tensor, at::Tensor> multihead_attention_in_projection(
    const std::optional<at::Tensor>& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, bool batch_first) {
  static auto op = detail::op_handle<decltype(multihead_attention_in_projection)>(
      "fusedattn::multihead_attention_in_projection");
  return op.call(query, key, value, num_heads, in_proj_weight, in_proj_bias, q_proj_weight,
                 k_proj_weight, v_proj_weight, batch_first);
}

std::tuple<at::Tensor, at::Tensor> multihead_attention_cached(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, at::Tensor& key_cache, at::Tensor& value_cache,
    at::Tensor& lengths, int64_t num_heads, const std::optional<at::Tensor>& in_proj_weight,
    const std::optional<at::Tensor>& in_proj_bias, const std::optional<at::Tensor>& q_proj_weight,
    const std::optional<at::Tensor>& k_proj_weight, const std::optional<at::Tensor>& v_proj_weight,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    bool batch_first, const std::optional<at::Tensor>& key_padding_mask, bool need_weights,
    bool average_attn_weights, bool is_causal, bool read_only,
    const std::optional<at::Tensor>& cache_key_padding_mask,
    const std::optional<at::Tensor>& key_scales, const std::optional<at::Tensor>& value_scales) {
  static auto op = detail::op_handle<decltype(multihead_attention_cached)>(
      "fusedattn::multihead_attention_cached");
  return op.call(query, key, value, key_cache, value_cache, lengths, num_heads, in_proj_weight,
                 in_proj_bias, q_proj_weight, k_proj_weight, v_proj_weight, out_proj_weight,
                 out_proj_bias, batch_first, key_padding_mask, need_weights, average_attn_weights,
                 is_causal, read_only, cache_key_padding_mask, key_scales, value_scales);
}
}  // namespace ops

namespace detail {

std::tuple<at::Tensor, at::Tensor, at::Tensor> multihead_attention_in_projection_composite(
    const std::optional<at::Tensor>& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, bool batch_first) {
  TORCH_CHECK(num_heads > 0, kFn, ": num_heads must be positive, got ", num_heads);
  TORCH_CHECK(key.has_value() == value.has_value(), kFn,
              ": key and value are both given or both None");
  TORCH_CHECK(query || key, kFn, ": the in-projection needs query, or key and value");
  const bool packed = in_proj_weight.has_value();
  TORCH_CHECK(packed || (q_proj_weight && k_proj_weight && v_proj_weight), kFn,
              ": needs in_proj_weight, or all of q_proj_weight, k_proj_weight, v_proj_weight");
  const at::Tensor& first = packed ? *in_proj_weight : *q_proj_weight;
  const SymInt rows = packed ? first.sym_size(0) / 3 : first.sym_size(0);  // H * D
  TORCH_SYM_CHECK((rows % num_heads).sym_eq(0), kFn, ": the projected size ", rows,
                  " must be divisible by num_heads = ", num_heads);
  const std::optional<at::Tensor> bias = bias_like(in_proj_bias, first);
  const bool autocast = at::autocast::is_autocast_enabled(first.device().type());
  auto input = [&](const at::Tensor& x, const char* name) {
    // Outside autocast the inputs come in the parameters' dtype: said here, not as a GEMM's.
    TORCH_CHECK(autocast || x.scalar_type() == first.scalar_type(), kFn, ": ", name,
                " must have the module's parameter dtype (", first.scalar_type(), "), got ",
                x.scalar_type(), "; convert the inputs, or the module with .to(dtype)");
    return batch_first_view(x, batch_first, name);
  };
  // Projection i (0: query, 1: key, 2: value) of x (N, T, F) -> (N, H, T, D).
  auto project = [&](const at::Tensor& x, int64_t i, const char* name) {
    const at::Tensor w = packed ? in_proj_weight->narrow_symint(0, rows * i, rows)
                                : (i == 0 ? *q_proj_weight : i == 1 ? *k_proj_weight : *v_proj_weight);
    TORCH_CHECK_VALUE(x.sym_size(2) == w.sym_size(1), kFn, ": ", name, " must have ",
                    w.sym_size(1), " features in its last dim, got shape ", x.sym_sizes());
    std::optional<at::Tensor> b;
    if (bias) b = bias->narrow_symint(0, rows * i, rows);
    return split_heads(at::linear(x, w, b), num_heads, /*seq_first=*/false);
  };
  const auto none = [&] { return at::empty({0}, first.options()); };
  if (query && key && packed && query->is_same(*key) && key->is_same(*value)) {
    // Self-attention: one GEMM for q|k|v.
    const auto x = input(*query, "query");
    TORCH_SYM_CHECK(x.sym_size(2).sym_eq(first.sym_size(1)), kFn, ": query must have ",
                    first.sym_size(1), " features in its last dim, got shape ", query->sym_sizes());
    const auto qkv = at::linear(x, first, bias);
    const SymInt n = x.sym_size(0), t = x.sym_size(1), heads(num_heads);
    const auto parts = qkv.view_symint({n, t, SymInt(3), heads, rows / num_heads});
    return {parts.select(2, 0).transpose(1, 2), parts.select(2, 1).transpose(1, 2),
            parts.select(2, 2).transpose(1, 2)};
  }
  at::Tensor q = query ? project(input(*query, "query"), 0, "query") : none();
  if (!key) return {q, none(), none()};
  const auto xk = input(*key, "key"), xv = input(*value, "value");
  TORCH_SYM_CHECK(xk.sym_size(0).sym_eq(xv.sym_size(0)) & xk.sym_size(1).sym_eq(xv.sym_size(1)),
                  kFn, ": key and value must have the same batch and sequence sizes, got key ",
                  key->sym_sizes(), " and value ", value->sym_sizes());
  return {q, project(xk, 1, "key"), project(xv, 2, "value")};
}

std::tuple<at::Tensor, at::Tensor> multihead_attention_cached_composite(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, at::Tensor& key_cache, at::Tensor& value_cache,
    at::Tensor& lengths, int64_t num_heads, const std::optional<at::Tensor>& in_proj_weight,
    const std::optional<at::Tensor>& in_proj_bias, const std::optional<at::Tensor>& q_proj_weight,
    const std::optional<at::Tensor>& k_proj_weight, const std::optional<at::Tensor>& v_proj_weight,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    bool batch_first, const std::optional<at::Tensor>& key_padding_mask, bool need_weights,
    bool average_attn_weights, bool is_causal, bool read_only,
    const std::optional<at::Tensor>& cache_key_padding_mask,
    const std::optional<at::Tensor>& key_scales, const std::optional<at::Tensor>& value_scales) {
  TORCH_CHECK_VALUE(key.has_value() == value.has_value(), kFn,
              ": with a cache, key and value are both the new tokens (self-attention) or both "
              "None (attend to the cache only)");
  TORCH_CHECK_VALUE(!(key && read_only), kFn,
              ": this cache is read-only (a cross-attention memory); pass key=None and value=None");
  TORCH_CHECK_VALUE(!(key_padding_mask && cache_key_padding_mask), kFn,
              ": this cache has its own key_padding_mask; pass none");
  TORCH_CHECK_VALUE(query.dim() == 2 || query.dim() == 3, kFn,
              ": query must be 3-D (T, N, E), (N, T, E) with batch_first, or 2-D (T, E), got shape ",
              query.sym_sizes());
  TORCH_CHECK_VALUE(!key || (key->dim() == query.dim() && value->dim() == query.dim()), kFn,
              ": key and value must have query's dims (", query.dim(), ")");
  const SymInt E = out_proj_weight.sym_size(0);
  TORCH_CHECK_VALUE(query.sym_size(-1) == E, kFn, ": query must have embed_dim = ", E,
                  " features, got shape ", query.sym_sizes());
  const bool batched = query.dim() == 3;
  auto [q, k, v] = multihead_attention_in_projection_composite(
      query, key, value, num_heads, in_proj_weight, in_proj_bias, q_proj_weight, k_proj_weight,
      v_proj_weight, batch_first);
  std::optional<at::Tensor> kpm = key_padding_mask ? key_padding_mask : cache_key_padding_mask;
  if (key_padding_mask && !batched) kpm = key_padding_mask->unsqueeze(0);
  std::optional<at::Tensor> k_new, v_new;
  if (key) k_new = k, v_new = v;
  at::Tensor out, weights;
  std::tie(out, std::ignore, weights) =
      ops::kv_cache_attention(q, k_new, v_new, key_cache, value_cache, lengths, std::nullopt,
                              is_causal, kpm, /*enable_gqa=*/false, /*return_lse=*/false,
                              need_weights, key_scales, value_scales);
  // (N, H, T, Dv) -> (N, T, H * Dv) -> the output projection, in the caller's layout.
  const SymInt n = out.sym_size(0), t = out.sym_size(2);
  auto merged = out.transpose(1, 2).reshape_symint({n, t, out.sym_size(1) * out.sym_size(3)});
  auto result = at::linear(merged, out_proj_weight, bias_like(out_proj_bias, out_proj_weight));
  if (!batched) {
    result = result.squeeze(0);
  } else if (!batch_first) {
    result = result.transpose(0, 1);
  }
  if (!need_weights) return {result, at::empty({0}, result.options())};
  if (average_attn_weights) weights = weights.mean(1);
  if (!batched) weights = weights.squeeze(0);
  return {result, weights};
}

}  // namespace detail
}  // namespace fusedattn
