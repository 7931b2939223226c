// CUDA implementations of `_attention_forward` and `_attention_backward`: the calls that stay
// on fusedattn's route (ops/route.h; by default a CUDA call torch's SDPA serves goes there
// from the `attention` composite and never reaches this file).
//
// Forward: the fused kernel (kernels/cuda/flash_cuda.h) for fp16/bf16 on sm_80+ at head dims up to
// 256, every mask kind, causal in both alignments, GQA, dropout, lse, returned weights and the
// variants (window, ALiBi, softcap, rel_bias);
// the ATen reference for fp32/fp64 and whatever the kernel does not cover. The backward is
// the ATen reference.
//
// The kernel is opt-in (no GPU run of this project's tests has validated it):
// FUSEDATTN_CUDA_KERNEL=fused turns it on, =reference (the default) keeps every call on the
// reference. FUSEDATTN_CUDA_POISON=1 fills outputs with NaN before the kernel runs, so tests
// see any element it fails to write.
//
// This file needs no nvcc: without FUSEDATTN_WITH_CUDA_KERNELS (no toolkit found at build
// time) it registers the reference alone.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "fusedattn/kernels/common/dropout.h"
#include "fusedattn/ops/attention.h"
#include "fusedattn/ops/kernel_args.h"
#include "fusedattn/ops/reference.h"

#ifdef FUSEDATTN_WITH_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "fusedattn/kernels/cuda/flash_cuda.h"
#endif

