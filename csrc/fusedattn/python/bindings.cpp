// fusedattn._C: loading it loads libfusedattn, whose static initialisers register the ops
// (torch.ops.fusedattn.*). It also exposes the C++ modules; python/fusedattn builds the
// torch.nn.Module classes on them.
#include <torch/python.h>

#include "fusedattn/fusedattn.h"

namespace py = pybind11;

namespace {
at::Tensor undefined_if_none(const std::optional<at::Tensor>& t) { return t.value_or(at::Tensor()); }
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedattn C++ extension: the C++ modules; the ops are under torch.ops.fusedattn";
  m.def("_cuda_kernels_built", &fusedattn::cuda_kernels_built,
        "Whether this build holds the fused CUDA kernels");
  m.def("cpu_capability", &fusedattn::cpu_capability,
        "The instruction-set tier of the CPU kernels in use (FUSEDATTN_CPU_CAPABILITY caps it)");
  m.def("cpu_capabilities_supported", &fusedattn::cpu_capabilities_supported,
        "Every tier this CPU runs, lowest first");
  m.def(
      "_check_attention_arguments",
      [](const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
         const std::optional<at::Tensor>& attn_mask,
         const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
         std::optional<double> scale, bool enable_gqa, std::optional<std::vector<int64_t>> window,
         const std::optional<at::Tensor>& alibi_slopes, std::optional<double> softcap,
         const std::optional<at::Tensor>& rel_bias) {
        fusedattn::check_attention_arguments(
            query, key, value, attn_mask, key_padding_mask, dropout_p, scale, enable_gqa,
            window ? at::OptionalIntArrayRef(*window) : at::OptionalIntArrayRef(), alibi_slopes,
            softcap, rel_bias);
      },
      "The attention op's argument checks (shapes, dtypes, devices), for the fake kernels",
      py::arg("query"), py::arg("key"), py::arg("value"), py::arg("attn_mask"),
      py::arg("key_padding_mask"), py::arg("dropout_p"), py::arg("scale"), py::arg("enable_gqa"),
      py::arg("window") = py::none(), py::arg("alibi_slopes") = py::none(),
      py::arg("softcap") = py::none(), py::arg("rel_bias") = py::none());

  m.def("_explain_attention", &fusedattn::explain_attention,
        "The route a fusedattn::attention call with these properties takes, and why",
        py::arg("query"), py::arg("attn_mask"), py::arg("key_padding_mask"),
        py::arg("return_weights"), py::arg("return_lse"), py::arg("variants"), py::arg("sinks"));

