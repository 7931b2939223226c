// Autograd for `_attention_forward`, `_attention_projected_forward` (the modules' path) and
// `_attention_varlen_forward`,
// in C++ so C++ apps differentiate through the same code
// as Python. Forward and backward each call the dispatcher below the autograd key, so the
// backend kernels (CPU, CUDA) and torch.compile's fake kernels are reached the same way.
#include <torch/autograd.h>
#include <torch/library.h>

#include "fusedattn/ops/attention.h"
#include "fusedattn/ops/params.h"
#include "fusedattn/ops/varlen.h"

namespace fusedattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The gradient of the returned weights as the backward ops take it, per head: averaged
// weights w = mean_h w_h give each head's weights grad / H (a broadcast view, no copy).
at::Tensor per_head_grad(const at::Tensor& grad_weights, bool averaged, int64_t heads) {
  if (!grad_weights.defined() || !averaged) return grad_weights;
  auto sizes = grad_weights.sizes().vec();
  sizes.insert(sizes.end() - 2, heads);
  return grad_weights.div(static_cast<double>(heads)).unsqueeze(-3).expand(sizes);
}

// Whether the masks' gradients are wanted. needs_input_grad counts only the tensors passed:
// an absent optional takes no slot, so key_padding_mask's index is first_mask (attn_mask's)
// plus one only when there is an attn_mask.
std::pair<bool, bool> mask_grads_wanted(AutogradContext* ctx, size_t first_mask,
                                        const at::Tensor& attn_mask,
                                        const at::Tensor& key_padding_mask) {
  const bool mask_grad = attn_mask.defined() && ctx->needs_input_grad(first_mask);
  const bool kpm_grad = key_padding_mask.defined() &&
                        ctx->needs_input_grad(first_mask + (attn_mask.defined() ? 1 : 0));
  return {mask_grad, kpm_grad};
}

// Whether a half-precision forward keeps out in fp32 for its backward: a gradient is wanted
// (grad mode on, an input requiring grad) and the inputs are bf16/fp16. D = rowsum(dO * O)
// from O rounded to the dtype turned dP - D into a cancellation at peaked rows (fp16, L = 3,
// S = 700, GQA, float key padding, inputs randn * 4: dQ, dK at 11-14x SDPA's error); the
// fp32 O costs B H L Ev floats and one rounding pass (0.5 ms of a 120 ms bf16 forward at
// B = 4, H = 8, L = 2048, E = 64).
bool keeps_fp32_out(const at::Tensor& query,
                    std::initializer_list<std::optional<at::Tensor>> inputs) {
  const auto t = query.scalar_type();
  if (!at::GradMode::is_enabled() || out_dtype(t, /*fp32_out=*/true) == t) return false;
  for (const auto& x : inputs) {
    if (x && x->defined() && x->requires_grad()) return true;
  }
  return false;
}

// The forward's out as the caller gets it: rounded to the inputs' dtype where the autograd
// asked for fp32 (`rounded`), as the op returned it otherwise (fp32 where the caller passed
// fp32_out; its gradient then reaches the backward ops in the inputs' dtype).
at::Tensor caller_out(const at::Tensor& out, const at::Tensor& query, bool rounded) {
  return rounded && out.scalar_type() != query.scalar_type() ? out.to(query.scalar_type()) : out;
}

