#include <catch2/catch.hpp>
#include <cstdlib>
#include <limits>
#include <string>
#include <torch/torch.h>

#include <fusedattn/fusedattn.h>

#include "reference.h"

using testing::require_close;

using fusedattn::AttentionOptions;
using testing::reference_attention;
using testing::RefOptions;

namespace {
torch::Tensor randn(std::vector<int64_t> shape, torch::Dtype dtype = torch::kDouble) {
  return torch::randn(shape, torch::TensorOptions().dtype(dtype));
}
}  // namespace

TEST_CASE("attention matches the fp64 formula on odd sizes", "[attention]") {
  torch::manual_seed(0);
  for (auto [L, S] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {7, 33}, {33, 7}, {5, 1}}) {
    auto q = randn({2, 3, L, 5}), k = randn({2, 3, S, 5}), v = randn({2, 3, S, 3});
    auto r = fusedattn::attention(q, k, v, AttentionOptions().return_weights(true).return_lse(true));
    auto [out, w] = reference_attention(q, k, v);
    require_close(r.out, out, 1e-12);
    require_close(*r.weights, w, 1e-12);
    auto s = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(5.0);
    require_close(*r.lse, torch::logsumexp(s, -1), 1e-12);
  }
}

TEST_CASE("sinks join each head's softmax denominator and get a gradient", "[attention][sinks]") {
  torch::manual_seed(5);
  auto q = randn({2, 3, 7, 5}).requires_grad_(), k = randn({2, 3, 9, 5}), v = randn({2, 3, 9, 4});
  auto sinks = randn({3}).requires_grad_();
  auto r = fusedattn::attention(
      q, k, v, AttentionOptions().sinks(sinks).is_causal(true).causal_alignment("bottom_right"));
  // The definition: softmax over [scores, sink_h], the sink's column dropped.
  auto s = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(5.0);
  auto allowed = torch::ones({7, 9}, torch::kBool).tril(2);
  s = s.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  auto with_sink = torch::cat({s, sinks.view({1, 3, 1, 1}).expand({2, 3, 7, 1})}, -1);
  auto p = torch::softmax(with_sink, -1).narrow(-1, 0, 9);
  auto ref = torch::matmul(p, v);
  require_close(r.out, ref, 1e-12);
  auto g = torch::randn_like(ref);
  auto grads = torch::autograd::grad({r.out}, {q, sinks}, {g});
  auto ref_grads = torch::autograd::grad({ref}, {q, sinks}, {g});
  require_close(grads[0], ref_grads[0], 1e-10);
  require_close(grads[1], ref_grads[1], 1e-10);
  CHECK_THROWS_WITH(fusedattn::attention(q, k, v, AttentionOptions().sinks(randn({4}))),
                    Catch::Contains("sinks must have shape (H,) = (3,)"));
}

TEST_CASE("average_weights returns the mean of the heads' weights", "[attention][weights]") {
  torch::manual_seed(3);
  // 130 float32 queries: the fused kernel's per-head loop into one fp32 sum.
  for (auto dtype : {torch::kDouble, torch::kFloat}) {
    auto q = randn({2, 4, 130, 16}, dtype), k = randn({2, 2, 77, 16}, dtype), v = randn({2, 2, 77, 8}, dtype);
    auto pad = torch::rand({2, 77}) > 0.7;
    auto o = AttentionOptions().enable_gqa(true).key_padding_mask(pad).is_causal(true).return_weights(true);
    auto per_head = fusedattn::attention(q, k, v, o);
    auto averaged = fusedattn::attention(q, k, v, o.average_weights(true));
    REQUIRE(averaged.weights->sizes() == torch::IntArrayRef({2, 130, 77}));
    const double tol = dtype == torch::kDouble ? 1e-12 : 1e-6;
    require_close(*averaged.weights, per_head.weights->mean(1), tol);
    require_close(averaged.out, per_head.out, tol);
  }
}

