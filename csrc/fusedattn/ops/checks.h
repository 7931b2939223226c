#pragma once
// The ops' argument checks: each rejects bad input with a message naming the argument. The
// attention op's full check is check_attention_arguments (ops/attention.h), run by
// make_attention_params where a backend receives the call and by the fake kernels.
#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedattn {

// A given scale: finite, and within float32's range unless the inputs are float64. `op` names
// the op in the message.
void check_scale(std::optional<double> scale, at::ScalarType dtype, const char* op);

// Where the attention op is entered: every tensor argument on query's device, so that the
// call dispatches to query's backend (a mask on the meta device would send it to a Meta
// kernel, which a C++ app without the Python fakes does not have). The rest is checked once,
// by the backend.
void check_attention_devices(const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                             const std::optional<at::Tensor>& key_padding_mask,
                             const std::optional<at::Tensor>& alibi_slopes,
                             const std::optional<at::Tensor>& rel_bias);

}  // namespace fusedattn
