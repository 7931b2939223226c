// CPU implementations of `_attention_forward` and `_attention_backward`.
//
// This is the seam where fused CPU kernels plug in: a kernel registered here checks its
// arguments with check_attention_inputs and hands the calls it does not cover to the
// reference. Until the fused kernels land, the reference serves every CPU call.
#include <torch/library.h>

#include "fusedattn/ops/reference.h"

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("_attention_forward", &fusedattn::reference::attention_forward_op);
  m.impl("_attention_backward", &fusedattn::reference::attention_backward_op);
}
