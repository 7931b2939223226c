#include "fusedattn/modules/multihead_attention.h"

#include <torch/nn/init.h>

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
  reset_parameters();
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
      opt(attn_mask), average_attn_weights, is_causal);
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
