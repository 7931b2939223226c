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
  std::get<0>(m->forward(xq, xk, yk)).sum().backward();
  REQUIRE(m->bandwidth.grad().defined());
  std::stringstream stream;
  torch::save(m, stream);
  fusedattn::GaussianKernelAttention loaded;
  loaded->to(torch::kDouble);  // archives load into parameters of the saved dtype
  torch::load(loaded, stream);
  REQUIRE(loaded->bandwidth.item<double>() == Approx(0.7));
}
