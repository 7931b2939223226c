#include "fusedattn/ops/checks.h"

#include <cmath>
#include <limits>
#include <vector>

#include "fusedattn/ops/attention.h"

namespace fusedattn {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_mask_dtype(const at::Tensor& mask, const char* name, const at::Tensor& query) {
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == query.scalar_type(),
              "attention: ", name, " must be bool or have query's dtype (", query.scalar_type(),
              "), got ", mask.scalar_type());
  TORCH_CHECK(mask.device() == query.device(), "attention: ", name,
              " must be on query's device (", query.device(), "), got ", mask.device());
}

}  // namespace

void check_scale(std::optional<double> scale, at::ScalarType dtype, const char* op) {
  if (!scale) return;
  TORCH_CHECK(std::isfinite(*scale), op, ": scale must be finite, got ", *scale);
  // Every dtype but float64 computes in float32: a scale beyond its range would turn every
  // score into +-inf and the softmax into NaN.
  TORCH_CHECK(dtype == at::kDouble || std::abs(*scale) <= double(std::numeric_limits<float>::max()),
              op, ": scale must be finite in float32 (the computation's precision for ", dtype,
              " inputs), |scale| <= ", std::numeric_limits<float>::max(), ", got ", *scale);
}

void check_attention_devices(const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                             const std::optional<at::Tensor>& key_padding_mask,
                             const std::optional<at::Tensor>& alibi_slopes,
                             const std::optional<at::Tensor>& rel_bias) {
  const auto dev = query.device();
  TORCH_CHECK(key.device() == dev && value.device() == dev,
              "attention: query, key and value must be on the same device, got query ", dev,
              ", key ", key.device(), ", value ", value.device());
  const std::pair<const char*, const std::optional<at::Tensor>*> others[] = {
      {"attn_mask", &attn_mask}, {"key_padding_mask", &key_padding_mask},
      {"alibi_slopes", &alibi_slopes}, {"rel_bias", &rel_bias}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(!*t || (*t)->device() == dev, "attention: ", name, " must be on query's device (",
                dev, "), got ", (*t)->device());
  }
}

