// kv_cache_attention: the dispatcher entry, its argument checks, the ATen implementation
// (CUDA without the fused kernel, and the CPU reference) and its autograd kernel.
#include "fusedattn/ops/kv_cache.h"
#include "fusedattn/ops/checks.h"
#include "fusedattn/ops/params.h"
#include "fusedattn/ops/route.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>
#include <string>

namespace fusedattn {

namespace ops {
std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_cache_attention(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, at::Tensor& key_cache, at::Tensor& value_cache,
    at::Tensor& lengths, std::optional<double> scale, bool is_causal,
    const std::optional<at::Tensor>& key_padding_mask, bool enable_gqa, bool return_lse,
    bool return_weights, const std::optional<at::Tensor>& key_scales,
    const std::optional<at::Tensor>& value_scales) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedattn::kv_cache_attention", "")
                       .typed<decltype(kv_cache_attention)>();
  return op.call(query, key, value, key_cache, value_cache, lengths, scale, is_causal,
                 key_padding_mask, enable_gqa, return_lse, return_weights, key_scales,
                 value_scales);
}
}  // namespace ops

bool cache_storage_supported(at::ScalarType storage, at::ScalarType model) {
  if (storage == model) return true;
  const bool small_model = model == at::kFloat || model == at::kBFloat16 || model == at::kHalf;
  return small_model && (storage == at::kBFloat16 || storage == at::kHalf || storage == at::kChar);
}

std::pair<at::Tensor, at::Tensor> quantize_for_cache(const at::Tensor& x, at::ScalarType storage) {
  TORCH_CHECK(cache_storage_supported(storage, x.scalar_type()),
              "quantize_for_cache: a ", x.scalar_type(), " tensor cannot be stored as ", storage,
              " (the cache stores float, bfloat16 or half in bfloat16, float16 or int8)");
  if (storage != at::kChar) return {x.to(storage), at::Tensor()};
  const auto xf = x.to(at::kFloat);
  const auto finite = at::isfinite(xf).all(-1);
  const auto amax = xf.abs().amax(-1);
  // fp32 division by 127, as the kernel; a row with a NaN or inf: scale NaN, q 0.
  auto scale = at::where(finite, amax / 127.0f,
                         at::full({}, std::numeric_limits<float>::quiet_NaN(), amax.options()));
  const auto usable = (scale > 0).unsqueeze(-1);
  auto q = at::where(usable, at::round(xf / scale.unsqueeze(-1)), at::zeros({}, xf.options()));
  return {q.clamp(-127, 127).to(at::kChar), scale};
}

at::Tensor dequantize_cache(const at::Tensor& stored, const std::optional<at::Tensor>& scales,
                            at::ScalarType dtype) {
  if (stored.scalar_type() != at::kChar) return stored.to(dtype);
  TORCH_CHECK(scales.has_value(), "dequantize_cache: an int8 cache needs its scales");
  return (stored.to(at::kFloat) * scales->unsqueeze(-1)).to(dtype);
}

void kv_cache_append(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                     at::Tensor& value_cache, at::Tensor& lengths,
                     const std::optional<at::Tensor>& key_scales,
                     const std::optional<at::Tensor>& value_scales) {
  TORCH_CHECK(key.dim() == 4 && value.dim() == 4,
              "kv_cache_append: key and value must be 4-D (B, Hk, T, E|Ev), got shapes ",
              key.sizes(), " and ", value.sizes());
  // The keys stand in for the queries: one query head per key head, the same head dim.
  check_kv_cache_arguments(key, key, value, key_cache, value_cache, lengths, std::nullopt,
                           /*enable_gqa=*/false, key_scales, value_scales);
  detail::check_kv_cache_lengths(lengths, key.size(2), key_cache.size(2));
  detail::kv_cache_append_aten(key, value, key_cache, value_cache, lengths,
                               detail::CacheScales{key_scales, value_scales});
}

