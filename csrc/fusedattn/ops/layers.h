#pragma once
// The ops behind the single-head layers (SelfAttention, AttentionPooling, Gaussian-kernel
// attention). Each is a CompositeImplicitAutograd kernel over fusedattn::attention (or ATen
// where the score is not a dot product); the C++ modules and the Python modules both call
// them through the dispatcher.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "fusedattn/macros.h"

namespace fusedattn::ops {

// x (N, T, in_dim) or (T, in_dim); q/k weights (d_k, in_dim), v weight (d_v, in_dim);
// key_padding_mask (N, T) bool True = padding. -> (out (N, T, d_v), weights (N, T, T) or empty)
FUSEDATTN_API std::tuple<at::Tensor, at::Tensor> self_attention(
    const at::Tensor& x, const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias,
    const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, bool need_weights);

// h (N, T, D): the many-to-one attention pooling. The query is h's last step (with a
// key_padding_mask (N, T), the last step that is not padding). score "luong":
// h_t . (W h_s) with score_weight W (D, D); "bahdanau": v . tanh(W1 h_t + W2 h_s) with
// score_weight W2 (D, D), query_weight W1 (D, D), score_vector v (D). Output
// tanh(W_c [context; h_t]) with output_weight W_c (units, 2 D).
// -> (out (N, units), weights (N, T))
FUSEDATTN_API std::tuple<at::Tensor, at::Tensor> attention_pooling(
    const at::Tensor& h, c10::string_view score, const at::Tensor& score_weight,
    const std::optional<at::Tensor>& query_weight, const std::optional<at::Tensor>& score_vector,
    const at::Tensor& output_weight, const std::optional<at::Tensor>& key_padding_mask);

// Nadaraya-Watson: weights softmax_j(-|q_i - k_j|^2 / (2 bandwidth^2)). query (..., L, D),
// key (..., S, D), value (..., S, Dv), or 1-D (L), (S), (S) for scalar points; bandwidth a
// one-element tensor (may require grad). -> (out (..., L, Dv) or (L), weights (..., L, S) or empty)
FUSEDATTN_API std::tuple<at::Tensor, at::Tensor> gaussian_kernel_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& bandwidth, bool need_weights);

}  // namespace fusedattn::ops

namespace fusedattn::detail {
std::tuple<at::Tensor, at::Tensor> self_attention_composite(
    const at::Tensor& x, const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias,
    const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, bool need_weights);
std::tuple<at::Tensor, at::Tensor> attention_pooling_composite(
    const at::Tensor& h, c10::string_view score, const at::Tensor& score_weight,
    const std::optional<at::Tensor>& query_weight, const std::optional<at::Tensor>& score_vector,
    const at::Tensor& output_weight, const std::optional<at::Tensor>& key_padding_mask);
std::tuple<at::Tensor, at::Tensor> gaussian_kernel_attention_composite(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& bandwidth, bool need_weights);
}  // namespace fusedattn::detail
