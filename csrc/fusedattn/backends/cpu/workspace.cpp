// The CPU ops' large fresh buffers: huge-page advice and the forward's kept workspace.
#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "fusedattn/backends/cpu/launch.h"
#include "fusedattn/kernels/cpu/scratch.h"

namespace fusedattn::cpu {

// The returned weights are the one L x S output, written once by the forward. Fresh 4 KiB
// pages cost a fault each on that first write: 512 MiB of weights (B=4, H=8, L=S=2048, fp32)
// took 80 ms of faults, 2 MiB pages 9 ms (measured here, transparent huge pages in "madvise"
// mode; bf16 weights at L=512, 16 MiB: 18.9 -> 13.2 ms a call with every block its own
// mapping, as the benchmark runs). From 4 MiB on (whole 2 MiB pages inside). Advice that
// outlives the tensor (memory the allocator keeps) only makes later pages there huge too.
// A hint: where the kernel declines it, nothing changes. Also given to the forward's K/V
// workspace, which is as large as K (and V) and as fresh.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (t.nbytes() < (size_t(4) << 20)) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

namespace {
// The forward's packed workspace (packed or widened K and V blocks), kept per calling thread
// between calls up to kCachedWorkspaceBytes; larger ones are allocated per call. A fresh one
// is first touched by the pack tasks, a page fault per page: bf16 at B=4, H=8, L=1024 capped
// to AVX2 (16 MiB of fp32 K and V), a causal forward took 44-51 ms instead of 28-29 whenever
// the allocator handed back fresh pages (Xeon). Contents are not kept: each call packs anew.
constexpr size_t kCachedWorkspaceBytes = size_t(64) << 20;
}  // namespace

void* packed_workspace(int64_t elems, const at::TensorOptions& options, at::Tensor& holder) {
  const size_t bytes = size_t(elems) * options.dtype().itemsize();
  thread_local at::Tensor cached;
#ifdef FUSEDATTN_EXACT_ALLOCATIONS
  constexpr bool kCache = false;  // scratch.h: exact-size allocations under ASan
#else
  constexpr bool kCache = true;
#endif
  if (!kCache || bytes > kCachedWorkspaceBytes) {
    holder = at::empty({int64_t(bytes)}, options.dtype(at::kByte));
    advise_huge_pages(holder);
    return holder.data_ptr();
  }
  if (!cached.defined() || cached.nbytes() < bytes) {
    cached = at::Tensor();  // the old one goes first
    cached = at::empty({int64_t(bytes)}, options.dtype(at::kByte));
    advise_huge_pages(cached);
  }
  return cached.data_ptr();
}

}  // namespace fusedattn::cpu