void check_kv_cache_arguments(const at::Tensor& query, const std::optional<at::Tensor>& key,
                              const std::optional<at::Tensor>& value, const at::Tensor& key_cache,
                              const at::Tensor& value_cache, const at::Tensor& lengths,
                              const std::optional<at::Tensor>& key_padding_mask, bool enable_gqa,
                              const std::optional<at::Tensor>& key_scales,
                              const std::optional<at::Tensor>& value_scales) {
  constexpr const char* fn = "kv_cache_attention";
  const auto qs = query.sym_sizes(), kcs = key_cache.sym_sizes(), vcs = value_cache.sym_sizes();
  TORCH_CHECK(query.dim() == 4, fn, ": query must be 4-D (B, H, T, E), got shape ", qs);
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.dim() == 4, fn,
              ": key_cache and value_cache must be 4-D (batch, Hk, max_len, E|Ev), got ", kcs,
              " and ", vcs);
  const auto t = query.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, fn,
              ": query must be float, double, bfloat16 or half, got ", t);
  const auto st = key_cache.scalar_type();
  TORCH_CHECK(value_cache.scalar_type() == st, fn,
              ": key_cache and value_cache must have one dtype, got ", st, " and ",
              value_cache.scalar_type());
  TORCH_CHECK(cache_storage_supported(st, t), fn, ": the cache must have query's dtype (", t,
              ")", t == at::kDouble ? "" : " or store it in bfloat16, float16 or int8",
              ", got ", st);
  if (st == at::kChar) {
    TORCH_CHECK(key_scales.has_value() && value_scales.has_value(), fn,
                ": an int8 cache needs key_scales and value_scales (float, (batch, Hk, max_len))");
    for (const auto& [sc, name] : {std::pair{&*key_scales, "key_scales"}, std::pair{&*value_scales, "value_scales"}}) {
      TORCH_CHECK(sc->scalar_type() == at::kFloat && sc->device() == key_cache.device(), fn,
                  ": ", name, " must be float on the cache's device (", key_cache.device(),
                  "), got ", sc->scalar_type(), " on ", sc->device());
      TORCH_CHECK(sc->dim() == 3, fn, ": ", name, " must be 3-D (batch, Hk, max_len), got ",
                  sc->sym_sizes());
      TORCH_SYM_CHECK(sc->sym_size(0).sym_eq(kcs[0]) & sc->sym_size(1).sym_eq(kcs[1]) &
                          sc->sym_size(2).sym_eq(kcs[2]),
                      fn, ": ", name, " must have the cache's (batch, Hk, max_len) = (", kcs[0],
                      ", ", kcs[1], ", ", kcs[2], "), got ", sc->sym_sizes());
    }
  } else {
    TORCH_CHECK(!key_scales.has_value() && !value_scales.has_value(), fn,
                ": key_scales and value_scales belong to an int8 cache; this one is ", st);
  }
  TORCH_CHECK(key_cache.device() == query.device() && value_cache.device() == query.device() &&
                  lengths.device() == query.device(),
              fn, ": the cache must be on query's device (", query.device(), "), got key_cache ",
              key_cache.device(), ", value_cache ", value_cache.device(), ", lengths ",
              lengths.device());
  // The cache is written in place (no copy can make it contiguous), and the kernels read
  // its rows with a contiguous last dim.
  for (const auto& [t, name] : {std::pair{&key_cache, "key_cache"}, std::pair{&value_cache, "value_cache"}}) {
    TORCH_SYM_CHECK(t->sym_size(-1).sym_le(1) | t->sym_stride(-1).sym_eq(1), fn, ": ", name,
                    " must have a contiguous last dim (stride 1), got strides ", t->sym_strides());
  }
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1, fn,
              ": lengths must be a 1-D int64 tensor (batch,), got ", lengths.scalar_type(), " ",
              lengths.sym_sizes());
  const c10::SymInt& B = qs[0];
  const c10::SymInt& H = qs[1];
  const c10::SymInt& T = qs[2];
  const c10::SymInt& E = qs[3];
  TORCH_SYM_CHECK(lengths.sym_size(0).sym_eq(B), fn, ": query's batch (", B,
                  ") must be the cache's (lengths has ", lengths.sym_size(0), ")");
  TORCH_SYM_CHECK(kcs[0].sym_ge(B) & vcs[0].sym_eq(kcs[0]), fn,
                  ": key_cache and value_cache must hold at least the batch (", B,
                  ") and the same rows, got ", kcs, " and ", vcs);
  TORCH_SYM_CHECK(kcs[1].sym_eq(vcs[1]) & kcs[2].sym_eq(vcs[2]), fn,
                  ": key_cache and value_cache must have the same heads and max_len, got ", kcs,
                  " and ", vcs);
  TORCH_SYM_CHECK(kcs[3].sym_eq(E), fn, ": key_cache's head dim (", kcs[3],
                  ") must be query's (", E, ")");
  const c10::SymInt& Hk = kcs[1];
  TORCH_SYM_CHECK(Hk.sym_gt(0) | H.sym_eq(0), fn, ": the cache must have at least one head");
  if (enable_gqa) {
    TORCH_SYM_CHECK((H % Hk).sym_eq(0), fn, ": with enable_gqa, query's heads (", H,
                    ") must be a multiple of the cache's (", Hk, ")");
  } else {
    TORCH_SYM_CHECK(H.sym_eq(Hk), fn, ": query has ", H, " heads and the cache ", Hk,
                    "; pass enable_gqa=True for grouped-query attention");
  }
  TORCH_CHECK(key.has_value() == value.has_value(), fn,
              ": key and value come together (both to append, neither to attend only)");
  if (key) {
    TORCH_CHECK(key->dim() == 4 && value->dim() == 4, fn,
                ": key and value must be 4-D (B, Hk, T, E|Ev), got ", key->sym_sizes(), " and ",
                value->sym_sizes());
    TORCH_CHECK(key->scalar_type() == t && value->scalar_type() == t, fn,
                ": key and value must have query's dtype (", t, "), got ", key->scalar_type(),
                " and ", value->scalar_type());
    TORCH_CHECK(key->device() == query.device() && value->device() == query.device(), fn,
                ": key and value must be on query's device (", query.device(), ")");
    const auto ks = key->sym_sizes(), vs = value->sym_sizes();
    TORCH_SYM_CHECK(ks[0].sym_eq(B) & ks[1].sym_eq(Hk) & ks[2].sym_eq(T) & ks[3].sym_eq(E), fn,
                    ": key must have shape (B, Hk, T, E) = (", B, ", ", Hk, ", ", T, ", ", E,
                    "), got ", ks);
    TORCH_SYM_CHECK(vs[0].sym_eq(B) & vs[1].sym_eq(Hk) & vs[2].sym_eq(T) & vs[3].sym_eq(vcs[3]),
                    fn, ": value must have shape (B, Hk, T, Ev) = (", B, ", ", Hk, ", ", T, ", ",
                    vcs[3], "), got ", vs);
  }
  if (key_padding_mask) {
    const auto& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == t, fn,
                ": key_padding_mask must be bool or have query's dtype (", t, "), got ",
                m.scalar_type());
    TORCH_CHECK(m.device() == query.device(), fn, ": key_padding_mask must be on query's device (",
                query.device(), "), got ", m.device());
    TORCH_CHECK(m.dim() == 2, fn, ": key_padding_mask must be 2-D (B, K) over the cache's first K ",
                "positions, got ", m.sym_sizes());
    TORCH_SYM_CHECK(m.sym_size(0).sym_eq(B) & m.sym_size(1).sym_le(kcs[2]), fn,
                    ": key_padding_mask must have shape (B, K) with B = ", B, " and K <= max_len = ",
                    kcs[2], ", got ", m.sym_sizes());
  }
}

