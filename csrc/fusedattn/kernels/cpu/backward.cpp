// The backward on query rows: per key/value head and block of 256 keys, blocks of 64 queries;
// P rebuilt from the forward's lse, dropout regenerated, every product on p.gemm.
#include <array>

#include "fusedattn/kernels/cpu/backward.h"
#include "fusedattn/kernels/cpu/forward.h"  // FUSEDATTN_FOR_EACH_TYPE

FUSEDATTN_TIER_NS_BEGIN

template <typename T>
void Backward<T>::run(int64_t begin, int64_t end) const {
  const bool kr = p.backward_path == BackwardPath::KeysAsRows;
  Work w(p, kr);
  for (int64_t t = begin; t < end; ++t) {
    if (kr) {
      keys_as_rows_task(t, w);
    } else {
      query_rows_task(t, w);
    }
  }
  if (kr && p.packed) p.packed->release();
}

template <typename T>
void Backward<T>::query_rows_task(int64_t t, Work& w) const {
  if constexpr (kIsHalf<T>) {
    if (p.half_on_f32) return query_rows_body<float>(t, w);
  } else if constexpr (std::is_same_v<T, float>) {
    if (p.bf16_products) return query_rows_body<bf16>(t, w);
  }
  query_rows_body<T>(t, w);
}

