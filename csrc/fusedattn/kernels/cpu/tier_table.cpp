// This tier's entry points (plan.h's KernelTable): the dtype switch from DType to the
// kernels' templates, made here once.
#include "fusedattn/kernels/cpu/backward.h"
#include "fusedattn/kernels/cpu/decode.h"
#include "fusedattn/kernels/cpu/forward.h"
#include "fusedattn/kernels/cpu/plan.h"

FUSEDATTN_TIER_NS_BEGIN
namespace {

template <typename F>
void with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float: return f(float{});
    case DType::Double: return f(double{});
    case DType::BFloat16: return f(bf16{});
    case DType::Half: return f(fp16{});
  }
}

void pack(const FlashParams& p, int64_t begin, int64_t end) {
  with_type(p.dtype, [&](auto tag) { Forward<decltype(tag)>(p).pack(begin, end); });
}
void forward(const FlashParams& p, int64_t begin, int64_t end) {
  with_type(p.dtype, [&](auto tag) { Forward<decltype(tag)>(p).run(begin, end); });
}
void backward(const FlashParams& p, int64_t begin, int64_t end) {
  with_type(p.dtype, [&](auto tag) { Backward<decltype(tag)>(p).run(begin, end); });
}

void decode_append(const DecodeParams& p, int64_t begin, int64_t end) {
  with_type(p.dtype, [&](auto tag) { Decode<decltype(tag)>(p).append(begin, end); });
}
void decode(const DecodeParams& p, int64_t begin, int64_t end) {
  with_type(p.dtype, [&](auto tag) { Decode<decltype(tag)>(p).run(begin, end); });
}
void decode_merge(const DecodeParams& p, int64_t begin, int64_t end) {
  with_type(p.dtype, [&](auto tag) { Decode<decltype(tag)>(p).merge(begin, end); });
}

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable t{&pack, &forward, &backward, &decode_append, &decode, &decode_merge};
  return t;
}

FUSEDATTN_TIER_NS_END
