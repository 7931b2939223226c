#pragma once
// Decoding over a KV cache on NVIDIA GPUs: a few queries per (b, h) against a long cache
// read in place, its keys split across thread blocks (flash-decoding) and the partial results
// merged by their log-sum-exp. Torch-free: backends/cuda/kv_cache_cuda.cpp checks the tensors, appends
// the new keys and values, fills the parameters and launches.
//
// Layout: q (B, H, T, E), the cache k (B, Hk, S, E) and v (B, Hk, S, Ev), out (B, H, T, Ev),
// each with a contiguous last dim and (b, h, row) strides; E, Ev <= 256.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fusedattn/kernels/common/types.h"

namespace fusedattn::kernels {

struct DecodeCudaParams : ProblemParams {  // dtype: Float, Half or BFloat16; L = T
  float scale = 1.f;
  const int64_t* lengths = nullptr;  // (B,) on the device: positions valid (after the append)
  int64_t kpm_len = 0;               // the key padding mask covers positions [0, kpm_len)
  float* lse = nullptr;              // (B, H, T) contiguous, or null
  // Set by the launcher's caller: splits ranges of split_keys positions per (b, h); with
  // splits > 1, partial holds (B, H, T, splits) x (2 + Ev) floats.
  int splits = 1;
  int64_t split_keys = 0;
  float* partial = nullptr;
};

constexpr int kDecodeCudaMaxHeadDim = 256;

// The partial ranges' merge runs only when p.splits > 1. Returns the launches' error code.
cudaError_t decode_cuda(const DecodeCudaParams& p, cudaStream_t stream);

}  // namespace fusedattn::kernels