TEST_CASE("attention masks: bool, float, key padding, both causal alignments, GQA", "[attention]") {
  torch::manual_seed(1);
  const int64_t N = 2, H = 4, Hk = 2, L = 6, S = 9;
  auto q = randn({N, H, L, 8}), k = randn({N, Hk, S, 8}), v = randn({N, Hk, S, 8});
  auto bool_mask = torch::rand({L, S}) > 0.3;
  auto float_mask = randn({N, 1, L, S});
  auto kpm = torch::zeros({N, S}, torch::kBool);
  kpm.index_put_({0, torch::indexing::Slice(5)}, true);
  for (bool causal : {false, true}) {
    for (bool bottom_right : {false, true}) {
      auto r = fusedattn::attention(q, k, v,
                                    AttentionOptions()
                                        .attn_mask(bool_mask)
                                        .key_padding_mask(kpm)
                                        .is_causal(causal)
                                        .enable_gqa(true)
                                        .causal_alignment(bottom_right ? "bottom_right" : "top_left"));
      RefOptions ro;
      ro.attn_mask = bool_mask;
      ro.key_padding_mask = kpm;
      ro.causal = causal;
      ro.bottom_right = bottom_right;
      require_close(r.out, reference_attention(q, k, v, ro).first, 1e-12);
    }
  }
  auto r = fusedattn::attention(q, k, v, AttentionOptions().attn_mask(float_mask).enable_gqa(true).scale(0.3));
  RefOptions ro;
  ro.attn_mask = float_mask;
  ro.scale = 0.3;
  require_close(r.out, reference_attention(q, k, v, ro).first, 1e-12);
}

TEST_CASE("a query whose keys are all masked gives zeros, never NaN", "[attention]") {
  auto q = randn({1, 1, 3, 4}, torch::kFloat).requires_grad_(), k = randn({1, 1, 5, 4}, torch::kFloat),
       v = randn({1, 1, 5, 4}, torch::kFloat);
  auto mask = torch::ones({3, 5}, torch::kBool);
  mask[1] = false;  // row 1 sees nothing
  auto r = fusedattn::attention(q, k, v, AttentionOptions().attn_mask(mask).return_weights(true));
  REQUIRE_FALSE(r.out.isnan().any().item<bool>());
  REQUIRE(r.out[0][0][1].abs().max().item<float>() == 0.f);
  REQUIRE(r.weights->index({0, 0, 1}).abs().max().item<float>() == 0.f);
  r.out.sum().backward();
  REQUIRE_FALSE(q.grad().isnan().any().item<bool>());
  REQUIRE(q.grad()[0][0][1].abs().max().item<float>() == 0.f);
}

TEST_CASE("attention gradients match autograd through the formula", "[attention][backward]") {
  torch::manual_seed(2);
  auto q = randn({2, 4, 7, 6}).requires_grad_(), k = randn({2, 2, 11, 6}).requires_grad_(),
       v = randn({2, 2, 11, 5}).requires_grad_();
  auto mask = randn({1, 4, 7, 11}).requires_grad_();
  auto r = fusedattn::attention(q, k, v, AttentionOptions().attn_mask(mask).is_causal(true).enable_gqa(true)
                                             .causal_alignment("bottom_right").return_weights(true));
  auto go = randn({2, 4, 7, 5}), gw = randn({2, 4, 7, 11});
  auto grads = torch::autograd::grad({r.out, *r.weights}, {q, k, v, mask}, {go, gw});
  RefOptions ro;
  ro.attn_mask = mask;
  ro.causal = true;
  ro.bottom_right = true;
  auto [out, w] = reference_attention(q, k, v, ro);
  auto expected = torch::autograd::grad({out, w}, {q, k, v, mask}, {go, gw});
  for (size_t i = 0; i < grads.size(); ++i) require_close(grads[i], expected[i], 1e-10);
}

