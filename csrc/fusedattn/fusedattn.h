#pragma once
// Everything of fusedattn's C++ API:
//   fusedattn::attention(q, k, v, AttentionOptions)   the attention op (fused where it can be)
//   fusedattn::MultiheadAttention                       drop-in for torch::nn::MultiheadAttention
//   fusedattn::KVCache                                  incremental decoding (forward_cached)
//   fusedattn::SelfAttention, AttentionPooling, GaussianKernelAttention   single-head layers
//   fusedattn::ops::*                                   one function per registered op schema
#include "fusedattn/macros.h"
#include "fusedattn/modules/layers.h"
#include "fusedattn/modules/multihead_attention.h"
#include "fusedattn/ops/attention.h"
#include "fusedattn/ops/kv_cache.h"
#include "fusedattn/ops/layers.h"
#include "fusedattn/ops/multihead_attention.h"
#include "fusedattn/ops/route.h"

namespace fusedattn::detail {
// An app that reaches the ops only by name (torch::jit, the dispatcher) references no symbol
// of libfusedattn, and a linker with --as-needed would drop the library and with it the op
// registrations. Every translation unit that includes this header references it instead.
inline const int64_t link_anchor_value = link_anchor();
}  // namespace fusedattn::detail