namespace detail {

int64_t check_kv_cache_lengths(const at::Tensor& lengths, int64_t appended, int64_t capacity) {
  const auto host = lengths.cpu();
  const int64_t* len = host.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < host.numel(); ++b) {
    TORCH_CHECK(len[b] >= 0, "kv_cache_attention: lengths[", b, "] = ", len[b],
                " is negative");
    TORCH_CHECK(len[b] + appended <= capacity, "kv_cache_attention: the cache is full: sequence ",
                b, " has ", len[b], " cached positions, ",
                appended > 0 ? "appending " + std::to_string(appended) + " would exceed"
                             : std::string("more than"),
                " max_len = ", capacity);
    longest = std::max(longest, len[b] + appended);
  }
  return longest;
}

// The visibility of the cache's first S positions to the queries: hidden (B, 1, T, S) bool,
// True past lengths[b] (after the append), after a causal query's position, and where a bool
// key padding mask pads; a float key padding mask as padding (B, 1, 1, S) in its own dtype,
// else undefined.
struct CacheVisibility {
  at::Tensor hidden, padding;
};
CacheVisibility cache_visibility(const at::Tensor& lengths, int64_t T, int64_t S, bool is_causal,
                                 const std::optional<at::Tensor>& key_padding_mask) {
  const int64_t B = lengths.size(0);
  const auto long_opts = lengths.options();
  auto j = at::arange(S, long_opts).view({1, 1, 1, S});
  auto len = lengths.view({B, 1, 1, 1});
  CacheVisibility v;
  v.hidden = j >= len;
  if (is_causal) v.hidden = v.hidden | (j > len - T + at::arange(T, long_opts).view({1, 1, T, 1}));
  if (key_padding_mask && key_padding_mask->size(1) > 0 && S > 0) {
    const int64_t K = std::min<int64_t>(key_padding_mask->size(1), S);
    auto m = key_padding_mask->narrow(1, 0, K);
    if (K < S) {
      const at::Scalar fill = m.scalar_type() == at::kBool ? at::Scalar(false) : at::Scalar(0.0);
      m = at::cat({m, at::full({B, S - K}, fill, m.options())}, 1);
    }
    m = m.view({B, 1, 1, S});
    if (m.scalar_type() == at::kBool) {
      v.hidden = v.hidden | m;
    } else {
      v.padding = m;
    }
  }
  return v;
}

