#pragma once
// The reference implementation of `_attention_forward` / `_attention_backward`, written with
// ATen ops so that it runs on any device. It materialises the (..., H, L, S) scores: it is the
// correct-first path that the fused kernels are tested against and fall back to.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "fusedattn/ops/params.h"

namespace fusedattn::reference {

// -> (out (..., H, L, Ev), lse (..., H, L) in accumulate_type, weights (..., H, L, S), their
// mean over heads (..., L, S) if average_weights, or empty)
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(const AttentionParams& params);

// -> (dq, dk, dv, d_attn_mask or empty, d_key_padding_mask or empty, d_rel_bias or empty)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const AttentionParams& params, const AttentionGrads& grads);

// The dropout multiplier (keep / (1 - p), or 0) of every element of the (..., H, L, S)
// probabilities, drawn with kernels::DropoutParams so that fused kernels draw the same.
at::Tensor dropout_multiplier(const AttentionProblem& problem, const at::Tensor& dropout_seed,
                              double dropout_p, const at::TensorOptions& options);

// The dropout seed tensor, checked (one int64 element), and its value (a sync on CUDA).
const at::Tensor& checked_dropout_seed(const std::optional<at::Tensor>& dropout_seed);
uint64_t dropout_seed_value(const std::optional<at::Tensor>& dropout_seed);

}  // namespace fusedattn::reference
