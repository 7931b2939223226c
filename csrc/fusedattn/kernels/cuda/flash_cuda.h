#pragma once
// Fused attention forward on NVIDIA GPUs (sm_80 and later): the FlashAttention-2 algorithm on
// the tensor cores (mma.sync m16n8k16, fp32 accumulation) for fp16 and bf16. Free of torch
// types: backends/cuda/attention_cuda.cpp checks the tensors, fills FlashCudaParams, takes the current
// stream and device, and calls the launchers below.
//
// Layout: every tensor is seen as (B, H, rows, cols). q, k, v and out have a contiguous last
// dim, 16-byte aligned base pointers and (b, h, row) strides that are multiples of 8 elements,
// and E, Ev are multiples of 8 (the kernel moves rows in 16-byte pieces; the launcher copies
// or pads inputs that are not so). Masks have arbitrary strides (0 where they broadcast).
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fusedattn/kernels/common/types.h"

namespace fusedattn::kernels {

struct FlashCudaParams : ProblemParams {  // dtype: Half or BFloat16; Ev <= head_dim
  int head_dim = 0;         // the compiled tile width: flash_cuda_head_dim(E, Ev)
  float scale_log2 = 0.f;   // softmax scale * log2(e): the kernel works in base 2
  float* lse = nullptr;     // (B, H, L) contiguous, natural log; -inf for fully masked rows

  // Dropout: drop.seed is unused; the seed is read on the device from a one-element int64
  // tensor that torch's CUDA generator filled (at::randint on the query's device), so a
  // captured CUDA graph draws a new one per replay.
  const int64_t* dropout_seed = nullptr;

  void* weights = nullptr;  // (B, H, L, S) contiguous, q's type: flash_weights_cuda
};

// The smallest compiled tile width that holds E and Ev (both <= 256), or 0 if none was built
// (CMake's FUSEDATTN_CUDA_HEAD_DIMS chooses them).
int flash_cuda_head_dim(int64_t E, int64_t Ev);
// Dynamic shared memory one block of the forward needs at that width, with or without a mask.
int flash_cuda_smem_bytes(int head_dim, bool masked);

// out and lse; L > 0 and B * H > 0. Returns the launch's error code.
cudaError_t flash_forward_cuda(const FlashCudaParams& p, cudaStream_t stream);
// weights = exp(s - lse) from the forward's lse (masked entries and fully masked rows 0).
cudaError_t flash_weights_cuda(const FlashCudaParams& p, cudaStream_t stream);

namespace flash_cuda {
// The kernels for element type T (__half, __nv_bfloat16) and head-dim tile kD, defined in
// flash_fwd_cuda.cuh and instantiated in one generated translation unit each.
template <typename T, int kD>
cudaError_t run(const FlashCudaParams& p, cudaStream_t stream, bool weights);
}  // namespace flash_cuda

}  // namespace fusedattn::kernels
