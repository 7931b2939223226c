// The CUDA decode kernels (decode_cuda.h). One thread block per (b, h, key range): its four
// warps take every fourth key of the range, each lane a 32nd of the head dim, with an online
// softmax per warp; the warps' states are combined in shared memory, and the ranges' by the
// merge kernel. Scores are reduced across the warp's lanes (a key row is one coalesced read).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "fusedattn/kernels/cuda/decode_cuda.h"

namespace fusedattn::kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kPerLane = kDecodeCudaMaxHeadDim / 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// max that keeps NaN (a NaN score must reach the output).
__device__ __forceinline__ float max_nan(float m, float v) { return (v > m || v != v) ? v : m; }

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Writes one finished row: out = acc / l, lse = m + log l (l == 0: 0 and -inf; NaN stays).
template <typename T>
__device__ void finish(const DecodeCudaParams& p, int64_t b, int64_t h, int64_t t, float m,
                       float l, const float* acc, int tid, int threads) {
  const float inv = l > 0.f ? 1.f / l : (l == 0.f ? 0.f : l);
  T* out = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + t * p.o_sr;
  for (int e = tid; e < p.Ev; e += threads) out[e] = from_float<T>(acc[e] * inv);
  if (tid == 0 && p.lse != nullptr)
    p.lse[(b * p.H + h) * p.L + t] = l > 0.f ? m + logf(l) : (l == 0.f ? -INFINITY : l);
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) decode_kernel(DecodeCudaParams p) {
  __shared__ float sm_m[kWarps], sm_l[kWarps], sm_acc[kWarps][kDecodeCudaMaxHeadDim];
  __shared__ float sm_out[kDecodeCudaMaxHeadDim];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hk);
  const int64_t c = blockIdx.y;
  const int64_t len = p.lengths[b];
  const int64_t j_begin = c * p.split_keys, j_end = min(len, j_begin + p.split_keys);
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  for (int64_t t = 0; t < p.L; ++t) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + t * p.q_sr;
    float qr[kPerLane], acc[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      qr[i] = e < p.E ? to_float(q[e]) : 0.f;
      acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    const int64_t visible_end = p.causal ? min(j_end, len - p.L + t + 1) : j_end;
    for (int64_t j = j_begin + warp; j < visible_end; j += kWarps) {
      float add = 0.f;
      if (j < p.kpm_len) {
        if (p.kpm_kind == MaskKind::Bool) {
          if (static_cast<const uint8_t*>(p.kpm)[b * p.p_sb + j * p.p_sc] != 0) continue;
        } else if (p.kpm_kind == MaskKind::Additive) {
          add = to_float(static_cast<const T*>(p.kpm)[b * p.p_sb + j * p.p_sc]);
        }
      }
      const T* kr = kbase + j * p.k_sr;
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int e = lane + 32 * i;
        if (e < p.E) dot += qr[i] * to_float(kr[e]);
      }
      const float s = warp_sum(dot) * p.scale + add;
      if (s == -INFINITY) continue;
      const float m_new = max_nan(m, s);
      const float alpha = __expf(m - m_new);  // 0 when m was -inf
      const float w = __expf(s - m_new);
      l = l * alpha + w;
      const T* vr = vbase + j * p.v_sr;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int e = lane + 32 * i;
        if (e < p.Ev) acc[i] = acc[i] * alpha + w * to_float(vr[e]);
      }
      m = m_new;
    }
    if (lane == 0) sm_m[warp] = m, sm_l[warp] = l;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      if (e < p.Ev) sm_acc[warp][e] = acc[i];
    }
    __syncthreads();
    float top = -INFINITY;
    for (int w = 0; w < kWarps; ++w) top = max_nan(top, sm_m[w]);
    float sum = 0.f;
    for (int w = 0; w < kWarps; ++w)
      if (sm_m[w] != -INFINITY) sum += sm_l[w] * __expf(sm_m[w] - top);
    for (int e = threadIdx.x; e < p.Ev; e += blockDim.x) {
      float a = 0.f;
      for (int w = 0; w < kWarps; ++w)
        if (sm_m[w] != -INFINITY) a += sm_acc[w][e] * __expf(sm_m[w] - top);
      sm_out[e] = a;
    }
    __syncthreads();
    if (p.splits > 1) {
      float* part = p.partial + (((b * p.H + h) * p.L + t) * p.splits + c) * (2 + p.Ev);
      if (threadIdx.x == 0) part[0] = top, part[1] = sum;
      for (int e = threadIdx.x; e < p.Ev; e += blockDim.x) part[2 + e] = sm_out[e];
    } else {
      finish<T>(p, b, h, t, top, sum, sm_out, threadIdx.x, blockDim.x);
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(128) merge_kernel(DecodeCudaParams p) {
  __shared__ float sm_acc[kDecodeCudaMaxHeadDim];
  const int64_t row = blockIdx.x, t = row % p.L, bh = row / p.L, b = bh / p.H, h = bh % p.H;
  const float* part = p.partial + row * p.splits * (2 + p.Ev);
  float top = -INFINITY;
  for (int c = 0; c < p.splits; ++c) top = max_nan(top, part[c * (2 + p.Ev)]);
  float l = 0.f;
  for (int c = 0; c < p.splits; ++c) {
    const float mc = part[c * (2 + p.Ev)];
    if (mc != -INFINITY) l += part[c * (2 + p.Ev) + 1] * __expf(mc - top);
  }
  for (int e = threadIdx.x; e < p.Ev; e += blockDim.x) {
    float a = 0.f;
    for (int c = 0; c < p.splits; ++c) {
      const float mc = part[c * (2 + p.Ev)];
      if (mc != -INFINITY) a += part[c * (2 + p.Ev) + 2 + e] * __expf(mc - top);
    }
    sm_acc[e] = a;
  }
  __syncthreads();
  finish<T>(p, b, h, t, top, l, sm_acc, threadIdx.x, blockDim.x);
}

template <typename T>
cudaError_t launch(const DecodeCudaParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.B * p.H), static_cast<unsigned>(p.splits));
  decode_kernel<T><<<grid, kWarps * 32, 0, stream>>>(p);
  if (p.splits > 1) merge_kernel<T><<<static_cast<unsigned>(p.B * p.H * p.L), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t decode_cuda(const DecodeCudaParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::Float: return launch<float>(p, stream);
    case DType::Half: return launch<__half>(p, stream);
    case DType::BFloat16: return launch<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;  // fp64 takes the ATen path
  }
}

}  // namespace fusedattn::kernels
