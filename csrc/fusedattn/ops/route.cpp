#include "fusedattn/ops/route.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "fusedattn/ops/attention.h"

namespace fusedattn {

RouteSetting route_setting() {
  const char* v = std::getenv("FUSEDATTN_ROUTE");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return RouteSetting::Auto;
  if (std::strcmp(v, "torch") == 0) return RouteSetting::Torch;
  if (std::strcmp(v, "own") == 0) return RouteSetting::Own;
  TORCH_CHECK(false, "FUSEDATTN_ROUTE must be \"auto\", \"torch\" or \"own\", got \"", v, "\"");
}

namespace {

// FUSEDATTN_CUDA_KERNEL=fused (fusedattn's fused CUDA kernels) or =reference (its ATen
// reference): either way fusedattn's own.
bool own_cuda_kernels_requested() {
  const char* v = std::getenv("FUSEDATTN_CUDA_KERNEL");
  return v != nullptr && (std::strcmp(v, "fused") == 0 || std::strcmp(v, "reference") == 0);
}

// Whether the setting sends a call on this device to torch when torch serves it.
bool device_routed(c10::DeviceType device, bool own_cuda_kernels, RouteSetting setting) {
  switch (setting) {
    case RouteSetting::Own: return false;
    case RouteSetting::Torch: return true;
    case RouteSetting::Auto: return device == c10::DeviceType::CUDA && !own_cuda_kernels;
  }
  return false;
}

}  // namespace

RouteChoice choose_route(const RouteCall& call, RouteSetting setting) {
  if (!device_routed(call.device, call.own_cuda_kernels, setting)) {
    if (setting == RouteSetting::Own) return {false, "FUSEDATTN_ROUTE=own"};
    if (call.device == c10::DeviceType::CUDA) return {false, "FUSEDATTN_CUDA_KERNEL is set"};
    return {false, "fusedattn's kernels on this device (FUSEDATTN_ROUTE=torch sends it to torch)"};
  }
  // Each case torch's scaled_dot_product_attention cannot give as fusedattn defines it.
  if (call.return_weights) return {false, "return_weights: torch returns no attention weights"};
  if (call.return_lse) return {false, "return_lse: torch's public op returns no log-sum-exp"};
  if (call.sinks) return {false, "sinks: torch has no attention sinks"};
  if (call.variants) return {false, "window/alibi_slopes/softcap/rel_bias: not in torch's op"};
  if (call.mask_grad)
    return {false, "a mask that requires grad: fusedattn's backward gives the mask's gradient"};
  return {true, "scaled_dot_product_attention (torch picks flash, cuDNN, efficient or math)"};
}

bool torch_route_possible(c10::Device device) {
  return device_routed(device.type(), device.is_cuda() && own_cuda_kernels_requested(),
                       route_setting());
}

RouteChoice attention_route(const at::Tensor& query, const std::optional<at::Tensor>& attn_mask,
                            const std::optional<at::Tensor>& key_padding_mask,
                            bool return_weights, bool return_lse, bool variants, bool sinks) {
  RouteCall call;
  call.device = query.device().type();
  call.own_cuda_kernels = query.is_cuda() && own_cuda_kernels_requested();
  call.return_weights = return_weights;
  call.return_lse = return_lse;
  call.variants = variants;
  call.sinks = sinks;
  const bool grad = at::GradMode::is_enabled();
  call.mask_grad = grad && ((attn_mask && attn_mask->requires_grad()) ||
                            (key_padding_mask && key_padding_mask->requires_grad()));
  return choose_route(call, route_setting());
}

std::string describe(const RouteChoice& choice, c10::Device device) {
  if (choice.torch) return std::string("torch: ") + choice.reason;
  std::string own = device.is_cpu() ? "fusedattn CPU kernels" : "fusedattn " + device.str() + " kernels";
  if (device.is_cuda()) {
    const char* v = std::getenv("FUSEDATTN_CUDA_KERNEL");
    own = v != nullptr && std::strcmp(v, "fused") == 0
              ? "fusedattn CUDA kernels (fused where they serve the call, else the reference)"
              : "fusedattn CUDA reference";
  }
  return own + ": " + choice.reason;
}

std::string explain_attention(const at::Tensor& query, const std::optional<at::Tensor>& attn_mask,
                              const std::optional<at::Tensor>& key_padding_mask,
                              bool return_weights, bool return_lse, bool variants, bool sinks) {
  return describe(attention_route(query, attn_mask, key_padding_mask, return_weights, return_lse,
                                  variants, sinks),
                  query.device());
}

namespace detail {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// x with leading dims of size 1 up to `rank` dims.
at::Tensor with_rank(const at::Tensor& x, int64_t rank) {
  auto r = x;
  while (r.dim() < rank) r = r.unsqueeze(0);
  return r;
}

// (..., A, B, C) -> (batch, A, B, C), the leading dims flattened; a bias whose leading dims
// are all 1 stays (1, A, B, C). `batch` are query's leading sizes.
at::Tensor as_4d(const at::Tensor& x, c10::SymIntArrayRef batch) {
  const int64_t lead = x.dim() - 3;
  if (lead == 1) return x;
  const auto s = x.sym_sizes();
  bool broadcast = true;
  for (int64_t d = 0; d < lead; ++d) broadcast = broadcast && s[d] == 1;
  if (broadcast) return x.reshape_symint({1, s[lead], s[lead + 1], s[lead + 2]});
  std::vector<c10::SymInt> full(batch.begin(), batch.end());
  full.insert(full.end(), {s[lead], s[lead + 1], s[lead + 2]});
  return x.expand_symint(full).reshape_symint({-1, s[lead], s[lead + 1], s[lead + 2]});
}

}  // namespace

at::Tensor attention_torch(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           const std::optional<at::Tensor>& attn_mask,
                           const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                           bool is_causal, bool bottom_right, std::optional<double> scale,
                           bool enable_gqa) {
  check_attention_arguments(query, key, value, attn_mask, key_padding_mask, dropout_p, scale,
                            enable_gqa);
  const int64_t nd = query.dim();
  const c10::SymInt L = query.sym_size(-2), S = key.sym_size(-2);
  // is_causal reaches torch as its flag where torch's alignment (top-left) is the call's and no
  // mask joins it (torch takes one or the other); otherwise as an (L, S) bool mask.
  const bool same_alignment = !bottom_right || L.sym_eq(S).guard_bool(__FILE__, __LINE__);
  const bool causal_flag = is_causal && same_alignment && !attn_mask && !key_padding_mask;
  // Allowed: bool, True = attend; bias: floats added. Either may stay undefined.
  at::Tensor allowed, bias;
  if (attn_mask) (attn_mask->scalar_type() == at::kBool ? allowed : bias) = *attn_mask;
  if (key_padding_mask) {
    auto kpm = key_padding_mask->unsqueeze(-2).unsqueeze(-2);  // (..., 1, 1, S)
    if (kpm.scalar_type() == at::kBool) {
      kpm = kpm.logical_not();
      allowed = allowed.defined() ? at::logical_and(allowed, kpm) : kpm;
    } else {
      bias = bias.defined() ? at::add(bias, kpm) : kpm;
    }
  }
  if (is_causal && !causal_flag) {
    const auto opts = at::TensorOptions().dtype(at::kLong).device(query.device());
    const auto offset = bottom_right ? S - L : c10::SymInt(0);
    auto causal = at::arange(c10::Scalar(S), opts).unsqueeze(0) <=
                  (at::arange(c10::Scalar(L), opts) + c10::Scalar(offset)).unsqueeze(1);  // (L, S)
    allowed = allowed.defined() ? at::logical_and(allowed, causal) : causal;
  }
  at::Tensor mask;
  if (bias.defined() && allowed.defined()) {
    mask = at::where(allowed, bias, at::scalar_tensor(kNegInf, bias.options()));
  } else {
    mask = bias.defined() ? bias : allowed;
  }

  // torch's fused kernels take 4-D inputs only.
  const auto batch = query.sym_sizes().slice(0, nd - 3);
  auto q = query, k = key, v = value;
  if (mask.defined()) mask = with_rank(mask, nd);
  if (nd != 4) {
    q = with_rank(q, 4), k = with_rank(k, 4), v = with_rank(v, 4);
    if (mask.defined()) mask = with_rank(mask, 4);
    if (nd > 4) {
      q = as_4d(q, batch), k = as_4d(k, batch), v = as_4d(v, batch);
      if (mask.defined()) mask = as_4d(mask, batch);
    }
  }
  auto out = at::scaled_dot_product_attention(q, k, v, mask.defined() ? std::optional(mask) : std::nullopt,
                                              dropout_p, causal_flag, scale, enable_gqa);
  if (nd == 4) return out;
  std::vector<c10::SymInt> shape(batch.begin(), batch.end());
  shape.insert(shape.end(), {query.sym_size(-3), L, value.sym_size(-1)});
  return out.reshape_symint(shape);
}

}  // namespace detail
}  // namespace fusedattn
