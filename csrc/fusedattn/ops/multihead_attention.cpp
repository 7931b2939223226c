#include "fusedattn/ops/multihead_attention.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <limits>
#include <tuple>

#include "fusedattn/ops/attention.h"
#include "fusedattn/ops/route.h"
#include "fusedattn/ops/varlen.h"

namespace fusedattn {
namespace {

constexpr const char* kFn = "MultiheadAttention";
using c10::SymInt;

// Appends one key (or value) column per head: (N, H, S, D) -> (N, H, S + 1, D).
at::Tensor append_column(const at::Tensor& x, const at::Tensor& column_hd) {
  const SymInt n = x.sym_size(0), h = x.sym_size(1), d = x.sym_size(3);
  auto col = column_hd.reshape_symint({1, h, 1, d}).expand_symint({n, h, 1, d});
  return at::cat({x, col.to(x.scalar_type())}, 2);
}

// Grows a mask's last (key) dim by one entry that does not mask: `unmasked` is what that
// means in the mask's convention (0 for float masks).
at::Tensor pad_key_column(const at::Tensor& m, bool unmasked) {
  auto sizes = m.sym_sizes().vec();
  sizes.back() = 1;
  auto col = m.scalar_type() == at::kBool && unmasked ? at::ones_symint(sizes, m.options())
                                                      : at::zeros_symint(sizes, m.options());
  return at::cat({m, col}, -1);
}

void check_float_or_bool(const at::Tensor& m, const char* name, const at::Tensor& query) {
  TORCH_CHECK(m.scalar_type() == at::kBool || m.is_floating_point(), kFn, ": only bool and float ",
              name, " are supported, got ", m.scalar_type());
  // Checked here, not only by the attention kernels: a mask on another device (meta) would
  // send the call to a Meta kernel, which a C++ app without the Python fakes does not have.
  TORCH_CHECK(m.device() == query.device(), kFn, ": ", name, " must be on query's device (",
              query.device(), "), got ", m.device());
}


std::optional<at::Tensor> chunk_or_none(const std::optional<at::Tensor>& t, int64_t i) {
  if (!t) return std::nullopt;
  return t->chunk(3, 0)[i];
}

}  // namespace

namespace ops {
std::tuple<at::Tensor, at::Tensor> multihead_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, const std::optional<at::Tensor>& bias_k,
    const std::optional<at::Tensor>& bias_v, bool add_zero_attn, double dropout_p,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    bool batch_first, const std::optional<at::Tensor>& key_padding_mask, bool need_weights,
    const std::optional<at::Tensor>& attn_mask, bool average_attn_weights, bool is_causal,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes,
    std::optional<double> softcap, const std::optional<at::Tensor>& rel_bias,
    const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedattn::multihead_attention", "")
                       .typed<decltype(multihead_attention)>();
  return op.call(query, key, value, num_heads, in_proj_weight, in_proj_bias, q_proj_weight,
                 k_proj_weight, v_proj_weight, bias_k, bias_v, add_zero_attn, dropout_p,
                 out_proj_weight, out_proj_bias, batch_first, key_padding_mask, need_weights,
                 attn_mask, average_attn_weights, is_causal, window, alibi_slopes, softcap,
                 rel_bias, sinks);
}
at::Tensor multihead_attention_varlen(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, double dropout_p,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool is_causal, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedattn::multihead_attention_varlen", "")
                       .typed<decltype(multihead_attention_varlen)>();
  return op.call(query, key, value, num_heads, in_proj_weight, in_proj_bias, q_proj_weight,
                 k_proj_weight, v_proj_weight, dropout_p, out_proj_weight, out_proj_bias,
                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, window,
                 alibi_slopes, softcap, rel_bias, sinks);
}
}  // namespace ops

