#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <fusedattn/fusedattn.h>

#include "reference.h"

using testing::require_close;

#include <sstream>

namespace {

// torch's own C++ MultiheadAttention with our parameters copied in: the reference.
torch::nn::MultiheadAttention torch_twin(fusedattn::MultiheadAttention& ours, bool add_bias_kv,
                                         bool add_zero_attn, int64_t kdim, int64_t vdim) {
  const auto& o = ours->options;
  torch::nn::MultiheadAttention ref(torch::nn::MultiheadAttentionOptions(o.embed_dim(), o.num_heads())
                                        .bias(o.bias())
                                        .add_bias_kv(add_bias_kv)
                                        .add_zero_attn(add_zero_attn)
                                        .kdim(kdim)
                                        .vdim(vdim));
  ref->to(torch::kDouble);
  torch::NoGradGuard g;
  auto theirs = ref->named_parameters();
  for (const auto& p : ours->named_parameters()) {
    REQUIRE(theirs.contains(p.key()));
    theirs[p.key()].copy_(p.value());
  }
  REQUIRE(theirs.size() == ours->named_parameters().size());
  return ref;
}

}  // namespace

TEST_CASE("MultiheadAttention matches torch::nn::MultiheadAttention", "[mha]") {
  struct Case { bool bias, bias_kv, zero_attn; int64_t kdim, vdim; };
  for (auto c : std::vector<Case>{{true, false, false, 12, 12}, {false, false, false, 12, 12},
                                  {true, true, true, 12, 12}, {true, false, false, 5, 5},
                                  {true, true, false, 6, 6}}) {  // torch C++ needs kdim == vdim
    INFO("bias " << c.bias << " add_bias_kv " << c.bias_kv << " add_zero_attn " << c.zero_attn
                 << " kdim " << c.kdim << " vdim " << c.vdim);
    torch::manual_seed(0);
    fusedattn::MultiheadAttention ours(fusedattn::MultiheadAttentionOptions(12, 3)
                                           .bias(c.bias).add_bias_kv(c.bias_kv).add_zero_attn(c.zero_attn)
                                           .kdim(c.kdim).vdim(c.vdim));
    ours->to(torch::kDouble);
    auto ref = torch_twin(ours, c.bias_kv, c.zero_attn, c.kdim, c.vdim);
    auto q = torch::randn({7, 2, 12}, torch::kDouble).requires_grad_();
    auto k = torch::randn({9, 2, c.kdim}, torch::kDouble);
    auto v = torch::randn({9, 2, c.vdim}, torch::kDouble);
    auto kpm = torch::zeros({2, 9}, torch::kBool);
    kpm.index_put_({1, torch::indexing::Slice(6)}, true);
    // torch's C++ functional adds attn_mask to the scores whatever its dtype (a bool mask
    // would add 1), so the twin gets the float form of a random mask.
    auto mask = torch::zeros({7, 9}, torch::kDouble)
                    .masked_fill(torch::rand({7, 9}) > 0.8, -std::numeric_limits<double>::infinity());
    auto [y, w] = ours->forward(q, k, v, kpm, true, mask, false);
    auto [y_ref, w_ref] = ref->forward(q, k, v, kpm, true, mask, false);
    require_close(y, y_ref, 1e-12);
    require_close(w, w_ref, 1e-12);
    auto g = torch::autograd::grad({y}, {q}, {torch::ones_like(y)})[0];
    auto g_ref = torch::autograd::grad({y_ref}, {q}, {torch::ones_like(y_ref)})[0];
    require_close(g, g_ref, 1e-12);
  }
}

