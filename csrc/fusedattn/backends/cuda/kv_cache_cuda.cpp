// CUDA implementation of `kv_cache_attention`: by default torch's route (SDPA over the cache,
// ops/kv_cache.h) where neither lse nor weights are asked for; with FUSEDATTN_CUDA_KERNEL=fused
// (opt-in, as the forward: no GPU run of this project's tests has validated it) the decode
// kernel (kernels/cuda/decode_cuda.h) for fp32/fp16/bf16 caches of the model's dtype at head
// dims up to 256; otherwise (fp64, a cache stored in fewer bytes) the ATen implementation. The
// lengths are read on the host once per call (a synchronisation) to refuse a full cache and to
// size the split.
//
// This file needs no nvcc: without FUSEDATTN_WITH_CUDA_KERNELS it registers the ATen path.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "fusedattn/ops/checks.h"
#include "fusedattn/ops/kernel_args.h"
#include "fusedattn/ops/kv_cache.h"

#ifdef FUSEDATTN_WITH_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "fusedattn/kernels/cuda/decode_cuda.h"
#endif

namespace fusedattn::cuda {
namespace {

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
#ifdef FUSEDATTN_WITH_CUDA_KERNELS
  const char* mode = std::getenv("FUSEDATTN_CUDA_KERNEL");
  const bool fused = mode != nullptr && std::strcmp(mode, "fused") == 0 &&
                     query.scalar_type() != at::kDouble && query.dim() == 4 &&
                     key_cache.scalar_type() == query.scalar_type() &&
                     query.size(-1) <= kernels::kDecodeCudaMaxHeadDim &&
                     value_cache.size(-1) <= kernels::kDecodeCudaMaxHeadDim;
  if (fused) {
    check_kv_cache_arguments(query, key, value, key_cache, value_cache, lengths,
                             key_padding_mask, enable_gqa);
    c10::cuda::CUDAGuard guard(query.device());
    const int64_t B = query.size(0), H = query.size(1), T = query.size(2), E = query.size(3);
    const int64_t C = key_cache.size(2), Ev = value_cache.size(3), Hk = key_cache.size(1);
    const int64_t longest = detail::check_kv_cache_lengths(lengths, key ? T : 0, C);
    if (key) detail::kv_cache_append_aten(*key, *value, key_cache, value_cache, lengths);
    auto q = query.stride(-1) == 1 ? query : query.contiguous();
    auto out = at::empty({B, H, T, Ev}, query.options());
    auto lse = at::empty({B, H, T}, query.options().dtype(at::kFloat));
    if (out.numel() > 0) {
      kernels::DecodeCudaParams p;
      p.dtype = kernel_dtype(query.scalar_type());
      p.B = B, p.H = H, p.Hk = Hk, p.L = T, p.S = C, p.E = E, p.Ev = Ev;
      p.scale = static_cast<float>(scale ? *scale : 1.0 / std::sqrt(static_cast<double>(E)));
      fill_operands(q, key_cache, value_cache, p);
      p.out = out.data_ptr(), p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sr = out.stride(2);
      auto lengths_c = lengths.contiguous();
      p.lengths = lengths_c.data_ptr<int64_t>();
      p.causal = is_causal;
      p.kpm_len = fill_cache_padding(key_padding_mask, p);
      p.lse = lse.data_ptr<float>();
      // Enough blocks for two per multiprocessor, ranges of at least 256 positions.
      const auto* prop = at::cuda::getDeviceProperties(query.device().index());
      const int64_t want = 2 * prop->multiProcessorCount, blocks = B * H;
      int64_t splits = blocks >= want ? 1 : (want + blocks - 1) / blocks;
      splits = std::clamp<int64_t>(std::min(splits, (longest + 255) / 256), 1, 65535);
      p.splits = static_cast<int>(splits);
      p.split_keys = std::max<int64_t>((longest + splits - 1) / splits, 1);
      at::Tensor partial;
      if (splits > 1) {
        partial = at::empty({B * H * T * splits * (2 + Ev)}, query.options().dtype(at::kFloat));
        p.partial = partial.data_ptr<float>();
      }
      const auto stream = at::cuda::getCurrentCUDAStream(query.device().index()).stream();
      C10_CUDA_CHECK(kernels::decode_cuda(p, stream));
    } else {
      lse.fill_(-std::numeric_limits<double>::infinity());
    }
    auto weights = return_weights ? detail::kv_cache_weights(query, key_cache, lengths, lse,
                                                             scale, is_causal, key_padding_mask)
                                  : at::empty({0}, query.options());
    return {out, return_lse ? lse : at::empty({0}, lse.options()), weights};
  }
#endif
  return detail::kv_cache_attention_aten(query, key, value, key_cache, value_cache, lengths,
                                         scale, is_causal, key_padding_mask, enable_gqa,
                                         return_lse, return_weights, scales);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CUDA, m) {
  m.impl("kv_cache_attention", &kv_cache_attention);
}

}  // namespace fusedattn::cuda
