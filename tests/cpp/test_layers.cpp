#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <fusedattn/fusedattn.h>

#include "reference.h"

using testing::require_close;

#include <cmath>
#include <sstream>

TEST_CASE("SelfAttention matches softmax(QK^T / sqrt(d_k)) V with padding", "[layers]") {
  torch::manual_seed(0);
  fusedattn::SelfAttention m(fusedattn::SelfAttentionOptions(6, 4).d_v(5));
  m->to(torch::kDouble);
  auto x = torch::randn({2, 7, 6}, torch::kDouble);
  auto pad = torch::zeros({2, 7}, torch::kBool);
  pad.index_put_({1, torch::indexing::Slice(5)}, true);
  auto [out, w] = m->forward(x, pad);
  auto q = m->q_proj->forward(x), k = m->k_proj->forward(x), v = m->v_proj->forward(x);
  auto s = torch::matmul(q, k.transpose(1, 2)) / 2.0;
  s = s.masked_fill(pad.unsqueeze(1), -INFINITY);
  auto p = torch::softmax(s, -1);
  require_close(out, torch::matmul(p, v), 1e-12);
  require_close(w, p, 1e-12);
  REQUIRE_THROWS_WITH(m->forward(torch::randn({2, 7, 5}, torch::kDouble)), Catch::Contains("in_dim = 6"));
}

TEST_CASE("AttentionPooling: Luong and Bahdanau against the seed's formula", "[layers]") {
  torch::manual_seed(1);
  auto h = torch::randn({3, 5, 4}, torch::kDouble);
  for (std::string score : {"luong", "bahdanau"}) {
    fusedattn::AttentionPooling m(fusedattn::AttentionPoolingOptions(4).units(6).score(score));
    m->to(torch::kDouble);
    auto [out, w] = m->forward(h);
    auto h_t = h.select(1, 4);
    torch::Tensor s;
    if (score == "luong") {
      s = torch::matmul(m->score_proj->forward(h), h_t.unsqueeze(-1)).squeeze(-1);
    } else {
      s = torch::matmul(torch::tanh(m->query_proj->forward(h_t).unsqueeze(1) + m->score_proj->forward(h)),
                        m->score_vector);
    }
    auto p = torch::softmax(s, -1);
    auto ctx = torch::matmul(p.unsqueeze(1), h).squeeze(1);
    require_close(w, p, 1e-12);
    require_close(out, torch::tanh(m->output_proj->forward(torch::cat({ctx, h_t}, -1))), 1e-12);
    REQUIRE(out.sizes() == torch::IntArrayRef({3, 6}));
  }
  REQUIRE_THROWS_WITH(fusedattn::AttentionPooling(fusedattn::AttentionPoolingOptions(4).score("dot")),
                      Catch::Contains("score must be"));
}

TEST_CASE("GaussianKernelAttention is Nadaraya-Watson and learns its bandwidth", "[layers]") {
  fusedattn::GaussianKernelAttention m(fusedattn::GaussianKernelAttentionOptions().bandwidth(0.7));
  auto xq = torch::linspace(0, 5, 9, torch::kDouble), xk = torch::rand({13}, torch::kDouble) * 5;
  auto yk = torch::sin(xk);
  m->to(torch::kDouble);
  auto [out, w] = m->forward(xq, xk, yk, true);
  auto d = xq.unsqueeze(1) - xk.unsqueeze(0);
  const double b = m->bandwidth.item<double>();  // 0.7 as stored (created in fp32)
  auto p = torch::softmax(-d * d / (2 * b * b), -1);
  require_close(w, p, 1e-10);
  require_close(out, torch::matmul(p, yk), 1e-10);
  std::get<0>(m->forward(xq, xk, yk)).sum().backward();  // grad_out expanded: row stride 0
  auto b_ref = torch::full({1}, b, torch::kDouble).requires_grad_();
  torch::matmul(torch::softmax(-d * d / (2 * b_ref * b_ref), -1), yk).sum().backward();
  require_close(m->bandwidth.grad(), b_ref.grad(), 1e-10);
  std::stringstream stream;
  torch::save(m, stream);
  fusedattn::GaussianKernelAttention loaded;
  loaded->to(torch::kDouble);  // archives load into parameters of the saved dtype
  torch::load(loaded, stream);
  REQUIRE(loaded->bandwidth.item<double>() == Approx(0.7));
}

