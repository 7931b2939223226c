#pragma once
// The op `fusedattn::multihead_attention`: torch.nn.MultiheadAttention's forward over the
// attention op. The C++ module and the Python module both call it through the dispatcher.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "fusedattn/macros.h"

namespace fusedattn {
namespace ops {
// query (L, N, E) or (N, L, E) with batch_first, or (L, E) unbatched; key/value likewise with
// S and kdim/vdim. in_proj_weight (3*H*Dh, E) packed, or q/k/v_proj_weight (H*Dh, E|kdim|vdim);
// in_proj_bias (3*H*Dh); bias_k/bias_v (1, 1, H*Dh); out_proj_weight (E, H*Dh).
// -> (attn_output like query, attn_weights (N, L, S') averaged or (N, H, L, S'), or empty)
FUSEDATTN_API std::tuple<at::Tensor, at::Tensor> multihead_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, const std::optional<at::Tensor>& bias_k,
    const std::optional<at::Tensor>& bias_v, bool add_zero_attn, double dropout_p,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    bool batch_first, const std::optional<at::Tensor>& key_padding_mask, bool need_weights,
    const std::optional<at::Tensor>& attn_mask, bool average_attn_weights, bool is_causal,
    at::OptionalIntArrayRef window = std::nullopt,
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
    std::optional<double> softcap = std::nullopt,
    const std::optional<at::Tensor>& rel_bias = std::nullopt,
    const std::optional<at::Tensor>& sinks = std::nullopt);
// Packed variable-length sequences (attention_varlen's layout): query (total_q, E), key and
// value (total_k, kdim|vdim), cu_seqlens_q / cu_seqlens_k (B + 1,) offsets; causal top-left
// per sequence. No weights, masks, bias_k/bias_v or add_zero_attn (the offsets are the
// padding). -> (total_q, E)
FUSEDATTN_API at::Tensor multihead_attention_varlen(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, double dropout_p,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool is_causal, at::OptionalIntArrayRef window = std::nullopt,
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
    std::optional<double> softcap = std::nullopt,
    const std::optional<at::Tensor>& rel_bias = std::nullopt,
    const std::optional<at::Tensor>& sinks = std::nullopt);

// The modules' in-projection into heads: query (L, N, E) / key (S, N, kdim) / value (S, N,
// vdim), (N, ...) first with batch_first, or 2-D unbatched; key and value both or neither,
// query optional (none: a cross-attention memory's keys and values). Self-attention (one
// tensor as all three, packed in_proj_weight) takes one GEMM. -> (q (N, H, L, D), k and v
// (N, H, S, D)), views of the projections; the ones not asked for are empty.
FUSEDATTN_API std::tuple<at::Tensor, at::Tensor, at::Tensor> multihead_attention_in_projection(
    const std::optional<at::Tensor>& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, bool batch_first = false);
// One decode step of the module against a KV cache (its tensors; ops/kv_cache.h): query the
// new tokens in the module's layout, key and value the same tokens (self-attention: appended
// to the cache) or none (attend to the cache only). read_only: the cache is a memory (no
// append); cache_key_padding_mask: the memory's own (N, S) mask, exclusive with
// key_padding_mask (N, K) over the cache's first K positions; key_scales, value_scales: an
// int8 cache's (kv_cache_attention). -> (attn_output like query, weights (N, T, max_len)
// averaged or (N, H, T, max_len), empty unless need_weights).
FUSEDATTN_API std::tuple<at::Tensor, at::Tensor> multihead_attention_cached(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, at::Tensor& key_cache, at::Tensor& value_cache,
    at::Tensor& lengths, int64_t num_heads, const std::optional<at::Tensor>& in_proj_weight,
    const std::optional<at::Tensor>& in_proj_bias, const std::optional<at::Tensor>& q_proj_weight,
    const std::optional<at::Tensor>& k_proj_weight, const std::optional<at::Tensor>& v_proj_weight,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    bool batch_first = false, const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
    bool need_weights = false, bool average_attn_weights = true, bool is_causal = false,
    bool read_only = false, const std::optional<at::Tensor>& cache_key_padding_mask = std::nullopt,
    const std::optional<at::Tensor>& key_scales = std::nullopt,
    const std::optional<at::Tensor>& value_scales = std::nullopt);
}  // namespace ops

namespace detail {
// torch accepts biases in another float dtype than their weights (its fused path casts
// them); so do the modules' ops: b cast to w's dtype rather than failing inside a GEMM.
std::optional<at::Tensor> bias_like(const std::optional<at::Tensor>& b, const at::Tensor& w);
// Their CompositeImplicitAutograd kernels (ops/multihead_attention_cached.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> multihead_attention_in_projection_composite(
    const std::optional<at::Tensor>& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, bool batch_first);
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
    const std::optional<at::Tensor>& key_scales, const std::optional<at::Tensor>& value_scales);

// Its CompositeImplicitAutograd kernel. Written with SymInt sizes so that torch.compile can
// trace it with dynamic shapes.
std::tuple<at::Tensor, at::Tensor> multihead_attention_composite(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, const std::optional<at::Tensor>& bias_k,
    const std::optional<at::Tensor>& bias_v, bool add_zero_attn, double dropout_p,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    bool batch_first, const std::optional<at::Tensor>& key_padding_mask, bool need_weights,
    const std::optional<at::Tensor>& attn_mask, bool average_attn_weights, bool is_causal,
    at::OptionalIntArrayRef window = std::nullopt,
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
    std::optional<double> softcap = std::nullopt,
    const std::optional<at::Tensor>& rel_bias = std::nullopt,
    const std::optional<at::Tensor>& sinks = std::nullopt);
// Its CompositeImplicitAutograd kernel: the projections, attention_varlen, the output
// projection.
at::Tensor multihead_attention_varlen_composite(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, double dropout_p,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool is_causal, at::OptionalIntArrayRef window = std::nullopt,
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
    std::optional<double> softcap = std::nullopt,
    const std::optional<at::Tensor>& rel_bias = std::nullopt,
    const std::optional<at::Tensor>& sinks = std::nullopt);
}  // namespace detail
}  // namespace fusedattn