// What both functions' forwards keep the same way: saved tensors query, key, value, out (as
// the op returned it: fp32 where kept so), lse, attn_mask, key_padding_mask, dropout_seed
// (undefined where absent), the flags the backward op takes, and the weights differentiable
// only when returned. -> (out as the caller gets it, lse, weights)
variable_list save_forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                           const at::Tensor& value, const at::Tensor& out, bool round_out,
                           const at::Tensor& lse,
                           const at::Tensor& weights, const std::optional<at::Tensor>& attn_mask,
                           const std::optional<at::Tensor>& key_padding_mask,
                           const std::optional<at::Tensor>& dropout_seed, double dropout_p,
                           bool is_causal, bool return_weights, bool average_weights) {
  ctx->save_for_backward({query, key, value, out, lse, attn_mask.value_or(at::Tensor()),
                          key_padding_mask.value_or(at::Tensor()),
                          dropout_seed.value_or(at::Tensor())});
  ctx->saved_data["dropout_p"] = dropout_p;
  ctx->saved_data["is_causal"] = is_causal;
  ctx->saved_data["average_weights"] = return_weights && average_weights;
  ctx->set_materialize_grads(false);
  if (!return_weights) ctx->mark_non_differentiable({weights});
  return {caller_out(out, query, round_out), lse, weights};
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  // Inputs 0..4 are tensors (query, key, value, attn_mask, key_padding_mask); a float mask
  // may require grad. The outputs are (out, lse, weights); all three are differentiable.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                               const std::optional<at::Tensor>& key_padding_mask,
                               const std::optional<at::Tensor>& dropout_seed, double dropout_p,
                               bool is_causal, bool bottom_right, std::optional<double> scale,
                               bool enable_gqa, bool return_weights, bool average_weights,
                               at::OptionalIntArrayRef window,
                               const std::optional<at::Tensor>& alibi_slopes,
                               std::optional<double> softcap,
                               const std::optional<at::Tensor>& rel_bias, bool fp32_out,
                               bool round_out) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse, weights] = ops::attention_forward(
        query, key, value, attn_mask, key_padding_mask, dropout_seed, dropout_p, is_causal,
        bottom_right, scale, enable_gqa, return_weights, average_weights, window, alibi_slopes,
        softcap, rel_bias, fp32_out || round_out);
    ctx->saved_data["bottom_right"] = bottom_right;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["enable_gqa"] = enable_gqa;
    // The variants (constants of the call: no gradient to alibi_slopes).
    ctx->saved_data["window"] = window ? c10::IValue(window->vec()) : c10::IValue();
    ctx->saved_data["alibi_slopes"] = alibi_slopes ? c10::IValue(alibi_slopes->detach()) : c10::IValue();
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["rel_bias"] = rel_bias ? c10::IValue(rel_bias->detach()) : c10::IValue();
    return save_forward(ctx, query, key, value, out, round_out, lse, weights, attn_mask,
                        key_padding_mask, dropout_seed, dropout_p, is_causal, return_weights,
                        average_weights);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fusedattn.attention: double backward (create_graph=True) is not supported");
    const auto saved = ctx->get_saved_variables();
    const auto &query = saved[0], &key = saved[1], &value = saved[2], &out = saved[3],
               &lse = saved[4], &attn_mask = saved[5], &key_padding_mask = saved[6],
               &dropout_seed = saved[7];
    const auto [mask_grad, kpm_grad] = mask_grads_wanted(ctx, 3, attn_mask, key_padding_mask);
    const auto grad_out =
        grads[0].defined() ? grads[0].to(query.scalar_type()) : at::zeros(out.sizes(), query.options());
    const auto grad_weights = per_head_grad(grads[2], ctx->saved_data["average_weights"].toBool(),
                                            query.size(-3));
    const auto& window_iv = ctx->saved_data["window"];
    const auto window = window_iv.isNone() ? std::vector<int64_t>() : window_iv.toIntVector();
    const auto& alibi_iv = ctx->saved_data["alibi_slopes"];
    const auto& rel_iv = ctx->saved_data["rel_bias"];

    auto [dq, dk, dv, d_mask, d_kpm, d_rel] = ops::attention_backward(
        grad_out, defined_or_none(grad_weights), defined_or_none(grads[1]), query, key, value, out,
        lse, defined_or_none(attn_mask), defined_or_none(key_padding_mask),
        defined_or_none(dropout_seed), ctx->saved_data["dropout_p"].toDouble(),
        ctx->saved_data["is_causal"].toBool(), ctx->saved_data["bottom_right"].toBool(),
        ctx->saved_data["scale"].toOptional<double>(), ctx->saved_data["enable_gqa"].toBool(),
        mask_grad, kpm_grad,
        window_iv.isNone() ? at::OptionalIntArrayRef() : at::OptionalIntArrayRef(window),
        alibi_iv.isNone() ? std::nullopt : std::optional<at::Tensor>(alibi_iv.toTensor()),
        ctx->saved_data["softcap"].toOptional<double>(),
        rel_iv.isNone() ? std::nullopt : std::optional<at::Tensor>(rel_iv.toTensor()));
    return {dq,
            dk,
            dv,
            mask_grad ? d_mask : at::Tensor(),
            kpm_grad ? d_kpm : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            rel_iv.isNone() ? at::Tensor() : d_rel.to(rel_iv.toTensor().scalar_type()),
            at::Tensor(), at::Tensor()};
  }
};

