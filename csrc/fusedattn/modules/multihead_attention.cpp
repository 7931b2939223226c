#include "fusedattn/modules/multihead_attention.h"

#include <torch/nn/init.h>
#include <torch/types.h>

#include <cmath>
#include <vector>

#include "fusedattn/ops/multihead_attention.h"

namespace fusedattn {
namespace {
std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}
}  // namespace

MultiheadAttentionOptions::MultiheadAttentionOptions(int64_t embed_dim, int64_t num_heads)
    : embed_dim_(embed_dim), num_heads_(num_heads), kdim_(embed_dim), vdim_(embed_dim) {}

MultiheadAttentionImpl::MultiheadAttentionImpl(const MultiheadAttentionOptions& options_)
    : torch::nn::Cloneable<MultiheadAttentionImpl>("fusedattn::MultiheadAttention"),
      options(options_) {
  reset();
}

int64_t MultiheadAttentionImpl::head_dim() const {
  return options.head_dim().value_or(options.embed_dim() / options.num_heads());
}

bool MultiheadAttentionImpl::qkv_same_embed_dim() const {
  return options.kdim() == options.embed_dim() && options.vdim() == options.embed_dim();
}

void MultiheadAttentionImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.embed_dim() > 0, "MultiheadAttention: embed_dim must be positive, got ", o.embed_dim());
  TORCH_CHECK(o.num_heads() > 0, "MultiheadAttention: num_heads must be positive, got ", o.num_heads());
  TORCH_CHECK(o.kdim() > 0 && o.vdim() > 0, "MultiheadAttention: kdim and vdim must be positive, got ",
              o.kdim(), " and ", o.vdim());
  TORCH_CHECK(o.dropout() >= 0.0 && o.dropout() <= 1.0,
              "MultiheadAttention: dropout must be in [0, 1], got ", o.dropout());
  if (o.head_dim()) {
    TORCH_CHECK(*o.head_dim() > 0, "MultiheadAttention: head_dim must be positive, got ", *o.head_dim());
  } else {
    TORCH_CHECK(o.embed_dim() % o.num_heads() == 0, "MultiheadAttention: embed_dim (", o.embed_dim(),
                ") must be divisible by num_heads (", o.num_heads(),
                "), or pass head_dim to choose the per-head size");
  }
  const int64_t inner = o.num_heads() * head_dim();

  // Creation order and initialisation follow torch.nn.MultiheadAttention exactly, so the same
  // seed gives the same parameters.
  if (qkv_same_embed_dim()) {
    in_proj_weight = register_parameter("in_proj_weight", torch::empty({3 * inner, o.embed_dim()}));
  } else {
    q_proj_weight = register_parameter("q_proj_weight", torch::empty({inner, o.embed_dim()}));
    k_proj_weight = register_parameter("k_proj_weight", torch::empty({inner, o.kdim()}));
    v_proj_weight = register_parameter("v_proj_weight", torch::empty({inner, o.vdim()}));
  }
  if (o.bias()) in_proj_bias = register_parameter("in_proj_bias", torch::empty({3 * inner}));
  out_proj = register_module(
      "out_proj", torch::nn::Linear(torch::nn::LinearOptions(inner, o.embed_dim()).bias(o.bias())));
  if (o.add_bias_kv()) {
    bias_k = register_parameter("bias_k", torch::empty({1, 1, inner}));
    bias_v = register_parameter("bias_v", torch::empty({1, 1, inner}));
  }
  // The variants' state, after torch's parameters (their order and draws stay torch's).
  TORCH_CHECK(o.window().empty() || (o.window().size() == 2 && o.window()[0] >= -1 && o.window()[1] >= -1),
              "MultiheadAttention: window must be {left, right}, each >= 0 or -1 for unbounded");
  TORCH_CHECK(!o.softcap() || *o.softcap() > 0, "MultiheadAttention: softcap must be positive");
  if (o.alibi()) alibi_slopes = register_buffer("alibi_slopes", fusedattn::alibi_slopes(o.num_heads()));
  if (o.max_relative_distance()) {
    TORCH_CHECK(*o.max_relative_distance() >= 0,
                "MultiheadAttention: max_relative_distance must be >= 0, got ", *o.max_relative_distance());
    rel_bias = register_parameter(
        "rel_bias", torch::zeros({o.num_heads(), 2 * *o.max_relative_distance() + 1}));
  }
  if (o.sinks()) sinks = register_parameter("sinks", torch::zeros({o.num_heads()}));
  reset_parameters();
}