TEST_CASE("attention in float32, bfloat16 and float16 against fp64", "[attention][dtype]") {
  torch::manual_seed(3);
  auto q = randn({1, 2, 17, 16}), k = randn({1, 2, 13, 16}), v = randn({1, 2, 13, 16});
  auto expected = reference_attention(q, k, v).first;
  for (auto [dtype, tol] : std::vector<std::pair<torch::Dtype, double>>{
           {torch::kFloat, 1e-5}, {torch::kBFloat16, 3e-2}, {torch::kHalf, 5e-3}}) {
    auto out = fusedattn::attention(q.to(dtype), k.to(dtype), v.to(dtype)).out;
    REQUIRE(out.dtype() == dtype);
    require_close(out, expected, tol);
  }
}

TEST_CASE("fp32 honours torch's fp32 matmul precision set from C++", "[attention][dtype]") {
  torch::manual_seed(5);
  auto q = randn({1, 2, 150, 32}), k = randn({1, 2, 90, 32}), v = randn({1, 2, 90, 32});
  auto expected = reference_attention(q, k, v).first;
  const auto f = [&] { return fusedattn::attention(q.to(torch::kFloat), k.to(torch::kFloat), v.to(torch::kFloat)).out; };
  const auto highest = f();
  // The portable packed GEMM: the bf16-product path on any avx512_bf16 CPU, not only on AMX.
  const char* before = std::getenv("FUSEDATTN_PACKED_GEMM");
  const std::string previous = before ? before : "";
  ::setenv("FUSEDATTN_PACKED_GEMM", "reference", 1);
  at::globalContext().setFloat32MatmulPrecision("medium");
  const auto medium = f();
  at::globalContext().setFloat32MatmulPrecision("highest");
  if (before) {
    ::setenv("FUSEDATTN_PACKED_GEMM", previous.c_str(), 1);
  } else {
    ::unsetenv("FUSEDATTN_PACKED_GEMM");
  }
  REQUIRE(medium.dtype() == torch::kFloat);
  require_close(highest, expected, 1e-5);
  require_close(medium, expected, 2e-2);  // bf16 products: ~2^-8 of the values
  const auto cap = fusedattn::cpu_capability();
  const double moved = (medium - highest).abs().max().item<double>();
  if (cap == "amx" || cap == "avx512_bf16") {
    REQUIRE(moved > 1e-4);
  } else {
    REQUIRE(moved == 0.0);
  }
}

TEST_CASE("half-precision gradients read O in fp32 from C++ too", "[attention][dtype]") {
  // Peaked rows longer than a backward block, GQA, float key padding: D = rowsum(dO * O) from
  // O rounded to fp16 gave dQ 3.4e-3 of the largest value (11x SDPA's); the autograd keeps O
  // in fp32 for the backward (3.1e-4), and the caller still gets fp16.
  torch::manual_seed(11);
  auto q = randn({2, 2, 3, 44}) * 4, k = randn({2, 1, 700, 44}) * 4, v = randn({2, 1, 700, 130});
  auto pad = randn({2, 700}), grad = randn({2, 2, 3, 130});
  for (auto* t : {&q, &k, &v, &pad, &grad}) *t = t->to(torch::kHalf).to(torch::kDouble);  // the fp16 values
  const auto dq = [&](torch::Dtype dtype) {
    auto qq = q.to(dtype).detach().requires_grad_(), kk = k.to(dtype), vv = v.to(dtype);
    auto r = fusedattn::attention(qq, kk, vv, AttentionOptions().enable_gqa(true).scale(0.845).key_padding_mask(pad.to(dtype)));
    REQUIRE(r.out.dtype() == dtype);
    r.out.backward(grad.to(dtype));
    return qq.grad().to(torch::kDouble);
  };
  const auto exact = dq(torch::kDouble), half = dq(torch::kHalf);
  const double err = (half - exact).abs().max().item<double>() / exact.abs().max().item<double>();
  REQUIRE(err < 1e-3);
  const auto wide = fusedattn::ops::attention_forward(
      q.to(torch::kHalf), k.to(torch::kHalf), v.to(torch::kHalf), {}, {}, {}, 0.0, false, false,
      std::nullopt, true, false, false, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
      /*fp32_out=*/true);
  REQUIRE(std::get<0>(wide).dtype() == torch::kFloat);
}

