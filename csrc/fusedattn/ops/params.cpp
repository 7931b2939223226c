#include "fusedattn/ops/params.h"

#include <cmath>

#include "fusedattn/ops/attention.h"

namespace fusedattn {

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType out_dtype(at::ScalarType dtype, bool fp32_out) {
  const bool half = dtype == at::kBFloat16 || dtype == at::kHalf;
  return fp32_out && half ? at::kFloat : dtype;
}

at::ScalarType AttentionParams::out_dtype() const {
  return fusedattn::out_dtype(problem.dtype, fp32_out);
}

bool check_backward_dtypes(at::ScalarType dtype, const at::Tensor& grad_out,
                           const at::Tensor& out, const char* op) {
  TORCH_CHECK(grad_out.scalar_type() == dtype, op, " backward: grad_out must be ", dtype,
              " (query's dtype), got ", grad_out.scalar_type());
  const bool half = out_dtype(dtype, /*fp32_out=*/true) != dtype;
  const bool widened = half && out.scalar_type() == at::kFloat;
  TORCH_CHECK(out.scalar_type() == dtype || widened, op, " backward: out must be ", dtype,
              half ? " (or float32, an fp32_out forward's)" : "", ", got ", out.scalar_type());
  return widened;
}

std::vector<int64_t> AttentionProblem::out_shape() const {
  auto s = batch;
  s.insert(s.end(), {heads, q_len, v_head_dim});
  return s;
}
std::vector<int64_t> AttentionProblem::lse_shape() const {
  auto s = batch;
  s.insert(s.end(), {heads, q_len});
  return s;
}
std::vector<int64_t> AttentionProblem::weights_shape() const {
  auto s = batch;
  s.insert(s.end(), {heads, q_len, kv_len});
  return s;
}

namespace {

ScoreMods score_mods(const AttentionProblem& pb, at::OptionalIntArrayRef window,
                          const std::optional<at::Tensor>& alibi_slopes,
                          std::optional<double> softcap,
                          const std::optional<at::Tensor>& rel_bias) {
  ScoreMods m;
  if (window) m.window_left = (*window)[0], m.window_right = (*window)[1];
  if (alibi_slopes) {
    auto a = *alibi_slopes;
    if (a.dim() == 1) a = a.expand({pb.batch_size, pb.heads});
    m.alibi = a.reshape({pb.batch_size, pb.heads});
  }
  if (softcap) m.softcap = *softcap;
  if (rel_bias) {
    m.rel_bias = rel_bias->detach().to(accumulate_type(pb.dtype)).contiguous();
    m.rel_max = (rel_bias->size(1) - 1) / 2;
  }
  return m;
}

}  // namespace

AttentionParams make_attention_params(const at::Tensor& query, const at::Tensor& key,
                                      const at::Tensor& value,
                                      const std::optional<at::Tensor>& attn_mask,
                                      const std::optional<at::Tensor>& key_padding_mask,
                                      const std::optional<at::Tensor>& dropout_seed,
                                      double dropout_p, bool is_causal, bool bottom_right,
                                      std::optional<double> scale, bool enable_gqa,
                                      at::OptionalIntArrayRef window,
                                      const std::optional<at::Tensor>& alibi_slopes,
                                      std::optional<double> softcap,
                                      const std::optional<at::Tensor>& rel_bias) {
  check_attention_arguments(query, key, value, attn_mask, key_padding_mask, dropout_p, scale,
                            enable_gqa, window, alibi_slopes, softcap, rel_bias);
  AttentionParams params;
  AttentionProblem& p = params.problem;
  p.batch.assign(query.sizes().begin(), query.sizes().end() - 3);
  for (int64_t d : p.batch) p.batch_size *= d;
  p.heads = query.size(-3);
  p.q_len = query.size(-2);
  p.head_dim = query.size(-1);
  p.kv_heads = key.size(-3);
  p.kv_len = key.size(-2);
  p.v_head_dim = value.size(-1);
  p.dtype = query.scalar_type();
  p.scale = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(p.head_dim));
  TORCH_CHECK(std::isfinite(p.scale), "attention: scale must be finite, got ", p.scale);
  params.query = query, params.key = key, params.value = value;
  params.attn_mask = attn_mask, params.key_padding_mask = key_padding_mask;
  params.dropout_seed = dropout_seed;
  params.dropout_p = dropout_p;
  params.is_causal = is_causal, params.bottom_right = bottom_right;
  params.mods = score_mods(p, window, alibi_slopes, softcap, rel_bias);
  return params;
}

void check_backward_output(const AttentionParams& params, const at::Tensor& grad_out) {
  TORCH_CHECK(grad_out.sizes().equals(params.problem.out_shape()),
              "attention backward: grad_out must have shape ",
              c10::IntArrayRef(params.problem.out_shape()), ", got ", grad_out.sizes());
}

}  // namespace fusedattn