// Scaled scores of the queries against the cache's first S positions, (B, H, T, S) in the
// accumulate type, -inf where a position is hidden (cache_visibility); a float key padding
// mask added. lengths: after the append.
// The cache's first S positions of the batch's B rows in `dtype` (dequantized).
at::Tensor cache_rows(const at::Tensor& cache, const std::optional<at::Tensor>& scales, int64_t B,
                      int64_t S, at::ScalarType dtype) {
  std::optional<at::Tensor> sc;
  if (scales) sc = scales->narrow(0, 0, B).narrow(2, 0, S);
  return dequantize_cache(cache.narrow(0, 0, B).narrow(2, 0, S), sc, dtype);
}

at::Tensor visible_scores(const at::Tensor& query, const at::Tensor& key_cache,
                          const std::optional<at::Tensor>& key_scales, const at::Tensor& lengths,
                          int64_t S, double scale, bool is_causal,
                          const std::optional<at::Tensor>& key_padding_mask) {
  const int64_t B = query.size(0), H = query.size(1), T = query.size(2);
  const auto acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto k = cache_rows(key_cache, key_scales, B, S, acc);
  if (H != k.size(1)) k = k.repeat_interleave(H / k.size(1), 1);
  auto scores = at::matmul(query.to(acc), k.transpose(-2, -1)).mul_(scale);  // (B, H, T, S)
  const auto vis = cache_visibility(lengths, T, S, is_causal, key_padding_mask);
  if (vis.padding.defined()) scores = scores + vis.padding.to(acc);
  return scores.masked_fill_(vis.hidden, -std::numeric_limits<double>::infinity());
}

double scale_of(std::optional<double> scale, const at::Tensor& query) {
  check_scale(scale, query.scalar_type(), "kv_cache_attention");
  return scale ? *scale : 1.0 / std::sqrt(static_cast<double>(query.size(3)));
}

at::Tensor kv_cache_weights(const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& lengths, const at::Tensor& lse,
                            std::optional<double> scale, bool is_causal,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const CacheScales& scales) {
  auto scores = visible_scores(query, key_cache, scales.key, lengths, key_cache.size(2),
                               scale_of(scale, query), is_causal, key_padding_mask);
  // A row with no visible position (lse -inf) has weights 0, not NaN.
  auto sub = lse.masked_fill(lse.isneginf(), 0).unsqueeze(-1);
  return at::exp(scores - sub).to(query.scalar_type());
}

