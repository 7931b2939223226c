#pragma once
// One attention call as everything below the schema takes it: the flat schema arguments
// gathered into AttentionParams once, where a backend kernel receives them, and checked there
// once (make_attention_params). A new option is a field here, its check in checks.cpp and its
// use in the kernels.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fusedattn {

// The sizes of one call.
struct AttentionProblem {
  std::vector<int64_t> batch;  // the leading "..." dims shared by query, key and value
  int64_t batch_size = 1;      // product of batch
  int64_t heads = 0;           // H
  int64_t kv_heads = 0;        // Hk; H % Hk == 0
  int64_t q_len = 0;           // L
  int64_t kv_len = 0;          // S
  int64_t head_dim = 0;        // E
  int64_t v_head_dim = 0;      // Ev
  double scale = 1.0;          // given, or 1 / sqrt(E)
  at::ScalarType dtype = at::kFloat;  // query's

  std::vector<int64_t> out_shape() const;      // (..., H, L, Ev)
  std::vector<int64_t> lse_shape() const;      // (..., H, L)
  std::vector<int64_t> weights_shape() const;  // (..., H, L, S)
};

// The attention variants beyond masks, as the kernels take them.
struct ScoreMods {
  int64_t window_left = -1, window_right = -1;  // < 0: unbounded on that side
  at::Tensor alibi;                             // (B, H) fp32 slopes (stride 0 where broadcast)
  double softcap = 0;                           // > 0: soft-capping
  at::Tensor rel_bias;                          // (H, 2 D + 1) contiguous, accumulate type
  int64_t rel_max = 0;                          // D
  bool windowed() const { return window_left >= 0 || window_right >= 0; }
  bool any() const { return windowed() || alibi.defined() || softcap > 0 || rel_bias.defined(); }
};

struct AttentionParams {
  AttentionProblem problem;
  at::Tensor query, key, value;  // (..., H, L, E), (..., Hk, S, E), (..., Hk, S, Ev)
  std::optional<at::Tensor> attn_mask;         // broadcasts to (..., H, L, S)
  std::optional<at::Tensor> key_padding_mask;  // (..., S)
  std::optional<at::Tensor> dropout_seed;      // one int64 where dropout_p > 0
  double dropout_p = 0.0;
  bool is_causal = false;
  bool bottom_right = false;  // causal alignment and the variants' positions
  ScoreMods mods;
  // The forward's outputs beyond out and lse.
  bool return_weights = false;
  bool average_weights = false;  // (..., L, S), the mean over heads
  // bf16/fp16 inputs: out returned in fp32, unrounded. The autograd asks for it where a
  // gradient is wanted and keeps it for the backward, whose D = rowsum(dO * O) would read a
  // cancellation from O rounded to the dtype at peaked rows; the caller gets it rounded.
  bool fp32_out = false;
  // out's dtype: fp32 under fp32_out for half-precision inputs, the inputs' otherwise.
  at::ScalarType out_dtype() const;
};

// The backward's inputs beyond the call's: out and lse of the forward, the gradients of its
// outputs, and which masks' gradients are wanted.
struct AttentionGrads {
  at::Tensor grad_out, out, lse;
  std::optional<at::Tensor> grad_weights;  // per head, (..., H, L, S); none or empty: none
  std::optional<at::Tensor> grad_lse;      // (..., H, L)
  bool attn_mask_grad = false;
  bool key_padding_mask_grad = false;
};

// The schema's arguments as AttentionParams, checked (check_attention_arguments); throws with
// a message naming the argument.
AttentionParams make_attention_params(const at::Tensor& query, const at::Tensor& key,
                                      const at::Tensor& value,
                                      const std::optional<at::Tensor>& attn_mask,
                                      const std::optional<at::Tensor>& key_padding_mask,
                                      const std::optional<at::Tensor>& dropout_seed,
                                      double dropout_p, bool is_causal, bool bottom_right,
                                      std::optional<double> scale, bool enable_gqa,
                                      at::OptionalIntArrayRef window = std::nullopt,
                                      const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                                      std::optional<double> softcap = std::nullopt,
                                      const std::optional<at::Tensor>& rel_bias = std::nullopt);
// grad_out's shape is the call's output shape (..., H, L, Ev): a named error otherwise.
void check_backward_output(const AttentionParams& params, const at::Tensor& grad_out);
// A forward's out dtype: fp32 under fp32_out for bf16/fp16 inputs, the inputs' otherwise.
at::ScalarType out_dtype(at::ScalarType dtype, bool fp32_out);

// A backward's dtypes, named errors otherwise: grad_out in the inputs' dtype, `out` (the
// forward's output it reads for D) too, or fp32 for bf16/fp16 inputs (an fp32_out forward's).
// -> whether out is fp32 for half-precision inputs.
bool check_backward_dtypes(at::ScalarType dtype, const at::Tensor& grad_out,
                           const at::Tensor& out, const char* op);

// A backend's `_attention_forward` / `_attention_backward` kernel from a function of the
// struct: the schema's arguments become AttentionParams (and AttentionGrads) here, once, so
// that a backend writes its entry points on the struct alone:
//   m.impl("_attention_forward", &attention_forward_entry<my_forward>);
using AttentionForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const AttentionParams&);
using AttentionBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                       at::Tensor> (*)(const AttentionParams&, const AttentionGrads&);

template <AttentionForwardFn Forward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_entry(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, bool enable_gqa, bool return_weights,
    bool average_weights, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, bool fp32_out) {
  auto params = make_attention_params(query, key, value, attn_mask, key_padding_mask,
                                      dropout_seed, dropout_p, is_causal, bottom_right, scale,
                                      enable_gqa, window, alibi_slopes, softcap, rel_bias);
  params.return_weights = return_weights, params.average_weights = average_weights;
  params.fp32_out = fp32_out;
  auto [out, lse, weights] = Forward(params);
  // A backend that writes out in the inputs' dtype alone: the fp32 out asked for, widened.
  if (out.scalar_type() != params.out_dtype()) out = out.to(params.out_dtype());
  return {out, lse, weights};
}

// grad_out is checked against the call's output shape (out_shape) before Backward runs.
template <AttentionBackwardFn Backward>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_backward_entry(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, bool enable_gqa, bool attn_mask_grad,
    bool key_padding_mask_grad, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias) {
  const auto params = make_attention_params(query, key, value, attn_mask, key_padding_mask,
                                            dropout_seed, dropout_p, is_causal, bottom_right,
                                            scale, enable_gqa, window, alibi_slopes, softcap,
                                            rel_bias);
  check_backward_output(params, grad_out);
  check_backward_dtypes(params.problem.dtype, grad_out, out, "attention");
  AttentionGrads grads;
  grads.grad_out = grad_out, grads.out = out, grads.lse = lse;
  grads.grad_weights = grad_weights, grads.grad_lse = grad_lse;
  grads.attn_mask_grad = attn_mask_grad, grads.key_padding_mask_grad = key_padding_mask_grad;
  return Backward(params, grads);
}

// The dtype the kernels accumulate in: fp64 for fp64 inputs, fp32 otherwise. lse has it.
at::ScalarType accumulate_type(at::ScalarType t);

}  // namespace fusedattn