// Self-attention (one tensor three times) and attention to a memory (key is value) take
// the CPU's projected op: q|k|v, or q and k|v, read in place, gradients written whole.
TEST_CASE("MultiheadAttention: self- and memory attention, values and gradients", "[mha]") {
  torch::manual_seed(0);
  fusedattn::MultiheadAttention ours(fusedattn::MultiheadAttentionOptions(12, 3));
  ours->to(torch::kDouble);
  auto ref = torch_twin(ours, false, false, 12, 12);
  auto x = torch::randn({7, 2, 12}, torch::kDouble).requires_grad_();
  auto mem = torch::randn({9, 2, 12}, torch::kDouble).requires_grad_();
  for (bool self : {true, false}) {
    INFO("self " << self);
    const auto& kv = self ? x : mem;
    auto kpm = torch::zeros({2, kv.size(0)}, torch::kBool);
    kpm.index_put_({1, torch::indexing::Slice(5)}, true);
    auto [y, w] = ours->forward(x, kv, kv, kpm, true, {}, true);
    auto [y_ref, w_ref] = ref->forward(x, kv, kv, kpm, true, {}, true);
    require_close(y, y_ref, 1e-12);
    require_close(w, w_ref, 1e-12);
    auto g_out = torch::randn_like(y);
    std::vector<torch::Tensor> leaves = {x, mem, ours->in_proj_weight, ours->out_proj->weight};
    std::vector<torch::Tensor> ref_leaves = {x, mem, ref->in_proj_weight, ref->out_proj->weight};
    auto g = torch::autograd::grad({y}, leaves, {g_out}, std::nullopt, false, true);
    auto g_ref = torch::autograd::grad({y_ref}, ref_leaves, {g_out}, std::nullopt, false, true);
    for (size_t i = 0; i < g.size(); ++i) {
      INFO("leaf " << i);
      REQUIRE(g[i].defined() == g_ref[i].defined());
      if (g[i].defined()) require_close(g[i], g_ref[i], 1e-12);
    }
  }
}

void copy_parameters(torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard g;
  auto dst = to.named_parameters();
  for (const auto& p : from.named_parameters()) dst[p.key()].copy_(p.value());
}

TEST_CASE("MultiheadAttention: batch_first, unbatched, averaged weights, 3-D float masks", "[mha]") {
  torch::manual_seed(1);
  fusedattn::MultiheadAttention seq_first(fusedattn::MultiheadAttentionOptions(8, 2));
  fusedattn::MultiheadAttention batch_first(fusedattn::MultiheadAttentionOptions(8, 2).batch_first(true));
  copy_parameters(*seq_first, *batch_first);
  auto x = torch::randn({5, 3, 8});
  auto mask = torch::randn({3 * 2, 5, 5});
  auto [a, wa] = seq_first->forward(x, x, x, {}, true, mask);
  auto [b, wb] = batch_first->forward(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), {}, true, mask);
  require_close(a, b.transpose(0, 1), 1e-6);
  require_close(wa, wb, 1e-6);
  REQUIRE(wa.sizes() == torch::IntArrayRef({3, 5, 5}));
  auto [u, wu] = seq_first->forward(x.select(1, 0), x.select(1, 0), x.select(1, 0), {}, true, {}, false);
  auto [full, wfull] = seq_first->forward(x, x, x, {}, true, {}, false);
  require_close(u, full.select(1, 0), 1e-6);
  REQUIRE(wu.sizes() == torch::IntArrayRef({2, 5, 5}));
  auto [y, none] = seq_first->forward(x, x, x, {}, /*need_weights=*/false);
  REQUIRE_FALSE(none.defined());
}

TEST_CASE("MultiheadAttention: is_causal alone, and with attn_mask", "[mha]") {
  torch::manual_seed(2);
  fusedattn::MultiheadAttention m(fusedattn::MultiheadAttentionOptions(8, 2));
  auto x = torch::randn({6, 2, 8});
  auto causal = torch::triu(torch::ones({6, 6}, torch::kBool), 1);  // True = not allowed
  auto [a, wa] = m->forward(x, x, x, {}, true, {}, true, /*is_causal=*/true);
  auto [b, wb] = m->forward(x, x, x, {}, true, causal);
  auto [c, wc] = m->forward(x, x, x, {}, true, causal, true, true);
  require_close(a, b, 1e-6);
  require_close(c, b, 1e-6);
  REQUIRE(wa.triu(1).abs().max().item<float>() == 0.f);
}

