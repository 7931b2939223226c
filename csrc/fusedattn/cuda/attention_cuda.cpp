// CUDA implementations of `_attention_forward` and `_attention_backward`.
//
// This is the seam where the fused CUDA kernels plug in (they need nvcc; this file does not,
// so a CUDA build of torch gets a working op even where no toolkit compiled kernels). A
// fused kernel registered here checks its arguments with check_attention_inputs and hands the
// calls it does not cover to the reference, which today serves every CUDA call.
#include <torch/library.h>

#include "fusedattn/ops/reference.h"

TORCH_LIBRARY_IMPL(fusedattn, CUDA, m) {
  m.impl("_attention_forward", &fusedattn::reference::attention_forward_op);
  m.impl("_attention_backward", &fusedattn::reference::attention_backward_op);
}
