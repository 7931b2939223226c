#include "fusedattn/backends/cpu/config.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "fusedattn/kernels/cpu/capability.h"
#include "fusedattn/ops/attention.h"

namespace fusedattn {
namespace cpu {
namespace {

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// oneDNN (behind cpublas::brgemm) reads ONEDNN_MAX_CPU_ISA once, at its first kernel: a
// FUSEDATTN_CPU_CAPABILITY cap is handed to it at load time unless the caller set one.
const bool onednn_capped = [] {
  const char* cap = std::getenv("FUSEDATTN_CPU_CAPABILITY");
  if (cap == nullptr || *cap == '\0' || std::getenv("ONEDNN_MAX_CPU_ISA") != nullptr) return false;
  try {
    setenv("ONEDNN_MAX_CPU_ISA", kernels::cpu::onednn_isa_name(kernels::cpu::capability()), 0);
  } catch (const std::invalid_argument&) {  // reported by the first op call
    return false;
  }
  return true;
}();

}  // namespace

KernelSwitches kernel_switches() {
  KernelSwitches s;
  s.reference = env_is("FUSEDATTN_CPU_KERNEL", "reference");
  s.unpacked = env_is("FUSEDATTN_CPU_KERNEL", "unpacked");
  s.portable_packed_gemm = env_is("FUSEDATTN_PACKED_GEMM", "reference");
  return s;
}

}  // namespace cpu

std::string cpu_capability() {
  try {
    return kernels::cpu::capability_name(kernels::cpu::capability());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
}

std::vector<std::string> cpu_capabilities_supported() {
  std::vector<std::string> tiers;
  for (int c = 0; c <= int(kernels::cpu::detected_capability()); ++c)
    tiers.emplace_back(kernels::cpu::capability_name(kernels::cpu::Capability(c)));
  return tiers;
}

}  // namespace fusedattn
