#pragma once
// Checked tensors into the torch-free kernels' parameter structs (kernels/common/types.h): pointers,
// strides and kinds, read in place.
#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>

#include "fusedattn/kernels/common/types.h"
#include "fusedattn/ops/params.h"

namespace fusedattn {

// The call's masks, causality and variants as the kernels' MaskParams: the masks as views of
// (B, H, L, S) and (B, S), stride 0 where they broadcast, never copied. Returns the views the
// pointers point into (undefined where a mask is absent); keep them alive over the launch.
std::pair<at::Tensor, at::Tensor> fill_mask_params(const AttentionParams& params,
                                                   kernels::MaskParams& p);

// A KV cache's key padding mask (B, K) over its first K positions into MaskParams' kpm
// fields, read in place. Returns K (0: none).
int64_t fill_cache_padding(const std::optional<at::Tensor>& key_padding_mask,
                           kernels::MaskParams& p);

// Pointers and (b, h, row) strides of q, k, v, each already viewed as 4-d (B, heads, rows,
// cols) with a contiguous last dim, into the kernels' ProblemParams.
void fill_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   kernels::ProblemParams& p);

// The kernels' name of a checked floating dtype.
kernels::DType kernel_dtype(at::ScalarType t);

}  // namespace fusedattn
