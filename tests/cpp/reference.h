#pragma once
// A direct fp64 implementation of the attention formula, written here (not in the library)
// so the tests compare the library against something it does not share code with.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <limits>
#include <optional>

namespace testing {

inline void require_close(const torch::Tensor& a, const torch::Tensor& b, double tol) {
  REQUIRE(a.sizes() == b.sizes());
  const double err = (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
  INFO("max abs error " << err);
  REQUIRE(err <= tol);
}

struct RefOptions {
  torch::Tensor attn_mask;         // bool True = allowed, or float added
  torch::Tensor key_padding_mask;  // (N, S) bool True = padding
  bool causal = false;
  bool bottom_right = false;
  std::optional<double> scale;
};

// q (N, H, L, E), k/v (N, Hk, S, E|Ev) -> (out, weights) in fp64; all-masked rows give 0.
inline std::pair<torch::Tensor, torch::Tensor> reference_attention(torch::Tensor q, torch::Tensor k,
                                                                   torch::Tensor v,
                                                                   const RefOptions& o = {}) {
  q = q.to(torch::kDouble);
  k = k.to(torch::kDouble);
  v = v.to(torch::kDouble);
  const int64_t H = q.size(1), Hk = k.size(1), L = q.size(2), S = k.size(2);
  if (Hk != H) {
    k = k.repeat_interleave(H / Hk, 1);
    v = v.repeat_interleave(H / Hk, 1);
  }
  const double scale = o.scale.value_or(1.0 / std::sqrt(double(q.size(-1))));
  auto s = torch::matmul(q, k.transpose(-2, -1)) * scale;
  auto allowed = torch::ones({1, 1, L, S}, torch::kBool);
  if (o.attn_mask.defined()) {
    if (o.attn_mask.dtype() == torch::kBool) {
      allowed = allowed & o.attn_mask;
    } else {
      s = s + o.attn_mask.to(torch::kDouble);
    }
  }
  if (o.key_padding_mask.defined()) {
    allowed = allowed & o.key_padding_mask.logical_not().view({-1, 1, 1, S});
  }
  if (o.causal) {
    const int64_t off = o.bottom_right ? S - L : 0;
    auto i = torch::arange(L).view({L, 1}), j = torch::arange(S).view({1, S});
    allowed = allowed & (j <= i + off);
  }
  allowed = allowed.expand_as(s);
  s = s.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  auto p = torch::softmax(s, -1);
  p = torch::where(allowed.any(-1, true), p, torch::zeros_like(p));  // softmax of all -inf is NaN
  return {torch::matmul(p, v), p};
}

}  // namespace testing
