// CPU implementation of `kv_cache_attention`: the decode kernel (kernels/cpu/decode.cpp,
// planned by plan_decode), reading the cache in place and appending the new keys and values
// in the same call. FUSEDATTN_CPU_KERNEL=reference sends it to the ATen implementation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "fusedattn/backends/cpu/config.h"
#include "fusedattn/backends/cpu/gemm_hooks.h"
#include "fusedattn/backends/cpu/launch.h"
#include "fusedattn/kernels/cpu/plan.h"
#include "fusedattn/ops/checks.h"
#include "fusedattn/ops/kernel_args.h"
#include "fusedattn/ops/kv_cache.h"

namespace fusedattn::cpu {
namespace {

kernels::CacheStorage cache_storage(at::ScalarType stored, at::ScalarType model) {
  if (stored == model) return kernels::CacheStorage::Model;
  switch (stored) {
    case at::kBFloat16: return kernels::CacheStorage::BFloat16;
    case at::kHalf: return kernels::CacheStorage::Half;
    default: return kernels::CacheStorage::Int8;  // checked: the only other storage
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_cache_attention(
    const at::Tensor& query, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, at::Tensor& key_cache, at::Tensor& value_cache,
    at::Tensor& lengths, std::optional<double> scale, bool is_causal,
    const std::optional<at::Tensor>& key_padding_mask, bool enable_gqa, bool return_lse,
    bool return_weights, const std::optional<at::Tensor>& key_scales,
    const std::optional<at::Tensor>& value_scales) {
  const detail::CacheScales scales{key_scales, value_scales};
  if (detail::kv_cache_takes_torch_route(query, key_padding_mask, return_lse, return_weights)) {
    return detail::kv_cache_attention_torch(query, key, value, key_cache, value_cache, lengths,
                                            scale, is_causal, key_padding_mask, enable_gqa,
                                            scales);
  }
  if (kernel_switches().reference) {
    return detail::kv_cache_attention_aten(query, key, value, key_cache, value_cache, lengths,
                                           scale, is_causal, key_padding_mask, enable_gqa,
                                           return_lse, return_weights, scales);
  }
  check_kv_cache_arguments(query, key, value, key_cache, value_cache, lengths, key_padding_mask,
                           enable_gqa, key_scales, value_scales);
  const int64_t B = query.size(0), H = query.size(1), T = query.size(2), E = query.size(3);
  const int64_t capacity = key_cache.size(2);
  const auto acc = accumulate_type(query.scalar_type());
  auto out = at::empty({B, H, T, value_cache.size(3)}, query.options());
  const bool lse_wanted = return_lse || return_weights;  // the weights come from it
  auto lse = lse_wanted ? at::empty({B, H, T}, query.options().dtype(acc))
                        : at::empty({0}, query.options().dtype(acc));
  auto weights = at::empty({0}, query.options());
  const int64_t longest = detail::check_kv_cache_lengths(lengths, key ? T : 0, capacity);
  // The lengths after the append, which the kernels read; `lengths` itself advances only
  // once they have run (an error before leaves the cache as it was).
  const auto after = key ? lengths + T : lengths.contiguous();
  auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    if (key) lengths.add_(T);
    if (return_weights) {
      weights = detail::kv_cache_weights(query, key_cache, after, lse, scale, is_causal,
                                         key_padding_mask, scales);
    }
    return {out, return_lse ? lse : at::empty({0}, lse.options()), weights};
  };
  if (out.numel() == 0 && !key) {
    if (lse_wanted) lse.fill_(-std::numeric_limits<double>::infinity());
    return finish();
  }

  kernels::DecodeParams p;
  p.dtype = kernel_dtype(query.scalar_type());
  p.B = B, p.H = H, p.Hk = key_cache.size(1);
  p.L = T, p.S = capacity, p.E = E, p.Ev = value_cache.size(3);
  check_scale(scale, query.scalar_type(), "kv_cache_attention");
  p.scale = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(E));
  p.gemm = &torch_gemms();
  auto q = query.stride(-1) == 1 || E <= 1 ? query : query.contiguous();
  fill_operands(q, key_cache, value_cache, p);
  p.storage = cache_storage(key_cache.scalar_type(), query.scalar_type());
  if (key_scales) {  // int8 (checked): the scales, written by the append, read by the tasks
    p.k_scale = key_scales->data_ptr<float>(), p.v_scale = value_scales->data_ptr<float>();
    p.ks_sb = key_scales->stride(0), p.ks_sh = key_scales->stride(1), p.ks_sr = key_scales->stride(2);
    p.vs_sb = value_scales->stride(0), p.vs_sh = value_scales->stride(1),
    p.vs_sr = value_scales->stride(2);
  }
  p.lengths = after.data_ptr<int64_t>();
  p.causal = is_causal;
  at::Tensor k_new, v_new;
  if (key) {
    k_new = key->stride(-1) == 1 || E <= 1 ? *key : key->contiguous();
    v_new = value->stride(-1) == 1 || value->size(-1) <= 1 ? *value : value->contiguous();
    p.kn = k_new.data_ptr(), p.kn_sb = k_new.stride(0), p.kn_sh = k_new.stride(1),
    p.kn_sr = k_new.stride(2);
    p.vn = v_new.data_ptr(), p.vn_sb = v_new.stride(0), p.vn_sh = v_new.stride(1),
    p.vn_sr = v_new.stride(2);
  }
  p.kpm_len = fill_cache_padding(key_padding_mask, p);
  p.out = out.data_ptr(), p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sr = out.stride(2);
  p.lse = lse_wanted ? lse.data_ptr() : nullptr;
  p.threads = at::get_num_threads();
  kernels::cpu::DecodePlan plan;
  try {
    plan = kernels::cpu::plan_decode(p, longest);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  at::Tensor partial;
  if (plan.partial_elems > 0) {
    partial = at::empty({plan.partial_elems}, query.options().dtype(acc));
    plan.p.partial = partial.data_ptr();
  }
  // The append copies T rows per (b, hk): a parallel region costs more than that until the
  // rows add up to about 1 MiB.
  if (plan.append_tasks > 0 && B * plan.p.Hk * T * (E + plan.p.Ev) * query.element_size() < (1 << 20)) {
    plan.kernels->decode_append(plan.p, 0, plan.append_tasks);
  } else {
    run_tasks(plan.append_tasks, plan.p, plan.kernels->decode_append);
  }
  if (H > 0) {
    run_tasks(plan.tasks, plan.p, plan.kernels->decode);
    run_tasks(plan.merge_tasks, plan.p, plan.kernels->decode_merge);
  }
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("kv_cache_attention", &kv_cache_attention);
}

}  // namespace fusedattn::cpu
