// attention_varlen: packed variable-length sequences (FlashAttention's varlen layout) as one
// call of the attention op per sequence on views of the packed tensors: no padding is formed
// or computed, the cost is the sum over sequences of L_b x S_b, and autograd differentiates
// through the per-sequence calls (gradients land in the packed tensors by the views).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <vector>

#include "fusedattn/ops/attention.h"

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

}  // namespace

namespace detail {

std::tuple<at::Tensor, at::Tensor> attention_varlen_composite(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double dropout_p, bool is_causal, c10::string_view causal_alignment,
    std::optional<double> scale, bool enable_gqa, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, bool return_lse) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3,
              "attention_varlen: query, key and value must be 3-D (total_q, H, E), (total_k, Hk, E), "
              "(total_k, Hk, Ev), got ", query.sizes(), ", ", key.sizes(), ", ", value.sizes());
  TORCH_CHECK(value.size(0) == key.size(0), "attention_varlen: key and value must have the same "
              "packed length, got ", key.size(0), " and ", value.size(0));
  const auto oq = offsets(cu_seqlens_q, "cu_seqlens_q", query.size(0), max_seqlen_q);
  const auto ok = offsets(cu_seqlens_k, "cu_seqlens_k", key.size(0), max_seqlen_k);
  TORCH_CHECK(oq.size() == ok.size(), "attention_varlen: cu_seqlens_q and cu_seqlens_k must hold "
              "the same number of sequences, got ", oq.size() - 1, " and ", ok.size() - 1);
  const int64_t batch = static_cast<int64_t>(oq.size()) - 1, heads = query.size(1);
  if (alibi_slopes && alibi_slopes->dim() == 2) {
    TORCH_CHECK(alibi_slopes->size(0) == batch, "attention_varlen: alibi_slopes must have shape "
                "(H,) or (B, H) with B = ", batch, ", got ", alibi_slopes->sizes());
  }
  // The sequences as views, by one split per tensor: its backward is one concatenation of
  // the per-sequence gradients (a narrow per sequence would add a zero-filled full-size
  // gradient each: fwd+bwd of 16 sequences was 0.44-0.62x the padded call that way).
  std::vector<int64_t> len_q(batch), len_k(batch);
  for (int64_t b = 0; b < batch; ++b) len_q[b] = oq[b + 1] - oq[b], len_k[b] = ok[b + 1] - ok[b];
  const auto qs = query.split_with_sizes(len_q, 0);
  const auto ks = key.split_with_sizes(len_k, 0);
  const auto vs = value.split_with_sizes(len_k, 0);
  std::vector<at::Tensor> outs, lses;
  for (int64_t b = 0; b < batch; ++b) {
    // (len, H, E) -> (H, len, E) views of sequence b.
    auto q = qs[b].transpose(0, 1), k = ks[b].transpose(0, 1), v = vs[b].transpose(0, 1);
    std::optional<at::Tensor> slopes = alibi_slopes;
    if (alibi_slopes && alibi_slopes->dim() == 2) slopes = alibi_slopes->select(0, b);
    auto [out, weights, lse] =
        ops::attention(q, k, v, std::nullopt, dropout_p, is_causal, scale, enable_gqa,
                       std::nullopt, causal_alignment, false, true, false, window, slopes,
                       softcap, rel_bias);
    outs.push_back(out.transpose(0, 1));  // (len, H, Ev)
    lses.push_back(lse);                  // (H, len)
  }
  if (batch == 0) {
    return {at::empty({0, heads, value.size(2)}, query.options()),
            at::empty({heads, 0}, query.options().dtype(query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat))};
  }
  auto out = at::cat(outs, 0);
  auto lse = return_lse ? at::cat(lses, 1) : at::empty({0}, lses[0].options());
  return {out, lse};
}

}  // namespace detail

namespace ops {
std::tuple<at::Tensor, at::Tensor> attention_varlen(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double dropout_p, bool is_causal, c10::string_view causal_alignment,
    std::optional<double> scale, bool enable_gqa, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, bool return_lse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedattn::attention_varlen", "")
                       .typed<decltype(attention_varlen)>();
  return op.call(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 dropout_p, is_causal, causal_alignment, scale, enable_gqa, window, alibi_slopes,
                 softcap, rel_bias, return_lse);
}
}  // namespace ops

AttentionResult attention_varlen(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                 const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, const AttentionOptions& o) {
  TORCH_CHECK(!o.attn_mask().defined() && !o.key_padding_mask().defined() && !o.return_weights(),
              "attention_varlen: attn_mask, key_padding_mask and return_weights are not options "
              "of the packed layout (the offsets are the padding)");
  at::OptionalIntArrayRef window;
  if (!o.window().empty()) window = o.window();
  auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  auto [out, lse] = ops::attention_varlen(
      query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, o.dropout_p(),
      o.is_causal(), o.causal_alignment(), o.scale(), o.enable_gqa(), window, opt(o.alibi_slopes()),
      o.softcap(), opt(o.rel_bias()), o.return_lse());
  AttentionResult r;
  r.out = std::move(out);
  if (o.return_lse()) r.lse = std::move(lse);
  return r;
}

}  // namespace fusedattn
