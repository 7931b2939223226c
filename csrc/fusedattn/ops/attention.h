#pragma once
// The C++ face of the op `fusedattn::attention`: thin wrappers that call the dispatcher, so a
// C++ caller goes through exactly the path (backend kernels, autograd) that Python takes.
#include <ATen/core/Tensor.h>
#include <torch/arg.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "fusedattn/macros.h"

namespace fusedattn {

// Shapes: query (..., H, L, E), key (..., Hk, S, E), value (..., Hk, S, Ev); "..." are the
// same batch dims for all three; Hk == H, or H % Hk == 0 with enable_gqa.
struct FUSEDATTN_API AttentionOptions {
  // bool: True where attention is allowed; float (query's dtype): added to the scaled scores.
  // Any shape that broadcasts to (..., H, L, S).
  TORCH_ARG(at::Tensor, attn_mask);
  TORCH_ARG(double, dropout_p) = 0.0;
  TORCH_ARG(bool, is_causal) = false;
  // Default 1 / sqrt(E).
  TORCH_ARG(std::optional<double>, scale) = std::nullopt;
  TORCH_ARG(bool, enable_gqa) = false;
  // (..., S): bool True = this key is padding and is ignored; float: added to the scores.
  TORCH_ARG(at::Tensor, key_padding_mask);
  // "top_left" (SDPA's rule: query i sees keys j <= i) or "bottom_right" (query i sees keys
  // j <= i + S - L: the last query sees every key, as a decoder with a KV cache needs).
  TORCH_ARG(std::string, causal_alignment) = "top_left";
  TORCH_ARG(bool, return_weights) = false;
  TORCH_ARG(bool, return_lse) = false;
  // With return_weights: the weights averaged over the heads, (..., L, S), as
  // nn.MultiheadAttention returns them; the per-head weights are never stored.
  TORCH_ARG(bool, average_weights) = false;
  // Sliding window {left, right}: query i sees keys i + o - left .. i + o + right (o: 0
  // top-left, S - L bottom-right, as causal_alignment); -1 = unbounded; empty = none.
  // Combined with is_causal it only narrows. Key blocks outside it are skipped.
  TORCH_ARG(std::vector<int64_t>, window) = {};
  // ALiBi: fp32 slopes (H,) or (..., H); adds -slope[h] * |i + o - j| to the scores.
  TORCH_ARG(at::Tensor, alibi_slopes);
  // Soft-capping: the scaled score s becomes softcap * tanh(s / softcap) before any bias or
  // mask is added.
  TORCH_ARG(std::optional<double>, softcap) = std::nullopt;
  // Learned relative position bias (H, 2 D + 1), any float dtype, differentiable: adds
  // rel_bias[h, clamp(j - (i + o), -D, D) + D] to the scores.
  TORCH_ARG(at::Tensor, rel_bias);
  // Attention sinks (H,), any float dtype, learnable: head h's logit sinks[h] joins the
  // softmax's denominator and carries no value, so each row's weights sum to less than 1.
  TORCH_ARG(at::Tensor, sinks);
};

struct AttentionResult {
  at::Tensor out;                     // (..., H, L, Ev), query's dtype
  // (..., H, L, S) probabilities after masking, before dropout; (..., L, S) averaged
  std::optional<at::Tensor> weights;
  std::optional<at::Tensor> lse;      // (..., H, L) log-sum-exp of the scaled, masked scores
};

// Rows whose keys are all masked give out = 0, weights = 0, lse = -inf and zero gradients.
FUSEDATTN_API AttentionResult attention(const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& value,
                                        const AttentionOptions& options = {});

// Packed variable-length sequences (FlashAttention's varlen layout): query (total_q, H, E),
// key (total_k, Hk, E), value (total_k, Hk, Ev), cu_seqlens_q / cu_seqlens_k (B + 1,) int32
// offsets. Options as attention's but masks and weights (the offsets are the padding);
// alignment per sequence, alibi_slopes (H,) or (B, H). -> out (total_q, H, Ev), lse (H, total_q).
// No padding is formed: one attention call per sequence on views (ops/varlen.cpp).
FUSEDATTN_API AttentionResult attention_varlen(const at::Tensor& query, const at::Tensor& key,
                                               const at::Tensor& value,
                                               const at::Tensor& cu_seqlens_q,
                                               const at::Tensor& cu_seqlens_k,
                                               int64_t max_seqlen_q, int64_t max_seqlen_k,
                                               const AttentionOptions& options = {});

// Whether this build holds the fused CUDA kernels (a CUDA toolkit was found at build time).
// Without them, or with FUSEDATTN_CUDA_KERNEL unset (see backends/cuda/attention_cuda.cpp), CUDA
// tensors take the ATen reference.
FUSEDATTN_API bool cuda_kernels_built();

// The instruction-set tier the CPU kernels run at: "scalar", "avx2", "avx512", "avx512_bf16"
// or "amx" (the highest this CPU runs, capped by FUSEDATTN_CPU_CAPABILITY, read once; an
// unknown or unsupported value is an error naming the allowed ones), and every tier this CPU
// runs, lowest first.
FUSEDATTN_API std::string cpu_capability();
FUSEDATTN_API std::vector<std::string> cpu_capabilities_supported();

// The attention op's argument checks alone (shapes, dtypes, devices; no data read): what the
// op's kernels reject, this rejects with the same message. The fake kernels call it for
// torch.compile and meta tensors, where the shapes are concrete.
FUSEDATTN_API void check_attention_arguments(const at::Tensor& query, const at::Tensor& key,
                                             const at::Tensor& value,
                                             const std::optional<at::Tensor>& attn_mask,
                                             const std::optional<at::Tensor>& key_padding_mask,
                                             double dropout_p, std::optional<double> scale,
                                             bool enable_gqa,
                                             at::OptionalIntArrayRef window = std::nullopt,
                                             const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                                             std::optional<double> softcap = std::nullopt,
    const std::optional<at::Tensor>& rel_bias = std::nullopt);

namespace ops {
// One function per schema, calling the dispatcher (the schemas are in registration.cpp).
FUSEDATTN_API std::tuple<at::Tensor, at::Tensor> attention_varlen(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double dropout_p, bool is_causal, c10::string_view causal_alignment,
    std::optional<double> scale, bool enable_gqa, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, bool return_lse,
    const std::optional<at::Tensor>& sinks = std::nullopt);
FUSEDATTN_API std::tuple<at::Tensor, at::Tensor, at::Tensor> attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    std::optional<double> scale, bool enable_gqa, const std::optional<at::Tensor>& key_padding_mask,
    c10::string_view causal_alignment, bool return_weights, bool return_lse,
    bool average_weights = false, at::OptionalIntArrayRef window = std::nullopt,
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
    std::optional<double> softcap = std::nullopt,
    const std::optional<at::Tensor>& rel_bias = std::nullopt,
    const std::optional<at::Tensor>& sinks = std::nullopt);

// -> (out, lse, weights); weights is empty unless return_weights, (..., L, S) if averaged.
FUSEDATTN_API std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, bool enable_gqa, bool return_weights,
    bool average_weights = false, at::OptionalIntArrayRef window = std::nullopt,
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
    std::optional<double> softcap = std::nullopt,
    const std::optional<at::Tensor>& rel_bias = std::nullopt, bool fp32_out = false);

