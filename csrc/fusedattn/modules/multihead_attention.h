#pragma once
// fusedattn::MultiheadAttention: torch.nn.MultiheadAttention's options, parameters (names,
// shapes, initialisation) and forward semantics, computed by the fused attention op.
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <ostream>
#include <tuple>

#include "fusedattn/macros.h"
#include "fusedattn/modules/kv_cache.h"

namespace fusedattn {

struct FUSEDATTN_API MultiheadAttentionOptions {
  MultiheadAttentionOptions(int64_t embed_dim, int64_t num_heads);
  TORCH_ARG(int64_t, embed_dim);
  TORCH_ARG(int64_t, num_heads);
  // Dropout on the attention probabilities, applied in training mode only.
  TORCH_ARG(double, dropout) = 0.0;
  // Biases of the input and output projections.
  TORCH_ARG(bool, bias) = true;
  // Learned key and value appended to the key/value sequences (bias_k, bias_v).
  TORCH_ARG(bool, add_bias_kv) = false;
  // A zero key and value appended to the key/value sequences.
  TORCH_ARG(bool, add_zero_attn) = false;
  // Feature sizes of key and value (default embed_dim).
  TORCH_ARG(int64_t, kdim);
  TORCH_ARG(int64_t, vdim);
  // Inputs and output are (N, L, E) instead of (L, N, E).
  TORCH_ARG(bool, batch_first) = false;
  // Per-head projection size (default embed_dim / num_heads): q/k/v map to num_heads *
  // head_dim features and out_proj maps back to embed_dim. Beyond torch.
  TORCH_ARG(std::optional<int64_t>, head_dim) = std::nullopt;
  // Attention variants (fusedattn::attention's), beyond torch: a sliding window {left, right}
  // (-1 unbounded; empty = none); ALiBi with the paper's slopes for num_heads (buffer
  // alibi_slopes); a learnable relative position bias (parameter rel_bias, (H, 2 D + 1),
  // zeros) for distances up to D = max_relative_distance; logit soft-capping.
  TORCH_ARG(std::vector<int64_t>, window) = {};
  TORCH_ARG(bool, alibi) = false;
  TORCH_ARG(std::optional<int64_t>, max_relative_distance) = std::nullopt;
  TORCH_ARG(std::optional<double>, softcap) = std::nullopt;
  // Attention sinks: a learnable logit per head (parameter sinks, (H,), zeros) that joins each
  // softmax's denominator with no value (fusedattn::attention's sinks).
  TORCH_ARG(bool, sinks) = false;
};

// ALiBi's slopes for n heads (the paper's geometric sequence; for n not a power of two, those
// of the power below and every other one of the power above). fp32 (n,).
FUSEDATTN_API at::Tensor alibi_slopes(int64_t num_heads);

class FUSEDATTN_API MultiheadAttentionImpl : public torch::nn::Cloneable<MultiheadAttentionImpl> {
 public:
  MultiheadAttentionImpl(int64_t embed_dim, int64_t num_heads)
      : MultiheadAttentionImpl(MultiheadAttentionOptions(embed_dim, num_heads)) {}
  explicit MultiheadAttentionImpl(const MultiheadAttentionOptions& options);

  // query (L, N, E), key (S, N, kdim), value (S, N, vdim); (N, ...) first with batch_first;
  // 2-D for one unbatched sequence. key_padding_mask (N, S): bool True = ignore that key, or
  // float added. attn_mask (L, S) or (N * num_heads, L, S): bool True = NOT allowed, or float
  // added. is_causal: apply a causal mask (together with attn_mask if both are given).
  // -> (attn_output like query, attn_weights (N, L, S) averaged over heads or (N, H, L, S),
  //     undefined unless need_weights). Weights are the probabilities before dropout.
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& query, const at::Tensor& key,
                                             const at::Tensor& value,
                                             const at::Tensor& key_padding_mask = {},
                                             bool need_weights = true,
                                             const at::Tensor& attn_mask = {},
                                             bool average_attn_weights = true,
                                             bool is_causal = false);

