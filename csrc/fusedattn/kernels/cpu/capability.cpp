// CPU feature detection and the FUSEDATTN_CPU_CAPABILITY cap (see capability.h).
#include "fusedattn/kernels/cpu/capability.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fusedattn::kernels::cpu {
namespace {

constexpr const char* kNames[] = {"scalar", "avx2", "avx512", "avx512_bf16", "amx"};
constexpr int kTiers = 5;

#if defined(__x86_64__) && defined(__linux__)
// Linux hands out the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, as
// oneDNN does before its first AMX kernel); a CPU with the flags but no permission has no AMX.
bool amx_permitted() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureTileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
}
#endif

Capability detect() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!avx2) return Capability::Scalar;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (!avx512) return Capability::Avx2;
  if (!__builtin_cpu_supports("avx512bf16")) return Capability::Avx512;
#if defined(__linux__)
  // AMX: CPUID.(7,0):EDX bits 22 (bf16) and 24 (tile); GCC 11 and Clang 14 know no
  // __builtin_cpu_supports name for them.
  unsigned a = 7, b = 0, c = 0, d = 0;
  __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
  const bool amx = ((d >> 22) & 1) && ((d >> 24) & 1) && amx_permitted();
  return amx ? Capability::Amx : Capability::Avx512Bf16;
#else
  return Capability::Avx512Bf16;
#endif
#else
  return Capability::Scalar;
#endif
}

Capability from_environment() {
  const Capability hw = detected_capability();
  const char* v = std::getenv("FUSEDATTN_CPU_CAPABILITY");
  if (v == nullptr || *v == '\0') return hw;
  for (int i = 0; i < kTiers; ++i) {
    if (std::strcmp(v, kNames[i]) != 0) continue;
    if (i > int(hw)) {
      throw std::invalid_argument(std::string("FUSEDATTN_CPU_CAPABILITY=") + v +
                                  ": this CPU cannot run that tier; it runs " +
                                  supported_capabilities());
    }
    return Capability(i);
  }
  throw std::invalid_argument(std::string("FUSEDATTN_CPU_CAPABILITY=") + v +
                              ": unknown tier; expected one of scalar, avx2, avx512, "
                              "avx512_bf16, amx (this CPU runs " + supported_capabilities() + ")");
}

}  // namespace

Capability detected_capability() {
  static const Capability c = detect();
  return c;
}

Capability capability() {
  static const Capability c = from_environment();
  return c;
}

const char* capability_name(Capability c) { return kNames[int(c)]; }

std::string supported_capabilities() {
  std::string s;
  for (int i = 0; i <= int(detected_capability()); ++i) {
    if (i) s += ' ';
    s += kNames[i];
  }
  return s;
}

const char* onednn_isa_name(Capability c) {
  switch (c) {
    case Capability::Scalar: return "SSE41";
    case Capability::Avx2: return "AVX2";
    case Capability::Avx512: return "AVX512_CORE";
    case Capability::Avx512Bf16: return "AVX512_CORE_BF16";
    case Capability::Amx: return "AVX512_CORE_AMX";
  }
  return "ALL";
}

}  // namespace fusedattn::kernels::cpu