TEST_CASE("dropout repeats under a seed and keeps the expectation", "[attention][dropout]") {
  auto q = randn({2, 2, 16, 8}), k = randn({2, 2, 16, 8}), v = randn({2, 2, 16, 8});
  torch::manual_seed(7);
  auto a = fusedattn::attention(q, k, v, AttentionOptions().dropout_p(0.3)).out;
  torch::manual_seed(7);
  auto b = fusedattn::attention(q, k, v, AttentionOptions().dropout_p(0.3)).out;
  auto c = fusedattn::attention(q, k, v, AttentionOptions().dropout_p(0.3)).out;
  REQUIRE(torch::equal(a, b));
  REQUIRE_FALSE(torch::equal(a, c));
  // With V = 1 every output is the sum of the kept, rescaled probabilities of its row.
  auto ones = torch::ones({2, 2, 16, 8}, torch::kDouble);
  double mean = 0;
  for (int i = 0; i < 20; ++i) mean += fusedattn::attention(q, k, ones, AttentionOptions().dropout_p(0.3)).out.mean().item<double>();
  REQUIRE(std::abs(mean / 20 - 1.0) < 0.02);
}

TEST_CASE("attention rejects bad input with the argument's name", "[attention][errors]") {
  auto q = randn({2, 4, 5, 8}), k = randn({2, 4, 6, 8}), v = randn({2, 4, 6, 8});
  REQUIRE_THROWS_WITH(fusedattn::attention(q, k, randn({2, 4, 7, 8})),
                      Catch::Contains("value must have shape"));
  REQUIRE_THROWS_WITH(fusedattn::attention(q, randn({2, 4, 6, 7}), v), Catch::Contains("key must have shape"));
  REQUIRE_THROWS_WITH(fusedattn::attention(q, k.to(torch::kFloat), v), Catch::Contains("same dtype"));
  REQUIRE_THROWS_WITH(fusedattn::attention(q, randn({2, 3, 6, 8}), randn({2, 3, 6, 8}),
                                           AttentionOptions().enable_gqa(true)),
                      Catch::Contains("multiple of the number of key/value heads"));
  REQUIRE_THROWS_WITH(fusedattn::attention(q, randn({2, 2, 6, 8}), randn({2, 2, 6, 8})),
                      Catch::Contains("enable_gqa"));
  REQUIRE_THROWS_WITH(
      fusedattn::attention(q, k, v, AttentionOptions().key_padding_mask(torch::zeros({2, 5}, torch::kBool))),
      Catch::Contains("key_padding_mask must have shape (..., S) = [2, 6], got [2, 5]"));
  REQUIRE_THROWS_WITH(fusedattn::attention(q, k, v, AttentionOptions().attn_mask(torch::zeros({5, 5}, torch::kBool))),
                      Catch::Contains("attn_mask must broadcast"));
  REQUIRE_THROWS_WITH(fusedattn::attention(q, k, v, AttentionOptions().attn_mask(torch::zeros({5, 6}, torch::kInt))),
                      Catch::Contains("attn_mask must be bool"));
  REQUIRE_THROWS_WITH(fusedattn::attention(q, k, v, AttentionOptions().causal_alignment("left")),
                      Catch::Contains("causal_alignment"));
  REQUIRE_THROWS_WITH(fusedattn::attention(q, k, v, AttentionOptions().dropout_p(1.5)), Catch::Contains("dropout_p"));
  REQUIRE_THROWS_WITH(fusedattn::attention(randn({5, 8}), randn({5, 8}), randn({5, 8})),
                      Catch::Contains("at least 3 dims"));
}

