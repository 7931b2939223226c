// Dispatch of the CUDA forward over element type and the compiled head-dim tiles
// (fusedattn_cuda_config.h, written by CMake from FUSEDATTN_CUDA_HEAD_DIMS).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fusedattn/kernels/cuda/flash_cuda.h"
#include "fusedattn/kernels/cuda/flash_fwd_cuda.cuh"
#include "fusedattn_cuda_config.h"

// The instantiations live in the generated translation units; none is compiled here.
#define FUSEDATTN_EXTERN(D)                                                                  \
  extern template cudaError_t fusedattn::kernels::flash_cuda::run<__half, D>(                \
      const fusedattn::kernels::FlashCudaParams&, cudaStream_t, bool);                       \
  extern template cudaError_t fusedattn::kernels::flash_cuda::run<__nv_bfloat16, D>(         \
      const fusedattn::kernels::FlashCudaParams&, cudaStream_t, bool);
FUSEDATTN_CUDA_FOR_EACH_HEAD_DIM(FUSEDATTN_EXTERN)
#undef FUSEDATTN_EXTERN

namespace fusedattn::kernels {
namespace {

template <typename T>
cudaError_t dispatch_dim(const FlashCudaParams& p, cudaStream_t stream, bool weights) {
#define FUSEDATTN_CASE(D) \
  if (p.head_dim == D) return flash_cuda::run<T, D>(p, stream, weights);
  FUSEDATTN_CUDA_FOR_EACH_HEAD_DIM(FUSEDATTN_CASE)
#undef FUSEDATTN_CASE
  return cudaErrorInvalidValue;  // flash_cuda_head_dim gave no such width
}

cudaError_t dispatch(const FlashCudaParams& p, cudaStream_t stream, bool weights) {
  if (p.L == 0 || p.B * p.H == 0) return cudaSuccess;
  if (p.dtype == DType::Half) return dispatch_dim<__half>(p, stream, weights);
  if (p.dtype == DType::BFloat16) return dispatch_dim<__nv_bfloat16>(p, stream, weights);
  return cudaErrorInvalidValue;
}

}  // namespace

int flash_cuda_head_dim(int64_t E, int64_t Ev) {
  const int64_t need = E > Ev ? E : Ev;
  int best = 0;
#define FUSEDATTN_CASE(D) \
  if (need <= D && (best == 0 || D < best)) best = D;
  FUSEDATTN_CUDA_FOR_EACH_HEAD_DIM(FUSEDATTN_CASE)
#undef FUSEDATTN_CASE
  return best;
}

int flash_cuda_smem_bytes(int head_dim, bool masked) {
  int bytes = 0;
#define FUSEDATTN_CASE(D)                                \
  if (head_dim == D) {                                   \
    using Tl = flash_cuda::Tiles<D>;                     \
    bytes = Tl::kSmemElems * 2 + (masked ? Tl::kBiasBytes : 0); \
  }
  FUSEDATTN_CUDA_FOR_EACH_HEAD_DIM(FUSEDATTN_CASE)
#undef FUSEDATTN_CASE
  return bytes;
}

cudaError_t flash_forward_cuda(const FlashCudaParams& p, cudaStream_t stream) {
  return dispatch(p, stream, /*weights=*/false);
}

cudaError_t flash_weights_cuda(const FlashCudaParams& p, cudaStream_t stream) {
  return dispatch(p, stream, /*weights=*/true);
}

}  // namespace fusedattn::kernels
