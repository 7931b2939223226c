#include "fusedattn/ops/reference.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>

#include <array>
#include <limits>

#include "fusedattn/kernels/common/dropout.h"

namespace fusedattn::reference {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// (..., Hk, S, D) -> (..., H, S, D): query head h reads key/value head h / (H / Hk).
at::Tensor expand_kv_heads(const AttentionProblem& p, const at::Tensor& t) {
  if (p.kv_heads == p.heads) return t;
  const int64_t group = p.heads / p.kv_heads;
  auto shape = t.sizes().vec();
  auto grouped = shape;
  grouped.insert(grouped.end() - 2, group);  // (..., Hk, G, S, D)
  shape[shape.size() - 3] = p.heads;
  return t.unsqueeze(-3).expand(grouped).reshape(shape);
}

// (..., H, S, D) -> (..., Hk, S, D): the gradient of expand_kv_heads.
at::Tensor reduce_kv_heads(const AttentionProblem& p, const at::Tensor& t) {
  if (p.kv_heads == p.heads) return t;
  auto shape = t.sizes().vec();
  shape[shape.size() - 3] = p.kv_heads;
  shape.insert(shape.end() - 2, p.heads / p.kv_heads);
  return t.reshape(shape).sum(-3);
}

// (L, S) relative positions j - (i + o) of key j to query i's diagonal (o: 0 top-left,
// S - L bottom-right), int64 on `device`.
at::Tensor relative_positions(const AttentionProblem& p, bool bottom_right, c10::Device device) {
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  const int64_t offset = bottom_right ? p.kv_len - p.q_len : 0;
  return at::arange(p.kv_len, opts).unsqueeze(0) - (at::arange(p.q_len, opts) + offset).unsqueeze(1);
}

// rel_bias's table entry of each (query, key): (L, S) int64.
at::Tensor rel_bias_index(const ScoreMods& mods, const at::Tensor& rel) {
  return rel.clamp(-mods.rel_max, mods.rel_max) + mods.rel_max;
}
// rel_bias gathered per (head, query, key): (H, L, S).
at::Tensor rel_bias_scores(const ScoreMods& mods, const at::Tensor& rel) {
  const auto idx = rel_bias_index(mods, rel);
  return mods.rel_bias.index_select(1, idx.flatten()).view({mods.rel_bias.size(0), rel.size(0), rel.size(1)});
}

// Scaled scores with every variant and mask applied: (..., H, L, S) in the accumulate type,
// in the op's order: soft-capped scores, + ALiBi, + float masks; then bool masks, key
// padding, causal and the window remove keys. cap_grad (optional): soft-capping's derivative
// 1 - tanh^2 per score.
at::Tensor masked_scores(const AttentionParams& params, const at::Tensor& q, const at::Tensor& k,
                         at::Tensor* cap_grad = nullptr) {
  const AttentionProblem& p = params.problem;
  const ScoreMods& mods = params.mods;
  const auto &attn_mask = params.attn_mask, &key_padding_mask = params.key_padding_mask;
  const bool bottom_right = params.bottom_right;
  auto s = at::matmul(q, k.transpose(-2, -1)).mul_(p.scale);
  if (mods.softcap > 0) {
    auto t = at::tanh(s / mods.softcap);
    if (cap_grad) *cap_grad = 1 - t * t;
    s = t.mul_(mods.softcap);
  }
  at::Tensor rel;
  if (mods.alibi.defined() || mods.windowed() || mods.rel_bias.defined())
    rel = relative_positions(p, bottom_right, s.device());
  if (mods.alibi.defined()) {
    auto shape = p.batch;
    shape.insert(shape.end(), {p.heads, 1, 1});
    auto slopes = mods.alibi.reshape(shape).to(s.scalar_type());
    s = s - slopes * rel.abs().to(s.scalar_type());
  }
  if (mods.rel_bias.defined()) s = s + rel_bias_scores(mods, rel).to(s.scalar_type());
  if (attn_mask) {
    if (attn_mask->scalar_type() == at::kBool) {
      s.masked_fill_(attn_mask->logical_not(), kNegInf);
    } else {
      s.add_(attn_mask->to(s.scalar_type()));
    }
  }
  if (key_padding_mask) {
    auto shape = p.batch;
    shape.insert(shape.end(), {1, 1, p.kv_len});
    auto kpm = key_padding_mask->reshape(shape);
    if (kpm.scalar_type() == at::kBool) {
      s.masked_fill_(kpm, kNegInf);
    } else {
      s.add_(kpm.to(s.scalar_type()));
    }
  }
  if (params.is_causal) {
    auto opts = at::TensorOptions().dtype(at::kLong).device(s.device());
    const int64_t offset = bottom_right ? p.kv_len - p.q_len : 0;
    auto row = at::arange(p.q_len, opts).unsqueeze(1);
    auto col = at::arange(p.kv_len, opts).unsqueeze(0);
    s.masked_fill_(col > row + offset, kNegInf);
  }
  if (mods.window_left >= 0) s.masked_fill_(rel < -mods.window_left, kNegInf);
  if (mods.window_right >= 0) s.masked_fill_(rel > mods.window_right, kNegInf);
  return s;
}

// softmax rows from the scores and their log-sum-exp; a row with lse = -inf (every key
// masked) gives zeros instead of exp(-inf - -inf) = NaN.
at::Tensor probabilities(const at::Tensor& scores, const at::Tensor& lse) {
  auto safe = lse.masked_fill(lse == kNegInf, 0.0);
  return at::exp(scores - safe.unsqueeze(-1));
}

}  // namespace

