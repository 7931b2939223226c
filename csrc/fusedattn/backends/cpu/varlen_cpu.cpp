// CPU implementations of `_attention_varlen_forward` and `_attention_varlen_backward`: the
// packed sequences as tasks of one fused call (kernels/cpu/plan.h: each sequence a B = 1 view
// of the packed tensors, planned on its own; the work items shared by the threads, largest
// first). FUSEDATTN_CPU_KERNEL=reference takes the per-sequence loop onto the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "fusedattn/backends/cpu/config.h"
#include "fusedattn/backends/cpu/gemm_hooks.h"
#include "fusedattn/backends/cpu/launch.h"
#include "fusedattn/ops/varlen.h"

namespace fusedattn::cpu {
namespace {

using kernels::cpu::VarlenItem;
using kernels::cpu::VarlenPlan;
using KernelFn = void (*)(const kernels::FlashParams&, int64_t, int64_t);

// The items in order, each taken by the next free thread.
template <typename Select>
void run_items(const VarlenPlan& plan, const std::vector<VarlenItem>& items, Select select) {
  if (items.empty()) return;
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), int64_t(items.size()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    BlasOnThisThread one_thread;
    for (size_t i = next.fetch_add(1); i < items.size(); i = next.fetch_add(1)) {
      const auto& plan_s = plan.seqs[items[i].seq];
      const KernelFn fn = select(*plan_s.kernels);
      fn(plan_s.p, items[i].begin, items[i].end);
    }
  });
}

// The packed call as the kernels see it (plan.h's VarlenParams): (1, heads, packed rows, dim)
// views, the checks and variants of the attention op, ALiBi per sequence or shared.
struct PackedLaunch {
  Launch launch;
  detail::VarlenOffsets offsets;
  AttentionProblem pb;
  at::Tensor slopes;
};

PackedLaunch prepare_packed(const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                            const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, const std::optional<at::Tensor>& dropout_seed,
                            double dropout_p, bool is_causal, bool bottom_right,
                            std::optional<double> scale, bool enable_gqa,
                            at::OptionalIntArrayRef window,
                            const std::optional<at::Tensor>& alibi_slopes,
                            std::optional<double> softcap,
                            const std::optional<at::Tensor>& rel_bias) {
  PackedLaunch r;
  r.offsets = detail::check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, alibi_slopes);
  const auto q4 = query.transpose(0, 1).unsqueeze(0), k4 = key.transpose(0, 1).unsqueeze(0),
             v4 = value.transpose(0, 1).unsqueeze(0);
  const auto params = make_attention_params(q4, k4, v4, std::nullopt, std::nullopt,
                                            dropout_seed, dropout_p, is_causal, bottom_right,
                                            scale, enable_gqa, window, std::nullopt, softcap,
                                            rel_bias);
  r.pb = params.problem;
  r.launch = prepare(params);
  auto& p = r.launch.p;
  if (alibi_slopes) {
    r.slopes = alibi_slopes->contiguous();
    p.alibi = r.slopes.data_ptr<float>();
    p.al_sh = 1;
    p.al_sb = r.slopes.dim() == 2 ? r.slopes.size(1) : 0;
  }
  p.lse_sh = r.pb.q_len;  // lse (H, total_q)
  return r;
}

kernels::cpu::VarlenParams varlen_params(const detail::VarlenOffsets& o, bool bottom_right) {
  return {o.q.data(), o.k.data(), o.batch, bottom_right};
}

std::tuple<at::Tensor, at::Tensor> varlen_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, const std::optional<at::Tensor>& dropout_seed, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, bool enable_gqa,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes,
    std::optional<double> softcap, const std::optional<at::Tensor>& rel_bias, bool fp32_out) {
  if (kernel_switches().reference) {
    return detail::attention_varlen_forward_per_sequence(
        query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_seed,
        dropout_p, is_causal, bottom_right, scale, enable_gqa, window, alibi_slopes, softcap,
        rel_bias, fp32_out);
  }
  auto pl = prepare_packed(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k, dropout_seed, dropout_p, is_causal, bottom_right, scale,
                           enable_gqa, window, alibi_slopes, softcap, rel_bias);
  auto& p = pl.launch.p;
  const int64_t total_q = query.size(0), heads = query.size(1), ev = value.size(2);
  auto out = at::empty({total_q, heads, ev},
                       query.options().dtype(out_dtype(query.scalar_type(), fp32_out)));
  auto lse = at::empty({heads, total_q}, query.options().dtype(accumulate_type(query.scalar_type())));
  p.out = out.data_ptr(), p.o_sb = 0, p.o_sh = out.stride(1), p.o_sr = out.stride(0);
  p.out_f32 = out.scalar_type() != query.scalar_type();
  p.lse = lse.data_ptr();
  if (heads == 0 || pl.offsets.batch == 0) return {out, lse};
  offer_gemms(p, query.scalar_type());
  auto plan = plan_or_error(kernels::cpu::plan_varlen_forward, p,
                            varlen_params(pl.offsets, bottom_right), int64_t(at::get_num_threads()));
  at::Tensor holder;
  if (plan.packed_elems > 0)
    kernels::cpu::set_varlen_workspace(plan, packed_workspace(plan.packed_elems, query.options(), holder));
  run_items(plan, plan.pack_items, [](const auto& k) { return k.pack; });
  run_items(plan, plan.items, [](const auto& k) { return k.forward; });
  return {out, lse};
}