  // Packed variable-length sequences (Python: forward(..., cu_seqlens=...), or jagged nested
  // inputs): query (total_q, E), key and value (total_k, kdim|vdim), every sequence's rows
  // one after another; cu_seqlens (B + 1,) int32 offsets into query's rows, cu_seqlens_k
  // into key's (undefined: cu_seqlens); a max_seqlen < 0 is read off the offsets (a host
  // read). Each sequence
  // attends within itself only (causal top-left with is_causal); no padding is formed or
  // computed. -> (total_q, E). No weights, masks, add_bias_kv or add_zero_attn.
  at::Tensor forward_packed(const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& cu_seqlens,
                            int64_t max_seqlen = -1, const at::Tensor& cu_seqlens_k = {},
                            int64_t max_seqlen_k = -1, bool is_causal = false);

  // Incremental decoding (Python: forward(..., cache=cache)). query: the new tokens, in
  // forward's layout (T in place of L). key and value: the same new tokens for
  // self-attention (projected and appended to the cache after each sequence's length), or
  // undefined to attend to the cache only (a memory_cache). Each token attends to every
  // cached position up to its own with is_causal (bottom-right within the new block), and
  // key_padding_mask (N, K) covers the cache's first K positions. Weights (N, T, max_len)
  // averaged or (N, H, T, max_len), 0 past each sequence's visible positions. No attn_mask,
  // no dropout (eval mode or dropout 0), no add_bias_kv / add_zero_attn / variants.
  std::tuple<at::Tensor, at::Tensor> forward_cached(const at::Tensor& query, const at::Tensor& key,
                                                    const at::Tensor& value, KVCache& cache,
                                                    const at::Tensor& key_padding_mask = {},
                                                    bool need_weights = true,
                                                    bool average_attn_weights = true,
                                                    bool is_causal = false);
  // Cross-attention keys and values of memory (the encoder's output, in forward's layout)
  // projected once: a read-only cache with memory's key_padding_mask (N, S). cache_dtype:
  // as kv_cache's.
  KVCache memory_cache(const at::Tensor& memory, const at::Tensor& key_padding_mask = {},
                       std::optional<at::ScalarType> cache_dtype = std::nullopt);
  // An empty cache for this module's self-attention, in its parameters' dtype and device,
  // stored in cache_dtype (default: the parameters' dtype; bfloat16, float16 or int8 store
  // fewer bytes, KVCache).
  KVCache kv_cache(int64_t max_batch, int64_t max_len,
                   std::optional<at::ScalarType> cache_dtype = std::nullopt);

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  int64_t head_dim() const;            // per-head projection size
  bool qkv_same_embed_dim() const;     // kdim == vdim == embed_dim: in_proj_weight is packed

  MultiheadAttentionOptions options;
  // Undefined where torch's module has None.
  at::Tensor in_proj_weight;   // (3 * H * head_dim, E) when qkv_same_embed_dim()
  at::Tensor q_proj_weight;    // (H * head_dim, E)     otherwise
  at::Tensor k_proj_weight;    // (H * head_dim, kdim)
  at::Tensor alibi_slopes;     // (H,) buffer, with options.alibi()
  at::Tensor rel_bias;         // (H, 2 D + 1) parameter, with options.max_relative_distance()
  at::Tensor sinks;            // (H,) parameter, with options.sinks()
  at::Tensor v_proj_weight;    // (H * head_dim, vdim)
  at::Tensor in_proj_bias;     // (3 * H * head_dim) with bias
  at::Tensor bias_k, bias_v;   // (1, 1, H * head_dim) with add_bias_kv
  torch::nn::Linear out_proj = nullptr;  // H * head_dim -> E

 protected:
  void check_cacheable() const;

  FORWARD_HAS_DEFAULT_ARGS({3, torch::nn::AnyValue(at::Tensor())},
                           {4, torch::nn::AnyValue(true)},
                           {5, torch::nn::AnyValue(at::Tensor())},
                           {6, torch::nn::AnyValue(true)},
                           {7, torch::nn::AnyValue(false)})
};

TORCH_MODULE(MultiheadAttention);

}  // namespace fusedattn
