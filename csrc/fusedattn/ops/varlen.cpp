// attention_varlen: packed variable-length sequences (FlashAttention's varlen layout). The
// public op draws the dropout seed and calls `_attention_varlen_forward` (autograd in
// ops/autograd.cpp); the CPU runs the sequences as tasks of one fused call
// (backends/cpu/varlen_cpu.cpp); other devices take the per-sequence loop here. No padding is formed
// or computed either way: the cost is the sum over sequences of L_b x S_b.
#include "fusedattn/ops/varlen.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "fusedattn/kernels/common/dropout.h"
#include "fusedattn/ops/attention.h"
#include "fusedattn/ops/params.h"
#include "fusedattn/ops/reference.h"
#include "fusedattn/ops/route.h"

namespace fusedattn {
namespace {

// Offsets (B + 1,) as host int64 values, checked: int32 or int64, starting at 0,
// non-decreasing, ending at `total`, no sequence longer than `max_len`.
std::vector<int64_t> offsets(const at::Tensor& cu, const char* name, int64_t total, int64_t max_len) {
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1 && (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong),
              "attention_varlen: ", name, " must be a 1-D int32 tensor of B + 1 offsets, got ",
              cu.scalar_type(), " of shape ", cu.sizes());
  const auto host = cu.to(at::kCPU, at::kLong).contiguous();
  std::vector<int64_t> o(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
  TORCH_CHECK(o.front() == 0 && o.back() == total, "attention_varlen: ", name,
              " must start at 0 and end at the packed length ", total, ", got ", o.front(), " .. ",
              o.back());
  for (size_t b = 0; b + 1 < o.size(); ++b) {
    TORCH_CHECK(o[b + 1] >= o[b], "attention_varlen: ", name, " must be non-decreasing, got ",
                o[b], " then ", o[b + 1], " at ", b);
    TORCH_CHECK(o[b + 1] - o[b] <= max_len, "attention_varlen: sequence ", b, " has length ",
                o[b + 1] - o[b], " > max_seqlen ", max_len, " (", name, ")");
  }
  return o;
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The per-sequence loop's inputs: each tensor's sequences as (H, len, D) views, by one split
// per tensor (its backward, where autograd sees it, is one concatenation; a narrow per
// sequence would add a zero-filled full-size gradient each).
std::vector<at::Tensor> sequences(const at::Tensor& x, const std::vector<int64_t>& o) {
  std::vector<int64_t> len(o.size() - 1);
  for (size_t b = 0; b + 1 < o.size(); ++b) len[b] = o[b + 1] - o[b];
  auto parts = x.split_with_sizes(len, 0);
  for (auto& t : parts) t = t.transpose(0, 1);
  return parts;
}

// Per sequence: its dropout seed (its range of the packed call's stream) and its ALiBi row.
struct SequenceArgs {
  std::vector<std::optional<at::Tensor>> seeds, slopes;
};
SequenceArgs sequence_args(const detail::VarlenOffsets& o, int64_t heads,
                           const std::optional<at::Tensor>& dropout_seed, double dropout_p,
                           const std::optional<at::Tensor>& alibi_slopes) {
  SequenceArgs a;
  uint64_t drop = 0;
  for (int64_t b = 0; b < o.batch; ++b) {
    a.seeds.push_back(dropout_p > 0 && dropout_seed
                          ? std::optional<at::Tensor>(detail::shifted_dropout_seed(*dropout_seed, drop))
                          : std::nullopt);
    drop += uint64_t(heads) * uint64_t(o.q[b + 1] - o.q[b]) * uint64_t(o.k[b + 1] - o.k[b]);
    a.slopes.push_back(alibi_slopes && alibi_slopes->dim() == 2
                           ? std::optional<at::Tensor>(alibi_slopes->select(0, b))
                           : alibi_slopes);
  }
  return a;
}

}  // namespace

namespace detail {

VarlenOffsets check_varlen(const at::Tensor& query, const at::Tensor& key,
                           const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                           const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                           int64_t max_seqlen_k, const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3,
              "attention_varlen: query, key and value must be 3-D (total_q, H, E), (total_k, Hk, E), "
              "(total_k, Hk, Ev), got ", query.sizes(), ", ", key.sizes(), ", ", value.sizes());
  TORCH_CHECK(value.size(0) == key.size(0), "attention_varlen: key and value must have the same "
              "packed length, got ", key.size(0), " and ", value.size(0));
  VarlenOffsets o;
  o.q = offsets(cu_seqlens_q, "cu_seqlens_q", query.size(0), max_seqlen_q);
  o.k = offsets(cu_seqlens_k, "cu_seqlens_k", key.size(0), max_seqlen_k);
  TORCH_CHECK(o.q.size() == o.k.size(), "attention_varlen: cu_seqlens_q and cu_seqlens_k must hold "
              "the same number of sequences, got ", o.q.size() - 1, " and ", o.k.size() - 1);
  o.batch = static_cast<int64_t>(o.q.size()) - 1;
  if (alibi_slopes) {
    const auto& a = *alibi_slopes;
    TORCH_CHECK(a.scalar_type() == at::kFloat, "attention_varlen: alibi_slopes must be float32, got ",
                a.scalar_type());
    TORCH_CHECK(a.device() == query.device(), "attention_varlen: alibi_slopes must be on query's "
                "device (", query.device(), "), got ", a.device());
    TORCH_CHECK((a.dim() == 1 && a.size(0) == query.size(1)) ||
                    (a.dim() == 2 && a.size(0) == o.batch && a.size(1) == query.size(1)),
                "attention_varlen: alibi_slopes must have shape (H,) or (B, H) with B = ", o.batch,
                " and H = ", query.size(1), ", got ", a.sizes());
  }
  return o;
}

at::Tensor shifted_dropout_seed(const at::Tensor& seed, uint64_t offset) {
  const uint64_t s = reference::dropout_seed_value(seed) + offset * kernels::DropoutParams::kStep;
  return at::full({1}, static_cast<int64_t>(s), seed.options().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_forward_per_sequence(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, const std::optional<at::Tensor>& dropout_seed, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, bool enable_gqa,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes,
    std::optional<double> softcap, const std::optional<at::Tensor>& rel_bias, bool fp32_out) {
  const auto o = check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, alibi_slopes);
  const int64_t heads = query.size(1);
  const auto acc = accumulate_type(query.scalar_type());
  if (o.batch == 0) {
    return {at::empty({0, heads, value.size(2)},
                      query.options().dtype(out_dtype(query.scalar_type(), fp32_out))),
            at::empty({heads, 0}, query.options().dtype(acc))};
  }
  const auto args = sequence_args(o, heads, dropout_seed, dropout_p, alibi_slopes);
  const auto qs = sequences(query, o.q), ks = sequences(key, o.k), vs = sequences(value, o.k);
  std::vector<at::Tensor> outs, lses;
  for (int64_t b = 0; b < o.batch; ++b) {
    auto [out, lse, weights] = ops::attention_forward(
        qs[b], ks[b], vs[b], std::nullopt, std::nullopt, args.seeds[b], dropout_p, is_causal,
        bottom_right, scale, enable_gqa, false, false, window, args.slopes[b], softcap, rel_bias,
        fp32_out);
    outs.push_back(out.transpose(0, 1));  // (len, H, Ev)
    lses.push_back(lse);                  // (H, len)
  }
  return {at::cat(outs, 0), at::cat(lses, 1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_per_sequence(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, bool enable_gqa,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes,
    std::optional<double> softcap, const std::optional<at::Tensor>& rel_bias) {
  const auto o = check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, alibi_slopes);
  const int64_t heads = query.size(1);
  // Every packed row belongs to one sequence (the offsets end at the packed lengths), whose
  // gradient is copied in whole: no fill needed.
  auto dq = at::empty(query.sizes(), query.options());
  auto dk = at::empty(key.sizes(), key.options());
  auto dv = at::empty(value.sizes(), value.options());
  at::Tensor d_rel = rel_bias ? at::zeros(rel_bias->sizes(), rel_bias->options().dtype(
                                                                 accumulate_type(query.scalar_type())))
                              : at::empty({0}, query.options());
  const auto args = sequence_args(o, heads, dropout_seed, dropout_p, alibi_slopes);
  const auto qs = sequences(query, o.q), ks = sequences(key, o.k), vs = sequences(value, o.k);
  const auto os = sequences(out, o.q), gs = sequences(grad_out, o.q);
  const auto dqs = sequences(dq, o.q), dks = sequences(dk, o.k), dvs = sequences(dv, o.k);
  const bool has_dlse = grad_lse && grad_lse->numel() > 0;
  for (int64_t b = 0; b < o.batch; ++b) {
    const int64_t q0 = o.q[b], len = o.q[b + 1] - q0;
    std::optional<at::Tensor> dlse;
    if (has_dlse) dlse = grad_lse->narrow(1, q0, len);
    auto [gq, gk, gv, gm, gp, gr] = ops::attention_backward(
        gs[b], std::nullopt, dlse, qs[b], ks[b], vs[b], os[b], lse.narrow(1, q0, len).contiguous(),
        std::nullopt, std::nullopt, args.seeds[b], dropout_p, is_causal, bottom_right, scale,
        enable_gqa, false, false, window, args.slopes[b], softcap, rel_bias);
    dqs[b].copy_(gq), dks[b].copy_(gk), dvs[b].copy_(gv);
    if (rel_bias && gr.numel() > 0) d_rel.add_(gr);
  }
  return {dq, dk, dv, d_rel};
}

}  // namespace detail

namespace ops {

std::tuple<at::Tensor, at::Tensor> attention_varlen(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double dropout_p, bool is_causal, c10::string_view causal_alignment,
    std::optional<double> scale, bool enable_gqa, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, bool return_lse,
    const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedattn::attention_varlen", "")
                       .typed<decltype(attention_varlen)>();
  return op.call(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 dropout_p, is_causal, causal_alignment, scale, enable_gqa, window, alibi_slopes,
                 softcap, rel_bias, return_lse, sinks);
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, const std::optional<at::Tensor>& dropout_seed, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, bool enable_gqa,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes,
    std::optional<double> softcap, const std::optional<at::Tensor>& rel_bias, bool fp32_out) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedattn::_attention_varlen_forward", "")
                       .typed<decltype(attention_varlen_forward)>();
  return op.call(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 dropout_seed, dropout_p, is_causal, bottom_right, scale, enable_gqa, window,
                 alibi_slopes, softcap, rel_bias, fp32_out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, bool enable_gqa,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes,
    std::optional<double> softcap, const std::optional<at::Tensor>& rel_bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedattn::_attention_varlen_backward", "")
                       .typed<decltype(attention_varlen_backward)>();
  return op.call(grad_out, grad_lse, query, key, value, out, lse, cu_seqlens_q, cu_seqlens_k,
                 max_seqlen_q, max_seqlen_k, dropout_seed, dropout_p, is_causal, bottom_right,
                 scale, enable_gqa, window, alibi_slopes, softcap, rel_bias);
}

}  // namespace ops

namespace detail {

namespace {

// torch's route: each sequence through attention_torch (torch's kernels and autograd), the
// outputs concatenated. -> out (total_q, H, Ev)
at::Tensor attention_varlen_torch(const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                  const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                  int64_t max_seqlen_k, double dropout_p, bool is_causal,
                                  bool bottom_right, std::optional<double> scale,
                                  bool enable_gqa) {
  const auto o = check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, std::nullopt);
  if (o.batch == 0) return at::empty({0, query.size(1), value.size(2)}, query.options());
  const auto qs = sequences(query, o.q), ks = sequences(key, o.k), vs = sequences(value, o.k);
  std::vector<at::Tensor> outs;
  for (int64_t b = 0; b < o.batch; ++b) {
    outs.push_back(attention_torch(qs[b], ks[b], vs[b], std::nullopt, std::nullopt, dropout_p,
                                   is_causal, bottom_right, scale, enable_gqa)
                       .transpose(0, 1));  // (len, H, Ev)
  }
  return at::cat(outs, 0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_varlen_composite(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double dropout_p, bool is_causal, c10::string_view causal_alignment,
    std::optional<double> scale, bool enable_gqa, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, bool return_lse,
    const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(causal_alignment == "top_left" || causal_alignment == "bottom_right",
              "attention_varlen: causal_alignment must be \"top_left\" or \"bottom_right\", got \"",
              std::string(causal_alignment), "\"");
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3,
              "attention_varlen: query, key and value must be 3-D (total_q, H, E), (total_k, Hk, E), "
              "(total_k, Hk, Ev), got ", query.sym_sizes(), ", ", key.sym_sizes(), ", ",
              value.sym_sizes());
  const bool variants = window || alibi_slopes || softcap || rel_bias;
  // The route needs the offsets on the host: not while tracing (fake or functional tensors),
  // where the op's own fake kernels serve.
  const bool traced = query.key_set().has(c10::DispatchKey::Python) ||
                      query.key_set().has(c10::DispatchKey::Functionalize);
  if (!traced &&
      attention_route(query, std::nullopt, std::nullopt, false, return_lse, variants,
                      sinks.has_value())
          .torch) {
    return {attention_varlen_torch(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, dropout_p, is_causal,
                                   causal_alignment == "bottom_right", scale, enable_gqa),
            at::empty({0}, query.options().dtype(accumulate_type(query.scalar_type())))};
  }
  auto seed = draw_dropout_seed(dropout_p, query.device());
  auto [out, lse] = ops::attention_varlen_forward(
      query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed,
      dropout_p, is_causal, causal_alignment == "bottom_right", scale, enable_gqa, window,
      alibi_slopes, softcap, rel_bias);
  if (sinks) {
    // lse (H, total_q), out (total_q, H, Ev).
    auto [factor, lse_sinks] =
        sink_factor("attention_varlen", lse, *sinks, query.sym_size(1), query);
    out = (out * factor.t().unsqueeze(-1)).to(out.scalar_type());
    lse = lse_sinks;
  }
  if (!return_lse) lse = at::empty({0}, lse.options());
  return {out, lse};
}

}  // namespace detail

AttentionResult attention_varlen(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                 const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, const AttentionOptions& o) {
  TORCH_CHECK(!o.attn_mask().defined() && !o.key_padding_mask().defined() && !o.return_weights(),
              "attention_varlen: attn_mask, key_padding_mask and return_weights are not options "
              "of the packed layout (the offsets are the padding)");
  at::OptionalIntArrayRef window;
  if (!o.window().empty()) window = o.window();
  auto [out, lse] = ops::attention_varlen(
      query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, o.dropout_p(),
      o.is_causal(), o.causal_alignment(), o.scale(), o.enable_gqa(), window, opt(o.alibi_slopes()),
      o.softcap(), opt(o.rel_bias()), o.return_lse(), opt(o.sinks()));
  AttentionResult r;
  r.out = std::move(out);
  if (o.return_lse()) r.lse = std::move(lse);
  return r;
}

}  // namespace fusedattn
