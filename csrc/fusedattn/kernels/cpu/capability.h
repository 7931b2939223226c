#pragma once
// The instruction-set tiers of the CPU kernels (torch-free). Each tier's kernel sources are
// compiled once with that tier's flags (CMakeLists.txt, FUSEDATTN_CPU_TIERS) into a namespace
// of its own; plan.cpp picks one table of entry points from the tier in use.
//
//   scalar       baseline x86-64 (SSE2): the portable 16-lane vectors lowered to xmm
//   avx2         AVX2 + FMA + F16C: the same loops on ymm
//   avx512       AVX-512 F/DQ/BW/VL: intrinsics for exp, transposes, streamed rows
//   avx512_bf16  + AVX512-BF16: one-instruction bf16 rounding, the keys-as-rows paths
//   amx          + AMX (through oneDNN's brgemm on packed bf16/fp16 blocks)
#include <cstdint>
#include <string>

namespace fusedattn::kernels::cpu {

enum class Capability : uint8_t { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, Amx = 4 };

// The highest tier this CPU (and this build) can run.
Capability detected_capability();
// The tier in use: detected_capability(), capped by FUSEDATTN_CPU_CAPABILITY, read once (the
// first call). An unknown value, or one above what the CPU can run, throws
// std::invalid_argument naming the allowed values and what this CPU has.
Capability capability();
const char* capability_name(Capability c);
// Every tier this CPU can run, lowest first, space-separated ("scalar avx2 ...").
std::string supported_capabilities();
// oneDNN's name of the same cap (ONEDNN_MAX_CPU_ISA): "SSE41", "AVX2", "AVX512_CORE", ...
const char* onednn_isa_name(Capability c);

}  // namespace fusedattn::kernels::cpu
