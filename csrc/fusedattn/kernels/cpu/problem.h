#pragma once
// One call seen by the kernels of a tier: the operands' rows, the block products on the
// caller's GEMMs, masks (masks.h) and dropout (dropout_rows.h). Accumulation is in A (fp32,
// fp64 for fp64 inputs); for bf16/fp16 the probabilities and dS are rounded to the input type
// for their GEMMs, as FlashAttention does. Scores are S = Q K^T straight from the inputs (no
// copies: the GEMMs read q, k, v, dout through their row strides).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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
  // The backward's P and dS blocks as GEMM operands, rounded into buf for half types; *unscale
  // multiplies the product back. fp16 has 5 exponent bits: dS = P (dP - D) of a long row (P ~
  // 1/S) under a small grad_out falls below fp16's smallest normal (6.1e-5) and loses its
  // digits (dQ 10x the error of PyTorch's fp32-inside math path at S = 4096, grad_out ~ 1e-3),
  // and a large one overflows to inf. So fp16 blocks are scaled by the power of two that puts
  // their largest finite magnitude in [2^14, 2^15) before rounding (exact: no digit changes),
  // 2^-64 .. 2^64; a block whose largest magnitude is 0 or inf keeps 1 (NaN stays NaN
  // either way). Other types: operand() and 1.
  static const T* scaled_operand(A* x, int64_t n, T* buf, A* unscale) {
    *unscale = A(1);
    if constexpr (std::is_same_v<T, fp16>) {
      A m = 0;
      for (int64_t i = 0; i < n; ++i) m = std::max(m, std::abs(x[i]));  // NaN never wins
      if (m > 0 && m <= std::numeric_limits<A>::max()) {
        int ex = 0;
        std::frexp(m, &ex);  // m = f 2^ex, f in [0.5, 1)
        const int s = std::clamp(15 - ex, -64, 64);
        const A up = std::ldexp(A(1), s);
        for (int64_t i = 0; i < n; ++i) x[i] *= up;
        *unscale = std::ldexp(A(1), -s);
      }
    }
    return operand(x, n, buf);
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
  // The gradients' rows of one (b, head): row i at + i * d*_sr.
  T* dq_rows(int64_t b, int64_t h) const { return static_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh; }
  A* lse_row(int64_t b, int64_t h) const { return static_cast<A*>(p.lse) + (b * p.H + h) * p.L; }
  const A* dlse_row(int64_t b, int64_t h) const {
    return p.dlse ? static_cast<const A*>(p.dlse) + (b * p.H + h) * p.L : nullptr;
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
  // D_i = rowsum(dO * O) for query i: softmax's backward term.
  A out_dot_dout(int64_t b, int64_t h, int64_t i) const {
    return dot_row(out_rows(b, h, i), dout_rows(b, h, i), p.Ev);
  }
};

FUSEDATTN_TIER_NS_END