// Attention on projections in the caller's layout (the modules' path): the backward op
// writes each given tensor's gradient whole.
class ProjectedAttentionFunction : public torch::autograd::Function<ProjectedAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query,
                               const std::optional<at::Tensor>& key,
                               const std::optional<at::Tensor>& value, int64_t num_heads,
                               bool seq_first, const std::optional<at::Tensor>& attn_mask,
                               const std::optional<at::Tensor>& key_padding_mask,
                               const std::optional<at::Tensor>& dropout_seed, double dropout_p,
                               bool is_causal, bool return_weights, bool average_weights,
                               bool fp32_out, bool round_out) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse, weights] = ops::attention_projected_forward(
        query, key, value, num_heads, seq_first, attn_mask, key_padding_mask, dropout_seed,
        dropout_p, is_causal, return_weights, average_weights, fp32_out || round_out);
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["seq_first"] = seq_first;
    return save_forward(ctx, query, key.value_or(at::Tensor()), value.value_or(at::Tensor()), out,
                        round_out, lse, weights, attn_mask, key_padding_mask, dropout_seed, dropout_p,
                        is_causal, return_weights, average_weights);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fusedattn.MultiheadAttention: double backward (create_graph=True) is not "
                "supported");
    const auto saved = ctx->get_saved_variables();
    const auto &query = saved[0], &key = saved[1], &value = saved[2], &out = saved[3],
               &lse = saved[4], &attn_mask = saved[5], &key_padding_mask = saved[6],
               &dropout_seed = saved[7];
    // The masks' input slots follow query and whichever of key and value were passed.
    const size_t first_mask = 1 + (key.defined() ? 1 : 0) + (value.defined() ? 1 : 0);
    const auto [mask_grad, kpm_grad] =
        mask_grads_wanted(ctx, first_mask, attn_mask, key_padding_mask);
    const int64_t heads = ctx->saved_data["num_heads"].toInt();
    const auto grad_out =
        grads[0].defined() ? grads[0].to(query.scalar_type()) : at::zeros(out.sizes(), query.options());
    const auto grad_weights =
        per_head_grad(grads[2], ctx->saved_data["average_weights"].toBool(), heads);
    auto [dq, dk, dv, d_mask, d_kpm] = ops::attention_projected_backward(
        grad_out, defined_or_none(grad_weights), defined_or_none(grads[1]), query,
        defined_or_none(key), defined_or_none(value), out, lse, heads,
        ctx->saved_data["seq_first"].toBool(), defined_or_none(attn_mask),
        defined_or_none(key_padding_mask), defined_or_none(dropout_seed),
        ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["is_causal"].toBool(),
        mask_grad, kpm_grad);
    return {dq,
            key.defined() ? dk : at::Tensor(),
            value.defined() ? dv : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            mask_grad ? d_mask : at::Tensor(),
            kpm_grad ? d_kpm : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// Packed sequences: gradients for query, key, value and rel_bias; lse is differentiable too.
class VarlenAttentionFunction : public torch::autograd::Function<VarlenAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                               const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                               int64_t max_seqlen_k, const std::optional<at::Tensor>& dropout_seed,
                               double dropout_p, bool is_causal, bool bottom_right,
                               std::optional<double> scale, bool enable_gqa,
                               at::OptionalIntArrayRef window,
                               const std::optional<at::Tensor>& alibi_slopes,
                               std::optional<double> softcap,
                               const std::optional<at::Tensor>& rel_bias, bool fp32_out,
                               bool round_out) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = ops::attention_varlen_forward(
        query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_seed,
        dropout_p, is_causal, bottom_right, scale, enable_gqa, window, alibi_slopes, softcap,
        rel_bias, fp32_out || round_out);
    ctx->save_for_backward({query, key, value, out, lse, cu_seqlens_q, cu_seqlens_k,
                            dropout_seed.value_or(at::Tensor()),
                            alibi_slopes ? alibi_slopes->detach() : at::Tensor(),
                            rel_bias ? rel_bias->detach() : at::Tensor()});
    ctx->saved_data["max_seqlen_q"] = max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = max_seqlen_k;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["bottom_right"] = bottom_right;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["enable_gqa"] = enable_gqa;
    ctx->saved_data["window"] = window ? c10::IValue(window->vec()) : c10::IValue();
    ctx->saved_data["softcap"] = softcap;
    ctx->set_materialize_grads(false);
    return {caller_out(out, query, round_out), lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fusedattn.attention_varlen: double backward (create_graph=True) is not supported");
    const auto saved = ctx->get_saved_variables();
    const auto &query = saved[0], &key = saved[1], &value = saved[2], &out = saved[3],
               &lse = saved[4], &cu_q = saved[5], &cu_k = saved[6], &seed = saved[7],
               &alibi = saved[8], &rel_bias = saved[9];
    const auto grad_out =
        grads[0].defined() ? grads[0].to(query.scalar_type()) : at::zeros(out.sizes(), query.options());
    const auto& window_iv = ctx->saved_data["window"];
    const auto window = window_iv.isNone() ? std::vector<int64_t>() : window_iv.toIntVector();
    auto [dq, dk, dv, d_rel] = ops::attention_varlen_backward(
        grad_out, defined_or_none(grads[1]), query, key, value, out, lse, cu_q, cu_k,
        ctx->saved_data["max_seqlen_q"].toInt(), ctx->saved_data["max_seqlen_k"].toInt(),
        defined_or_none(seed), ctx->saved_data["dropout_p"].toDouble(),
        ctx->saved_data["is_causal"].toBool(), ctx->saved_data["bottom_right"].toBool(),
        ctx->saved_data["scale"].toOptional<double>(), ctx->saved_data["enable_gqa"].toBool(),
        window_iv.isNone() ? at::OptionalIntArrayRef() : at::OptionalIntArrayRef(window),
        defined_or_none(alibi), ctx->saved_data["softcap"].toOptional<double>(),
        defined_or_none(rel_bias));
    variable_list r(19);
    r[0] = dq, r[1] = dk, r[2] = dv;
    if (rel_bias.defined()) r[16] = d_rel.to(rel_bias.scalar_type());
    return r;
  }
};

