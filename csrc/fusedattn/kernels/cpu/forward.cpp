// The forward on query rows: one task per (b, h, block of 64 queries), key blocks of 512 with
// an online softmax; the products on packed operands (half types with p.packed), on the JIT
// GEMM (p.fgemm: fp32 with K^T transposed by the tasks, or half types widened by the pack
// tasks), on p.gemm's fp32 products of widened rows, or on p.gemm reading q, k, v in place.
#include "fusedattn/kernels/cpu/forward.h"

FUSEDATTN_TIER_NS_BEGIN

template <typename T>
void Forward<T>::run(int64_t begin, int64_t end) const {
  Work w(p);
  for (int64_t t = begin; t < end; ++t) {
    switch (p.forward_path) {
      case ForwardPath::AveragedWeights: averaged_weights_task(t, w); break;
      case ForwardPath::Weights: weights_task(t, w); break;
      case ForwardPath::KeysAsRows: keys_as_rows_task(t, w); break;
      case ForwardPath::QueryRows: query_rows_task(t, w); break;
    }
  }
  if (p.packed) p.packed->release();
}

template <typename T>
const T* Forward<T>::kt_block(int64_t b, int64_t hk, int64_t jb, Work& w) const {
  using layout::kFwdBlockK;
  const int64_t head = b * p.Hk + hk;
  if (w.kt_head != head) {
    std::fill(w.kt_ready.begin(), w.kt_ready.end(), char(0));
    w.kt_head = head;
  }
  T* kt = w.kt.data() + jb * layout::packed_slot(p);
  if (!w.kt_ready[jb]) {
    const int64_t j0 = jb * kFwdBlockK;
    transpose(this->k_rows(b, hk, j0), p.k_sr, std::min(kFwdBlockK, p.S - j0), p.E, kt,
              layout::slot_ld_kt(p));
    w.kt_ready[jb] = 1;
  }
  return kt;
}

template <typename T>
void Forward<T>::query_rows_task(int64_t t, Work& w) const {
  if constexpr (std::is_same_v<T, float>) {
    if (p.bf16_products) return query_rows_body<bf16>(t, w);
  }
  query_rows_body<T>(t, w);
}