TEST_CASE("MultiheadAttention: head_dim independent of embed_dim", "[mha]") {
  fusedattn::MultiheadAttention m(fusedattn::MultiheadAttentionOptions(10, 3).head_dim(4));
  REQUIRE(m->in_proj_weight.sizes() == torch::IntArrayRef({36, 10}));
  REQUIRE(m->out_proj->weight.sizes() == torch::IntArrayRef({10, 12}));
  auto x = torch::randn({4, 2, 10});
  auto [y, w] = m->forward(x, x, x);
  REQUIRE(y.sizes() == x.sizes());
  REQUIRE_THROWS_WITH(fusedattn::MultiheadAttention(fusedattn::MultiheadAttentionOptions(10, 3)),
                      Catch::Contains("embed_dim (10) must be divisible by num_heads (3)"));
}

TEST_CASE("MultiheadAttention: dropout only in training", "[mha][dropout]") {
  torch::manual_seed(3);
  fusedattn::MultiheadAttention m(fusedattn::MultiheadAttentionOptions(8, 2).dropout(0.5));
  auto x = torch::randn({6, 2, 8});
  m->eval();
  auto [a, wa] = m->forward(x, x, x);
  auto [b, wb] = m->forward(x, x, x);
  REQUIRE(torch::equal(a, b));
  m->train();
  auto [c, wc] = m->forward(x, x, x);
  REQUIRE_FALSE(torch::allclose(a, c));
}

TEST_CASE("MultiheadAttention: save/load and clone", "[mha][serialize]") {
  torch::manual_seed(4);
  fusedattn::MultiheadAttention m(fusedattn::MultiheadAttentionOptions(8, 2).add_bias_kv(true));
  std::stringstream stream;
  torch::save(m, stream);
  fusedattn::MultiheadAttention loaded(fusedattn::MultiheadAttentionOptions(8, 2).add_bias_kv(true));
  torch::load(loaded, stream);
  auto x = torch::randn({3, 2, 8});
  require_close(std::get<0>(m->forward(x, x, x)), std::get<0>(loaded->forward(x, x, x)), 0);

  auto copy = std::dynamic_pointer_cast<fusedattn::MultiheadAttentionImpl>(m->clone());
  REQUIRE(copy);
  require_close(std::get<0>(copy->forward(x, x, x)), std::get<0>(m->forward(x, x, x)), 0);
  {
    torch::NoGradGuard g;
    copy->in_proj_weight.zero_();
  }
  REQUIRE(m->in_proj_weight.abs().sum().item<float>() > 0);
}

TEST_CASE("MultiheadAttention rejects bad input with the argument's name", "[mha][errors]") {
  fusedattn::MultiheadAttention m(fusedattn::MultiheadAttentionOptions(8, 2));
  auto x = torch::randn({5, 3, 8});
  REQUIRE_THROWS_WITH(m->forward(torch::randn({5, 3, 7}), x, x), Catch::Contains("embed_dim = 8"));
  REQUIRE_THROWS_WITH(m->forward(x, torch::randn({5, 2, 8}), torch::randn({5, 2, 8})),
                      Catch::Contains("same batch size"));
  REQUIRE_THROWS_WITH(m->forward(x, x, torch::randn({4, 3, 8})), Catch::Contains("same sequence length"));
  REQUIRE_THROWS_WITH(m->forward(x, x, x, torch::zeros({3, 4}, torch::kBool)),
                      Catch::Contains("key_padding_mask must have shape (N, S) = (3, 5)"));
  REQUIRE_THROWS_WITH(m->forward(x, x, x, {}, true, torch::zeros({5, 4}, torch::kBool)),
                      Catch::Contains("attn_mask must have shape (L, S) = (5, 5)"));
  REQUIRE_THROWS_WITH(m->forward(x, x, x, {}, true, torch::zeros({5, 5}, torch::kInt)),
                      Catch::Contains("only bool and float attn_mask"));
  REQUIRE_THROWS_WITH(m->forward(torch::randn({8}), x, x), Catch::Contains("query must be 3-D"));
  REQUIRE_THROWS_WITH(m->forward(x, x, x.to(torch::kDouble)), Catch::Contains("same dtype"));
}

