#include "fusedattn/modules/kv_cache.h"

#include "fusedattn/ops/kv_cache.h"

#include <tuple>
#include <vector>

namespace fusedattn {
namespace {
std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}
}  // namespace

KVCache::KVCache(int64_t max_batch, int64_t max_len, int64_t num_heads, int64_t head_dim,
                 std::optional<int64_t> value_dim, at::TensorOptions options,
                 std::optional<at::ScalarType> cache_dtype) {
  TORCH_CHECK(max_batch > 0, "KVCache: max_batch must be positive, got ", max_batch);
  TORCH_CHECK(max_len > 0, "KVCache: max_len must be positive, got ", max_len);
  TORCH_CHECK(num_heads > 0, "KVCache: num_heads must be positive, got ", num_heads);
  TORCH_CHECK(head_dim > 0, "KVCache: head_dim must be positive, got ", head_dim);
  const int64_t ev = value_dim.value_or(head_dim);
  TORCH_CHECK(ev > 0, "KVCache: value_dim must be positive, got ", ev);
  TORCH_CHECK(!options.has_dtype() || at::isFloatingType(options.dtype().toScalarType()),
              "KVCache: dtype must be a floating-point dtype, got ", options.dtype());
  const auto model = options.has_dtype() ? options.dtype().toScalarType()
                                          : at::typeMetaToScalarType(at::get_default_dtype());
  const auto storage = cache_dtype.value_or(model);
  TORCH_CHECK(cache_storage_supported(storage, model), "KVCache: cache_dtype must be the model's ",
              "dtype (", model, ") or, for a float, bfloat16 or half model, bfloat16, float16 or ",
              "int8; got ", storage);
  key_cache_ = at::zeros({max_batch, num_heads, max_len, head_dim}, options.dtype(storage));
  value_cache_ = at::zeros({max_batch, num_heads, max_len, ev}, options.dtype(storage));
  if (storage == at::kChar) {
    key_scales_ = at::zeros({max_batch, num_heads, max_len}, options.dtype(at::kFloat));
    value_scales_ = at::zeros({max_batch, num_heads, max_len}, options.dtype(at::kFloat));
  }
  lengths_ = at::zeros({max_batch}, options.dtype(at::kLong));
}

KVCache KVCache::from_tensors(const at::Tensor& keys, const at::Tensor& values,
                              const at::Tensor& lengths, const at::Tensor& key_padding_mask,
                              bool read_only, std::optional<at::ScalarType> cache_dtype) {
  TORCH_CHECK(keys.defined() && values.defined() && keys.dim() == 4 && values.dim() == 4,
              "KVCache::from_tensors: keys and values must be 4-D tensors (B, H, S, E)");
  KVCache c;
  if (cache_dtype && *cache_dtype != keys.scalar_type()) {
    TORCH_CHECK(cache_storage_supported(*cache_dtype, keys.scalar_type()),
                "KVCache::from_tensors: cache_dtype must be the keys' dtype (",
                keys.scalar_type(), ") or, for float, bfloat16 or half keys, bfloat16, float16 ",
                "or int8; got ", *cache_dtype);
    std::tie(c.key_cache_, c.key_scales_) = quantize_for_cache(keys, *cache_dtype);
    std::tie(c.value_cache_, c.value_scales_) = quantize_for_cache(values, *cache_dtype);
  } else {
    c.key_cache_ = keys, c.value_cache_ = values;
  }
  c.lengths_ = lengths.defined()
                   ? lengths
                   : at::full({keys.size(0)}, keys.size(2), keys.options().dtype(at::kLong));
  c.key_padding_mask_ = key_padding_mask;
  c.read_only_ = read_only;
  return c;
}

void KVCache::reset(std::optional<int64_t> batch) {
  const int64_t b = batch.value_or(max_batch());
  TORCH_CHECK(b > 0 && b <= max_batch(), "KVCache::reset: batch must be in [1, max_batch = ",
              max_batch(), "], got ", b);
  lengths_ = at::zeros({b}, lengths_.options());
}

void KVCache::reorder(const at::Tensor& index) {
  TORCH_CHECK(index.defined() && index.dim() == 1 &&
                  (index.scalar_type() == at::kLong || index.scalar_type() == at::kInt),
              "KVCache::reorder: index must be a 1-D int64 or int32 tensor");
  const int64_t n = index.size(0);
  TORCH_CHECK(n <= max_batch() || read_only_, "KVCache::reorder: index has ", n,
              " rows, more than max_batch = ", max_batch());
  const auto idx = index.to(lengths_.device(), at::kLong);
  if (n > 0) {
    const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < batch(), "KVCache::reorder: index values must be in [0, batch = ",
                batch(), "), got ", lo, "..", hi);
  }
  // The rows of the caches and, for int8, of their scales (position dim 2 in both).
  std::vector<at::Tensor*> rows{&key_cache_, &value_cache_};
  if (key_scales_.defined()) rows.insert(rows.end(), {&key_scales_, &value_scales_});
  if (read_only_) {  // a memory: gathered into new tensors, of any batch
    for (auto* t : rows) *t = t->narrow(0, 0, batch()).index_select(0, idx);
  } else {
    // Only the filled positions move (beam search reorders every step).
    const int64_t used = batch() > 0 ? lengths_.max().item<int64_t>() : 0;
    for (auto* t : rows) {
      auto src = t->narrow(0, 0, batch()).narrow(2, 0, used).index_select(0, idx);
      t->narrow(0, 0, n).narrow(2, 0, used).copy_(src);
    }
  }
  if (key_padding_mask_.defined()) key_padding_mask_ = key_padding_mask_.index_select(0, idx);
  lengths_ = lengths_.index_select(0, idx);
}

void KVCache::append(const at::Tensor& key, const at::Tensor& value) {
  TORCH_CHECK(!read_only_, "KVCache: this cache is read-only (a cross-attention memory); "
              "append needs a writable cache");
  kv_cache_append(key, value, key_cache_, value_cache_, lengths_, opt(key_scales_),
                  opt(value_scales_));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> KVCache::attend(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool is_causal,
    const at::Tensor& key_padding_mask, std::optional<double> scale, bool enable_gqa,
    bool return_lse, bool return_weights) {
  TORCH_CHECK(!(key.defined() && read_only_),
              "KVCache: this cache is read-only (a cross-attention memory); attend without key "
              "and value");
  TORCH_CHECK(!(key_padding_mask.defined() && key_padding_mask_.defined()),
              "KVCache: this cache has its own key_padding_mask; pass none");
  const auto& kpm = key_padding_mask.defined() ? key_padding_mask : key_padding_mask_;
  auto [out, lse, weights] = ops::kv_cache_attention(
      query, opt(key), opt(value), key_cache_, value_cache_, lengths_, scale, is_causal,
      opt(kpm), enable_gqa, return_lse, return_weights, opt(key_scales_), opt(value_scales_));
  return {out, return_lse ? lse : at::Tensor(), return_weights ? weights : at::Tensor()};
}

std::ostream& operator<<(std::ostream& stream, const KVCache& c) {
  return stream << "fusedattn::KVCache(batch=" << c.batch() << ", max_batch=" << c.max_batch()
                << ", max_len=" << c.max_len() << ", cache_dtype=" << c.cache_dtype()
                << ", read_only=" << c.read_only() << ")";
}

}  // namespace fusedattn
