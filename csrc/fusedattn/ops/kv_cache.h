#pragma once
// The op `fusedattn::kv_cache_attention`: a few new queries per sequence against a
// preallocated key/value cache, appending the new keys and values first (incremental
// decoding). Its CPU kernel is the decode kernel (kernels/cpu/decode.cpp); CUDA takes torch's
// route (kv_cache_attention_torch) where it serves the call; otherwise kv_cache_attention_aten.
// Gradients are not defined (decoding is inference): a backward through it is an error that
// says so.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <utility>

#include "fusedattn/macros.h"

namespace fusedattn {
namespace ops {
// query (B, H, T, E); key (B, Hk, T, E) and value (B, Hk, T, Ev), both or neither;
// key_cache (Bc, Hk, C, E) and value_cache (Bc, Hk, C, Ev) with Bc >= B (rows [0, B) used),
// contiguous last dims; lengths int64 (B,), the positions cached per sequence.
// With key and value: they are written at positions [lengths[b], lengths[b] + T) and lengths
// grows by T (in place; past C is an error). Then each query attends to positions
// [0, lengths[b]); is_causal: token t to positions <= lengths[b] - T + t. key_padding_mask
// (B, K), K <= C: bool True = padding, or float added, over positions [0, K).
// H != Hk needs enable_gqa. -> (out (B, H, T, Ev), lse (B, H, T) fp32 (fp64 for fp64),
// weights (B, H, T, max_len), 0 at hidden positions; the last two empty unless asked for).
// A query with no visible position gives 0 (weights 0) and lse -inf.
// The cache may store fewer bytes than the model's dtype (query's, which key and value
// have): bfloat16 or float16, or int8 with key_scales and value_scales, float (Bc, Hk, C), one
// per stored row (quantize_for_cache's arithmetic); the append rounds or quantizes, the
// attention reads the stored values back (the kernel dequantizes per key block).
FUSEDATTN_API std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_cache_attention(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, at::Tensor& key_cache, at::Tensor& value_cache,
    at::Tensor& lengths, std::optional<double> scale = std::nullopt, bool is_causal = false,
    const std::optional<at::Tensor>& key_padding_mask = std::nullopt, bool enable_gqa = false,
    bool return_lse = false, bool return_weights = false,
    const std::optional<at::Tensor>& key_scales = std::nullopt,
    const std::optional<at::Tensor>& value_scales = std::nullopt);
}  // namespace ops

// The append of kv_cache_attention without the attention: key (B, Hk, T, E) and value
// (B, Hk, T, Ev) written at positions [lengths[b], lengths[b] + T) of the cache's first B rows
// in its stored form, lengths += T (in place). Checked as kv_cache_attention checks them.
// ATen operations on any device; not an op (not traced by torch.compile).
FUSEDATTN_API void kv_cache_append(const at::Tensor& key, const at::Tensor& value,
                                   at::Tensor& key_cache, at::Tensor& value_cache,
                                   at::Tensor& lengths,
                                   const std::optional<at::Tensor>& key_scales = std::nullopt,
                                   const std::optional<at::Tensor>& value_scales = std::nullopt);

// Whether a cache of dtype `storage` can hold a model of dtype `model`: the same dtype, or
// bfloat16, float16 or int8 for a float, bfloat16 or half model.
FUSEDATTN_API bool cache_storage_supported(at::ScalarType storage, at::ScalarType model);
// x (..., F) in the model's dtype -> its stored form (..., F) in `storage` and, for int8, the
// scales (...) float (else undefined): rounded to nearest even for bfloat16/float16; int8 per
// row: scale = max|x| / 127 (fp32), q = round(x / scale), a zero row scale 0, a row with a
// NaN or inf scale NaN (it reads back as NaN). The decode kernel's append computes the same.
FUSEDATTN_API std::pair<at::Tensor, at::Tensor> quantize_for_cache(const at::Tensor& x,
                                                                   at::ScalarType storage);
// The stored rows back in `dtype` (int8: q * scales); the model's dtype stays as it is.
FUSEDATTN_API at::Tensor dequantize_cache(const at::Tensor& stored,
                                          const std::optional<at::Tensor>& scales,
                                          at::ScalarType dtype);

// The argument checks of kv_cache_attention on SymInt sizes (the real and the fake kernels
// run it); lengths' values are checked by the kernels.
FUSEDATTN_API void check_kv_cache_arguments(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, const at::Tensor& key_cache,
    const at::Tensor& value_cache, const at::Tensor& lengths,
    const std::optional<at::Tensor>& key_padding_mask, bool enable_gqa,
    const std::optional<at::Tensor>& key_scales = std::nullopt,
    const std::optional<at::Tensor>& value_scales = std::nullopt);

namespace detail {
// An int8 cache's scales (float (Bc, Hk, C)); none for other storages.
struct CacheScales {
  std::optional<at::Tensor> key, value;
};
// lengths' values, read on the host: every lengths[b] + appended within capacity, none
// negative. Returns the longest length after the append.
int64_t check_kv_cache_lengths(const at::Tensor& lengths, int64_t appended, int64_t capacity);
// The append in ATen operations: key (B, Hk, T, E) and value at positions lengths[b] + t of
// the cache's first B rows, then lengths += T (lengths checked by check_kv_cache_lengths).
// Stored in the cache's form (quantize_for_cache).
void kv_cache_append_aten(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                          at::Tensor& value_cache, at::Tensor& lengths,
                          const CacheScales& scales = {});
// The weights (B, H, T, max_len) of a call from its lse (lengths after the append).
at::Tensor kv_cache_weights(const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& lengths, const at::Tensor& lse,
                            std::optional<double> scale, bool is_causal,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const CacheScales& scales = {});
// The op in ATen operations (any device; the CPU reference for the tests).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_cache_attention_aten(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, at::Tensor& key_cache, at::Tensor& value_cache,
    at::Tensor& lengths, std::optional<double> scale, bool is_causal,
    const std::optional<at::Tensor>& key_padding_mask, bool enable_gqa, bool return_lse,
    bool return_weights, const CacheScales& scales = {});
// Whether a call takes torch's route (ops/route.h): neither lse nor weights asked for, and the
// route setting sends calls on query's device to torch.
bool kv_cache_takes_torch_route(const at::Tensor& query,
                                const std::optional<at::Tensor>& key_padding_mask,
                                bool return_lse, bool return_weights);
// The op on torch's route: the append in ATen operations, then scaled_dot_product_attention
// over the cache's first max(lengths) positions with the visible positions as one (B, 1, T, S)
// mask. lse and weights are not computed (empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_cache_attention_torch(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, at::Tensor& key_cache, at::Tensor& value_cache,
    at::Tensor& lengths, std::optional<double> scale, bool is_causal,
    const std::optional<at::Tensor>& key_padding_mask, bool enable_gqa,
    const CacheScales& scales = {});
}  // namespace detail
}  // namespace fusedattn