TEST_CASE("MultiheadAttention: the variants as options (window, ALiBi, rel_bias, softcap)", "[mha][variants]") {
  auto o = fusedattn::MultiheadAttentionOptions(16, 4).batch_first(true).window({4, 1}).alibi(true)
               .max_relative_distance(3).softcap(5.0);
  fusedattn::MultiheadAttention m(o);
  auto params = m->named_parameters();
  REQUIRE(params.contains("rel_bias"));
  REQUIRE(params["rel_bias"].sizes() == torch::IntArrayRef({4, 7}));
  REQUIRE(m->named_buffers().contains("alibi_slopes"));
  require_close(m->alibi_slopes, torch::tensor({0.25f, 0.0625f, 0.015625f, 0.00390625f}), 1e-7);
  auto x = torch::randn({2, 9, 16});
  auto out = std::get<0>(m->forward(x, x, x, {}, /*need_weights=*/false));
  out.sum().backward();
  REQUIRE(m->rel_bias.grad().abs().sum().item<float>() > 0);
  // The same module without the options gives another result; with them, save/load keeps it.
  std::stringstream buf;
  torch::save(m, buf);
  fusedattn::MultiheadAttention loaded(o);
  torch::load(loaded, buf);
  require_close(std::get<0>(loaded->forward(x, x, x, {}, false)), out.detach(), 1e-6);
  REQUIRE_THROWS_WITH(fusedattn::MultiheadAttention(fusedattn::MultiheadAttentionOptions(8, 2).window({1})),
                      Catch::Contains("window must be {left, right}"));
}

TEST_CASE("MultiheadAttention: decoding through a KVCache equals the full causal forward", "[mha][kv_cache]") {
  torch::manual_seed(0);
  fusedattn::MultiheadAttention m(fusedattn::MultiheadAttentionOptions(24, 3).batch_first(true));
  m->eval();
  torch::NoGradGuard g;
  const int64_t N = 3, L = 9;
  auto x = torch::randn({N, L, 24});
  auto [full, wfull] = m->forward(x, x, x, {}, true, {}, true, /*is_causal=*/true);
  auto cache = m->kv_cache(N + 1, 16);  // room for a grown batch of beams
  cache.reset(N);
  std::vector<at::Tensor> outs, ws;
  for (int64_t t = 0; t < L; t += 2) {  // chunks of 2 new tokens (and one of 1)
    auto step = x.narrow(1, t, std::min<int64_t>(2, L - t));
    auto [o, w] = m->forward_cached(step, step, step, cache, {}, true, true, /*is_causal=*/true);
    outs.push_back(o);
    ws.push_back(w);
  }
  require_close(torch::cat(outs, 1), full, 1e-5);
  require_close(torch::cat(ws, 1).narrow(2, 0, L), wfull, 1e-5);
  REQUIRE(cache.lengths().equal(torch::full({N}, L, torch::kLong)));

  // Beam search: rows kept, duplicated and the batch grown, then one more token.
  auto index = torch::tensor({2, 0, 0, 1}, torch::kLong);
  cache.reorder(index);
  REQUIRE(cache.batch() == 4);
  auto y = torch::randn({4, 1, 24});
  auto got = std::get<0>(m->forward_cached(y, y, y, cache, {}, false, true, true));
  auto hist = torch::cat({x.index_select(0, index), y}, 1);
  auto want = std::get<0>(m->forward(hist, hist, hist, {}, false, {}, true, true)).narrow(1, L, 1);
  require_close(got, want, 1e-5);

  // Cross-attention: the memory projected once.
  auto enc = torch::randn({N, 7, 24});
  auto kpm = torch::zeros({N, 7}, torch::kBool);
  kpm.index_put_({1, torch::indexing::Slice(4)}, true);
  auto memory = m->memory_cache(enc, kpm);
  auto q = torch::randn({N, 4, 24});
  auto [a, wa] = m->forward(q, enc, enc, kpm);
  auto [b, wb] = m->forward_cached(q, {}, {}, memory);
  require_close(b, a, 1e-5);
  require_close(wb, wa, 1e-6);

  // Misuse, named.
  REQUIRE_THROWS_WITH(m->forward_cached(q, q, q, memory), Catch::Contains("read-only"));
  auto small = m->kv_cache(N, 2);
  REQUIRE_THROWS_WITH(m->forward_cached(q, q, q, small), Catch::Contains("cache is full"));
  REQUIRE_THROWS_WITH(cache.reorder(torch::tensor({7}, torch::kLong)), Catch::Contains("index values"));
  REQUIRE_THROWS_WITH(fusedattn::KVCache(1, 0, 2, 8), Catch::Contains("max_len must be positive"));
  auto q2 = torch::randn({2, 1, 24});
  REQUIRE_THROWS_WITH(m->forward_cached(q2, q2, q2, cache), Catch::Contains("query's batch"));
}