std::tuple<at::Tensor, at::Tensor> attention_varlen_forward_autograd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, const std::optional<at::Tensor>& dropout_seed, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, bool enable_gqa,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes,
    std::optional<double> softcap, const std::optional<at::Tensor>& rel_bias, bool fp32_out) {
  const bool round_out = !fp32_out && keeps_fp32_out(query, {query, key, value, rel_bias});
  auto outs = VarlenAttentionFunction::apply(query, key, value, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k, dropout_seed, dropout_p,
                                             is_causal, bottom_right, scale, enable_gqa, window,
                                             alibi_slopes, softcap, rel_bias, fp32_out, round_out);
  return {outs[0], outs[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_projected_forward_autograd(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, int64_t num_heads, bool seq_first,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool return_weights, bool average_weights, bool fp32_out) {
  const bool round_out =
      !fp32_out && keeps_fp32_out(query, {query, key, value, attn_mask, key_padding_mask});
  auto outs = ProjectedAttentionFunction::apply(
      query, key, value, num_heads, seq_first, attn_mask, key_padding_mask, dropout_seed,
      dropout_p, is_causal, return_weights, average_weights, fp32_out, round_out);
  return {outs[0], outs[1], outs[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_autograd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, bool enable_gqa, bool return_weights,
    bool average_weights, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, bool fp32_out) {
  const bool round_out = !fp32_out && keeps_fp32_out(query, {query, key, value, attn_mask,
                                                              key_padding_mask, rel_bias});
  auto outs = AttentionFunction::apply(query, key, value, attn_mask, key_padding_mask,
                                       dropout_seed, dropout_p, is_causal, bottom_right, scale,
                                       enable_gqa, return_weights, average_weights, window,
                                       alibi_slopes, softcap, rel_bias, fp32_out, round_out);
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, Autograd, m) {
  m.impl("_attention_forward", &attention_forward_autograd);
  m.impl("_attention_projected_forward", &attention_projected_forward_autograd);
  m.impl("_attention_varlen_forward", &attention_varlen_forward_autograd);
}

}  // namespace fusedattn