void check_attention_arguments(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& attn_mask,
                            const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                            std::optional<double> scale, bool enable_gqa,
                            at::OptionalIntArrayRef window,
                            const std::optional<at::Tensor>& alibi_slopes,
                            std::optional<double> softcap,
                            const std::optional<at::Tensor>& rel_bias) {
  // Sizes as SymInts: the real kernels pass concrete sizes, the fake kernels (torch.compile,
  // torch.export with dynamic shapes) symbolic ones, where a check that cannot be decided
  // while tracing becomes a guard or a run-time assertion instead of being skipped.
  using c10::SymInt;
  const auto qs = query.sym_sizes(), ks = key.sym_sizes(), vs = value.sym_sizes();
  TORCH_CHECK(query.dim() >= 3, "attention: query must have shape (..., H, L, E) with at least 3 dims, got ",
              qs);
  TORCH_CHECK(key.dim() == query.dim() && value.dim() == query.dim(),
              "attention: query, key and value must have the same number of dims, got query ", qs,
              ", key ", ks, ", value ", vs);
  TORCH_CHECK(is_supported_float(query.scalar_type()),
              "attention: query must be float64, float32, bfloat16 or float16, got ",
              query.scalar_type());
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              "attention: query, key and value must have the same dtype, got query ",
              query.scalar_type(), ", key ", key.scalar_type(), ", value ", value.scalar_type());
  TORCH_CHECK(key.device() == query.device() && value.device() == query.device(),
              "attention: query, key and value must be on the same device, got query ",
              query.device(), ", key ", key.device(), ", value ", value.device());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "attention: dropout_p must be in [0, 1], got ",
              dropout_p);

  const int64_t nd = query.dim();
  const SymInt& heads = qs[nd - 3];
  const SymInt& head_dim = qs[nd - 1];
  const SymInt& kv_heads = ks[nd - 3];
  const SymInt& kv_len = ks[nd - 2];
  for (int64_t d = 0; d < nd - 3; ++d) {
    TORCH_SYM_CHECK(ks[d].sym_eq(qs[d]) & vs[d].sym_eq(qs[d]),
                    "attention: query, key and value must have the same batch dims (...), got query ",
                    qs, ", key ", ks, ", value ", vs);
  }
  TORCH_SYM_CHECK(ks[nd - 1].sym_eq(head_dim),
                  "attention: key must have shape (..., Hk, S, E) with E = ", head_dim,
                  " (query's last dim), got ", ks);
  TORCH_SYM_CHECK(vs[nd - 3].sym_eq(kv_heads) & vs[nd - 2].sym_eq(kv_len),
                  "attention: value must have shape (..., Hk, S, Ev) with (Hk, S) = (", kv_heads,
                  ", ", kv_len, ") from key, got ", vs);
  if (enable_gqa) {
    TORCH_SYM_CHECK(kv_heads.sym_gt(0) & (heads % kv_heads.max(1)).sym_eq(0),
                    "attention: with enable_gqa the number of query heads (", heads,
                    ") must be a multiple of the number of key/value heads (", kv_heads, ")");
  } else {
    TORCH_SYM_CHECK(kv_heads.sym_eq(heads), "attention: key and value must have H = ", heads,
                    " heads like query (or pass enable_gqa=True), got ", kv_heads);
  }

  if (attn_mask) {
    const auto& m = *attn_mask;
    check_mask_dtype(m, "attn_mask", query);
    std::vector<SymInt> target(qs.begin(), qs.end() - 1);  // (..., H, L, S)
    target.push_back(kv_len);
    const auto ms = m.sym_sizes();
    TORCH_CHECK(m.dim() <= static_cast<int64_t>(target.size()),
                "attention: attn_mask must broadcast to (..., H, L, S) = ", c10::SymIntArrayRef(target),
                ", got ", ms);
    for (int64_t i = 1; i <= m.dim(); ++i) {
      const SymInt& size = ms[m.dim() - i];
      TORCH_SYM_CHECK(size.sym_eq(1) | size.sym_eq(target[target.size() - i]),
                      "attention: attn_mask must broadcast to (..., H, L, S) = ",
                      c10::SymIntArrayRef(target), ", got ", ms);
    }
  }
  if (key_padding_mask) {
    const auto& m = *key_padding_mask;
    check_mask_dtype(m, "key_padding_mask", query);
    std::vector<SymInt> expected(qs.begin(), qs.end() - 3);  // (..., S)
    expected.push_back(kv_len);
    const auto ms = m.sym_sizes();
    TORCH_CHECK(m.dim() == static_cast<int64_t>(expected.size()),
                "attention: key_padding_mask must have shape (..., S) = ", c10::SymIntArrayRef(expected),
                ", got ", ms);
    for (size_t i = 0; i < expected.size(); ++i) {
      TORCH_SYM_CHECK(ms[i].sym_eq(expected[i]),
                      "attention: key_padding_mask must have shape (..., S) = ",
                      c10::SymIntArrayRef(expected), ", got ", ms);
    }
  }
  if (!scale) {
    TORCH_SYM_CHECK(head_dim.sym_gt(0),
                    "attention: query's head dim E (its last dim) must be > 0 for the default "
                    "scale 1/sqrt(E), got query of shape ", qs, " (pass scale= to allow E = 0)");
  }
  check_scale(scale, query.scalar_type(), "attention");

  if (window) {
    TORCH_CHECK(window->size() == 2 && (*window)[0] >= -1 && (*window)[1] >= -1,
                "attention: window must be (left, right), each >= 0 or -1 for unbounded, got ",
                *window);
  }
  if (alibi_slopes) {
    const auto& a = *alibi_slopes;
    TORCH_CHECK(a.scalar_type() == at::kFloat, "attention: alibi_slopes must be float32, got ",
                a.scalar_type());
    TORCH_CHECK(a.device() == query.device(), "attention: alibi_slopes must be on query's device (",
                query.device(), "), got ", a.device());
    // (H,) or the batch dims then H: (..., H).
    const auto as = a.sym_sizes();
    TORCH_CHECK(a.dim() == 1 || a.dim() == nd - 2,
                "attention: alibi_slopes must have shape (H,) or (..., H) = ", qs.slice(0, nd - 2),
                ", got ", as);
    for (int64_t d = 0; d < a.dim(); ++d) {
      const int64_t qd = a.dim() == 1 ? nd - 3 : d;
      TORCH_SYM_CHECK(as[d].sym_eq(qs[qd]), "attention: alibi_slopes must have shape (H,) or (..., H) = ",
                      qs.slice(0, nd - 2), ", got ", as);
    }
  }
  if (softcap) {
    TORCH_CHECK(*softcap > 0 && std::isfinite(*softcap),
                "attention: softcap must be positive and finite, got ", *softcap);
  }
  if (rel_bias) {
    const auto& t = *rel_bias;
    TORCH_CHECK(t.is_floating_point(), "attention: rel_bias must be floating point, got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == query.device(), "attention: rel_bias must be on query's device (",
                query.device(), "), got ", t.device());
    TORCH_CHECK(t.dim() == 2, "attention: rel_bias must have shape (H, 2 D + 1) with H = ", heads,
                ", got ", t.sym_sizes());
    TORCH_SYM_CHECK(t.sym_size(0).sym_eq(heads) & (t.sym_size(1) % 2).sym_eq(1),
                    "attention: rel_bias must have shape (H, 2 D + 1) with H = ", heads,
                    " and an odd number of entries, got ", t.sym_sizes());
  }
}

}  // namespace fusedattn