// The seed formula for SelfAttention, written with plain ATen ops on the module's weights.
static torch::Tensor self_attention_formula(fusedattn::SelfAttention& m, const torch::Tensor& x,
                                            const torch::Tensor& pad, bool causal) {
  auto q = m->q_proj->forward(x), k = m->k_proj->forward(x), v = m->v_proj->forward(x);
  auto s = torch::matmul(q, k.transpose(1, 2)) / std::sqrt(double(q.size(-1)));
  s = s.masked_fill(pad.unsqueeze(1), -INFINITY);
  if (causal) s = s.masked_fill(torch::ones({x.size(1), x.size(1)}, torch::kBool).triu(1), -INFINITY);
  return torch::matmul(torch::softmax(s, -1), v);
}

TEST_CASE("SelfAttention and AttentionPooling: gradients, causal, save/load", "[layers]") {
  torch::manual_seed(2);
  auto x = torch::randn({3, 9, 6}, torch::kDouble);
  auto pad = torch::zeros({3, 9}, torch::kBool);
  pad.index_put_({0, torch::indexing::Slice(4)}, true);
  pad.index_put_({2, torch::indexing::Slice(8)}, true);

  fusedattn::SelfAttention sa(fusedattn::SelfAttentionOptions(6, 5).d_v(3));
  sa->to(torch::kDouble);
  for (bool causal : {false, true}) {
    auto xa = x.clone().requires_grad_(), xb = x.clone().requires_grad_();
    auto out = std::get<0>(sa->forward(xa, pad, causal, false));
    auto expected = self_attention_formula(sa, xb, pad, causal);
    require_close(out, expected, 1e-12);
    auto g = torch::randn_like(out);
    auto grads = torch::autograd::grad({out}, {xa, sa->q_proj->weight, sa->v_proj->bias}, {g});
    auto want = torch::autograd::grad({expected}, {xb, sa->q_proj->weight, sa->v_proj->bias}, {g});
    for (size_t i = 0; i < grads.size(); ++i) require_close(grads[i], want[i], 1e-10);
  }
  std::stringstream stream;
  torch::save(sa, stream);
  fusedattn::SelfAttention sa2(fusedattn::SelfAttentionOptions(6, 5).d_v(3));
  sa2->to(torch::kDouble);
  torch::load(sa2, stream);
  REQUIRE(torch::equal(std::get<0>(sa2->forward(x, pad)), std::get<0>(sa->forward(x, pad))));

  // Padding: the query is each row's last valid step, and padded steps get weight 0.
  fusedattn::AttentionPooling pool(fusedattn::AttentionPoolingOptions(6).units(4));
  pool->to(torch::kDouble);
  auto xa = x.clone().requires_grad_();
  auto [out, w] = pool->forward(xa, pad);
  REQUIRE(w.masked_select(pad).abs().max().item<double>() == 0.0);
  for (int64_t n = 0; n < 3; ++n) {
    const int64_t len = (~pad[n]).sum().item<int64_t>();
    auto alone = std::get<0>(pool->forward(x[n].slice(0, 0, len).unsqueeze(0)));
    require_close(out[n].unsqueeze(0), alone, 1e-12);
  }
  out.sum().backward();
  REQUIRE(xa.grad().index({0, torch::indexing::Slice(4)}).abs().max().item<double>() == 0.0);
  REQUIRE(pool->score_proj->weight.grad().abs().sum().item<double>() > 0.0);
  std::stringstream stream2;
  torch::save(pool, stream2);
  fusedattn::AttentionPooling pool2(fusedattn::AttentionPoolingOptions(6).units(4));
  pool2->to(torch::kDouble);
  torch::load(pool2, stream2);
  REQUIRE(torch::equal(std::get<0>(pool2->forward(x, pad)), std::get<0>(pool->forward(x, pad))));
  REQUIRE_THROWS_WITH(pool->forward(x, torch::zeros({3, 8}, torch::kBool)),
                      Catch::Contains("key_padding_mask"));
}