// -> (grad_query, grad_key, grad_value, grad_attn_mask, grad_key_padding_mask,
// grad_rel_bias); the last three are empty unless asked for (rel_bias: given).
FUSEDATTN_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights,
                   const std::optional<at::Tensor>& grad_lse, const at::Tensor& query,
                   const at::Tensor& key, const at::Tensor& value, const at::Tensor& out,
                   const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
                   const std::optional<at::Tensor>& key_padding_mask,
                   const std::optional<at::Tensor>& dropout_seed, double dropout_p,
                   bool is_causal, bool bottom_right, std::optional<double> scale,
                   bool enable_gqa, bool attn_mask_grad, bool key_padding_mask_grad,
                   at::OptionalIntArrayRef window = std::nullopt,
                   const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                   std::optional<double> softcap = std::nullopt,
    const std::optional<at::Tensor>& rel_bias = std::nullopt);
// Attention on projections in the caller's layout, as the modules call it (schemas and
// the three forms of query/key/value in registration.cpp).
FUSEDATTN_API std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_projected_forward(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, int64_t num_heads, bool seq_first,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool return_weights, bool average_weights, bool fp32_out = false);
FUSEDATTN_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_projected_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& query,
    const std::optional<at::Tensor>& key, const std::optional<at::Tensor>& value,
    const at::Tensor& out, const at::Tensor& lse, int64_t num_heads, bool seq_first,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool attn_mask_grad, bool key_padding_mask_grad);
}  // namespace ops

namespace detail {
// Defined next to the op registrations; fusedattn.h references it (see there).
FUSEDATTN_API int64_t link_anchor();

// A dropout seed drawn from torch's generator on `device` (none when dropout_p is 0).
std::optional<at::Tensor> draw_dropout_seed(double dropout_p, c10::Device device);
// x (A, B, H * D) in a caller's layout, (A, B) = (L, N) if seq_first else (N, L), as an
// (N, H, L, D) view: no copy.
at::Tensor split_heads(const at::Tensor& x, int64_t heads, bool seq_first);
// The (N, H, L, D), (N, H, S, D), (N, H, S, Dv) views of projections in the three forms of
// `_attention_projected_forward` (query alone packed q|k|v; query and packed k|v; all
// three); throws, naming the argument, on a shape that does not split so.
std::array<at::Tensor, 3> split_projected(const at::Tensor& query,
                                          const std::optional<at::Tensor>& key,
                                          const std::optional<at::Tensor>& value, int64_t heads,
                                          bool seq_first);
// The CompositeImplicitAutograd kernel of `attention`: validates the flags, draws the dropout
// seed from torch's default generator and calls `_attention_forward`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_composite(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    std::optional<double> scale, bool enable_gqa, const std::optional<at::Tensor>& key_padding_mask,
    c10::string_view causal_alignment, bool return_weights, bool return_lse,
    bool average_weights, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, const std::optional<at::Tensor>& sinks);
// The CompositeImplicitAutograd kernel of `attention_varlen` (ops/varlen.cpp).
std::tuple<at::Tensor, at::Tensor> attention_varlen_composite(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double dropout_p, bool is_causal, c10::string_view causal_alignment,
    std::optional<double> scale, bool enable_gqa, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, bool return_lse,
    const std::optional<at::Tensor>& sinks);

// Attention sinks on a call's results, every backend alike: the softmax over [scores, sink_h]
// is the kernels' softmax times exp(lse - logaddexp(lse, sink_h)), so out and the weights
// scale by that factor (<= 1) and the lse becomes logaddexp(lse, sink_h); exact, O(L) per
// row, no L x S buffer. Differentiable through the lse: the kernels' backward, given
// grad_lse, yields query/key/value's gradients and autograd the sinks'. lse (..., H, L) in
// the accumulate type; sinks (H,). Checks sinks against `heads` (named errors) and returns
// (factor, lse with the sinks), both lse's shape.
std::pair<at::Tensor, at::Tensor> sink_factor(const char* op, const at::Tensor& lse,
                                              const at::Tensor& sinks, const c10::SymInt& heads,
                                              const at::Tensor& query);
}  // namespace detail

}  // namespace fusedattn
