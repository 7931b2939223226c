#pragma once
// The CPU backend's configuration from the environment, in one place.
//
// FUSEDATTN_CPU_CAPABILITY caps the instruction-set tier (kernels/cpu/capability.h); read once,
// at load, where it is also handed to oneDNN (ONEDNN_MAX_CPU_ISA) unless the caller set that.
// The kernel switches below are test and diagnosis aids, read at each call so that a test can
// set them for one call (a getenv each, against microseconds of kernel launch):
//   FUSEDATTN_CPU_KERNEL=reference  every call on the ATen reference;
//   FUSEDATTN_CPU_KERNEL=unpacked   no packed (AMX brgemm) or JIT GEMMs: MKL's for every product;
//   FUSEDATTN_PACKED_GEMM=reference the packed layout in portable C++ instead of oneDNN's.
namespace fusedattn::cpu {

struct KernelSwitches {
  bool reference = false;
  bool unpacked = false;
  bool portable_packed_gemm = false;
};
KernelSwitches kernel_switches();

}  // namespace fusedattn::cpu
