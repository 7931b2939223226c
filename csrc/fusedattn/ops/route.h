#pragma once
// Which implementation runs a call: fusedattn's own kernels (the CPU kernels, the CUDA
// reference or the opt-in CUDA kernels) or torch's scaled_dot_product_attention, which on a
// GPU picks its fused flash, cuDNN or memory-efficient kernel. The decision reads the call's
// flags, never its sizes or values, so it costs no synchronisation and holds for a whole
// torch.compile graph; where torch's kernels cannot give fusedattn's results (returned
// weights, lse, the variants, sinks, gradients of a mask) the call stays on fusedattn's.
//
// The setting (FUSEDATTN_ROUTE, read per call):
//   unset / "auto": CUDA calls go to torch where torch serves them, unless
//                   FUSEDATTN_CUDA_KERNEL=fused (or =reference) opts into fusedattn's CUDA
//                   kernels (or its reference); CPU calls run fusedattn's kernels;
//   "torch":        every device's calls go to torch where torch serves them (on the CPU: the
//                   same code path as a GPU's, so the CPU tests cover it);
//   "own":          every call runs fusedattn's kernels.
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

#include "fusedattn/macros.h"

namespace fusedattn {

enum class RouteSetting { Auto, Torch, Own };

// FUSEDATTN_ROUTE as above; an unknown value is an error naming the accepted ones.
FUSEDATTN_API RouteSetting route_setting();

// What the route decision reads of one call.
struct RouteCall {
  c10::DeviceType device = c10::DeviceType::CPU;
  bool own_cuda_kernels = false;  // FUSEDATTN_CUDA_KERNEL=fused or =reference
  bool return_weights = false;
  bool return_lse = false;
  bool variants = false;  // window, alibi_slopes, softcap or rel_bias
  bool sinks = false;
  bool mask_grad = false;  // a float attn_mask or key_padding_mask that requires grad
};

struct RouteChoice {
  bool torch = false;  // at::scaled_dot_product_attention; else fusedattn's own kernels
  const char* reason = "";  // why, for fusedattn.explain (a literal)
};

// Pure: the route of `call` under `setting`.
FUSEDATTN_API RouteChoice choose_route(const RouteCall& call, RouteSetting setting);

// Whether calls on `device` may go to torch at all under the current setting (the modules
// use it to pick their split-heads path, which is the one that reaches the route).
FUSEDATTN_API bool torch_route_possible(c10::Device device);

// The route of a `fusedattn::attention` call with these arguments (the current setting).
FUSEDATTN_API RouteChoice attention_route(const at::Tensor& query,
                                          const std::optional<at::Tensor>& attn_mask,
                                          const std::optional<at::Tensor>& key_padding_mask,
                                          bool return_weights, bool return_lse, bool variants,
                                          bool sinks);

// "torch: ..." or "fusedattn ...: ...", the route and its reason in one line.
FUSEDATTN_API std::string describe(const RouteChoice& choice, c10::Device device);

// describe(attention_route(...)) for the call (fusedattn.explain).
FUSEDATTN_API std::string explain_attention(const at::Tensor& query,
                                            const std::optional<at::Tensor>& attn_mask,
                                            const std::optional<at::Tensor>& key_padding_mask,
                                            bool return_weights, bool return_lse, bool variants,
                                            bool sinks);

namespace detail {

// The attention op on torch's route: fusedattn's masks (attn_mask bool True = allowed or
// float added; key_padding_mask (..., S) bool True = padding or float added) and both causal
// alignments as one additive or bool bias that broadcasts, never expanded over the heads; the
// inputs as 4-D (batch dims flattened) so that torch's fused kernels take them. Arguments
// checked as the op checks them. -> out (..., H, L, Ev)
FUSEDATTN_API at::Tensor attention_torch(const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value,
                                         const std::optional<at::Tensor>& attn_mask,
                                         const std::optional<at::Tensor>& key_padding_mask,
                                         double dropout_p, bool is_causal, bool bottom_right,
                                         std::optional<double> scale, bool enable_gqa);

}  // namespace detail
}  // namespace fusedattn