// A gradient-shaped tensor the kernels read: contiguous last dim, rows apart (an expanded
// gradient of a sum has stride 0 everywhere: copied).
at::Tensor readable(const at::Tensor& t) {
  const bool ok = (t.size(-1) <= 1 || t.stride(-1) == 1) && (t.size(1) <= 1 || t.stride(1) >= t.size(2)) &&
                  (t.size(0) <= 1 || t.stride(0) >= t.size(1) * t.size(2));
  return ok ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, bool enable_gqa,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes,
    std::optional<double> softcap, const std::optional<at::Tensor>& rel_bias) {
  if (kernel_switches().reference) {
    return detail::attention_varlen_backward_per_sequence(
        grad_out, grad_lse, query, key, value, out, lse, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, dropout_seed, dropout_p, is_causal, bottom_right, scale,
        enable_gqa, window, alibi_slopes, softcap, rel_bias);
  }
  auto pl = prepare_packed(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k, dropout_seed, dropout_p, is_causal, bottom_right, scale,
                           enable_gqa, window, alibi_slopes, softcap, rel_bias);
  auto& p = pl.launch.p;
  const int64_t total_q = query.size(0), heads = query.size(1), ev = value.size(2);
  const std::vector<int64_t> out_shape{total_q, heads, ev};
  TORCH_CHECK(grad_out.sizes().equals(out_shape) && out.sizes().equals(out_shape),
              "attention_varlen backward: grad_out and out must have shape ",
              c10::IntArrayRef(out_shape), ", got ", grad_out.sizes(), " and ", out.sizes());
  const bool out_f32 = check_backward_dtypes(query.scalar_type(), grad_out, out, "attention_varlen");
  const auto acc = accumulate_type(query.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == heads && lse.size(1) == total_q &&
                  lse.scalar_type() == acc,
              "attention_varlen backward: lse must be ", acc, " of shape (", heads, ", ", total_q,
              "), got ", lse.scalar_type(), " ", lse.sizes());
  const auto out_r = readable(out), dout = readable(grad_out), lse_c = lse.contiguous();
  at::Tensor dlse;
  if (grad_lse && grad_lse->numel() > 0) dlse = grad_lse->to(acc).contiguous();
  p.out = out_r.data_ptr(), p.o_sb = 0, p.o_sh = out_r.stride(1), p.o_sr = out_r.stride(0);
  p.out_f32 = out_f32;
  p.dout = dout.data_ptr(), p.do_sb = 0, p.do_sh = dout.stride(1), p.do_sr = dout.stride(0);
  p.lse = lse_c.data_ptr();
  p.dlse = dlse.defined() ? dlse.data_ptr() : nullptr;
  auto dq = at::empty(query.sizes(), query.options());
  auto dk = at::empty(key.sizes(), key.options());
  auto dv = at::empty(value.sizes(), value.options());
  p.dq = dq.data_ptr(), p.dq_sb = 0, p.dq_sh = dq.stride(1), p.dq_sr = dq.stride(0);
  p.dk = dk.data_ptr(), p.dk_sb = 0, p.dk_sh = dk.stride(1), p.dk_sr = dk.stride(0);
  p.dv = dv.data_ptr(), p.dv_sb = 0, p.dv_sh = dv.stride(1), p.dv_sr = dv.stride(0);
  at::Tensor d_rel;  // (batch, H, 2 D + 1): a row per sequence, summed below
  if (rel_bias) {
    d_rel = at::zeros({pl.offsets.batch, heads, rel_bias->size(1)}, query.options().dtype(acc));
    p.d_rel_bias = d_rel.data_ptr();
  }
  auto none = at::empty({0}, query.options());
  if (heads == 0 || pl.offsets.batch == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv, d_rel.defined() ? d_rel.sum(0) : none};
  }
  offer_gemms(p, query.scalar_type());
  const auto plan = plan_or_error(kernels::cpu::plan_varlen_backward, p,
                                  varlen_params(pl.offsets, bottom_right));
  run_items(plan, plan.items, [](const auto& k) { return k.backward; });
  return {dq, dk, dv, d_rel.defined() ? d_rel.sum(0) : none};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("_attention_varlen_forward", &varlen_forward);
  m.impl("_attention_varlen_backward", &varlen_backward);
}

}  // namespace fusedattn::cpu
