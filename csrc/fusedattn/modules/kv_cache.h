#pragma once
// fusedattn::KVCache: preallocated keys and values of incremental decoding (Python's
// fusedattn.KVCache, same methods). MultiheadAttention fills it (forward_cached) and makes
// read-only ones for cross-attention (memory_cache).
#include <ATen/ATen.h>

#include <optional>
#include <ostream>
#include <tuple>

#include "fusedattn/macros.h"

namespace fusedattn {

class FUSEDATTN_API KVCache {
 public:
  // key_cache (max_batch, num_heads, max_len, head_dim), value_cache (..., value_dim), zeros;
  // lengths int64 (max_batch,) zeros. Storage never reallocates while the cache fills.
  // options: the model's dtype and device. cache_dtype: how the keys and values are stored,
  // the model's dtype by default; bfloat16 or float16 (half the bytes of float), or int8 (a
  // quarter, with one float scale per stored row: key_scales / value_scales (max_batch,
  // num_heads, max_len)), for a float, bfloat16 or half model (ops/kv_cache.h).
  KVCache(int64_t max_batch, int64_t max_len, int64_t num_heads, int64_t head_dim,
          std::optional<int64_t> value_dim = std::nullopt, at::TensorOptions options = {},
          std::optional<at::ScalarType> cache_dtype = std::nullopt);
  // A cache over given keys (B, H, S, E) and values (B, H, S, Ev), used in place (or, with a
  // cache_dtype other than theirs, stored in it: quantize_for_cache); lengths default to S each
  // (full); read-only by default (a cross-attention memory), with a key_padding_mask (B, S)
  // that applies to every query.
  static KVCache from_tensors(const at::Tensor& keys, const at::Tensor& values,
                              const at::Tensor& lengths = {},
                              const at::Tensor& key_padding_mask = {}, bool read_only = true,
                              std::optional<at::ScalarType> cache_dtype = std::nullopt);

  int64_t max_batch() const { return key_cache_.size(0); }
  int64_t max_len() const { return key_cache_.size(2); }
  int64_t batch() const { return lengths_.size(0); }  // rows in use
  bool read_only() const { return read_only_; }
  // The cached keys / values of the rows in use: views (batch, H, max_len, E|Ev).
  at::Tensor keys() const { return key_cache_.narrow(0, 0, batch()); }
  at::Tensor values() const { return value_cache_.narrow(0, 0, batch()); }
  // Cached positions per sequence, int64 (batch,); may be set (ragged prompts: after a
  // padded prefill, the real lengths, so that the next tokens overwrite the padding).
  at::Tensor& lengths() { return lengths_; }
  const at::Tensor& key_padding_mask() const { return key_padding_mask_; }
  at::Tensor& key_cache() { return key_cache_; }
  at::Tensor& value_cache() { return value_cache_; }
  // An int8 cache's scales, float (max_batch, H, max_len); undefined for other storages.
  at::Tensor& key_scales() { return key_scales_; }
  at::Tensor& value_scales() { return value_scales_; }
  at::ScalarType cache_dtype() const { return key_cache_.scalar_type(); }

  // Empties the cache for batch sequences (default max_batch).
  void reset(std::optional<int64_t> batch = std::nullopt);
  // Row i becomes old row index[i] (beam search), in place; index int64 (new_batch <=
  // max_batch). A read-only cache (a memory) is gathered into new tensors, of any new_batch.
  void reorder(const at::Tensor& index);
  // Stores key (batch, Hk, T, E) and value (batch, Hk, T, Ev) after each sequence's cached
  // positions (in the cache's storage form) and advances lengths by T, without attending.
  void append(const at::Tensor& key, const at::Tensor& value);
  // kv_cache_attention on this cache: query (batch, H, T, E); key/value (batch, Hk, T, E|Ev)
  // appended first (undefined: attend only). -> (out, lse, weights), the last two undefined
  // unless asked for.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> attend(
      const at::Tensor& query, const at::Tensor& key = {}, const at::Tensor& value = {},
      bool is_causal = false, const at::Tensor& key_padding_mask = {},
      std::optional<double> scale = std::nullopt, bool enable_gqa = false,
      bool return_lse = false, bool return_weights = false);

 private:
  KVCache() = default;
  at::Tensor key_cache_, value_cache_, lengths_, key_padding_mask_, key_scales_, value_scales_;
  bool read_only_ = false;
};

FUSEDATTN_API std::ostream& operator<<(std::ostream& stream, const KVCache& cache);

}  // namespace fusedattn