// PT = T: the products read the inputs (or the packed / widened copies of them); PT = bf16
// for T = float (bf16_products()): the packed bf16 K^T and V of the pack tasks, the task's
// queries rounded once into w.q16 and P into w.p16, everything else as for fp32.
template <typename T>
template <typename PT>
void Forward<T>::query_rows_body(int64_t t, Work& w) const {
  using layout::kFwdBlockK;
  constexpr bool kRounded = !std::is_same_v<PT, T>;
  constexpr A kNegInf = Masks<T>::kNegInf;
  const auto [bh, b, h, hk, i0, bq] = q_task(t);
  const T* q_in = this->q_rows(b, h, i0);
  const PT* q = nullptr;
  int64_t q_sr = p.q_sr;
  if constexpr (kRounded) {
    for (int64_t r = 0; r < bq; ++r) narrow_row(q_in + r * p.q_sr, w.q16.data() + r * p.E, p.E);
    q = w.q16.data(), q_sr = p.E;
  } else {
    q = q_in;
  }
  std::fill(w.m.begin(), w.m.end(), kNegInf);  // running max, in units of raw s
  std::fill(w.l.begin(), w.l.end(), A(0));
  std::fill(w.acc.begin(), w.acc.end(), A(0));
  const int64_t kv_end = this->kv_end(b, i0 + bq - 1);
  const bool packed = this->packed() || kRounded, fk = this->fk(), wide = this->wide();
  // Half products round P for their P V product; on fp32 products (wide) P stays fp32.
  const bool narrow = kIsHalf<PT> && !wide;
  const A mul = this->mul;
  float* qf = w.qf.data();
  if (wide) widen_rows(q_in, p.q_sr, bq, p.E, qf);
  // A sliding window's left edge: keys before it are skipped, from its exact start where
  // the products read K and V in place, from its block where they read the packed operands
  // (per block of kFwdBlockK keys).
  const int64_t first = this->visible_begin(i0);
  const int64_t j_begin = packed || fk || wide ? first / kFwdBlockK * kFwdBlockK : first;
  for (int64_t j0 = j_begin; j0 < kv_end; j0 += kFwdBlockK) {
    // Packed: the block's columns up to kv_end rounded up to whole 64-column panels of the
    // packed layout (the causal mask hides the extra ones); a prefix of a packed V block is
    // a valid packed operand. bkp is P's row stride and the P V product's depth, even for
    // the packed layout (when odd, the block is S's last: P's extra column is 0, and so is
    // the extra row packed with V).
    int64_t bk = std::min(kFwdBlockK, kv_end - j0);
    if (packed) bk = std::min(std::min(kFwdBlockK, p.S - j0), layout::round64(bk));
    const int64_t bkp = packed ? bk + (bk & 1) : bk;
    A* s = w.s.data();
    if (packed) {
      p.packed->gemm(bq, bk, p.E, p.E, q_sr, bk, false, q, packed_kt(b, hk, j0 / kFwdBlockK),
                     reinterpret_cast<float*>(s));
    } else if constexpr (kRounded) {
      // unreachable: bf16_products() runs on packed operands alone
    } else if (fk) {
      this->fgemm(bq, bk, p.E, p.q_sr, layout::slot_ld_kt(p), bk, false, q,
                  kt_block(b, hk, j0 / kFwdBlockK, w), s);
    } else if (wide && p.fgemm) {
      p.fgemm(bq, bk, p.E, p.E, layout::slot_ld_kt(p), bk, false, qf,
              this->wide_k(b, hk, j0 / kFwdBlockK), reinterpret_cast<float*>(s));
    } else if (wide) {
      p.gemm->f32(false, true, bq, bk, p.E, 1.f, qf, p.E, this->wide_k(b, hk, j0 / kFwdBlockK),
                  p.E, 0.f, reinterpret_cast<float*>(s), bk);
    } else {
      this->mm(false, true, bq, bk, p.E, A(1), q, p.q_sr, this->k_rows(b, hk, j0), p.k_sr, A(0), s, bk);
    }
    this->apply_masks(s, bk, b, h, i0, bq, j0, bk, w.bias.data());
    // Packed: columns past kv_end (whole panels' rest) are keys no query here sees, whose K
    // and V may hold anything (trailing padding): their scores go, and P V stops at kv_end
    // (an odd end's last key by a rank-1 update, its pair partner being one of them).
    const int64_t kd = packed ? std::min(bk, kv_end - j0) : bk;
    if (kd < bk)
      for (int64_t r = 0; r < bq; ++r) std::fill(s + r * bk + kd, s + (r + 1) * bk, kNegInf);
    // P for the P V product: s itself, or (half types) rounded into w.narrow row by row
    // while the row is still in L1.
    PT* pn = nullptr;
    if constexpr (kRounded) {
      pn = w.p16.data();
    } else if (narrow) {
      pn = w.narrow.data();
    }
    for (int64_t r = 0; r < bq; ++r) {
      A* row = s + r * bk;
      if (narrow && bkp != bk) pn[r * bkp + bk] = PT{};
      // NaN-keeping max: a NaN score makes m NaN, and with it the row's output and lse.
      const A m_new = max_nan(w.m[r], row_max(row, bk));
      if (m_new == kNegInf) {  // this row has seen no visible key yet
        std::fill(row, row + bk, A(0));
        if constexpr (kIsHalf<PT>) {
          if (narrow) narrow_row(row, pn + r * bkp, bk);
        }
        continue;
      }
      A block_sum;
      if (!narrow) {
        block_sum = exp_sum_row(row, bk, mul, m_new * mul);
        if (p.dropout) this->drop_row(row, b, h, i0 + r, j0, bk);
      } else if constexpr (std::is_same_v<PT, bf16>) {
        if (!p.dropout) {  // one pass: exp, sum, round to bf16
          block_sum = exp_sum_bf16_row(row, pn + r * bkp, bk, mul, m_new * mul);
        } else {
          block_sum = exp_sum_row(row, bk, mul, m_new * mul);
          this->drop_row(row, b, h, i0 + r, j0, bk);
          narrow_row(row, pn + r * bkp, bk);
        }
      } else {
        block_sum = exp_sum_row(row, bk, mul, m_new * mul);
        if (p.dropout) this->drop_row(row, b, h, i0 + r, j0, bk);
        if constexpr (kIsHalf<PT>) narrow_row(row, pn + r * bkp, bk);
      }
      const A alpha = exp_scalar((w.m[r] - m_new) * mul);  // 0 when m was -inf
      w.l[r] = w.l[r] * alpha + block_sum;  // normaliser of the probabilities before dropout
      if (alpha != A(1)) scale_row(w.acc.data() + r * p.Ev, p.Ev, alpha);
      w.m[r] = m_new;
    }
    if (packed) {
      int64_t depth = kd < bk ? kd : bkp;
      if constexpr (kIsHalf<PT>) {
        if (depth & 1) {  // kd odd: its last key by a rank-1 update
          --depth;
          const T* vrow = this->v_rows(b, hk, j0 + depth);
          for (int64_t r = 0; r < bq; ++r) {
            const A pr = to_acc(pn[r * bkp + depth]);
            A* acc = w.acc.data() + r * p.Ev;
            for (int64_t e = 0; e < p.Ev; ++e) acc[e] += pr * to_acc(vrow[e]);
          }
        }
      }
      if (depth > 0)
        p.packed->gemm(bq, p.Ev, depth, v_depth(j0), bkp, p.Ev, true, pn,
                       packed_v<PT>(b, hk, j0 / kFwdBlockK), reinterpret_cast<float*>(w.acc.data()));
    } else if constexpr (kRounded) {
      // unreachable, as above
    } else if (fk) {
      this->fgemm(bq, p.Ev, bk, bk, p.v_sr, p.Ev, true, s, this->v_rows(b, hk, j0), w.acc.data());
    } else if (wide && p.fgemm) {
      p.fgemm(bq, p.Ev, bk, bk, p.Ev, p.Ev, true, reinterpret_cast<const float*>(s),
              this->wide_v(b, hk, j0 / kFwdBlockK), reinterpret_cast<float*>(w.acc.data()));
    } else if (wide) {
      p.gemm->f32(false, false, bq, p.Ev, bk, 1.f, reinterpret_cast<const float*>(s), bk,
                  this->wide_v(b, hk, j0 / kFwdBlockK), p.Ev, 1.f,
                  reinterpret_cast<float*>(w.acc.data()), p.Ev);
    } else {
      const T* pv = nullptr;
      if constexpr (kIsHalf<T>) pv = pn; else pv = s;
      this->mm(false, false, bq, p.Ev, bk, A(1), pv, bk, this->v_rows(b, hk, j0), p.v_sr, A(1),
               w.acc.data(), p.Ev);
    }
  }
  A* lse = this->lse_row(b, h) + i0;
  A inv[layout::kFwdBlockQ];
  for (int64_t r = 0; r < bq; ++r) {
    // l == 0: no visible key, output 0 and lse -inf; l NaN (a NaN input) stays NaN in both.
    const A l = w.l[r];
    inv[r] = l > A(0) ? A(1) / l : (l == A(0) ? A(0) : l);
    lse[r] = l > A(0) ? w.m[r] * mul + std::log(l) : (l == A(0) ? kNegInf : l);
  }
  this->store_out_rows(b, h, i0, bq, w.acc.data(), p.Ev, inv);
}

// The keys-as-rows task exists for bf16 on the avx512_bf16 tier (forward_keys_as_rows.cpp);
// the plan chooses that path nowhere else.
template <typename T>
void Forward<T>::keys_as_rows_task(int64_t t, Work& w) const {
#ifdef FUSEDATTN_AVX512_BF16
  if constexpr (std::is_same_v<T, bf16>) return keys_as_rows_bf16(t, w);
#endif
  query_rows_task(t, w);
}

#define FUSEDATTN_INSTANTIATE(T)                                             \
  template void Forward<T>::run(int64_t, int64_t) const;                    \
  template void Forward<T>::query_rows_task(int64_t, typename Forward<T>::Work&) const;           \
  template void Forward<T>::keys_as_rows_task(int64_t, typename Forward<T>::Work&) const;
FUSEDATTN_FOR_EACH_TYPE(FUSEDATTN_INSTANTIATE)
#undef FUSEDATTN_INSTANTIATE

FUSEDATTN_TIER_NS_END