at::Tensor alibi_slopes(int64_t n) {
  auto geometric = [](int64_t m) {  // 2^(-8 i / m), i = 1..m
    std::vector<float> s(m);
    for (int64_t i = 0; i < m; ++i) s[i] = std::pow(2.0f, -8.0f * float(i + 1) / float(m));
    return s;
  };
  int64_t pow2 = 1;
  while (pow2 * 2 <= n) pow2 *= 2;
  auto s = geometric(pow2);
  if (pow2 < n) {
    const auto above = geometric(2 * pow2);
    for (int64_t i = 0; int64_t(s.size()) < n; i += 2) s.push_back(above[i]);
  }
  return torch::tensor(s, torch::kFloat);
}

void MultiheadAttentionImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  namespace init = torch::nn::init;
  if (in_proj_weight.defined()) {
    init::xavier_uniform_(in_proj_weight);
  } else {
    init::xavier_uniform_(q_proj_weight);
    init::xavier_uniform_(k_proj_weight);
    init::xavier_uniform_(v_proj_weight);
  }
  if (in_proj_bias.defined()) {
    init::constant_(in_proj_bias, 0.0);
    init::constant_(out_proj->bias, 0.0);
  }
  if (bias_k.defined()) init::xavier_normal_(bias_k);
  if (bias_v.defined()) init::xavier_normal_(bias_v);
}

std::tuple<at::Tensor, at::Tensor> MultiheadAttentionImpl::forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& key_padding_mask, bool need_weights, const at::Tensor& attn_mask,
    bool average_attn_weights, bool is_causal) {
  auto [out, weights] = ops::multihead_attention(
      query, key, value, options.num_heads(), opt(in_proj_weight), opt(in_proj_bias),
      opt(q_proj_weight), opt(k_proj_weight), opt(v_proj_weight), opt(bias_k), opt(bias_v),
      options.add_zero_attn(), is_training() ? options.dropout() : 0.0, out_proj->weight,
      opt(out_proj->bias), options.batch_first(), opt(key_padding_mask), need_weights,
      opt(attn_mask), average_attn_weights, is_causal,
      options.window().empty() ? at::OptionalIntArrayRef() : at::OptionalIntArrayRef(options.window()),
      opt(alibi_slopes), options.softcap(), opt(rel_bias), opt(sinks));
  return {out, need_weights ? weights : at::Tensor()};
}

at::Tensor MultiheadAttentionImpl::forward_packed(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value,
                                                  const at::Tensor& cu_seqlens,
                                                  int64_t max_seqlen,
                                                  const at::Tensor& cu_seqlens_k,
                                                  int64_t max_seqlen_k, bool is_causal) {
  TORCH_CHECK(!bias_k.defined() && !options.add_zero_attn(),
              "MultiheadAttention: packed sequences (cu_seqlens) do not take add_bias_kv or "
              "add_zero_attn");
  const bool own_k = cu_seqlens_k.defined();
  const auto& cu_k = own_k ? cu_seqlens_k : cu_seqlens;
  // A negative max_seqlen: read off the offsets.
  auto longest = [](const at::Tensor& cu, int64_t given) -> int64_t {
    if (given >= 0) return given;
    return cu.numel() > 1 ? cu.diff().max().item<int64_t>() : 0;
  };
  return ops::multihead_attention_varlen(
      query, key, value, options.num_heads(), opt(in_proj_weight), opt(in_proj_bias),
      opt(q_proj_weight), opt(k_proj_weight), opt(v_proj_weight),
      is_training() ? options.dropout() : 0.0, out_proj->weight, opt(out_proj->bias), cu_seqlens,
      cu_k, longest(cu_seqlens, max_seqlen),
      longest(cu_k, max_seqlen_k >= 0 || own_k ? max_seqlen_k : max_seqlen), is_causal,
      options.window().empty() ? at::OptionalIntArrayRef() : at::OptionalIntArrayRef(options.window()),
      opt(alibi_slopes), options.softcap(), opt(rel_bias), opt(sinks));
}