const at::Tensor& checked_dropout_seed(const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK(dropout_seed && dropout_seed->numel() == 1 && dropout_seed->scalar_type() == at::kLong,
              "attention: dropout_p > 0 needs dropout_seed, a one-element int64 tensor");
  return *dropout_seed;
}

uint64_t dropout_seed_value(const std::optional<at::Tensor>& dropout_seed) {
  return static_cast<uint64_t>(checked_dropout_seed(dropout_seed).item<int64_t>());
}

at::Tensor dropout_multiplier(const AttentionProblem& p, const at::Tensor& dropout_seed,
                              double dropout_p, const at::TensorOptions& options) {
  const auto params = kernels::DropoutParams::make(dropout_seed_value(dropout_seed), dropout_p);
  // In fp64 for fp64 calls (the kernels' keep_scale in their accumulate type), else fp32.
  const bool f64 = options.dtype() == at::kDouble;
  auto mult = at::empty(p.weights_shape(), options.device(at::kCPU).dtype(f64 ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(mult.scalar_type(), "dropout_multiplier", [&] {
    scalar_t* data = mult.data_ptr<scalar_t>();
    const auto keep_scale = static_cast<scalar_t>(params.keep_scale);
    at::parallel_for(0, mult.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        data[i] = params.keep(static_cast<uint64_t>(i)) ? keep_scale : scalar_t(0);
      }
    });
  });
  return mult.to(options);
}