// U = T: the products read the inputs in place, and P, dS are rounded to T for them (bf16 on
// CPUs with bf16 GEMMs). U = float (p.half_on_f32: fp16, and bf16 elsewhere): the products
// read fp32 copies and fp32 P and dS, as PyTorch's own CPU kernel keeps them; products of two
// half values are exact in fp32, so S and dP are the same numbers either way. (fp16's dS, rounded,
// fell below its smallest normal for long rows under a small grad_out: dQ at 10x the error of
// PyTorch's math path at S = 4096, grad_out ~ 1e-3; in fp32, the math path's own.)
// U = bf16 for T = float (p.bf16_products): the products read copies of Q, K, V, dO and P, dS
// rounded to bf16, on the bf16 GEMM; the sums, D and the gradients stay fp32.
template <typename T>
template <typename U>
void Backward<T>::query_rows_body(int64_t t, Work& w) const {
  using layout::kBwdBlockK;
  using layout::kBwdBlockQ;
  constexpr bool kWide = !std::is_same_v<U, T>;  // the products read copies (widened or rounded)
  constexpr bool kRounded = kWide && std::is_same_v<U, bf16>;
  // Rows of x (row stride ld) copied as U into y (contiguous rows of `cols`).
  const auto copy_rows = [](const T* x, int64_t ld, int64_t n, int64_t cols, U* y) {
    if constexpr (kRounded) {
      for (int64_t r = 0; r < n; ++r) narrow_row(x + r * ld, y + r * cols, cols);
    } else if constexpr (kWide) {
      widen_rows(x, ld, n, cols, y);
    }
  };
  const auto copies = [&w]() {
    if constexpr (kRounded) {
      return std::array<U*, 4>{w.k16.data(), w.v16.data(), w.q16.data(), w.do16.data()};
    } else {
      return std::array<float*, 4>{w.kf.data(), w.vf.data(), w.qf.data(), w.dof.data()};
    }
  }();
  const int64_t b = t / p.Hk, hk = t % p.Hk, ke = this->key_end(b);
  // Row r of X (one of q, k, v, dout) is x + r * x_sr.
  const U *k = nullptr, *v = nullptr, *q = nullptr, *dout = nullptr;
  int64_t k_sr = p.k_sr, v_sr = p.v_sr, q_sr = p.q_sr, do_sr = p.do_sr;
  if constexpr (kWide) {
    copy_rows(this->k_rows(b, hk, 0), p.k_sr, ke, p.E, copies[0]);
    copy_rows(this->v_rows(b, hk, 0), p.v_sr, ke, p.Ev, copies[1]);
    k = copies[0], v = copies[1], k_sr = p.E, v_sr = p.Ev, q_sr = p.E, do_sr = p.Ev;
  } else {
    k = this->k_rows(b, hk, 0), v = this->v_rows(b, hk, 0);
  }
  const auto mm = [&](bool ta, bool tb, int64_t m, int64_t n, int64_t kk, A alpha, const U* a,
                      int64_t lda, const U* bb, int64_t ldb, A beta, A* c, int64_t ldc) {
    if constexpr (kRounded) {
      p.gemm->half(true, ta, tb, m, n, kk, alpha, reinterpret_cast<const uint16_t*>(a), lda,
                   reinterpret_cast<const uint16_t*>(bb), ldb, beta, c, ldc);
    } else if constexpr (kWide) {
      p.gemm->f32(ta, tb, m, n, kk, alpha, a, lda, bb, ldb, beta, c, ldc);
    } else {
      this->mm(ta, tb, m, n, kk, alpha, a, lda, bb, ldb, beta, c, ldc);
    }
  };
  std::fill(w.dk.begin(), w.dk.end(), A(0));
  std::fill(w.dv.begin(), w.dv.end(), A(0));
  for (int64_t h = hk * this->group; h < (hk + 1) * this->group; ++h) {
    const A* lse = this->lse_row(b, h);
    const A* dlse = this->dlse_row(b, h);
    if constexpr (kWide) {
      copy_rows(this->q_rows(b, h, 0), p.q_sr, p.L, p.E, copies[2]);
      copy_rows(this->dout_rows(b, h, 0), p.do_sr, p.L, p.Ev, copies[3]);
      q = copies[2], dout = copies[3];
    } else {
      q = this->q_rows(b, h, 0), dout = this->dout_rows(b, h, 0);
    }
    for (int64_t i = 0; i < p.L; ++i) {
      w.d[i] = this->out_dot_dout(b, h, i);
      w.one_key[i] = this->sees_one_key(b, h, i, ke);
    }
    std::fill(w.dq.begin(), w.dq.end(), A(0));
    // Keys some query sees: from the first query's window edge to the last query's end.
    const int64_t j_end = std::min(ke, this->visible_end(p.L - 1));
    // One key block holds every row whole: P from each row's own softmax and D = rowsum(P *
    // dP), both exact to the fp32 sums, where dO * O would read O rounded to T (fp16/bf16
    // peaked rows: a cancellation in dP - D) and exp(s - lse) lse's rounding.
    const bool whole_rows = j_end - this->visible_begin(0) <= kBwdBlockK;
    for (int64_t j0 = this->visible_begin(0); j0 < j_end; j0 += kBwdBlockK) {
      const int64_t bk = std::min(kBwdBlockK, j_end - j0);
      // Queries that see any key of this block (causal, the window): [i_first, i_end).
      const auto [i_first, i_end] = this->seeing_queries(j0, j0 + bk);
      const U* kj = k + j0 * k_sr;
      const U* vj = v + j0 * v_sr;
      for (int64_t i0 = i_first / kBwdBlockQ * kBwdBlockQ; i0 < i_end; i0 += kBwdBlockQ) {
        const int64_t bq = std::min(kBwdBlockQ, p.L - i0);
        const U* qi = q + i0 * q_sr;
        const U* doi = dout + i0 * do_sr;
        A* s = w.s.data();
        A* dp = w.dp.data();
        mm(false, true, bq, bk, p.E, A(1), qi, q_sr, kj, k_sr, A(0), s, bk);
        A* cap = p.softcap > 0 ? w.cap.data() : nullptr;
        this->apply_masks(s, bk, b, h, i0, bq, j0, bk, w.bias.data(), cap);
        uint8_t* own = w.own.data();
        if (whole_rows) {
          this->whole_row_probabilities(s, bq, bk, lse + i0, w.bias.data(), own);
        } else {
          this->probabilities(s, bq, bk, lse + i0);
        }
        // dP = dO V^T. With dropout the forward used P * M: dP picks up M here, and dV
        // takes P * M below, once dS (which needs P itself) is formed.
        mm(false, true, bq, bk, p.Ev, A(1), doi, do_sr, vj, v_sr, A(0), dp, bk);
        if (p.dropout) {
          for (int64_t r = 0; r < bq; ++r) this->drop_row(dp + r * bk, b, h, i0 + r, j0, bk);
        }
        for (int64_t r = 0; r < bq; ++r) {
          const A glse = dlse ? dlse[i0 + r] : A(0);
          if (whole_rows && own[r]) w.d[i0 + r] = dot_row(s + r * bk, dp + r * bk, bk);
          if (w.one_key[i0 + r]) {
            one_key_grad_row(dp + r * bk, s + r * bk, bk, w.d[i0 + r], glse);
          } else {
            softmax_grad_row(dp + r * bk, s + r * bk, bk, w.d[i0 + r], glse);
          }
        }
        // rel_bias: dS (of the scores the bias is added to) into its table entries.
        if (p.rel_bias) {
          A* grad = this->rel_grad_row(b, h);
          for (int64_t r = 0; r < bq; ++r) this->rel_bias_grad_row(dp + r * bk, bk, i0 + r, j0, grad);
        }
        // Soft-capping: the scores' gradient times tanh's derivative (dS of the raw scores).
        if (cap) {
          for (int64_t e = 0; e < bq * bk; ++e) dp[e] *= cap[e];
        }
        if (p.dropout) {
          for (int64_t r = 0; r < bq; ++r) this->drop_row(s + r * bk, b, h, i0 + r, j0, bk);
        }
        // dV += P^T dO; dS is in dp: dQ += scale dS K, dK += scale dS^T Q.
        const U *pm = nullptr, *ds = nullptr;
        if constexpr (kRounded) {
          narrow_row(s, w.s16.data(), bq * bk);
          narrow_row(dp, w.ds16.data(), bq * bk);
          pm = w.s16.data(), ds = w.ds16.data();
        } else if constexpr (kWide) {
          pm = s, ds = dp;
        } else {
          pm = this->operand(s, bq * bk, w.narrow_s.data());
          ds = this->operand(dp, bq * bk, w.narrow_dp.data());
        }
        mm(true, false, bk, p.Ev, bq, A(1), pm, bk, doi, do_sr, A(1), w.dv.data() + j0 * p.Ev, p.Ev);
        const A alpha = A(p.scale);
        mm(false, false, bq, p.E, bk, alpha, ds, bk, kj, k_sr, A(1), w.dq.data() + i0 * p.E, p.E);
        mm(true, false, bk, p.E, bq, alpha, ds, bk, qi, q_sr, A(1), w.dk.data() + j0 * p.E, p.E);
      }
    }
    T* dq = this->dq_rows(b, h);
    for (int64_t i = 0; i < p.L; ++i) store_out_row(w.dq.data() + i * p.E, A(1), dq + i * p.dq_sr, p.E);
  }
  this->store_dk_dv(b, hk, w);
}

#define FUSEDATTN_INSTANTIATE(T)                                                       \
  template void Backward<T>::run(int64_t, int64_t) const;                             \
  template void Backward<T>::query_rows_task(int64_t, typename Backward<T>::Work&) const;
FUSEDATTN_FOR_EACH_TYPE(FUSEDATTN_INSTANTIATE)
#undef FUSEDATTN_INSTANTIATE

FUSEDATTN_TIER_NS_END