void MultiheadAttentionImpl::check_cacheable() const {
  TORCH_CHECK(!bias_k.defined() && !options.add_zero_attn(),
              "MultiheadAttention: a KV cache does not take add_bias_kv or add_zero_attn");
  TORCH_CHECK(options.window().empty() && !alibi_slopes.defined() && !options.softcap() &&
                  !rel_bias.defined() && !sinks.defined(),
              "MultiheadAttention: a KV cache does not take the variants (window, alibi, "
              "max_relative_distance, softcap) or sinks");
}

KVCache MultiheadAttentionImpl::kv_cache(int64_t max_batch, int64_t max_len,
                                        std::optional<at::ScalarType> cache_dtype) {
  return KVCache(max_batch, max_len, options.num_heads(), head_dim(), head_dim(),
                 out_proj->weight.options().requires_grad(false), cache_dtype);
}

KVCache MultiheadAttentionImpl::memory_cache(const at::Tensor& memory,
                                            const at::Tensor& key_padding_mask,
                                            std::optional<at::ScalarType> cache_dtype) {
  check_cacheable();
  auto [q, k, v] = ops::multihead_attention_in_projection(
      std::nullopt, memory, memory, options.num_heads(), opt(in_proj_weight), opt(in_proj_bias),
      opt(q_proj_weight), opt(k_proj_weight), opt(v_proj_weight), options.batch_first());
  const auto kpm = key_padding_mask.defined() && memory.dim() == 2 ? key_padding_mask.unsqueeze(0)
                                                                  : key_padding_mask;
  return KVCache::from_tensors(k, v, at::Tensor(), kpm, /*read_only=*/true, cache_dtype);
}

std::tuple<at::Tensor, at::Tensor> MultiheadAttentionImpl::forward_cached(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, KVCache& cache,
    const at::Tensor& key_padding_mask, bool need_weights, bool average_attn_weights,
    bool is_causal) {
  check_cacheable();
  TORCH_CHECK(!(is_training() && options.dropout() > 0),
              "MultiheadAttention: a KV cache decodes without dropout; call eval() (or build "
              "the module with dropout 0)");
  auto [out, weights] = ops::multihead_attention_cached(
      query, opt(key), opt(value), cache.key_cache(), cache.value_cache(), cache.lengths(),
      options.num_heads(), opt(in_proj_weight), opt(in_proj_bias), opt(q_proj_weight),
      opt(k_proj_weight), opt(v_proj_weight), out_proj->weight, opt(out_proj->bias),
      options.batch_first(), opt(key_padding_mask), need_weights, average_attn_weights,
      is_causal, cache.read_only(), opt(cache.key_padding_mask()), opt(cache.key_scales()),
      opt(cache.value_scales()));
  return {out, need_weights ? weights : at::Tensor()};
}

void MultiheadAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "fusedattn::MultiheadAttention(embed_dim=" << options.embed_dim()
         << ", num_heads=" << options.num_heads() << ", head_dim=" << head_dim()
         << ", dropout=" << options.dropout() << ", bias=" << options.bias()
         << ", add_bias_kv=" << options.add_bias_kv() << ", add_zero_attn=" << options.add_zero_attn()
         << ", kdim=" << options.kdim() << ", vdim=" << options.vdim()
         << ", batch_first=" << options.batch_first() << ")";
}

}  // namespace fusedattn
