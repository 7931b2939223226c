#pragma once
// The CPU kernels' GEMM back-ends from LibTorch (kernels/cpu/gemm.h's hooks).
#include <ATen/ATen.h>

#include "fusedattn/kernels/cpu/gemm.h"
#include "fusedattn/kernels/cpu/params.h"

namespace fusedattn::cpu {

// fp32/fp64/bf16/fp16 GEMMs: LibTorch's BLAS (MKL's sgemm_/dgemm_/cblas_gemm_bf16bf16f32 in
// the PyPI wheels), else torch's own matmul (at::addmm_ on views of the blocks): no loop of
// ours. at::native::cpublas::gemm is not exported by libtorch_cpu; its brgemm and pack are.
const kernels::Gemms& torch_gemms();
// The offers the plan may take (null: none): bf16/fp16 products on packed operands
// (cpublas::pack + brgemm, where could_pack says oneDNN can), fp32 products on cpublas::brgemm.
// unpacked: FUSEDATTN_CPU_KERNEL=unpacked, which keeps every product on torch_gemms().
// FUSEDATTN_PACKED_GEMM=reference offers a plain C++ implementation of the packed layout
// instead of oneDNN's (PackedGemm::portable): the AMX paths' own code (keys as rows, the
// packed forward) then runs, slowly, on any CPU with AVX512-BF16, so that tests cover it there.
const kernels::PackedGemm* packed_gemm_offer(at::ScalarType t, bool unpacked);
kernels::FloatGemm float_gemm_offer(bool unpacked);
// A call's offers into p.packed and p.fgemm (the kernel switches applied): for fp32 inputs
// under p.bf16_products, bf16's packed GEMM.
void offer_gemms(kernels::FlashParams& p, at::ScalarType dtype);
// Whether torch's fp32 matmul precision for the CPU allows bf16 products, read as ATen's own
// CPU matmul reads it (torch.set_float32_matmul_precision("medium"), or
// torch.backends.mkldnn.matmul.fp32_precision = "bf16"; "high" / "tf32" keep fp32 on the CPU).
bool fp32_matmul_allows_bf16();
// Which serves torch_gemms()'s fp32 products: "blas" or "torch.mm".
const char* gemm_backend();

// While alive, MKL runs single-threaded on this thread. The kernels' products are small blocks
// of one task; at::parallel_for runs a single task inline, outside an OpenMP region, where MKL
// would fork its threads for each of them: the head-averaged weights of one 16-query block
// (N=1, L=16, E=256, 8 heads) took 43-57 us instead of 23 (AMD EPYC), the other thread
// spinning in libgomp. Without MKL it does nothing.
class BlasOnThisThread {
 public:
  BlasOnThisThread();
  ~BlasOnThisThread();
  BlasOnThisThread(const BlasOnThisThread&) = delete;
  BlasOnThisThread& operator=(const BlasOnThisThread&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace fusedattn::cpu
