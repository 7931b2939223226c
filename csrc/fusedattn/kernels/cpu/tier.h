#pragma once
// Included first by every per-tier kernel source. CMake compiles those sources once per tier
// with that tier's flags and -DFUSEDATTN_TIER=<name> (scalar, avx2, avx512, avx512_bf16); all
// their code lives in namespace fusedattn::kernels::cpu::<name>, so the copies never collide.
// What a tier may use is read from the compiler's own feature macros, nowhere else:
//   FUSEDATTN_AVX512       AVX-512 F, DQ, BW, VL intrinsics
//   FUSEDATTN_AVX512_BF16  and AVX512-BF16 (vcvtneps2bf16)
#include <cstdint>

#ifndef FUSEDATTN_TIER
#error "per-tier kernel sources are compiled with -DFUSEDATTN_TIER=<tier> (see CMakeLists.txt)"
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FUSEDATTN_AVX512 1
#if defined(__AVX512BF16__)
#define FUSEDATTN_AVX512_BF16 1
#endif
#endif

#define FUSEDATTN_TIER_NS_BEGIN namespace fusedattn::kernels::cpu { namespace FUSEDATTN_TIER {
#define FUSEDATTN_TIER_NS_END } }
