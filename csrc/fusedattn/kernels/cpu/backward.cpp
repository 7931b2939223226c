// The backward on query rows: per key/value head and block of 256 keys, blocks of 64 queries;
// P rebuilt from the forward's lse, dropout regenerated, every product on p.gemm.
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
  using layout::kBwdBlockK;
  using layout::kBwdBlockQ;
  const int64_t b = t / p.Hk, hk = t % p.Hk, ke = this->key_end(b);
  std::fill(w.dk.begin(), w.dk.end(), A(0));
  std::fill(w.dv.begin(), w.dv.end(), A(0));
  for (int64_t h = hk * this->group; h < (hk + 1) * this->group; ++h) {
    const A* lse = this->lse_row(b, h);
    const A* dlse = this->dlse_row(b, h);
    for (int64_t i = 0; i < p.L; ++i) {
      w.d[i] = this->out_dot_dout(b, h, i);
      w.one_key[i] = this->sees_one_key(b, h, i, ke);
    }
    std::fill(w.dq.begin(), w.dq.end(), A(0));
    for (int64_t j0 = 0; j0 < ke; j0 += kBwdBlockK) {
      const int64_t bk = std::min(kBwdBlockK, ke - j0);
      // Queries that see any key of this block: i >= j0 - causal_offset.
      const int64_t i_first = p.causal ? std::max<int64_t>(j0 - p.causal_offset, 0) : 0;
      const T* k = this->k_rows(b, hk, j0);
      const T* v = this->v_rows(b, hk, j0);
      for (int64_t i0 = i_first / kBwdBlockQ * kBwdBlockQ; i0 < p.L; i0 += kBwdBlockQ) {
        const int64_t bq = std::min(kBwdBlockQ, p.L - i0);
        const T* q = this->q_rows(b, h, i0);
        const T* dout = this->dout_rows(b, h, i0);
        A* s = w.s.data();
        A* dp = w.dp.data();
        this->mm(false, true, bq, bk, p.E, A(1), q, p.q_sr, k, p.k_sr, A(0), s, bk);
        this->apply_masks(s, bk, b, h, i0, bq, j0, bk, w.bias.data());
        this->probabilities(s, bq, bk, lse + i0);
        // dP = dO V^T. With dropout the forward used P * M: dP picks up M here, and dV
        // takes P * M below, once dS (which needs P itself) is formed.
        this->mm(false, true, bq, bk, p.Ev, A(1), dout, p.do_sr, v, p.v_sr, A(0), dp, bk);
        if (p.dropout) {
          for (int64_t r = 0; r < bq; ++r) this->drop_row(dp + r * bk, b, h, i0 + r, j0, bk);
        }
        for (int64_t r = 0; r < bq; ++r) {
          const A glse = dlse ? dlse[i0 + r] : A(0);
          if (w.one_key[i0 + r]) {
            one_key_grad_row(dp + r * bk, s + r * bk, bk, glse);
          } else {
            softmax_grad_row(dp + r * bk, s + r * bk, bk, w.d[i0 + r], glse);
          }
        }
        if (p.dropout) {
          for (int64_t r = 0; r < bq; ++r) this->drop_row(s + r * bk, b, h, i0 + r, j0, bk);
        }
        A p_unscale, ds_unscale;
        const T* pm = this->scaled_operand(s, bq * bk, w.narrow_s.data(), &p_unscale);
        this->mm(true, false, bk, p.Ev, bq, p_unscale, pm, bk, dout, p.do_sr, A(1),
                 w.dv.data() + j0 * p.Ev, p.Ev);
        // dS is in dp: dQ += scale dS K, dK += scale dS^T Q.
        const T* ds = this->scaled_operand(dp, bq * bk, w.narrow_dp.data(), &ds_unscale);
        const A alpha = A(p.scale) * ds_unscale;
        this->mm(false, false, bq, p.E, bk, alpha, ds, bk, k, p.k_sr, A(1),
                 w.dq.data() + i0 * p.E, p.E);
        this->mm(true, false, bk, p.E, bq, alpha, ds, bk, q, p.q_sr, A(1),
                 w.dk.data() + j0 * p.E, p.E);
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