TEST_CASE("the op is registered for C++ callers that use the dispatcher by name", "[attention][registration]") {
  auto handle = c10::Dispatcher::singleton().findSchema({"fusedattn::attention", ""});
  REQUIRE(handle.has_value());
  REQUIRE(c10::Dispatcher::singleton().findSchema({"fusedattn::multihead_attention", ""}).has_value());
}

TEST_CASE("C++ entry points: degenerate input is an answer or a named error, never a crash",
          "[attention][errors]") {
  using fusedattn::MultiheadAttentionOptions;
  // Zero heads, zero keys, zero queries: empty or zero outputs.
  auto out = fusedattn::attention(randn({2, 0, 5, 8}), randn({2, 0, 7, 8}), randn({2, 0, 7, 4})).out;
  REQUIRE(out.sizes() == torch::IntArrayRef({2, 0, 5, 4}));
  auto no_keys = fusedattn::attention(randn({2, 3, 5, 8}), randn({2, 3, 0, 8}), randn({2, 3, 0, 4}),
                                      AttentionOptions().return_lse(true));
  REQUIRE((no_keys.out == 0).all().item<bool>());
  REQUIRE(no_keys.lse->isneginf().all().item<bool>());
  // A mask on another device than the inputs (it once routed the call to the shape-only kernels).
  REQUIRE_THROWS_WITH(fusedattn::attention(randn({2, 3, 5, 8}), randn({2, 3, 7, 8}), randn({2, 3, 7, 4}),
                                           AttentionOptions().attn_mask(torch::ones(
                                               {5, 7}, torch::TensorOptions().dtype(torch::kBool).device(torch::kMeta)))),
                      Catch::Contains("attn_mask must be on query's device"));
  REQUIRE_THROWS_WITH(fusedattn::attention(randn({2, 3, 5, 0}), randn({2, 3, 7, 0}), randn({2, 3, 7, 4})),
                      Catch::Contains("head dim E"));
  REQUIRE_THROWS_WITH(fusedattn::attention(randn({2, 3, 5, 8}), randn({2, 3, 7, 8}), randn({2, 3, 7, 4}),
                                           AttentionOptions().scale(std::nan(""))),
                      Catch::Contains("scale must be finite"));
  // NaN in, NaN out: no data path hides it.
  auto q = randn({1, 2, 5, 8});
  q[0][1][3][0] = std::nan("");
  auto nan_out = fusedattn::attention(q, randn({1, 2, 7, 8}), randn({1, 2, 7, 4})).out;
  REQUIRE(nan_out[0][1][3].isnan().all().item<bool>());
  REQUIRE_FALSE(nan_out[0][0].isnan().any().item<bool>());

  // Module options checked where the app builds the module.
  REQUIRE_THROWS_WITH(fusedattn::MultiheadAttention(MultiheadAttentionOptions(8, 0)),
                      Catch::Contains("num_heads must be positive"));
  REQUIRE_THROWS_WITH(fusedattn::MultiheadAttention(MultiheadAttentionOptions(8, 2).dropout(1.5)),
                      Catch::Contains("dropout must be in"));
  REQUIRE_THROWS_WITH(fusedattn::MultiheadAttention(MultiheadAttentionOptions(8, 2).kdim(0)),
                      Catch::Contains("kdim and vdim must be positive"));
  REQUIRE_THROWS_WITH(fusedattn::SelfAttention(fusedattn::SelfAttentionOptions(0, 4)), Catch::Contains("must be positive"));
  REQUIRE_THROWS_WITH(fusedattn::GaussianKernelAttention(fusedattn::GaussianKernelAttentionOptions().bandwidth(0.0)),
                      Catch::Contains("bandwidth must be positive"));

  fusedattn::MultiheadAttention m(MultiheadAttentionOptions(8, 2));
  auto x = torch::randn({5, 3, 8});
  // A mask on the meta device, a float64 input to a float32 module: named.
  REQUIRE_THROWS_WITH(m->forward(x, x, x, torch::zeros({3, 5}, torch::TensorOptions().dtype(torch::kBool).device(torch::kMeta))),
                      Catch::Contains("key_padding_mask must be on query's device (cpu), got meta"));
  REQUIRE_THROWS_WITH(m->forward(x.to(torch::kDouble), x.to(torch::kDouble), x.to(torch::kDouble)),
                      Catch::Contains("parameter dtype (Float)"));
  // torch's is_causal hint: a mask that cannot apply is set aside only where torch never reads it.
  auto wrong = torch::zeros({2, 2});
  auto causal = torch::ones({5, 5}, torch::kBool).triu(1);
  auto hinted = std::get<0>(m->forward(x, x, x, {}, /*need_weights=*/false, wrong, true, /*is_causal=*/true));
  require_close(hinted, std::get<0>(m->forward(x, x, x, {}, false, causal)), 1e-6);
  REQUIRE_THROWS_WITH(m->forward(x, x, x, {}, /*need_weights=*/true, wrong, true, true),
                      Catch::Contains("2-D attn_mask must have shape"));
}

