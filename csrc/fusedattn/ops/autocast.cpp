// Autocast for the public attention op, as torch's for scaled_dot_product_attention: inside
// torch.autocast, floating-point query/key/value and float masks run in the autocast dtype
// (bf16 on the CPU by default, fp16 on CUDA). The modules' op needs none: its projections are
// at::linear, which autocast casts, and the attention op below them then sees that dtype.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "fusedattn/ops/attention.h"

namespace fusedattn::detail {
namespace {

template <c10::DeviceType Device, c10::DispatchKey Key>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_autocast(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    std::optional<double> scale, bool enable_gqa, const std::optional<at::Tensor>& key_padding_mask,
    c10::string_view causal_alignment, bool return_weights, bool return_lse,
    bool average_weights, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias, const std::optional<at::Tensor>& sinks) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
  const auto dtype = at::autocast::get_autocast_dtype(Device);
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, Device); };
  auto cast_mask = [&](const std::optional<at::Tensor>& m) -> std::optional<at::Tensor> {
    if (!m || !m->is_floating_point()) return m;  // bool masks stay bool
    return cast(*m);
  };
  return ops::attention(cast(query), cast(key), cast(value), cast_mask(attn_mask), dropout_p,
                        is_causal, scale, enable_gqa, cast_mask(key_padding_mask),
                        causal_alignment, return_weights, return_lse, average_weights, window,
                        alibi_slopes, softcap, rel_bias, sinks);  // ALiBi's slopes, sinks as given
}

}  // namespace
}  // namespace fusedattn::detail

TORCH_LIBRARY_IMPL(fusedattn, AutocastCPU, m) {
  m.impl("attention", TORCH_FN((fusedattn::detail::attention_autocast<
                                c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>)));
}

TORCH_LIBRARY_IMPL(fusedattn, AutocastCUDA, m) {
  m.impl("attention", TORCH_FN((fusedattn::detail::attention_autocast<
                                c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>)));
}