TEST_CASE("MultiheadAttention: a KVCache stored in bfloat16 or int8 decodes near the full cache", "[mha][kv_cache]") {
  torch::manual_seed(0);
  fusedattn::MultiheadAttention m(fusedattn::MultiheadAttentionOptions(32, 2).batch_first(true));
  m->eval();
  torch::NoGradGuard g;
  const int64_t N = 2, L = 12;
  auto x = torch::randn({N, L, 32});
  auto full = m->kv_cache(N + 1, 16);
  full.reset(N);
  std::vector<at::Tensor> want;
  for (int64_t t = 0; t < L; ++t) {
    auto step = x.narrow(1, t, 1);
    want.push_back(std::get<0>(m->forward_cached(step, step, step, full, {}, false, true, true)));
  }
  const auto reference = torch::cat(want, 1);
  for (const auto [storage, tol] : {std::pair{torch::kBFloat16, 4e-3}, std::pair{torch::kChar, 1e-2}}) {
    auto cache = m->kv_cache(N + 1, 16, storage);
    cache.reset(N);
    REQUIRE(cache.cache_dtype() == storage);
    REQUIRE(cache.key_scales().defined() == (storage == torch::kChar));
    std::vector<at::Tensor> outs;
    for (int64_t t = 0; t < L; ++t) {
      auto step = x.narrow(1, t, 1);
      outs.push_back(std::get<0>(m->forward_cached(step, step, step, cache, {}, false, true, true)));
    }
    auto got = torch::cat(outs, 1);
    const double rel = ((got - reference).norm(2, {-1}) / reference.norm(2, {-1})).max().item<double>();
    REQUIRE(rel < tol);
    // Beams reorder the stored rows and int8's scales with them.
    auto index = torch::tensor({1, 1, 0}, torch::kLong);
    cache.reorder(index);
    auto y = torch::randn({3, 1, 32});
    auto a = std::get<0>(m->forward_cached(y, y, y, cache, {}, false, true, true));
    auto hist = torch::cat({x.index_select(0, index), y}, 1);
    auto b = std::get<0>(m->forward(hist, hist, hist, {}, false, {}, true, true)).narrow(1, L, 1);
    REQUIRE(((a - b).norm(2, {-1}) / b.norm(2, {-1})).max().item<double>() < tol);
    // A cross-attention memory in the same storage.
    auto enc = torch::randn({N, 5, 32});
    auto memory = m->memory_cache(enc, {}, storage);
    REQUIRE(memory.cache_dtype() == storage);
    auto mq = torch::randn({N, 3, 32});
    auto c = std::get<0>(m->forward_cached(mq, {}, {}, memory, {}, false));
    auto d = std::get<0>(m->forward(mq, enc, enc, {}, false));
    REQUIRE(((c - d).norm(2, {-1}) / d.norm(2, {-1})).max().item<double>() < tol);
  }
  REQUIRE_THROWS_WITH(m->kv_cache(1, 4, torch::kInt), Catch::Contains("cache_dtype must be the model's"));
}

