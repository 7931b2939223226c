#pragma once
// The kernels' work buffers (Forward::Work, Backward::Work, the decode tasks'): std::vectors
// on memory each thread recycles. A buffer freed by one task (or call) is handed to the next
// of its size class on the same thread, so its pages are not faulted in again: packed
// sequences build a task's buffers per sequence, and with every block >= 64 KiB its own
// mapping (as the benchmarks run, MALLOC_MMAP_THRESHOLD_=65536) their first touch took 49%
// of a 16-sequence fp32 backward (162 vs 84 ms, AMD EPYC, 2 threads). Contents are
// value-initialised as any vector's. Tier-free (scratch.cpp is compiled once).
#include <cstddef>
#include <vector>

// Under AddressSanitizer (scripts/sanitize.sh) every work buffer and cached workspace is an
// allocation of exactly its size, freed when done: recycled, rounded-up blocks would hide an
// overflow into their slack from ASan.
#if defined(__SANITIZE_ADDRESS__)
#define FUSEDATTN_EXACT_ALLOCATIONS 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FUSEDATTN_EXACT_ALLOCATIONS 1
#endif
#endif

namespace fusedattn::kernels::cpu {

void* scratch_allocate(size_t bytes);
void scratch_release(void* ptr, size_t bytes);

template <typename T>
struct ScratchAllocator {
  using value_type = T;
  ScratchAllocator() = default;
  template <typename U>
  ScratchAllocator(const ScratchAllocator<U>&) {}  // NOLINT: allocators convert implicitly
  T* allocate(size_t n) { return static_cast<T*>(scratch_allocate(n * sizeof(T))); }
  void deallocate(T* ptr, size_t n) { scratch_release(ptr, n * sizeof(T)); }
  template <typename U>
  bool operator==(const ScratchAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const ScratchAllocator<U>&) const { return false; }
};

template <typename T>
using Scratch = std::vector<T, ScratchAllocator<T>>;

}  // namespace fusedattn::kernels::cpu
