#pragma once
// Counter-based dropout, free of torch types so every backend (the ATen reference, the fused
// CPU kernel, a CUDA kernel) can draw the same keep/drop decision for element (row, col) of a
// batch-head's L x S probability matrix from one 64-bit seed, in any order, without storing
// a mask. The backward regenerates the forward's mask from the same seed.
#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDATTN_HOST_DEVICE inline
#endif

namespace fusedattn::kernels {

// splitmix64's finaliser: a bijection on 64 bits whose output bits pass BigCrush for
// consecutive inputs, which is what consecutive element indices are.
FUSEDATTN_HOST_DEVICE uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

struct DropoutParams {
  static constexpr uint64_t kStep = 0x9e3779b97f4a7c15ULL;  // the golden ratio in 64 bits
  uint64_t seed = 0;        // drawn from torch's generator once per forward call
  uint32_t threshold = 0;   // drop when the 32-bit draw is below this: round(p * 2^32)
  bool drop_all = false;    // p == 1
  // 1 / (1 - p), 0 when p == 1; in fp64, so that fp64 calls scale without fp32's rounding
  // (4.8e-8 relative at p = 0.1); fp32 kernels take float(keep_scale).
  double keep_scale = 1.0;

  static DropoutParams make(uint64_t seed, double p) {
    DropoutParams d;
    d.seed = seed;
    d.drop_all = p >= 1.0;
    const double t = p * 4294967296.0;
    d.threshold = d.drop_all ? 0xffffffffu : static_cast<uint32_t>(t);
    d.keep_scale = d.drop_all ? 0.0 : 1.0 / (1.0 - p);
    return d;
  }

  // The same stream from element `offset` on: keep(i) of the result is keep(offset + i) of
  // this one. Packed sequences draw each sequence's L x S block from its own range so.
  FUSEDATTN_HOST_DEVICE DropoutParams shifted(uint64_t offset) const {
    DropoutParams d = *this;
    d.seed = seed + offset * kStep;
    return d;
  }

  // index: the element's position in the row-major (batch*heads, L, S) probability tensor.
  FUSEDATTN_HOST_DEVICE bool keep(uint64_t index) const {
    if (drop_all) return false;
    const uint32_t draw = static_cast<uint32_t>(mix64(seed + index * kStep) >> 32);
    return draw >= threshold;
  }
};

}  // namespace fusedattn::kernels