TEST_CASE("variants: window, ALiBi and softcap from C++ equal their formulas", "[attention][variants]") {
  const int64_t L = 37, S = 45, H = 3;
  auto q = randn({2, H, L, 16}), k = randn({2, H, S, 16}), v = randn({2, H, S, 8});
  for (int t : {0, 1, 2}) {
    auto q_ = q.clone().requires_grad_(true), k_ = k.clone().requires_grad_(true);
    const int64_t o = S - L;  // bottom-right
    auto rel = torch::arange(S, torch::kLong).unsqueeze(0) - (torch::arange(L, torch::kLong) + o).unsqueeze(1);
    auto slopes = torch::rand({H}, torch::kFloat);
    auto opts = AttentionOptions().causal_alignment("bottom_right");
    // The same attention written as a float mask on the (soft-capped) scores.
    auto scores = torch::matmul(q_, k_.transpose(-1, -2)) / std::sqrt(16.0);
    torch::Tensor bias = torch::zeros({L, S}, torch::kDouble);
    if (t == 0) {
      opts.window({6, 2});
      bias = bias.masked_fill((rel < -6) | (rel > 2), -INFINITY);
    } else if (t == 1) {
      opts.alibi_slopes(slopes);
      bias = -slopes.to(torch::kDouble).view({H, 1, 1}) * rel.abs().to(torch::kDouble);
    } else {
      opts.softcap(2.0);
      scores = 2.0 * torch::tanh(scores / 2.0);
    }
    auto expected = torch::matmul(torch::softmax(scores + bias, -1), v);
    auto got = fusedattn::attention(q_, k_, v, opts).out;
    require_close(got, expected, 1e-10);
    auto g = torch::randn_like(expected);
    auto ge = torch::autograd::grad({expected}, {q_, k_}, {g});
    auto gg = torch::autograd::grad({got}, {q_, k_}, {g});
    require_close(gg[0], ge[0], 1e-9);
    require_close(gg[1], ge[1], 1e-9);
  }
  REQUIRE_THROWS_WITH(fusedattn::attention(q, k, v, AttentionOptions().window({1})),
                      Catch::Contains("window must be (left, right)"));
  REQUIRE_THROWS_WITH(fusedattn::attention(q, k, v, AttentionOptions().softcap(-1.0)),
                      Catch::Contains("softcap must be positive"));
}