namespace detail {

std::optional<at::Tensor> bias_like(const std::optional<at::Tensor>& b, const at::Tensor& w) {
  if (!b || b->scalar_type() == w.scalar_type()) return b;
  return b->to(w.scalar_type());
}

at::Tensor multihead_attention_varlen_composite(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, double dropout_p,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool is_causal, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(num_heads > 0, kFn, ": num_heads must be positive, got ", num_heads);
  TORCH_CHECK(query.dim() == 2 && key.dim() == 2 && value.dim() == 2, kFn,
              ": packed sequences (cu_seqlens) take 2-D query (total_q, E), key (total_k, kdim) "
              "and value (total_k, vdim), got ", query.sym_sizes(), ", ", key.sym_sizes(), ", ",
              value.sym_sizes());
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              kFn, ": query, key and value must have the same dtype, got ", query.scalar_type(), ", ",
              key.scalar_type(), ", ", value.scalar_type());
  TORCH_CHECK(at::autocast::is_autocast_enabled(query.device().type()) ||
                  query.scalar_type() == out_proj_weight.scalar_type(),
              kFn, ": query, key and value must have the module's parameter dtype (",
              out_proj_weight.scalar_type(), "), got ", query.scalar_type(),
              "; convert the inputs, or the module with .to(dtype)");
  const SymInt E = out_proj_weight.sym_size(0);
  TORCH_SYM_CHECK(query.sym_size(1).sym_eq(E), kFn, ": query must have embed_dim = ", E,
                  " features, got shape ", query.sym_sizes());
  TORCH_SYM_CHECK(value.sym_size(0).sym_eq(key.sym_size(0)), kFn,
                  ": key and value must have the same packed length, got key ", key.sym_sizes(),
                  " and value ", value.sym_sizes());
  const auto in_bias =
      detail::bias_like(in_proj_bias, in_proj_weight ? *in_proj_weight
                                         : q_proj_weight ? *q_proj_weight : out_proj_weight);
  at::Tensor q, k, v;  // (total, H * D) each
  if (in_proj_weight) {
    TORCH_SYM_CHECK(key.sym_size(1).sym_eq(E) & value.sym_size(1).sym_eq(E), kFn,
                    ": with a packed in_proj_weight, key and value must have embed_dim = ", E,
                    " features, got key ", key.sym_sizes(), " and value ", value.sym_sizes());
    if (query.is_same(key) && key.is_same(value)) {  // self-attention: one GEMM
      auto qkv = at::linear(query, *in_proj_weight, in_bias).chunk(3, -1);
      q = qkv[0], k = qkv[1], v = qkv[2];
    } else {
      const auto w = in_proj_weight->chunk(3, 0);
      q = at::linear(query, w[0], chunk_or_none(in_bias, 0));
      k = at::linear(key, w[1], chunk_or_none(in_bias, 1));
      v = at::linear(value, w[2], chunk_or_none(in_bias, 2));
    }
  } else {
    TORCH_CHECK(q_proj_weight && k_proj_weight && v_proj_weight, kFn,
                ": needs in_proj_weight, or all of q_proj_weight, k_proj_weight, v_proj_weight");
    TORCH_SYM_CHECK(key.sym_size(1).sym_eq(k_proj_weight->sym_size(1)) &
                        value.sym_size(1).sym_eq(v_proj_weight->sym_size(1)),
                    kFn, ": key and value must have kdim = ", k_proj_weight->sym_size(1),
                    " and vdim = ", v_proj_weight->sym_size(1), " features, got key ",
                    key.sym_sizes(), " and value ", value.sym_sizes());
    q = at::linear(query, *q_proj_weight, chunk_or_none(in_bias, 0));
    k = at::linear(key, *k_proj_weight, chunk_or_none(in_bias, 1));
    v = at::linear(value, *v_proj_weight, chunk_or_none(in_bias, 2));
  }
  TORCH_SYM_CHECK((q.sym_size(1) % num_heads).sym_eq(0), kFn, ": the projected size ",
                  q.sym_size(1), " must be divisible by num_heads = ", num_heads);
  auto heads = [&](const at::Tensor& x) {  // (total, H * D) -> (total, H, D), a view
    return x.view_symint({x.sym_size(0), c10::SymInt(num_heads), x.sym_size(1) / num_heads});
  };
  std::optional<at::Tensor> slopes;
  if (alibi_slopes) slopes = alibi_slopes->to(at::kFloat);
  auto [out, lse] = ops::attention_varlen(heads(q), heads(k), heads(v), cu_seqlens_q, cu_seqlens_k,
                                          max_seqlen_q, max_seqlen_k, dropout_p, is_causal,
                                          "top_left", std::nullopt, false, window, slopes, softcap,
                                          rel_bias, false, sinks);
  return at::linear(out.flatten(1), out_proj_weight, detail::bias_like(out_proj_bias, out_proj_weight));
}