  m.def("_check_kv_cache_arguments", &fusedattn::check_kv_cache_arguments,
        "kv_cache_attention's argument checks, for its fake kernel", py::arg("query"),
        py::arg("key"), py::arg("value"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("lengths"), py::arg("key_padding_mask"), py::arg("enable_gqa"),
        py::arg("key_scales") = py::none(), py::arg("value_scales") = py::none());
  m.def("_quantize_for_cache", &fusedattn::quantize_for_cache,
        "x in a KV cache's storage dtype -> (stored, int8 scales or None)", py::arg("x"),
        py::arg("dtype"));
  m.def("_dequantize_cache", &fusedattn::dequantize_cache,
        "A KV cache's stored rows (and int8 scales) back in dtype", py::arg("stored"),
        py::arg("scales"), py::arg("dtype"));
  m.def("_kv_cache_append", &fusedattn::kv_cache_append,
        "kv_cache_attention's append alone: key and value stored after lengths, lengths += T",
        py::arg("key"), py::arg("value"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("lengths"), py::arg("key_scales") = py::none(),
        py::arg("value_scales") = py::none());

  // _C.cpp.MultiheadAttention: the C++ module itself (parameters, train/eval, clone, forward).
  torch::python::bind_module<fusedattn::MultiheadAttentionImpl, /*force_enable=*/true>(
      m, "MultiheadAttention")
      .def(py::init([](int64_t embed_dim, int64_t num_heads, double dropout, bool bias,
                       bool add_bias_kv, bool add_zero_attn, std::optional<int64_t> kdim,
                       std::optional<int64_t> vdim, bool batch_first,
                       std::optional<int64_t> head_dim,
                       std::optional<std::vector<int64_t>> window, bool alibi,
                       std::optional<int64_t> max_relative_distance,
                       std::optional<double> softcap, bool sinks) {
             auto o = fusedattn::MultiheadAttentionOptions(embed_dim, num_heads)
                          .dropout(dropout)
                          .bias(bias)
                          .add_bias_kv(add_bias_kv)
                          .add_zero_attn(add_zero_attn)
                          .kdim(kdim.value_or(embed_dim))
                          .vdim(vdim.value_or(embed_dim))
                          .batch_first(batch_first)
                          .head_dim(head_dim)
                          .window(window.value_or(std::vector<int64_t>{}))
                          .alibi(alibi)
                          .max_relative_distance(max_relative_distance)
                          .softcap(softcap)
                          .sinks(sinks);
             return std::make_shared<fusedattn::MultiheadAttentionImpl>(o);
           }),
           py::arg("embed_dim"), py::arg("num_heads"), py::arg("dropout") = 0.0,
           py::arg("bias") = true, py::arg("add_bias_kv") = false, py::arg("add_zero_attn") = false,
           py::arg("kdim") = py::none(), py::arg("vdim") = py::none(),
           py::arg("batch_first") = false, py::arg("head_dim") = py::none(),
           py::arg("window") = py::none(), py::arg("alibi") = false,
           py::arg("max_relative_distance") = py::none(), py::arg("softcap") = py::none(),
           py::arg("sinks") = false)
      .def(
          "forward",
          [](fusedattn::MultiheadAttentionImpl& self, const at::Tensor& query,
             const at::Tensor& key, const at::Tensor& value,
             const std::optional<at::Tensor>& key_padding_mask, bool need_weights,
             const std::optional<at::Tensor>& attn_mask, bool average_attn_weights,
             bool is_causal) {
            return self.forward(query, key, value, undefined_if_none(key_padding_mask),
                                need_weights, undefined_if_none(attn_mask), average_attn_weights,
                                is_causal);
          },
          py::arg("query"), py::arg("key"), py::arg("value"),
          py::arg("key_padding_mask") = py::none(), py::arg("need_weights") = true,
          py::arg("attn_mask") = py::none(), py::arg("average_attn_weights") = true,
          py::arg("is_causal") = false)
      .def_property_readonly("head_dim", &fusedattn::MultiheadAttentionImpl::head_dim)
      .def("__repr__", [](const fusedattn::MultiheadAttentionImpl& self) {
        std::ostringstream s;
        self.pretty_print(s);
        return s.str();
      });

  namespace fa = fusedattn;
  torch::python::bind_module<fa::SelfAttentionImpl, /*force_enable=*/true>(m, "SelfAttention")
      .def(py::init([](int64_t in_dim, int64_t d_k, std::optional<int64_t> d_v, bool bias) {
             return std::make_shared<fa::SelfAttentionImpl>(
                 fa::SelfAttentionOptions(in_dim, d_k).d_v(d_v).bias(bias));
           }),
           py::arg("in_dim"), py::arg("d_k"), py::arg("d_v") = py::none(), py::arg("bias") = true)
      .def(
          "forward",
          [](fa::SelfAttentionImpl& self, const at::Tensor& x,
             const std::optional<at::Tensor>& key_padding_mask, bool is_causal, bool need_weights) {
            return self.forward(x, undefined_if_none(key_padding_mask), is_causal, need_weights);
          },
          py::arg("x"), py::arg("key_padding_mask") = py::none(), py::arg("is_causal") = false,
          py::arg("need_weights") = true);

  torch::python::bind_module<fa::AttentionPoolingImpl, /*force_enable=*/true>(m, "AttentionPooling")
      .def(py::init([](int64_t input_dim, int64_t units, std::string score) {
             return std::make_shared<fa::AttentionPoolingImpl>(
                 fa::AttentionPoolingOptions(input_dim).units(units).score(score));
           }),
           py::arg("input_dim"), py::arg("units") = 128, py::arg("score") = "luong")
      .def(
          "forward",
          [](fa::AttentionPoolingImpl& self, const at::Tensor& h,
             const std::optional<at::Tensor>& key_padding_mask) {
            return self.forward(h, undefined_if_none(key_padding_mask));
          },
          py::arg("h"), py::arg("key_padding_mask") = py::none());

  torch::python::bind_module<fa::GaussianKernelAttentionImpl, /*force_enable=*/true>(
      m, "GaussianKernelAttention")
      .def(py::init([](double bandwidth, bool learnable) {
             return std::make_shared<fa::GaussianKernelAttentionImpl>(
                 fa::GaussianKernelAttentionOptions().bandwidth(bandwidth).learnable(learnable));
           }),
           py::arg("bandwidth") = 1.0, py::arg("learnable") = true)
      .def("forward", &fa::GaussianKernelAttentionImpl::forward, py::arg("query"), py::arg("key"),
           py::arg("value"), py::arg("need_weights") = false);
}
