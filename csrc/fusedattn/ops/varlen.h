#pragma once
// The internal ops behind attention_varlen (schemas in registration.cpp): the forward and
// backward of packed variable-length sequences, one implementation per backend (CPU:
// backends/cpu/varlen_cpu.cpp, the sequences as tasks of one fused call) and, for every other device,
// a loop of the attention op's own kernels over the sequences (ops/varlen.cpp).
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fusedattn {

namespace ops {
// -> (out (total_q, H, Ev), lse (H, total_q) in the accumulate type)
std::tuple<at::Tensor, at::Tensor> attention_varlen_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, const std::optional<at::Tensor>& dropout_seed, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, bool enable_gqa,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes,
    std::optional<double> softcap, const std::optional<at::Tensor>& rel_bias,
    bool fp32_out = false);
// -> (grad_query, grad_key, grad_value, grad_rel_bias (accumulate type; empty without one))
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, bool enable_gqa,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes,
    std::optional<double> softcap, const std::optional<at::Tensor>& rel_bias);
}  // namespace ops

namespace detail {

// The checked offsets of one call, on the host: `batch` sequences, sequence s is rows
// [q[s], q[s + 1]) of query and [k[s], k[s + 1]) of key and value.
struct VarlenOffsets {
  std::vector<int64_t> q, k;
  int64_t batch = 0;
};
// Every check of the packed layout (ranks, lengths, offsets against the packed tensors and
// max_seqlen_*, alibi_slopes (H,) or (batch, H) fp32): errors name the argument. Reads the
// offsets (a copy to the host for device tensors).
VarlenOffsets check_varlen(const at::Tensor& query, const at::Tensor& key,
                           const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                           const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                           int64_t max_seqlen_k, const std::optional<at::Tensor>& alibi_slopes);

// The dropout seed of sequence s: the packed call's stream from element `offset` on
// (kernels::DropoutParams::shifted), as a tensor like `seed`.
at::Tensor shifted_dropout_seed(const at::Tensor& seed, uint64_t offset);

// The device-independent kernels: each sequence through `_attention_forward` /
// `_attention_backward` on views (the CompositeExplicitAutograd kernels of the internal ops,
// so CUDA tensors take them; the CPU kernels with FUSEDATTN_CPU_KERNEL=reference too).
std::tuple<at::Tensor, at::Tensor> attention_varlen_forward_per_sequence(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, const std::optional<at::Tensor>& dropout_seed, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, bool enable_gqa,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes,
    std::optional<double> softcap, const std::optional<at::Tensor>& rel_bias, bool fp32_out);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_per_sequence(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, bool enable_gqa,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes,
    std::optional<double> softcap, const std::optional<at::Tensor>& rel_bias);

}  // namespace detail
}  // namespace fusedattn
