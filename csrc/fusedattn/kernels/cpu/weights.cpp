// The forward that also returns the weights (p.weights, (B, H, L, S)), and the head-averaged
// weights (B, L, S) that nn.MultiheadAttention returns by default.
//
// The weights are an L x S output anyway, so a block's scores against every visible key are
// formed at once in the weights' own rows (fp32/fp64) or in w.rows (half types: fp32, row
// stride ns), exponentiated and normalised there with the row's exact max and sum, and those
// rows are P in O = P V: two GEMMs and one exp per score, the flash forward's count, where a
// flash forward followed by a pass rebuilding the weights from the lse took three and two.
// Returned weights are the probabilities before dropout; O uses the dropped ones.
#include "fusedattn/kernels/cpu/forward.h"

FUSEDATTN_TIER_NS_BEGIN

// Task t = (b, block of queries) with head-averaged weights: the heads' weights tasks in
// turn, each adding its rows / H into the sum (64 x S, in L2 across the heads): the output
// rows themselves for fp32/fp64, w.avg for half types, rounded once at the end.
template <typename T>
void Forward<T>::averaged_weights_task(int64_t t, Work& w) const {
  const int64_t nqb = layout::q_blocks(p), b = t / nqb, qb = t % nqb;
  const int64_t i0 = qb * layout::kFwdBlockQ, bq = std::min(layout::kFwdBlockQ, p.L - i0);
  T* wout = static_cast<T*>(p.weights) + (b * p.L + i0) * p.S;
  A* avg;
  if constexpr (std::is_same_v<T, A>) {
    avg = wout;
  } else {
    avg = w.avg.data();
  }
  std::fill(avg, avg + bq * p.S, A(0));
  for (int64_t h = 0; h < p.H; ++h) weights_task((b * p.H + h) * nqb + qb, w, avg);
  if constexpr (kIsHalf<T>) store_row(avg, wout, bq * p.S);
}

