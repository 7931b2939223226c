#pragma once
// One call seen by the kernels of a tier: the operands' rows, the block products on the
// caller's GEMMs, masks (masks.h) and dropout (dropout_rows.h). Accumulation is in A (fp32,
// fp64 for fp64 inputs); where bf16 runs its products in bf16 (CPUs with bf16 GEMMs) the
// probabilities and dS are rounded to bf16 for them, as FlashAttention does, and elsewhere the
// half types run them in fp32 on widened operands (p.half_on_f32). Scores are S = Q K^T
// straight from the inputs (no copies: the GEMMs read q, k, v, dout through their row strides).
#include <cstdint>
#include <type_traits>

#include "fusedattn/kernels/cpu/dropout_rows.h"
#include "fusedattn/kernels/cpu/layout.h"
#include "fusedattn/kernels/cpu/masks.h"

FUSEDATTN_TIER_NS_BEGIN

template <typename T>
struct Problem : Masks<T> {
  using A = typename Masks<T>::A;
  using Masks<T>::p;
  int64_t group;  // query heads per key/value head

  explicit Problem(const FlashParams& params) : Masks<T>(params), group(params.H / params.Hk) {}

  // Row-major C = alpha op(A) op(B) + beta C with A, B in the input type (p.gemm).
  void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, A beta, A* c, int64_t ldc) const {
    if constexpr (kIsHalf<T>) {
      p.gemm->half(std::is_same_v<T, bf16>, ta, tb, m, n, k, alpha,
                   reinterpret_cast<const uint16_t*>(a), lda, reinterpret_cast<const uint16_t*>(b),
                   ldb, beta, c, ldc);
    } else if constexpr (std::is_same_v<T, float>) {
      p.gemm->f32(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    } else {
      p.gemm->f64(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
  }
  // p.fgemm for T = float (calls compiled for every T are taken only where the plan set it).
  template <typename X, typename Y>
  void fgemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
             const X* a, const Y* b, A* c) const {
    if constexpr (std::is_same_v<T, float>) p.fgemm(m, n, k, lda, ldb, ldc, add_c, a, b, c);
  }
  // An accumulator block as a GEMM operand: itself, or rounded into buf for half types.
  static const T* operand(const A* x, int64_t n, T* buf) {
    if constexpr (kIsHalf<T>) {
      narrow_row(x, buf, n);
      return buf;
    } else {
      (void)buf, (void)n;
      return x;
    }
  }

  const T* q_rows(int64_t b, int64_t h, int64_t i) const {
    return static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + i * p.q_sr;
  }
  const T* k_rows(int64_t b, int64_t hk, int64_t j) const {
    return static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + j * p.k_sr;
  }
  const T* v_rows(int64_t b, int64_t hk, int64_t j) const {
    return static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + j * p.v_sr;
  }
  const T* dout_rows(int64_t b, int64_t h, int64_t i) const {
    return static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + i * p.do_sr;
  }
  T* out_rows(int64_t b, int64_t h, int64_t i) const {
    return static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + i * p.o_sr;
  }
  // out's rows as fp32 (p.out_f32).
  float* out_rows_f32(int64_t b, int64_t h, int64_t i) const {
    return static_cast<float*>(p.out) + b * p.o_sb + h * p.o_sh + i * p.o_sr;
  }
  // The forward's output rows i0 .. i0 + n - 1: row r = x[r * ldx ..] * inv[r] (inv null: 1),
  // in out's type (T, or fp32 under p.out_f32); ends with out_rows_done().
  void store_out_rows(int64_t b, int64_t h, int64_t i0, int64_t n, const A* x, int64_t ldx,
                      const A* inv) const {
    const auto store = [&](auto* out) {
      for (int64_t r = 0; r < n; ++r)
        store_fwd_row(x + r * ldx, inv ? inv[r] : A(1), out + r * p.o_sr, p.Ev);
    };
    if (kIsHalf<T> && p.out_f32) {
      if constexpr (kIsHalf<T>) store(out_rows_f32(b, h, i0));
    } else {
      store(out_rows(b, h, i0));
    }
    out_rows_done();
  }
  // Output rows i0 .. i0 + n - 1 set to 0.
  void zero_out_rows(int64_t b, int64_t h, int64_t i0, int64_t n) const {
    for (int64_t r = 0; r < n; ++r) {
      if (kIsHalf<T> && p.out_f32) {
        float* o = out_rows_f32(b, h, i0 + r);
        std::fill(o, o + p.Ev, 0.f);
      } else {
        T* o = out_rows(b, h, i0 + r);
        std::fill(o, o + p.Ev, T{});
      }
    }
  }
  // The gradients' rows of one (b, head): row i at + i * d*_sr.
  T* dq_rows(int64_t b, int64_t h) const { return static_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh; }
  int64_t lse_offset(int64_t b, int64_t h) const { return (b * p.H + h) * (p.lse_sh ? p.lse_sh : p.L); }
  A* lse_row(int64_t b, int64_t h) const { return static_cast<A*>(p.lse) + lse_offset(b, h); }
  const A* dlse_row(int64_t b, int64_t h) const {
    return p.dlse ? static_cast<const A*>(p.dlse) + lse_offset(b, h) : nullptr;
  }

  void drop_row(A* row, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t bk) const {
    cpu::FUSEDATTN_TIER::drop_row(p, row, b, h, i, j0, bk);
  }
  // Rows of s -> exp(s * mul - lse) from the forward's lse; rows with no visible key: 0; a
  // NaN lse (a NaN input) keeps the row NaN.
  void probabilities(A* s, int64_t bq, int64_t bk, const A* lse) const {
    for (int64_t r = 0; r < bq; ++r) {
      A* row = s + r * bk;
      if (lse[r] == Masks<T>::kNegInf) {
        std::fill(row, row + bk, A(0));
      } else {
        exp_rows(row, bk, this->mul, lse[r]);
      }
    }
  }
  // Rows of s (scores, masked, whole: every key the query sees is in the row) -> their
  // softmax from the row's own maximum, exp((s - m) * mul) / l, where the forward's lse is
  // this row's own (within 4 ulp of |lse| + 1 of m * mul + log l): exp(s * mul - lse) would
  // carry lse's rounding, a relative error of |lse| x eps in every probability (2e-6 at
  // |lse| = 30 in fp32: dK at 3-8x the math path's error for peaked rows, L = 65, S = 2,
  // E = 1). own[r] says which rows took it; the others (an lse merged over more keys than
  // this call's, as ring attention's shards pass) take exp(s * mul - lse). `row` is
  // scratch of bk values.
  void whole_row_probabilities(A* s, int64_t bq, int64_t bk, const A* lse, A* row,
                               uint8_t* own) const {
    constexpr A kTol = 4 * std::numeric_limits<A>::epsilon();
    for (int64_t r = 0; r < bq; ++r) {
      A* x = s + r * bk;
      own[r] = 0;
      if (lse[r] == Masks<T>::kNegInf) {
        std::fill(x, x + bk, A(0));
        continue;
      }
      const A m = row_max(x, bk);
      A l = A(0);
      if (std::isfinite(m)) {
        for (int64_t j = 0; j < bk; ++j) row[j] = x[j] - m;
        l = exp_sum_row(row, bk, this->mul, A(0));
      }
      const A local = m * this->mul + std::log(l);
      if (l > A(0) && std::abs(local - lse[r]) <= kTol * (std::abs(lse[r]) + A(1))) {
        store_scaled_row(row, A(1) / l, x, bk);
        own[r] = 1;
      } else {
        exp_rows(x, bk, this->mul, lse[r]);
      }
    }
  }
  // D_i = rowsum(dO * O) for query i: softmax's backward term.
  A out_dot_dout(int64_t b, int64_t h, int64_t i) const {
    if constexpr (kIsHalf<T>) {
      if (p.out_f32) return dot_row(out_rows_f32(b, h, i), dout_rows(b, h, i), p.Ev);
    }
    return dot_row(out_rows(b, h, i), dout_rows(b, h, i), p.Ev);
  }
};

FUSEDATTN_TIER_NS_END
