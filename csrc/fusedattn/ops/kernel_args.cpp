#include "fusedattn/ops/kernel_args.h"

namespace fusedattn {

int64_t fill_cache_padding(const std::optional<at::Tensor>& key_padding_mask,
                           kernels::MaskParams& p) {
  if (!key_padding_mask || key_padding_mask->size(1) == 0) return 0;
  const auto& m = *key_padding_mask;
  p.kpm_kind = m.scalar_type() == at::kBool ? kernels::MaskKind::Bool : kernels::MaskKind::Additive;
  p.kpm = m.data_ptr(), p.p_sb = m.stride(0), p.p_sc = m.stride(1);
  return m.size(1);
}

kernels::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::DType::Float;
    case at::kDouble: return kernels::DType::Double;
    case at::kBFloat16: return kernels::DType::BFloat16;
    default: return kernels::DType::Half;  // the checks allow no other
  }
}

void fill_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   kernels::ProblemParams& p) {
  p.q = q.data_ptr(), p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sr = q.stride(2);
  p.k = k.data_ptr(), p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sr = k.stride(2);
  p.v = v.data_ptr(), p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sr = v.stride(2);
}

std::pair<at::Tensor, at::Tensor> fill_mask_params(const AttentionParams& params,
                                                   kernels::MaskParams& p) {
  using kernels::MaskKind;
  const AttentionProblem& pb = params.problem;
  const auto& attn_mask = params.attn_mask;
  const auto& key_padding_mask = params.key_padding_mask;
  const auto& mods = params.mods;
  const bool bottom_right = params.bottom_right;
  at::Tensor mask, kpm;
  if (attn_mask) {
    mask = attn_mask->expand(pb.weights_shape())
               .reshape({pb.batch_size, pb.heads, pb.q_len, pb.kv_len});
    p.mask_kind = mask.scalar_type() == at::kBool ? MaskKind::Bool : MaskKind::Additive;
    p.mask = mask.data_ptr();
    p.m_sb = mask.stride(0), p.m_sh = mask.stride(1), p.m_sr = mask.stride(2),
    p.m_sc = mask.stride(3);
  }
  if (key_padding_mask) {
    kpm = key_padding_mask->reshape({pb.batch_size, pb.kv_len});
    p.kpm_kind = kpm.scalar_type() == at::kBool ? MaskKind::Bool : MaskKind::Additive;
    p.kpm = kpm.data_ptr(), p.p_sb = kpm.stride(0), p.p_sc = kpm.stride(1);
  }
  p.causal = params.is_causal;
  p.causal_offset = bottom_right ? pb.kv_len - pb.q_len : 0;
  p.pos_offset = bottom_right ? pb.kv_len - pb.q_len : 0;
  p.window_left = mods.window_left, p.window_right = mods.window_right;
  if (mods.alibi.defined()) {
    p.alibi = mods.alibi.data_ptr<float>(), p.al_sb = mods.alibi.stride(0), p.al_sh = mods.alibi.stride(1);
  }
  p.softcap = mods.softcap;
  if (mods.rel_bias.defined()) p.rel_bias = mods.rel_bias.data_ptr(), p.rel_max = mods.rel_max;
  return {mask, kpm};
}

}  // namespace fusedattn