void kv_cache_append_aten(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                          at::Tensor& value_cache, at::Tensor& lengths,
                          const CacheScales& scales) {
  const int64_t B = key.size(0), Hk = key.size(1), T = key.size(2);
  // Positions lengths[b] + t, as scatter indices along the cache's position dim.
  auto pos = (lengths.unsqueeze(1) + at::arange(T, lengths.options())).view({B, 1, T, 1});
  auto [k, k_scale] = quantize_for_cache(key, key_cache.scalar_type());
  auto [v, v_scale] = quantize_for_cache(value, value_cache.scalar_type());
  key_cache.narrow(0, 0, B).scatter_(2, pos.expand({B, Hk, T, key.size(3)}), k);
  value_cache.narrow(0, 0, B).scatter_(2, pos.expand({B, Hk, T, value.size(3)}), v);
  if (k_scale.defined()) {
    auto at_pos = pos.squeeze(-1).expand({B, Hk, T});
    scales.key->narrow(0, 0, B).scatter_(2, at_pos, k_scale);
    scales.value->narrow(0, 0, B).scatter_(2, at_pos, v_scale);
  }
  lengths.add_(T);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_cache_attention_aten(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, at::Tensor& key_cache, at::Tensor& value_cache,
    at::Tensor& lengths, std::optional<double> scale, bool is_causal,
    const std::optional<at::Tensor>& key_padding_mask, bool enable_gqa, bool return_lse,
    bool return_weights, const CacheScales& scales) {
  check_kv_cache_arguments(query, key, value, key_cache, value_cache, lengths, key_padding_mask,
                           enable_gqa, scales.key, scales.value);
  const int64_t B = query.size(0), H = query.size(1), T = query.size(2);
  const int64_t Hk = key_cache.size(1);
  const int64_t longest = check_kv_cache_lengths(lengths, key ? T : 0, key_cache.size(2));
  if (key) kv_cache_append_aten(*key, *value, key_cache, value_cache, lengths, scales);
  const auto acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto scores = visible_scores(query, key_cache, scales.key, lengths, longest,
                               scale_of(scale, query), is_causal, key_padding_mask);
  auto lse = at::logsumexp(scores, -1);  // -inf where no position is visible
  auto probs = at::exp(scores - lse.masked_fill(lse.isneginf(), 0).unsqueeze(-1));
  auto v = cache_rows(value_cache, scales.value, B, longest, acc);
  if (H != Hk) v = v.repeat_interleave(H / Hk, 1);
  auto out = at::matmul(probs, v).to(query.scalar_type());
  auto weights = return_weights ? kv_cache_weights(query, key_cache, lengths, lse, scale,
                                                   is_causal, key_padding_mask, scales)
                                : at::empty({0}, query.options());
  return {out, return_lse ? lse : at::empty({0}, query.options().dtype(acc)), weights};
}

bool kv_cache_takes_torch_route(const at::Tensor& query,
                                const std::optional<at::Tensor>& key_padding_mask,
                                bool return_lse, bool return_weights) {
  return attention_route(query, std::nullopt, key_padding_mask, return_weights, return_lse, false,
                         false)
      .torch;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_cache_attention_torch(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, at::Tensor& key_cache, at::Tensor& value_cache,
    at::Tensor& lengths, std::optional<double> scale, bool is_causal,
    const std::optional<at::Tensor>& key_padding_mask, bool enable_gqa,
    const CacheScales& scales) {
  check_kv_cache_arguments(query, key, value, key_cache, value_cache, lengths, key_padding_mask,
                           enable_gqa, scales.key, scales.value);
  const int64_t B = query.size(0), T = query.size(2);
  scale_of(scale, query);  // checks a given scale before the cache changes
  const int64_t longest = check_kv_cache_lengths(lengths, key ? T : 0, key_cache.size(2));
  if (key) kv_cache_append_aten(*key, *value, key_cache, value_cache, lengths, scales);
  // lse and weights are not asked for on this route: two distinct empty tensors (outputs of
  // an op must not alias each other, and .to() of a tensor already in that dtype is itself).
  const auto none_lse = [&] {
    return at::empty({0}, query.options().dtype(accumulate_type(query.scalar_type())));
  };
  const auto none_weights = [&] { return at::empty({0}, query.options()); };
  if (longest == 0) {  // nothing visible: every query gives 0
    return {at::zeros({B, query.size(1), T, value_cache.size(3)}, query.options()), none_lse(),
            none_weights()};
  }
  // The visible positions as one mask: bool (True = visible), or the float padding with -inf
  // where hidden.
  const int64_t S = longest;
  const auto vis = cache_visibility(lengths, T, S, is_causal, key_padding_mask);
  const auto mask =
      vis.padding.defined()
          ? at::where(vis.hidden, at::scalar_tensor(-std::numeric_limits<double>::infinity(),
                                                    vis.padding.options()),
                      vis.padding)
          : vis.hidden.logical_not();
  // A cache stored in fewer bytes is dequantized here (torch's kernels read the model's dtype).
  auto k = cache_rows(key_cache, scales.key, B, S, query.scalar_type());
  auto v = cache_rows(value_cache, scales.value, B, S, query.scalar_type());
  auto out = at::scaled_dot_product_attention(query, k, v, mask, 0.0, false, scale, enable_gqa);
  return {out, none_lse(), none_weights()};
}

}  // namespace detail

namespace {

// Decoding has no gradient: outputs that would need one get a node whose backward says so
// (rather than outputs silently detached from the graph). The results computed below
// autograd come in a struct, which the Function does not take for one of its inputs.
struct CacheResults {
  at::Tensor out, lse, weights;
};
class NoGradThroughCache : public torch::autograd::Function<NoGradThroughCache> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& query,
                                                const std::optional<at::Tensor>& key,
                                                const std::optional<at::Tensor>& value,
                                                const std::optional<at::Tensor>& kpm,
                                                CacheResults results) {
    ctx->mark_non_differentiable({results.lse});
    return {results.out, results.lse, results.weights};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list) {
    TORCH_CHECK(false, "kv_cache_attention: gradients through a KV cache are not supported "
                "(decoding is inference); run the decode steps under torch.no_grad() or "
                "torch.inference_mode(), or train with the full causal forward");
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_cache_attention_autograd(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, at::Tensor& key_cache, at::Tensor& value_cache,
    at::Tensor& lengths, std::optional<double> scale, bool is_causal,
    const std::optional<at::Tensor>& key_padding_mask, bool enable_gqa, bool return_lse,
    bool return_weights, const std::optional<at::Tensor>& key_scales,
    const std::optional<at::Tensor>& value_scales) {
  auto wants = [](const std::optional<at::Tensor>& t) { return t && t->requires_grad(); };
  const bool grad = at::GradMode::is_enabled() &&
                    (query.requires_grad() || wants(key) || wants(value) || wants(key_padding_mask));
  std::tuple<at::Tensor, at::Tensor, at::Tensor> r;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    r = ops::kv_cache_attention(query, key, value, key_cache, value_cache, lengths, scale,
                                is_causal, key_padding_mask, enable_gqa, return_lse,
                                return_weights, key_scales, value_scales);
  }
  // The in-place writes, as autograd's own in-place ops record them.
  if (key) {
    key_cache.unsafeGetTensorImpl()->bump_version();
    value_cache.unsafeGetTensorImpl()->bump_version();
    lengths.unsafeGetTensorImpl()->bump_version();
    for (const auto* sc : {&key_scales, &value_scales}) {
      if (sc->has_value()) (*sc)->unsafeGetTensorImpl()->bump_version();
    }
  }
  if (!grad) return r;
  auto outs = NoGradThroughCache::apply(query, key, value, key_padding_mask,
                                        CacheResults{std::get<0>(r), std::get<1>(r), std::get<2>(r)});
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, Autograd, m) {
  m.impl("kv_cache_attention", &kv_cache_attention_autograd);
}

}  // namespace fusedattn
