// The schemas of every fusedattn op, in one place (C++ apps get them without Python), with
// the kernels that are not tied to a backend. Backend kernels register in backends/cpu/ and
// backends/cuda/, autograd in ops/autograd.cpp, fake (meta) kernels for torch.compile in
// python/fusedattn.
#include <torch/library.h>

#include "fusedattn/ops/attention.h"
#include "fusedattn/ops/layers.h"
#include "fusedattn/ops/multihead_attention.h"
#include "fusedattn/ops/varlen.h"

namespace fusedattn::detail {
int64_t link_anchor() { return 1; }
}  // namespace fusedattn::detail

TORCH_LIBRARY(fusedattn, m) {
  // Public: scaled_dot_product_attention's arguments plus key padding, both causal
  // alignments, returned weights / log-sum-exp, and the variants: window (left, right) keys
  // around each query's diagonal (-1: unbounded), ALiBi slopes (H,) or (..., H) (fp32, no
  // gradient), softcap (the scaled scores through softcap * tanh(s / softcap)), rel_bias
  // (H, 2 D + 1), learnable: entry clamp(j - i - o, -D, D) + D added to the scores. Returns
  // (out, weights, lse); weights is empty unless return_weights (the Python wrapper turns
  // what was not asked into None), and (..., L, S), the mean over heads, with average_weights.
  // sinks (H,): each head's learned logit joins the softmax's denominator with no value (the
  // attention sinks of gpt-oss); out, weights and lse are then the sink-inclusive ones, and
  // the sinks get a gradient.
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "float dropout_p=0.0, bool is_causal=False, float? scale=None, bool enable_gqa=False, *, "
      "Tensor? key_padding_mask=None, str causal_alignment=\"top_left\", "
      "bool return_weights=False, bool return_lse=False, bool average_weights=False, "
      "int[]? window=None, Tensor? alibi_slopes=None, float? softcap=None, "
      "Tensor? rel_bias=None, Tensor? sinks=None) -> (Tensor, Tensor, Tensor)");
  m.impl("attention", c10::DispatchKey::CompositeImplicitAutograd,
         TORCH_FN(fusedattn::detail::attention_composite));

  // Packed variable-length sequences: query (total_q, H, E), key (total_k, Hk, E), value
  // (total_k, Hk, Ev), cu_seqlens_* (B + 1,) int32 offsets. -> (out (total_q, H, Ev), lse
  // (H, total_q), empty unless return_lse). Alignment per sequence (ops/varlen.cpp).
  m.def(
      "attention_varlen(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, *, float dropout_p=0.0, "
      "bool is_causal=False, str causal_alignment=\"top_left\", float? scale=None, "
      "bool enable_gqa=False, int[]? window=None, Tensor? alibi_slopes=None, "
      "float? softcap=None, Tensor? rel_bias=None, bool return_lse=False, Tensor? sinks=None) "
      "-> (Tensor, Tensor)");
  m.impl("attention_varlen", c10::DispatchKey::CompositeImplicitAutograd,
         TORCH_FN(fusedattn::detail::attention_varlen_composite));
  // Internal, pure given dropout_seed: its forward and backward. lse (H, total_q) in the
  // accumulate type. The CPU's kernels are backends/cpu/varlen_cpu.cpp; every other device loops over
  // the sequences through `_attention_forward` / `_attention_backward` (ops/varlen.cpp).
  m.def(
      "_attention_varlen_forward(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? dropout_seed, "
      "float dropout_p, bool is_causal, bool bottom_right, float? scale, bool enable_gqa, "
      "int[]? window, Tensor? alibi_slopes, float? softcap, Tensor? rel_bias, "
      "bool fp32_out=False) -> (Tensor, Tensor)");
  // -> (grad_query, grad_key, grad_value, grad_rel_bias (accumulate type; empty without it))
  m.def(
      "_attention_varlen_backward(Tensor grad_out, Tensor? grad_lse, Tensor query, Tensor key, "
      "Tensor value, Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, Tensor? dropout_seed, float dropout_p, "
      "bool is_causal, bool bottom_right, float? scale, bool enable_gqa, int[]? window, "
      "Tensor? alibi_slopes, float? softcap, Tensor? rel_bias) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.impl("_attention_varlen_forward", c10::DispatchKey::CompositeExplicitAutograd,
         TORCH_FN(fusedattn::detail::attention_varlen_forward_per_sequence));
  m.impl("_attention_varlen_backward", c10::DispatchKey::CompositeExplicitAutograd,
         TORCH_FN(fusedattn::detail::attention_varlen_backward_per_sequence));

  // Internal, pure given dropout_seed: what the backends implement. -> (out, lse, weights).
  // fp32_out: bf16/fp16 inputs get out in fp32, unrounded (the autograd keeps it for the
  // backward, which accepts either); the same flag on the projected and packed forwards.
  m.def(
      "_attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "Tensor? key_padding_mask, Tensor? dropout_seed, float dropout_p, bool is_causal, "
      "bool bottom_right, float? scale, bool enable_gqa, bool return_weights, "
      "bool average_weights=False, int[]? window=None, Tensor? alibi_slopes=None, "
      "float? softcap=None, Tensor? rel_bias=None, bool fp32_out=False) "
      "-> (Tensor, Tensor, Tensor)");
  // -> (grad_query, grad_key, grad_value, grad_attn_mask, grad_key_padding_mask,
  //     grad_rel_bias); the last three empty unless asked for / given
  m.def(
      "_attention_backward(Tensor grad_out, Tensor? grad_weights, Tensor? grad_lse, "
      "Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, Tensor? attn_mask, "
      "Tensor? key_padding_mask, Tensor? dropout_seed, float dropout_p, bool is_causal, "
      "bool bottom_right, float? scale, bool enable_gqa, bool attn_mask_grad, "
      "bool key_padding_mask_grad, int[]? window=None, Tensor? alibi_slopes=None, "
      "float? softcap=None, Tensor? rel_bias=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Internal, for the modules: attention on projections in the caller's layout, (A, B, F)
  // with (A, B) = (seq, N) if seq_first else (N, seq) and F = heads x head dim, read in
  // place. query alone: the packed q|k|v of a self-attention in-projection (F = 3 H D);
  // query and key: q and the packed k|v of one key/value projection (F = H D, 2 H D); all
  // three: separate. out is (A, B, H Dv), heads merged; scale 1 / sqrt(D), causal top-left.
  // The backward writes each given tensor's gradient whole (grad_key, grad_value empty where
  // not given), so no split, merge or concatenation copies the data on either side. CPU
  // kernels only: the modules take this path on the CPU and split heads for other devices.
  // -> (out, lse, weights); backward -> (grad_query, grad_key, grad_value, grad_attn_mask,
  // grad_key_padding_mask)
  m.def(
      "_attention_projected_forward(Tensor query, Tensor? key, Tensor? value, int num_heads, "
      "bool seq_first, Tensor? attn_mask, Tensor? key_padding_mask, Tensor? dropout_seed, "
      "float dropout_p, bool is_causal, bool return_weights, bool average_weights, "
      "bool fp32_out=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_attention_projected_backward(Tensor grad_out, Tensor? grad_weights, Tensor? grad_lse, "
      "Tensor query, Tensor? key, Tensor? value, Tensor out, Tensor lse, int num_heads, "
      "bool seq_first, Tensor? attn_mask, Tensor? key_padding_mask, Tensor? dropout_seed, "
      "float dropout_p, bool is_causal, bool attn_mask_grad, bool key_padding_mask_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The forward of fusedattn::MultiheadAttention (C++ and Python modules both call it), with
  // torch.nn.MultiheadAttention's semantics. dropout_p is the effective one (0 in eval).
  // Returns (attn_output, attn_weights); attn_weights is empty unless need_weights.
  m.def(
      "multihead_attention(Tensor query, Tensor key, Tensor value, int num_heads, "
      "Tensor? in_proj_weight, Tensor? in_proj_bias, Tensor? q_proj_weight, "
      "Tensor? k_proj_weight, Tensor? v_proj_weight, Tensor? bias_k, Tensor? bias_v, "
      "bool add_zero_attn, float dropout_p, Tensor out_proj_weight, Tensor? out_proj_bias, "
      "bool batch_first=False, Tensor? key_padding_mask=None, bool need_weights=True, "
      "Tensor? attn_mask=None, bool average_attn_weights=True, bool is_causal=False, "
      "int[]? window=None, Tensor? alibi_slopes=None, float? softcap=None, "
      "Tensor? rel_bias=None, Tensor? sinks=None) -> (Tensor, Tensor)");
  m.impl("multihead_attention", c10::DispatchKey::CompositeImplicitAutograd,
         TORCH_FN(fusedattn::detail::multihead_attention_composite));
  // Its packed form (both modules' forward with cu_seqlens): query (total_q, E), key and
  // value (total_k, kdim|vdim) -> (total_q, E), attention_varlen between the projections.
  m.def(
      "multihead_attention_varlen(Tensor query, Tensor key, Tensor value, int num_heads, "
      "Tensor? in_proj_weight, Tensor? in_proj_bias, Tensor? q_proj_weight, "
      "Tensor? k_proj_weight, Tensor? v_proj_weight, float dropout_p, Tensor out_proj_weight, "
      "Tensor? out_proj_bias, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, bool is_causal=False, int[]? window=None, Tensor? alibi_slopes=None, "
      "float? softcap=None, Tensor? rel_bias=None, Tensor? sinks=None) -> Tensor");
  m.impl("multihead_attention_varlen", c10::DispatchKey::CompositeImplicitAutograd,
         TORCH_FN(fusedattn::detail::multihead_attention_varlen_composite));

  // The modules' in-projection into heads and their decode step on a KV cache's tensors
  // (ops/multihead_attention.h): one implementation for the C++ and the Python module.
  m.def(
      "multihead_attention_in_projection(Tensor? query, Tensor? key, Tensor? value, "
      "int num_heads, Tensor? in_proj_weight, Tensor? in_proj_bias, Tensor? q_proj_weight, "
      "Tensor? k_proj_weight, Tensor? v_proj_weight, bool batch_first=False) "
      "-> (Tensor, Tensor, Tensor)");
  m.impl("multihead_attention_in_projection", c10::DispatchKey::CompositeImplicitAutograd,
         TORCH_FN(fusedattn::detail::multihead_attention_in_projection_composite));
  m.def(
      "multihead_attention_cached(Tensor query, Tensor? key, Tensor? value, "
      "Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor(c!) lengths, int num_heads, "
      "Tensor? in_proj_weight, Tensor? in_proj_bias, Tensor? q_proj_weight, "
      "Tensor? k_proj_weight, Tensor? v_proj_weight, Tensor out_proj_weight, "
      "Tensor? out_proj_bias, *, bool batch_first=False, Tensor? key_padding_mask=None, "
      "bool need_weights=False, bool average_attn_weights=True, bool is_causal=False, "
      "bool read_only=False, Tensor? cache_key_padding_mask=None, Tensor(d!)? key_scales=None, "
      "Tensor(e!)? value_scales=None) -> (Tensor, Tensor)");
  m.impl("multihead_attention_cached", c10::DispatchKey::CompositeImplicitAutograd,
         TORCH_FN(fusedattn::detail::multihead_attention_cached_composite));

  // Incremental decoding (ops/kv_cache.h): query (B, H, T, E) against a preallocated cache
  // (Bc >= B, Hk, max_len, E|Ev); key and value (B, Hk, T, E|Ev), when given, are written
  // at each sequence's lengths[b] and lengths grows by T, in place (an int8 cache's scales
  // too). -> (out (B, H, T, Ev), lse (B, H, T), empty unless return_lse). No gradient.
  m.def(
      "kv_cache_attention(Tensor query, Tensor? key, Tensor? value, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor(c!) lengths, *, float? scale=None, bool is_causal=False, "
      "Tensor? key_padding_mask=None, bool enable_gqa=False, bool return_lse=False, "
      "bool return_weights=False, Tensor(d!)? key_scales=None, Tensor(e!)? value_scales=None) "
      "-> (Tensor, Tensor, Tensor)");

  // The single-head layers (ops/layers.h): SelfAttention, AttentionPooling, Gaussian-kernel attention.
  m.def(
      "self_attention(Tensor x, Tensor q_weight, Tensor? q_bias, Tensor k_weight, Tensor? k_bias, "
      "Tensor v_weight, Tensor? v_bias, Tensor? key_padding_mask=None, bool is_causal=False, "
      "bool need_weights=True) -> (Tensor, Tensor)");
  m.impl("self_attention", c10::DispatchKey::CompositeImplicitAutograd,
         TORCH_FN(fusedattn::detail::self_attention_composite));
  m.def(
      "attention_pooling(Tensor h, str score, Tensor score_weight, Tensor? query_weight, "
      "Tensor? score_vector, Tensor output_weight, Tensor? key_padding_mask=None) "
      "-> (Tensor, Tensor)");
  m.impl("attention_pooling", c10::DispatchKey::CompositeImplicitAutograd,
         TORCH_FN(fusedattn::detail::attention_pooling_composite));
  m.def(
      "gaussian_kernel_attention(Tensor query, Tensor key, Tensor value, Tensor bandwidth, "
      "bool need_weights=False) -> (Tensor, Tensor)");
  m.impl("gaussian_kernel_attention", c10::DispatchKey::CompositeImplicitAutograd,
         TORCH_FN(fusedattn::detail::gaussian_kernel_attention_composite));
}