namespace {

// q, k, v in the accumulate type, k and v with their heads repeated to query's (GQA).
std::array<at::Tensor, 3> accumulate_operands(const AttentionParams& params) {
  const auto acc = accumulate_type(params.problem.dtype);
  return {params.query.to(acc), expand_kv_heads(params.problem, params.key.to(acc)),
          expand_kv_heads(params.problem, params.value.to(acc))};
}

// The dropout multiplier of the call's probabilities, undefined without dropout.
at::Tensor dropout_of(const AttentionParams& params, const at::Tensor& probs) {
  if (params.dropout_p <= 0.0) return {};
  return dropout_multiplier(params.problem, *params.dropout_seed, params.dropout_p, probs.options());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(const AttentionParams& params) {
  const AttentionProblem& p = params.problem;
  const auto options = params.query.options();
  const auto [q, k, v] = accumulate_operands(params);
  auto s = masked_scores(params, q, k);
  auto lse = at::logsumexp(s, -1);
  auto probs = probabilities(s, lse);
  const auto mult = dropout_of(params, probs);
  auto out = at::matmul(mult.defined() ? probs * mult : probs, v).to(params.out_dtype());
  auto weights = !params.return_weights ? at::empty({0}, options)
                 : params.average_weights ? (p.heads > 0 ? probs.mean(-3) : probs.sum(-3)).to(p.dtype)
                                          : probs.to(p.dtype);
  return {out, lse, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const AttentionParams& params, const AttentionGrads& grads) {
  const AttentionProblem& p = params.problem;
  const auto &query = params.query, &key = params.key, &value = params.value;
  const auto &attn_mask = params.attn_mask, &key_padding_mask = params.key_padding_mask;
  const ScoreMods& mods = params.mods;
  const auto &grad_out = grads.grad_out, &lse = grads.lse;
  const auto &grad_weights = grads.grad_weights, &grad_lse = grads.grad_lse;
  const auto acc = accumulate_type(p.dtype);
  const auto [q, k, v] = accumulate_operands(params);
  auto d_out = grad_out.to(acc);
  at::Tensor cap_grad;
  auto s = masked_scores(params, q, k, &cap_grad);
  auto probs = probabilities(s, lse.to(acc));
  const auto mult = dropout_of(params, probs);
  auto dropped = mult.defined() ? probs * mult : probs;

  auto dv = at::matmul(dropped.transpose(-2, -1), d_out);  // (..., H, S, Ev)
  auto dp = at::matmul(d_out, v.transpose(-2, -1));        // d loss / d probs, (..., H, L, S)
  if (mult.defined()) dp.mul_(mult);
  if (grad_weights && grad_weights->numel() > 0) dp.add_(grad_weights->to(acc));
  // softmax backward: ds = P * (dP - rowsum(P * dP)); lse's own gradient adds P * dlse.
  auto ds = probs * (dp - (probs * dp).sum(-1, /*keepdim=*/true));
  if (grad_lse && grad_lse->numel() > 0) ds.add_(probs * grad_lse->to(acc).unsqueeze(-1));

  // The masks' gradients are ds; the raw scores' pass through soft-capping's derivative.
  auto ds_raw = cap_grad.defined() ? ds * cap_grad : ds;
  auto dq = at::matmul(ds_raw, k).mul_(p.scale);
  auto dk = at::matmul(ds_raw.transpose(-2, -1), q).mul_(p.scale);
  dk = reduce_kv_heads(p, dk);
  dv = reduce_kv_heads(p, dv);

  at::Tensor d_mask = at::empty({0}, query.options());
  if (grads.attn_mask_grad && attn_mask && attn_mask->is_floating_point()) {
    d_mask = at::sum_to(ds, attn_mask->sizes()).to(attn_mask->scalar_type());
  }
  at::Tensor d_kpm = at::empty({0}, query.options());
  if (grads.key_padding_mask_grad && key_padding_mask && key_padding_mask->is_floating_point()) {
    d_kpm = ds.sum({-3, -2}).to(key_padding_mask->scalar_type());
  }
  // rel_bias: ds summed over the batch, scattered into each head's table entries.
  at::Tensor d_rel = at::empty({0}, query.options());
  if (mods.rel_bias.defined()) {
    const auto idx = rel_bias_index(mods, relative_positions(p, params.bottom_right, ds.device()));
    auto per_head = ds.reshape({p.batch_size, p.heads, p.q_len * p.kv_len}).sum(0);
    d_rel = at::zeros_like(mods.rel_bias)
                .scatter_add_(1, idx.flatten().unsqueeze(0).expand({p.heads, -1}), per_head);
  }
  return {dq.to(query.scalar_type()), dk.to(key.scalar_type()), dv.to(value.scalar_type()), d_mask,
          d_kpm, d_rel};
}

}  // namespace fusedattn::reference
