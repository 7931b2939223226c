#pragma once
// The single-head attention layers, as LibTorch modules over the ops in ops/layers.h:
// SelfAttention (scaled dot-product self-attention with its own projections),
// AttentionPooling (many-to-one attention pooling), GaussianKernelAttention
// (Nadaraya-Watson weights).
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <string>
#include <tuple>

#include "fusedattn/macros.h"

namespace fusedattn {

struct FUSEDATTN_API SelfAttentionOptions {
  SelfAttentionOptions(int64_t in_dim, int64_t d_k);
  TORCH_ARG(int64_t, in_dim);
  TORCH_ARG(int64_t, d_k);                              // query/key size
  TORCH_ARG(std::optional<int64_t>, d_v) = std::nullopt;  // value/output size, default d_k
  TORCH_ARG(bool, bias) = true;
};

// Single-head scaled dot-product self-attention with its own Q/K/V projections.
class FUSEDATTN_API SelfAttentionImpl : public torch::nn::Cloneable<SelfAttentionImpl> {
 public:
  SelfAttentionImpl(int64_t in_dim, int64_t d_k) : SelfAttentionImpl(SelfAttentionOptions(in_dim, d_k)) {}
  explicit SelfAttentionImpl(const SelfAttentionOptions& options);
  // x (N, T, in_dim) or (T, in_dim); key_padding_mask (N, T) bool True = padding.
  // -> (out (N, T, d_v), weights (N, T, T); undefined unless need_weights)
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x,
                                             const at::Tensor& key_padding_mask = {},
                                             bool is_causal = false, bool need_weights = true);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  SelfAttentionOptions options;
  torch::nn::Linear q_proj = nullptr, k_proj = nullptr, v_proj = nullptr;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(at::Tensor())}, {2, torch::nn::AnyValue(false)},
                           {3, torch::nn::AnyValue(true)})
};
TORCH_MODULE(SelfAttention);

struct FUSEDATTN_API AttentionPoolingOptions {
  explicit AttentionPoolingOptions(int64_t input_dim);
  TORCH_ARG(int64_t, input_dim);
  TORCH_ARG(int64_t, units) = 128;
  TORCH_ARG(std::string, score) = "luong";  // or "bahdanau"
};

// Many-to-one attention: the last step queries every step; out = tanh(W_c [context; h_t]).
class FUSEDATTN_API AttentionPoolingImpl : public torch::nn::Cloneable<AttentionPoolingImpl> {
 public:
  explicit AttentionPoolingImpl(int64_t input_dim) : AttentionPoolingImpl(AttentionPoolingOptions(input_dim)) {}
  explicit AttentionPoolingImpl(const AttentionPoolingOptions& options);
  // h (N, T, input_dim); key_padding_mask (N, T) bool True = padding (then the query is the
  // last step that is not padding). -> (out (N, units), weights (N, T))
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& h, const at::Tensor& key_padding_mask = {});
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  AttentionPoolingOptions options;
  torch::nn::Linear score_proj = nullptr;   // W (luong) or W2 (bahdanau): input_dim -> input_dim
  torch::nn::Linear query_proj = nullptr;   // W1 (bahdanau only)
  at::Tensor score_vector;                  // v (bahdanau only), (input_dim)
  torch::nn::Linear output_proj = nullptr;  // W_c: 2 * input_dim -> units

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(at::Tensor())})
};
TORCH_MODULE(AttentionPooling);

struct FUSEDATTN_API GaussianKernelAttentionOptions {
  TORCH_ARG(double, bandwidth) = 1.0;
  TORCH_ARG(bool, learnable) = true;  // bandwidth a parameter (else a buffer)
};

// Nadaraya-Watson kernel regression: softmax_j(-|q_i - k_j|^2 / (2 bandwidth^2)) v_j.
class FUSEDATTN_API GaussianKernelAttentionImpl
    : public torch::nn::Cloneable<GaussianKernelAttentionImpl> {
 public:
  explicit GaussianKernelAttentionImpl(const GaussianKernelAttentionOptions& options = {});
  // query (..., L, D) / key (..., S, D) / value (..., S, Dv), or 1-D points (L), (S), (S).
  // -> (out, weights (..., L, S); undefined unless need_weights)
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& query, const at::Tensor& key,
                                             const at::Tensor& value, bool need_weights = false);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  GaussianKernelAttentionOptions options;
  at::Tensor bandwidth;  // one element

 protected:
  FORWARD_HAS_DEFAULT_ARGS({3, torch::nn::AnyValue(false)})
};
TORCH_MODULE(GaussianKernelAttention);

}  // namespace fusedattn
