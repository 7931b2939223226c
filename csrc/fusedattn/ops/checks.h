#pragma once
// Argument checking for the attention kernels: one place that turns tensors into sizes and
// rejects bad input with a message naming the argument. Every backend calls it before it
// touches data.
#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>
#include <vector>

#include "fusedattn/kernels/types.h"

namespace fusedattn {

struct AttentionProblem {
  std::vector<int64_t> batch;  // the leading "..." dims shared by query, key and value
  int64_t batch_size = 1;      // product of batch
  int64_t heads = 0;           // H
  int64_t kv_heads = 0;        // Hk; H % Hk == 0
  int64_t q_len = 0;           // L
  int64_t kv_len = 0;          // S
  int64_t head_dim = 0;        // E
  int64_t v_head_dim = 0;      // Ev
  double scale = 1.0;          // given, or 1 / sqrt(E)
  at::ScalarType dtype = at::kFloat;  // query's

  std::vector<int64_t> out_shape() const;      // (..., H, L, Ev)
  std::vector<int64_t> lse_shape() const;      // (..., H, L)
  std::vector<int64_t> weights_shape() const;  // (..., H, L, S)
};

// The attention variants beyond masks, as the kernels take them: made once, where a backend
// kernel receives its arguments (make_score_mods), from the schema's window, alibi_slopes and
// softcap.
struct ScoreMods {
  int64_t window_left = -1, window_right = -1;  // < 0: unbounded on that side
  at::Tensor alibi;                             // (B, H) fp32 slopes (stride 0 where broadcast)
  double softcap = 0;                           // > 0: soft-capping
  at::Tensor rel_bias;                          // (H, 2 D + 1) contiguous, accumulate type
  int64_t rel_max = 0;                          // D
  bool windowed() const { return window_left >= 0 || window_right >= 0; }
  bool any() const { return windowed() || alibi.defined() || softcap > 0 || rel_bias.defined(); }
};

// A given scale: finite, and within float32's range unless the inputs are float64. `op` names
// the op in the message.
void check_scale(std::optional<double> scale, at::ScalarType dtype, const char* op);
// The argument checks of the attention op, on sizes as SymInts (concrete or symbolic): the
// real kernels and the fake ones run this one function.
void check_attention_shapes(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& attn_mask,
                            const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                            std::optional<double> scale, bool enable_gqa,
                            at::OptionalIntArrayRef window = std::nullopt,
                            const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                            std::optional<double> softcap = std::nullopt,
                            const std::optional<at::Tensor>& rel_bias = std::nullopt);

// The checked variants of one call (check_attention_shapes has checked their arguments).
ScoreMods make_score_mods(const AttentionProblem& problem, at::OptionalIntArrayRef window,
                          const std::optional<at::Tensor>& alibi_slopes,
                          std::optional<double> softcap,
                          const std::optional<at::Tensor>& rel_bias = std::nullopt);

// check_attention_shapes, then the concrete problem sizes.
AttentionProblem check_attention_inputs(const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& value,
                                        const std::optional<at::Tensor>& attn_mask,
                                        const std::optional<at::Tensor>& key_padding_mask,
                                        double dropout_p, std::optional<double> scale,
                                        bool enable_gqa,
                                        at::OptionalIntArrayRef window = std::nullopt,
                                        const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                                        std::optional<double> softcap = std::nullopt,
                                        const std::optional<at::Tensor>& rel_bias = std::nullopt);

// attn_mask, key_padding_mask and causality as the kernels' MaskParams: the masks as views of
// (B, H, L, S) and (B, S), stride 0 where they broadcast, never copied. Returns the views the
// pointers point into (undefined where a mask is absent); keep them alive over the launch.
std::pair<at::Tensor, at::Tensor> fill_mask_params(const AttentionProblem& pb,
                                                   const std::optional<at::Tensor>& attn_mask,
                                                   const std::optional<at::Tensor>& key_padding_mask,
                                                   bool is_causal, bool bottom_right,
                                                   kernels::MaskParams& p,
                                                   const ScoreMods& mods = ScoreMods());

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

// The dtype the kernels accumulate in: fp64 for fp64 inputs, fp32 otherwise. lse has it.
at::ScalarType accumulate_type(at::ScalarType t);

}  // namespace fusedattn