namespace fusedattn::cuda {
namespace {

#ifdef FUSEDATTN_WITH_CUDA_KERNELS

using kernels::FlashCudaParams;

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

// (..., X, R, C) -> (B, X, R, cols) with C <= cols, a contiguous last dim, (b, x, row) strides
// that are multiples of 8 elements and a 16-byte aligned start, as the kernel's 16-byte
// copies need: the input's own view where it is so, else a copy zero-padded to `cols`.
at::Tensor kernel_view(const at::Tensor& t, int64_t batch, int64_t cols) {
  auto r = t.reshape({batch, t.size(-3), t.size(-2), t.size(-1)});
  bool ok = r.size(3) == cols && (r.size(3) <= 1 || r.stride(3) == 1) &&
            reinterpret_cast<uintptr_t>(r.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3 && ok; ++d) ok = r.stride(d) % 8 == 0;
  if (ok) return r;
  auto padded = at::zeros({r.size(0), r.size(1), r.size(2), cols}, r.options());
  padded.narrow(3, 0, r.size(3)).copy_(r);
  return padded;
}

// The compiled head-dim tile the fused kernel runs this call at, or 0 where the call goes to
// the reference: not requested, fp32/fp64, head dim > 256, below sm_80, too little shared
// memory, lengths or grid past int32.
int fused_head_dim(const AttentionParams& params) {
  const AttentionProblem& pb = params.problem;
  const auto& query = params.query;
  const ScoreMods& mods = params.mods;
  if (!env_is("FUSEDATTN_CUDA_KERNEL", "fused")) return 0;
  const auto t = query.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16) return 0;
  const int head_dim = kernels::flash_cuda_head_dim(round8(pb.head_dim), round8(pb.v_head_dim));
  if (head_dim == 0) return 0;
  const auto* prop = at::cuda::getDeviceProperties(query.device().index());
  if (prop->major < 8 || kernels::flash_cuda_smem_bytes(head_dim, /*masked=*/true) >
                             static_cast<int>(prop->sharedMemPerBlockOptin)) {
    return 0;
  }
  constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();
  if (pb.q_len >= kMaxInt || pb.kv_len >= kMaxInt ||
      (pb.q_len + 63) / 64 * pb.batch_size * pb.heads >= kMaxInt) {
    return 0;
  }
  // The kernel takes the window's sides and rel_bias's D as int.
  if (mods.window_left >= kMaxInt || mods.window_right >= kMaxInt || mods.rel_max >= kMaxInt) return 0;
  return head_dim;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward(const AttentionParams& params,
                                                             int head_dim) {
  const AttentionProblem& pb = params.problem;
  const auto &query = params.query, &key = params.key, &value = params.value;
  const bool return_weights = params.return_weights;
  const double dropout_p = params.dropout_p;
  const c10::cuda::CUDAGuard guard(query.device());
  FlashCudaParams p;
  p.dtype = query.scalar_type() == at::kHalf ? kernels::DType::Half : kernels::DType::BFloat16;
  p.B = pb.batch_size, p.H = pb.heads, p.Hk = pb.kv_heads;
  p.L = pb.q_len, p.S = pb.kv_len;
  p.E = round8(pb.head_dim), p.Ev = round8(pb.v_head_dim);
  p.head_dim = head_dim;
  p.scale_log2 = static_cast<float>(pb.scale * 1.4426950408889634);

  auto out_padded = at::empty({p.B, p.H, p.L, p.Ev}, query.options());
  auto lse = at::empty(pb.lse_shape(), query.options().dtype(at::kFloat));
  at::Tensor weights = at::empty({0}, query.options());
  if (return_weights) weights = at::empty(pb.weights_shape(), query.options());
  if (env_is("FUSEDATTN_CUDA_POISON", "1")) {
    out_padded.fill_(std::numeric_limits<double>::quiet_NaN());
    lse.fill_(std::numeric_limits<double>::quiet_NaN());
    weights.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  auto finish = [&] {
    auto out = out_padded;
    if (p.Ev != pb.v_head_dim) out = out.narrow(3, 0, pb.v_head_dim).contiguous();
    return std::make_tuple(out.view(pb.out_shape()), lse, weights);
  };
  if (p.L == 0 || p.B * p.H == 0) return finish();

  const auto q = kernel_view(query, p.B, p.E);
  const auto k = kernel_view(key, p.B, p.E);
  const auto v = kernel_view(value, p.B, p.Ev);
  fill_operands(q, k, v, p);
  p.out = out_padded.data_ptr(), p.o_sh = p.L * p.Ev, p.o_sb = p.H * p.o_sh, p.o_sr = p.Ev;
  p.lse = lse.data_ptr<float>();
  const auto mask_views = fill_mask_params(params, p);
  at::Tensor seed;
  if (dropout_p > 0.0) {
    // Read on the device (drawn there by the op unless a caller passed a CPU seed).
    seed = reference::checked_dropout_seed(params.dropout_seed).to(query.device()).contiguous();
    p.dropout = true;
    p.drop = kernels::DropoutParams::make(0, dropout_p);
    p.dropout_seed = seed.data_ptr<int64_t>();
  }
  const auto stream = at::cuda::getCurrentCUDAStream(query.device().index()).stream();
  C10_CUDA_CHECK(kernels::flash_forward_cuda(p, stream));
  if (return_weights && p.S > 0) {
    p.weights = weights.data_ptr();
    C10_CUDA_CHECK(kernels::flash_weights_cuda(p, stream));
  }
  return finish();
}

#endif  // FUSEDATTN_WITH_CUDA_KERNELS

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(const AttentionParams& params) {
#ifdef FUSEDATTN_WITH_CUDA_KERNELS
  if (const int head_dim = fused_head_dim(params)) {
    auto [out, lse, weights] = fused_forward(params, head_dim);
    // Averaged weights: the per-head ones, then their mean (fp32 sum).
    if (params.return_weights && params.average_weights)
      weights = weights.mean(-3, false, at::kFloat).to(params.problem.dtype);
    return {out, lse, weights};
  }
#endif
  return reference::attention_forward(params);
}

}  // namespace
}  // namespace fusedattn::cuda

namespace fusedattn {
bool cuda_kernels_built() {
#ifdef FUSEDATTN_WITH_CUDA_KERNELS
  return true;
#else
  return false;
#endif
}
}  // namespace fusedattn

namespace fusedattn::cuda {

TORCH_LIBRARY_IMPL(fusedattn, CUDA, m) {
  m.impl("_attention_forward", &attention_forward_entry<attention_forward>);
  m.impl("_attention_backward", &attention_backward_entry<reference::attention_backward>);
}

}  // namespace fusedattn::cuda