TEST_CASE("KVCache: append stores as the attention's own append does", "[kv_cache]") {
  torch::manual_seed(5);
  torch::NoGradGuard g;
  const int64_t B = 2, Hk = 2, E = 8;
  auto q = torch::randn({B, 2 * Hk, 3, E}), k = torch::randn({B, Hk, 3, E}), v = torch::randn({B, Hk, 3, E});
  for (const auto storage : {torch::kFloat, torch::kBFloat16, torch::kChar}) {
    fusedattn::KVCache fused(B, 8, Hk, E, std::nullopt, torch::kFloat, storage);
    fusedattn::KVCache split(B, 8, Hk, E, std::nullopt, torch::kFloat, storage);
    auto want = std::get<0>(fused.attend(q, k, v, true, {}, std::nullopt, true));
    split.append(k, v);
    REQUIRE(torch::equal(split.lengths(), torch::full({B}, 3, torch::kLong)));
    REQUIRE(torch::equal(split.key_cache(), fused.key_cache()));
    REQUIRE(torch::equal(split.value_cache(), fused.value_cache()));
    auto got = std::get<0>(split.attend(q, {}, {}, true, {}, std::nullopt, true));
    REQUIRE(torch::equal(got, want));
  }
  fusedattn::KVCache small(B, 2, Hk, E);
  REQUIRE_THROWS_WITH(small.append(k, v), Catch::Contains("the cache is full"));
}

TEST_CASE("MultiheadAttention: packed sequences (forward_packed) equal each sequence alone", "[mha][varlen]") {
  torch::manual_seed(3);
  fusedattn::MultiheadAttention m(fusedattn::MultiheadAttentionOptions(12, 3).window({4, 0}));
  m->to(torch::kDouble);
  const std::vector<int32_t> lengths{5, 0, 13, 1};
  std::vector<int32_t> o{0};
  for (auto n : lengths) o.push_back(o.back() + n);
  const auto cu = torch::tensor(o, torch::kInt);
  auto x = torch::randn({o.back(), 12}, torch::kDouble).requires_grad_();
  auto out = m->forward_packed(x, x, x, cu, -1, {}, -1, /*is_causal=*/true);
  REQUIRE(out.sizes() == torch::IntArrayRef({o.back(), 12}));
  out.sum().backward();
  auto xr = x.detach().clone().requires_grad_();
  for (size_t b = 0; b < lengths.size(); ++b) {
    if (lengths[b] == 0) continue;
    auto xb = xr.narrow(0, o[b], lengths[b]).unsqueeze(1);  // (L, 1, E): sequence first
    auto [ob, wb] = m->forward(xb, xb, xb, {}, false, {}, true, /*is_causal=*/true);
    require_close(out.narrow(0, o[b], lengths[b]), ob.squeeze(1), 1e-12);
    ob.sum().backward();
  }
  require_close(x.grad(), xr.grad(), 1e-12);
  REQUIRE_THROWS_WITH(m->forward_packed(x.unsqueeze(0), x.unsqueeze(0), x.unsqueeze(0), cu),
                      Catch::Contains("2-D query"));
}
