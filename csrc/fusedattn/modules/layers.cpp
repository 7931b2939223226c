#include "fusedattn/modules/layers.h"

#include <torch/nn/init.h>

#include "fusedattn/ops/layers.h"

namespace fusedattn {
namespace {
std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}
torch::nn::Linear linear(int64_t in, int64_t out, bool bias) {
  return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias));
}
}  // namespace

// ---------------------------------------------------------------- SelfAttention
SelfAttentionOptions::SelfAttentionOptions(int64_t in_dim, int64_t d_k) : in_dim_(in_dim), d_k_(d_k) {}

SelfAttentionImpl::SelfAttentionImpl(const SelfAttentionOptions& options_)
    : torch::nn::Cloneable<SelfAttentionImpl>("fusedattn::SelfAttention"), options(options_) {
  reset();
}

void SelfAttentionImpl::reset() {
  const auto& o = options;
  const int64_t d_v = o.d_v().value_or(o.d_k());
  TORCH_CHECK(o.in_dim() > 0 && o.d_k() > 0 && d_v > 0,
              "SelfAttention: in_dim, d_k and d_v must be positive, got ", o.in_dim(), ", ",
              o.d_k(), ", ", d_v);
  q_proj = register_module("q_proj", linear(o.in_dim(), o.d_k(), o.bias()));
  k_proj = register_module("k_proj", linear(o.in_dim(), o.d_k(), o.bias()));
  v_proj = register_module("v_proj", linear(o.in_dim(), d_v, o.bias()));
}

std::tuple<at::Tensor, at::Tensor> SelfAttentionImpl::forward(const at::Tensor& x,
                                                              const at::Tensor& key_padding_mask,
                                                              bool is_causal, bool need_weights) {
  auto [out, weights] = ops::self_attention(x, q_proj->weight, opt(q_proj->bias), k_proj->weight,
                                            opt(k_proj->bias), v_proj->weight, opt(v_proj->bias),
                                            opt(key_padding_mask), is_causal, need_weights);
  return {out, need_weights ? weights : at::Tensor()};
}

void SelfAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "fusedattn::SelfAttention(in_dim=" << options.in_dim() << ", d_k=" << options.d_k()
         << ", d_v=" << options.d_v().value_or(options.d_k()) << ", bias=" << options.bias() << ")";
}

// ---------------------------------------------------------------- AttentionPooling
AttentionPoolingOptions::AttentionPoolingOptions(int64_t input_dim) : input_dim_(input_dim) {}

AttentionPoolingImpl::AttentionPoolingImpl(const AttentionPoolingOptions& options_)
    : torch::nn::Cloneable<AttentionPoolingImpl>("fusedattn::AttentionPooling"), options(options_) {
  reset();
}

void AttentionPoolingImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.input_dim() > 0 && o.units() > 0,
              "AttentionPooling: input_dim and units must be positive, got ", o.input_dim(), ", ",
              o.units());
  TORCH_CHECK(o.score() == "luong" || o.score() == "bahdanau",
              "AttentionPooling: score must be \"luong\" or \"bahdanau\", got \"", o.score(), "\"");
  const int64_t D = o.input_dim();
  score_proj = register_module("score_proj", linear(D, D, false));
  if (o.score() == "bahdanau") {
    query_proj = register_module("query_proj", linear(D, D, false));
    score_vector = register_parameter("score_vector", torch::empty({D}));
    torch::NoGradGuard g;
    const double bound = 1.0 / std::sqrt(double(D));
    score_vector.uniform_(-bound, bound);
  }
  output_proj = register_module("output_proj", linear(2 * D, o.units(), false));
}

std::tuple<at::Tensor, at::Tensor> AttentionPoolingImpl::forward(const at::Tensor& h,
                                                                 const at::Tensor& key_padding_mask) {
  return ops::attention_pooling(h, options.score(), score_proj->weight,
                                query_proj ? std::optional<at::Tensor>(query_proj->weight) : std::nullopt,
                                opt(score_vector), output_proj->weight, opt(key_padding_mask));
}

void AttentionPoolingImpl::pretty_print(std::ostream& stream) const {
  stream << "fusedattn::AttentionPooling(input_dim=" << options.input_dim()
         << ", units=" << options.units() << ", score=" << options.score() << ")";
}

// ---------------------------------------------------------------- GaussianKernelAttention
GaussianKernelAttentionImpl::GaussianKernelAttentionImpl(const GaussianKernelAttentionOptions& options_)
    : torch::nn::Cloneable<GaussianKernelAttentionImpl>("fusedattn::GaussianKernelAttention"),
      options(options_) {
  reset();
}

void GaussianKernelAttentionImpl::reset() {
  TORCH_CHECK(options.bandwidth() > 0, "GaussianKernelAttention: bandwidth must be positive, got ",
              options.bandwidth());
  auto b = torch::full({1}, options.bandwidth());
  bandwidth = options.learnable() ? register_parameter("bandwidth", b) : register_buffer("bandwidth", b);
}

std::tuple<at::Tensor, at::Tensor> GaussianKernelAttentionImpl::forward(const at::Tensor& query,
                                                                        const at::Tensor& key,
                                                                        const at::Tensor& value,
                                                                        bool need_weights) {
  auto [out, weights] = ops::gaussian_kernel_attention(query, key, value, bandwidth, need_weights);
  return {out, need_weights ? weights : at::Tensor()};
}

void GaussianKernelAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "fusedattn::GaussianKernelAttention(bandwidth=" << options.bandwidth()
         << ", learnable=" << options.learnable() << ")";
}

}  // namespace fusedattn