TEST_CASE("attention_varlen from C++: each packed sequence is its own attention", "[attention][varlen]") {
  const std::vector<int64_t> lq{4, 0, 9, 1}, lk{6, 3, 9, 2};
  auto offsets = [](const std::vector<int64_t>& l) {
    std::vector<int32_t> o{0};
    for (auto n : l) o.push_back(o.back() + static_cast<int32_t>(n));
    return torch::tensor(o, torch::kInt);
  };
  auto cu_q = offsets(lq), cu_k = offsets(lk);
  auto q = randn({14, 2, 8}), k = randn({20, 2, 8}), v = randn({20, 2, 5});
  auto r = fusedattn::attention_varlen(q, k, v, cu_q, cu_k, 9, 9,
                                       AttentionOptions().is_causal(true).causal_alignment("bottom_right").return_lse(true));
  REQUIRE(r.out.sizes() == torch::IntArrayRef({14, 2, 5}));
  REQUIRE(r.lse->sizes() == torch::IntArrayRef({2, 14}));
  int64_t a = 0, c = 0;
  for (size_t b = 0; b < lq.size(); ++b) {
    auto one = fusedattn::attention(q.narrow(0, a, lq[b]).transpose(0, 1), k.narrow(0, c, lk[b]).transpose(0, 1),
                                    v.narrow(0, c, lk[b]).transpose(0, 1),
                                    AttentionOptions().is_causal(true).causal_alignment("bottom_right")).out;
    if (lq[b] > 0) require_close(r.out.narrow(0, a, lq[b]).transpose(0, 1), one, 1e-12);
    a += lq[b], c += lk[b];
  }
  REQUIRE_THROWS_WITH(fusedattn::attention_varlen(q, k, v, cu_k, cu_q, 9, 9), Catch::Contains("cu_seqlens_q must start at 0"));
}

TEST_CASE("the route: torch's SDPA for what it serves on CUDA, fusedattn's kernels otherwise",
          "[attention][route]") {
  using fusedattn::choose_route;
  using fusedattn::RouteCall;
  using fusedattn::RouteSetting;
  RouteCall cuda;
  cuda.device = c10::DeviceType::CUDA;
  REQUIRE(choose_route(cuda, RouteSetting::Auto).torch);
  REQUIRE_FALSE(choose_route(cuda, RouteSetting::Own).torch);
  RouteCall cpu;  // the CPU runs fusedattn's kernels unless the setting says torch
  REQUIRE_FALSE(choose_route(cpu, RouteSetting::Auto).torch);
  REQUIRE(choose_route(cpu, RouteSetting::Torch).torch);
  auto opted_in = cuda;
  opted_in.own_cuda_kernels = true;
  REQUIRE_FALSE(choose_route(opted_in, RouteSetting::Auto).torch);
  REQUIRE(choose_route(opted_in, RouteSetting::Torch).torch);
  // What torch's op cannot give keeps the call on fusedattn's kernels, with the reason.
  const std::pair<bool RouteCall::*, const char*> kept[] = {
      {&RouteCall::return_weights, "return_weights"}, {&RouteCall::return_lse, "return_lse"},
      {&RouteCall::variants, "window"}, {&RouteCall::sinks, "sinks"},
      {&RouteCall::mask_grad, "requires grad"}};
  for (const auto& [flag, reason] : kept) {
    auto call = cuda;
    call.*flag = true;
    const auto choice = choose_route(call, RouteSetting::Auto);
    REQUIRE_FALSE(choice.torch);
    REQUIRE(std::string(choice.reason).find(reason) != std::string::npos);
  }
}

TEST_CASE("torch's route gives fusedattn's results on CPU tensors", "[attention][route]") {
  torch::manual_seed(0);
  auto q = randn({2, 4, 7, 6}), k = randn({2, 2, 9, 6}), v = randn({2, 2, 9, 3});
  auto kpm = torch::rand({2, 9}) < 0.3;
  kpm.index_put_({torch::indexing::Slice(), 0}, false);
  auto mask = randn({7, 9});
  auto opts = AttentionOptions().attn_mask(mask).key_padding_mask(kpm).is_causal(true)
                  .causal_alignment("bottom_right").enable_gqa(true);
  auto own = fusedattn::attention(q, k, v, opts).out;
  auto routed = fusedattn::detail::attention_torch(q, k, v, mask, kpm, 0.0, true, true,
                                                   std::nullopt, true);
  require_close(routed, own, 1e-12);
}
