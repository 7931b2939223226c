#pragma once
// The reference implementation of `_attention_forward` / `_attention_backward`, written with
// ATen ops so that it runs on any device. It materialises the (..., H, L, S) scores: it is the
// correct-first path that the fused kernels are tested against and fall back to.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "fusedattn/ops/checks.h"

namespace fusedattn::reference {

// -> (out (..., H, L, Ev), lse (..., H, L) in accumulate_type, weights (..., H, L, S), their
// mean over heads (..., L, S) if average_weights, or empty)
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const AttentionProblem& problem, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dropout_seed,
    double dropout_p, bool is_causal, bool bottom_right, bool return_weights,
    bool average_weights, const ScoreMods& mods = ScoreMods());

// -> (dq, dk, dv, d_attn_mask or empty, d_key_padding_mask or empty, d_rel_bias or empty)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const AttentionProblem& problem, const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_weights, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& lse,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, bool attn_mask_grad, bool key_padding_mask_grad,
    const ScoreMods& mods = ScoreMods());

// The backward with the op's schema (it checks its arguments): what a backend without a
// fused backward registers.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_op(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, bool enable_gqa, bool attn_mask_grad,
    bool key_padding_mask_grad, at::OptionalIntArrayRef window,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
    const std::optional<at::Tensor>& rel_bias);

// The dropout multiplier (keep / (1 - p), or 0) of every element of the (..., H, L, S)
// probabilities, drawn with kernels::DropoutParams so that fused kernels draw the same.
at::Tensor dropout_multiplier(const AttentionProblem& problem, const at::Tensor& dropout_seed,
                              double dropout_p, const at::TensorOptions& options);

// The dropout seed tensor, checked (one int64 element), and its value (a sync on CUDA).
const at::Tensor& checked_dropout_seed(const std::optional<at::Tensor>& dropout_seed);
uint64_t dropout_seed_value(const std::optional<at::Tensor>& dropout_seed);

}  // namespace fusedattn::reference
