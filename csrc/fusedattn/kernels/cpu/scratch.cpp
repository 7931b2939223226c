// Per-thread recycling of the kernels' work buffers (scratch.h). Blocks from 16 KiB up come
// in power-of-two size classes (at most 2x the request) from a per-thread free list, which
// keeps up to 64 MiB per thread; smaller ones are plain operator new (malloc's bins recycle
// them already).
#include "fusedattn/kernels/cpu/scratch.h"

#include <cstdlib>
#include <new>
#include <utility>

namespace fusedattn::kernels::cpu {
namespace {

constexpr size_t kMinRecycled = size_t(16) << 10;
constexpr size_t kMaxKeptBytes = size_t(64) << 20;
constexpr size_t kAlign = 64;

size_t size_class(size_t bytes) {
  size_t c = kMinRecycled;
  while (c < bytes) c <<= 1;
  return c;
}

struct Pool {
  std::vector<std::pair<void*, size_t>> blocks;  // free blocks and their class
  size_t kept = 0;
  ~Pool() {
    for (auto& b : blocks) std::free(b.first);
  }
};
thread_local Pool pool;

}  // namespace

#ifdef FUSEDATTN_EXACT_ALLOCATIONS
constexpr bool kRecycle = false;
#else
constexpr bool kRecycle = true;
#endif

void* scratch_allocate(size_t bytes) {
  if (!kRecycle || bytes < kMinRecycled) return ::operator new(bytes);
  const size_t c = size_class(bytes);
  for (size_t i = pool.blocks.size(); i-- > 0;) {
    if (pool.blocks[i].second == c) {
      void* ptr = pool.blocks[i].first;
      pool.blocks[i] = pool.blocks.back();
      pool.blocks.pop_back();
      pool.kept -= c;
      return ptr;
    }
  }
  void* ptr = std::aligned_alloc(kAlign, c);
  if (ptr == nullptr) throw std::bad_alloc();
  return ptr;
}

void scratch_release(void* ptr, size_t bytes) {
  if (ptr == nullptr) return;
  if (!kRecycle || bytes < kMinRecycled) return ::operator delete(ptr);
  const size_t c = size_class(bytes);
  if (pool.kept + c > kMaxKeptBytes) return std::free(ptr);
  pool.blocks.emplace_back(ptr, c);
  pool.kept += c;
}

}  // namespace fusedattn::kernels::cpu