std::tuple<at::Tensor, at::Tensor> multihead_attention_composite(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t num_heads,
    const std::optional<at::Tensor>& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const std::optional<at::Tensor>& q_proj_weight, const std::optional<at::Tensor>& k_proj_weight,
    const std::optional<at::Tensor>& v_proj_weight, const std::optional<at::Tensor>& bias_k,
    const std::optional<at::Tensor>& bias_v, bool add_zero_attn, double dropout_p,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    bool batch_first, const std::optional<at::Tensor>& key_padding_mask, bool need_weights,
    const std::optional<at::Tensor>& attn_mask, bool average_attn_weights, bool is_causal,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes,
    std::optional<double> softcap, const std::optional<at::Tensor>& rel_bias,
    const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(num_heads > 0, kFn, ": num_heads must be positive, got ", num_heads);
  TORCH_CHECK(query.dim() == 3 || query.dim() == 2, kFn,
              ": query must be 3-D (L, N, E), (N, L, E) with batch_first, or 2-D (L, E) "
              "unbatched, got shape ", query.sym_sizes());
  TORCH_CHECK(key.dim() == query.dim() && value.dim() == query.dim(), kFn,
              ": key and value must have as many dims as query (", query.dim(), "), got key ",
              key.sym_sizes(), " and value ", value.sym_sizes());
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              kFn, ": query, key and value must have the same dtype, got ", query.scalar_type(), ", ",
              key.scalar_type(), ", ", value.scalar_type());
  TORCH_CHECK(key.device() == query.device() && value.device() == query.device(), kFn,
              ": query, key and value must be on the same device, got ", query.device(), ", ",
              key.device(), ", ", value.device());
  // Outside autocast (which casts each projection's operands itself) the inputs must come in
  // the parameters' dtype: said here, not as a GEMM's "mat1 and mat2" error.
  TORCH_CHECK(at::autocast::is_autocast_enabled(query.device().type()) ||
                  query.scalar_type() == out_proj_weight.scalar_type(),
              kFn, ": query, key and value must have the module's parameter dtype (",
              out_proj_weight.scalar_type(), "), got ", query.scalar_type(),
              "; convert the inputs, or the module with .to(dtype)");
  const bool batched = query.dim() == 3;
  // Internally an unbatched call is a batch of one, batch first.
  const bool seq_first = batched && !batch_first;
  auto q_in = batched ? query : query.unsqueeze(0);
  auto k_in = batched ? key : key.unsqueeze(0);
  auto v_in = batched ? value : value.unsqueeze(0);
  const int64_t seq_dim = seq_first ? 0 : 1, batch_dim = seq_first ? 1 : 0;
  const SymInt N = q_in.sym_size(batch_dim), L = q_in.sym_size(seq_dim), S = k_in.sym_size(seq_dim);
  const SymInt E = out_proj_weight.sym_size(0);

  TORCH_SYM_CHECK(q_in.sym_size(2).sym_eq(E), kFn, ": query must have embed_dim = ", E,
                  " features in its last dim, got shape ", query.sym_sizes());
  TORCH_SYM_CHECK(k_in.sym_size(batch_dim).sym_eq(N) & v_in.sym_size(batch_dim).sym_eq(N), kFn,
                  ": query, key and value must have the same batch size, got query ",
                  query.sym_sizes(), ", key ", key.sym_sizes(), ", value ", value.sym_sizes());
  TORCH_SYM_CHECK(v_in.sym_size(seq_dim).sym_eq(S), kFn,
                  ": key and value must have the same sequence length, got key ", key.sym_sizes(),
                  " and value ", value.sym_sizes());

  // Projections, (A, B, F) in the caller's layout. Self-attention (one tensor passed three
  // times) takes one packed GEMM, and on the CPU a key that is the value one GEMM for both.
  // On the CPU without extra key columns they go to the projected op as they are (q, k, v
  // read in place, the output written heads-merged, the gradients written whole); elsewhere
  // they are split into heads for the attention op.
  const auto in_bias =
      detail::bias_like(in_proj_bias, in_proj_weight ? *in_proj_weight
                                         : q_proj_weight ? *q_proj_weight : out_proj_weight);
  const auto out_bias = detail::bias_like(out_proj_bias, out_proj_weight);

  // The variants (window, ALiBi, softcap, rel_bias) and sinks run on the attention op's
  // kernels, on split heads.
  const bool variants = window || alibi_slopes || softcap || rel_bias || sinks;
  // The op takes fp32 slopes; a module's buffer follows the module's .to(dtype).
  std::optional<at::Tensor> slopes;
  if (alibi_slopes) slopes = alibi_slopes->to(at::kFloat);
  // Where torch's route may take the call, the split-heads path reaches it.
  const bool projected = q_in.is_cpu() && !torch_route_possible(q_in.device()) && !bias_k &&
                         !bias_v && !add_zero_attn && !variants;
  const bool self_packed = in_proj_weight && query.is_same(key) && key.is_same(value);
  // packed: 3, qp holds q|k|v; 2, kp holds k|v; 0, qp, kp, vp apart.
  int packed = 0;
  at::Tensor qp, kp, vp;
  if (in_proj_weight) {
    TORCH_SYM_CHECK(in_proj_weight->sym_size(1).sym_eq(E) & k_in.sym_size(2).sym_eq(E) &
                        v_in.sym_size(2).sym_eq(E),
                    kFn, ": with a packed in_proj_weight, key and value must have embed_dim = ", E,
                    " features, got key ", key.sym_sizes(), " and value ", value.sym_sizes());
    const SymInt rows = in_proj_weight->sym_size(0) / 3;  // per projection
    auto rows_of = [&](const at::Tensor& t, int64_t first, int64_t count) {
      return t.narrow_symint(0, rows * first, rows * count);
    };
    auto bias_of = [&](int64_t first, int64_t count) -> std::optional<at::Tensor> {
      if (!in_bias) return std::nullopt;
      return rows_of(*in_bias, first, count);
    };
    if (self_packed) {
      qp = at::linear(q_in, *in_proj_weight, in_bias);
      packed = 3;
    } else {
      qp = at::linear(q_in, rows_of(*in_proj_weight, 0, 1), bias_of(0, 1));
      if (key.is_same(value) && projected) {
        kp = at::linear(k_in, rows_of(*in_proj_weight, 1, 2), bias_of(1, 2));
        packed = 2;
      } else {
        kp = at::linear(k_in, rows_of(*in_proj_weight, 1, 1), bias_of(1, 1));
        vp = at::linear(v_in, rows_of(*in_proj_weight, 2, 1), bias_of(2, 1));
      }
    }
  } else {
    TORCH_CHECK(q_proj_weight && k_proj_weight && v_proj_weight, kFn,
                ": needs in_proj_weight, or all of q_proj_weight, k_proj_weight, v_proj_weight");
    TORCH_SYM_CHECK(k_in.sym_size(2).sym_eq(k_proj_weight->sym_size(1)), kFn,
                    ": key must have kdim = ", k_proj_weight->sym_size(1),
                    " features in its last dim, got shape ", key.sym_sizes());
    TORCH_SYM_CHECK(v_in.sym_size(2).sym_eq(v_proj_weight->sym_size(1)), kFn,
                    ": value must have vdim = ", v_proj_weight->sym_size(1),
                    " features in its last dim, got shape ", value.sym_sizes());
    qp = at::linear(q_in, *q_proj_weight, chunk_or_none(in_bias, 0));
    kp = at::linear(k_in, *k_proj_weight, chunk_or_none(in_bias, 1));
    vp = at::linear(v_in, *v_proj_weight, chunk_or_none(in_bias, 2));
  }
  const SymInt q_features = packed == 3 ? qp.sym_size(2) / 3 : qp.sym_size(2);
  TORCH_SYM_CHECK((q_features % num_heads).sym_eq(0), kFn, ": the projected size ", q_features,
                  " must be divisible by num_heads = ", num_heads);
  at::Tensor q, k, v;  // (N, H, L, D), (N, H, S, D), (N, H, S, Dv) views
  if (!projected) {
    if (packed == 3) {
      auto parts = qp.chunk(3, -1);
      qp = parts[0], kp = parts[1], vp = parts[2];
    }
    q = detail::split_heads(qp, num_heads, seq_first);
    k = detail::split_heads(kp, num_heads, seq_first);
    v = detail::split_heads(vp, num_heads, seq_first);
  }

  // Masks, in the attention op's conventions: attn_mask bool True = allowed, float added;
  // key_padding_mask bool True = padding, float added.
  std::optional<at::Tensor> mask;
  // torch reads is_causal=True as a hint that attn_mask is the causal mask, and without key
  // padding or weights uses the hint alone, never looking at the mask. Here both apply; only
  // a mask that cannot apply, in that case, is set aside (with a warning) as torch does.
  auto mask_fits = [&](const at::Tensor& m) {
    if (m.dim() == 2) return (m.sym_size(0).sym_eq(L) & m.sym_size(1).sym_eq(S)).guard_bool(__FILE__, __LINE__);
    return m.dim() == 3 && (m.sym_size(0).sym_eq(N * num_heads) & m.sym_size(1).sym_eq(L) &
                            m.sym_size(2).sym_eq(S)).guard_bool(__FILE__, __LINE__);
  };
  if (attn_mask && is_causal && !key_padding_mask && !need_weights && !mask_fits(*attn_mask)) {
    TORCH_WARN_ONCE(kFn, ": is_causal=True with an attn_mask of shape ", attn_mask->sym_sizes(),
                    " that does not fit (L, S) = (", L, ", ", S,
                    "): the causal mask applies and attn_mask is ignored, as in "
                    "torch.nn.MultiheadAttention");
  } else if (attn_mask) {
    check_float_or_bool(*attn_mask, "attn_mask", query);
    const auto& m = *attn_mask;
    if (m.dim() == 2) {
      TORCH_SYM_CHECK(m.sym_size(0).sym_eq(L) & m.sym_size(1).sym_eq(S), kFn,
                      ": 2-D attn_mask must have shape (L, S) = (", L, ", ", S, "), got ",
                      m.sym_sizes());
      mask = m;
    } else {
      TORCH_CHECK(m.dim() == 3, kFn, ": attn_mask must be 2-D (L, S) or 3-D (N * num_heads, L, S), got ",
                  m.sym_sizes());
      TORCH_SYM_CHECK(m.sym_size(0).sym_eq(N * num_heads) & m.sym_size(1).sym_eq(L) &
                          m.sym_size(2).sym_eq(S),
                      kFn, ": 3-D attn_mask must have shape (N * num_heads, L, S) = (", N * num_heads,
                      ", ", L, ", ", S, "), got ", m.sym_sizes());
      mask = m.view_symint({N, SymInt(num_heads), L, S});
    }
    mask = mask->scalar_type() == at::kBool ? mask->logical_not() : mask->to(query.scalar_type());
  }
  std::optional<at::Tensor> kpm;
  if (key_padding_mask) {
    check_float_or_bool(*key_padding_mask, "key_padding_mask", query);
    kpm = batched ? *key_padding_mask : key_padding_mask->unsqueeze(0);
    if (batched) {
      TORCH_CHECK(kpm->dim() == 2, kFn, ": key_padding_mask must have shape (N, S) = (", N, ", ",
                  S, "), got ", key_padding_mask->sym_sizes());
    } else {
      TORCH_CHECK(kpm->dim() == 2, kFn, ": for unbatched input key_padding_mask must have shape (S) = (",
                  S, "), got ", key_padding_mask->sym_sizes());
    }
    TORCH_SYM_CHECK(kpm->sym_size(0).sym_eq(N) & kpm->sym_size(1).sym_eq(S), kFn,
                    ": key_padding_mask must have shape (N, S) = (", N, ", ", S, "), got ",
                    key_padding_mask->sym_sizes());
    if (kpm->is_floating_point()) kpm = kpm->to(query.scalar_type());
  }

  // Extra key columns (bias_k, zero attention) come after the S real keys; masks grow by a
  // column that does not mask them. A causal mask then has to be explicit, because the op's
  // causal rule would hide the extra columns from early queries.
  const int extra = (bias_k ? 1 : 0) + (add_zero_attn ? 1 : 0);
  bool op_causal = is_causal;
  if (is_causal && extra > 0) {
    auto opts = at::TensorOptions().dtype(at::kLong).device(query.device());
    auto allowed = at::arange(c10::Scalar(S), opts).unsqueeze(0) <=
                   at::arange(c10::Scalar(L), opts).unsqueeze(1);  // (L, S) top-left causal
    if (!mask) {
      mask = allowed;
    } else if (mask->scalar_type() == at::kBool) {
      mask = at::logical_and(*mask, allowed);
    } else {
      mask = mask->masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
    }
    op_causal = false;
  }
  auto add_column = [&](const at::Tensor& k_col, const at::Tensor& v_col) {
    k = append_column(k, k_col);
    v = append_column(v, v_col);
    if (mask) mask = pad_key_column(*mask, /*unmasked=*/true);   // bool: True = allowed
    if (kpm) kpm = pad_key_column(*kpm, /*unmasked=*/false);     // bool: True = padding
  };
  if (bias_k || bias_v) {
    TORCH_CHECK(bias_k && bias_v, kFn, ": bias_k and bias_v come together");
    add_column(*bias_k, *bias_v);
  }
  if (add_zero_attn) {
    auto zk = at::zeros_symint({k.sym_size(1), k.sym_size(3)}, k.options());
    auto zv = at::zeros_symint({v.sym_size(1), v.sym_size(3)}, v.options());
    add_column(zk, zv);
  }

  at::Tensor merged, weights;  // (A, B, H * Dv) in the caller's layout; the weights
  if (projected) {
    TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, kFn, ": dropout must be in [0, 1], got ",
                dropout_p);
    auto given = [](const at::Tensor& t) {
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    std::tie(merged, std::ignore, weights) = ops::attention_projected_forward(
        qp, given(kp), given(vp), num_heads, seq_first, mask, kpm,
        detail::draw_dropout_seed(dropout_p, query.device()), dropout_p, op_causal, need_weights,
        need_weights && average_attn_weights);
  } else {
    at::Tensor out;
    std::tie(out, weights, std::ignore) =
        ops::attention(q, k, v, mask, dropout_p, op_causal, std::nullopt, false, kpm, "top_left",
                       need_weights, false, need_weights && average_attn_weights, window,
                       slopes, softcap, rel_bias, sinks);
    // (N, H, L, Dv) -> the caller's layout, heads concatenated.
    const SymInt hd = out.sym_size(1) * out.sym_size(3);
    merged = seq_first ? out.permute({2, 0, 1, 3}).reshape_symint({L, N, hd})
                       : out.transpose(1, 2).reshape_symint({N, L, hd});
  }
  auto result = at::linear(merged, out_proj_weight, out_bias);
  if (!batched) result = result.squeeze(0);

  at::Tensor attn_weights = at::empty({0}, query.options());
  if (need_weights) {
    attn_weights = weights;  // (N, L, S) when averaged: the op averages over heads itself
    if (!batched) attn_weights = attn_weights.squeeze(0);
  }
  return {result, attn_weights};
}

}  // namespace detail
}  // namespace fusedattn