// avg set (averaging): this head's weights go to per-task buffers (w.rows, and w.head for
// half types) and are added into avg (bq x S) instead of stored.
template <typename T>
void Forward<T>::weights_task(int64_t t, Work& w, A* avg) const {
  using layout::kFwdBlockK;
  constexpr A kNegInf = Masks<T>::kNegInf;
  const auto [bh, b, h, hk, i0, bq] = q_task(t);
  const T* q = this->q_rows(b, h, i0);
  T* wout = static_cast<T*>(p.weights) + (bh * p.L + i0) * p.S;
  if (avg) {
    if constexpr (std::is_same_v<T, A>) {
      wout = w.rows.data();
    } else {
      wout = w.head.data();
    }
  }
  A* lse = this->lse_row(b, h) + i0;
  const bool packed = this->packed(), fk = this->fk();
  const A mul = this->mul;
  // Columns formed: the visible ones; packed, up to whole 64-column panels of packed K^T
  // (the causal mask hides the extra ones). Columns ns.. of the weights are 0.
  int64_t ns = this->kv_end(b, i0 + bq - 1);
  if (packed) ns = std::min(p.S, layout::round64(ns));
  A* s;
  int64_t lds;
  if constexpr (std::is_same_v<T, A>) {
    s = wout, lds = p.S;
  } else {
    s = w.rows.data(), lds = ns;
  }
  if (ns == 0) {  // no query of the block sees a key
    for (int64_t r = 0; r < bq; ++r) {
      if (!avg) std::fill(wout + r * p.S, wout + (r + 1) * p.S, T{});
      lse[r] = kNegInf;
    }
    this->zero_out_rows(b, h, i0, bq);
    return;
  }
  if (packed) {
    for (int64_t j0 = 0; j0 < ns; j0 += kFwdBlockK) {
      p.packed->gemm(bq, std::min(kFwdBlockK, ns - j0), p.E, p.E, p.q_sr, lds, false, q,
                     packed_kt(b, hk, j0 / kFwdBlockK), reinterpret_cast<float*>(s + j0));
    }
  } else if (fk) {
    for (int64_t j0 = 0; j0 < ns; j0 += kFwdBlockK) {
      this->fgemm(bq, std::min(kFwdBlockK, ns - j0), p.E, p.q_sr, layout::slot_ld_kt(p), lds,
                  false, q, packed_kt(b, hk, j0 / kFwdBlockK), s + j0);
    }
  } else {
    this->mm(false, true, bq, ns, p.E, A(1), q, p.q_sr, this->k_rows(b, hk, 0), p.k_sr, A(0), s, lds);
  }
  for (int64_t j0 = 0; j0 < ns; j0 += kFwdBlockK) {
    this->apply_masks(s + j0, lds, b, h, i0, bq, j0, std::min(kFwdBlockK, ns - j0), w.bias.data());
  }
  // Rows of s end normalised, except for half types without dropout: there the weights are
  // rounded from exp * (1 / sum) in one pass, and w.l keeps 1 / sum for the odd block below.
  // Averaging fp32/fp64 (out_scaled): the rows stay exp, avg takes exp * (1 / sum) / H in
  // one pass, and O = exp V is scaled by w.l = 1 / sum once formed (a pass fewer per score).
  const bool out_scaled = avg != nullptr && std::is_same_v<T, A>;
  const bool s_normalised = (std::is_same_v<T, A> && !out_scaled) || (kIsHalf<T> && p.dropout);
  const A inv_h = A(1) / A(p.H);
  for (int64_t r = 0; r < bq; ++r) {
    A* row = s + r * lds;
    T* wrow = wout + r * p.S;
    const A m = row_max(row, ns);  // NaN if a score is: the row's sum, so the row, NaN
    A sum = 0;
    if (m == kNegInf) {  // no visible key: weights 0, output 0, lse -inf
      std::fill(row, row + ns, A(0));
    } else if constexpr (kIsHalf<T>) {
      sum = exp_sum_row_short(row, ns, mul, m * mul);
    } else {
      sum = exp_sum_row(row, ns, mul, m * mul);
    }
    const A inv = m == kNegInf ? A(0) : A(1) / sum;
    if constexpr (!std::is_same_v<T, A>) {
      if (s_normalised) {
        scale_row(row, ns, inv);
        narrow_row(row, wrow, ns);
      } else {
        scale_narrow_row(row, inv, wrow, ns);
        w.l[r] = inv;
      }
    } else if (out_scaled) {
      w.l[r] = inv;
      add_scaled_row(avg + r * p.S, row, ns, inv * inv_h);
    } else {
      scale_row(row, ns, inv);
    }
    if (!avg) {
      std::fill(wrow + ns, wrow + p.S, T{});
    } else if constexpr (kIsHalf<T>) {  // this head's weights as returned (rounded), / H
      add_scaled_row(avg + r * p.S, wrow, ns, inv_h);
    }
    lse[r] = sum > A(0) ? m * mul + std::log(sum) : (sum == A(0) ? kNegInf : sum);
  }
  // O = P V, P the normalised rows (for half types the rounded weights themselves), in one
  // product, or key block by key block: packed V is one slot per block, and dropout
  // multiplies a copy of P.
  A* acc = w.acc.data();
  for (int64_t j0 = 0, bk = 0; j0 < ns; j0 += bk) {
    bk = p.dropout || packed ? std::min(kFwdBlockK, ns - j0) : ns - j0;
    // The packed product's depth must be even; bk is odd only in S's last block (ns < S is
    // a multiple of 64): P gets a zero column there, as packed V has a zero row.
    const int64_t bkp = packed ? bk + (bk & 1) : bk;
    const T* pa = wout + j0;
    int64_t lda = p.S;
    if (p.dropout || bkp != bk) {
      A* pd = w.s.data();  // bq x bkp
      for (int64_t r = 0; r < bq; ++r) {
        std::copy(s + r * lds + j0, s + r * lds + j0 + bk, pd + r * bkp);
        if (!s_normalised && !out_scaled) scale_row(pd + r * bkp, bk, w.l[r]);
        if (p.dropout) this->drop_row(pd + r * bkp, b, h, i0 + r, j0, bk);
        if (bkp != bk) pd[r * bkp + bk] = A(0);
      }
      pa = this->operand(pd, bq * bkp, w.narrow.data()), lda = bkp;
    }
    if (packed) {
      p.packed->gemm(bq, p.Ev, bkp, v_depth(j0), lda, p.Ev, j0 > 0, pa,
                     packed_v(b, hk, j0 / kFwdBlockK), reinterpret_cast<float*>(acc));
    } else if (fk) {
      this->fgemm(bq, p.Ev, bk, lda, p.v_sr, p.Ev, j0 > 0, pa, this->v_rows(b, hk, j0), acc);
    } else {
      this->mm(false, false, bq, p.Ev, bk, A(1), pa, lda, this->v_rows(b, hk, j0), p.v_sr,
               A(j0 > 0 ? 1 : 0), acc, p.Ev);
    }
  }
  this->store_out_rows(b, h, i0, bq, acc, p.Ev, out_scaled ? w.l.data() : nullptr);
}

#define FUSEDATTN_INSTANTIATE(T)                                           \
  template void Forward<T>::averaged_weights_task(int64_t, typename Forward<T>::Work&) const;  \
  template void Forward<T>::weights_task(int64_t, typename Forward<T>::Work&, typename Forward<T>::A*) const;
FUSEDATTN_FOR_EACH_TYPE(FUSEDATTN_INSTANTIATE)
#undef FUSEDATTN_INSTANTIATE

FUSEDATTN_TIER_NS_END
