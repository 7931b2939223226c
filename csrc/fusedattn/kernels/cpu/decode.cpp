// Decoding over a KV cache (params.h's DecodeParams): a few new queries per sequence against
// a long, preallocated cache, read in place. One task per (b, key/value head, key range):
// the task's rows are the group's query heads x the T new tokens, gathered into one block so
// that each key block is read once for all of them (GQA shares it across the group). With
// splits > 1 (flash-decoding, planned in plan.cpp) the tasks leave their partial softmax
// state (max, sum, unnormalised output) and the merge tasks combine the ranges by their
// log-sum-exp. Half types widen their rows to fp32 where the plan says so (half_on_f32),
// else run the half GEMMs with P rounded to the type. A cache stored in fewer bytes
// (cache_storage.h) is read once, in its stored size: a few query rows take their fp32
// products from the stored rows converted in registers, more rows dequantize a key block into
// fp32 and run the GEMMs.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "fusedattn/kernels/cpu/forward.h"  // FUSEDATTN_FOR_EACH_TYPE
#include "fusedattn/kernels/cpu/cache_storage.h"
#include "fusedattn/kernels/cpu/decode.h"
#include "fusedattn/kernels/cpu/scratch.h"

FUSEDATTN_TIER_NS_BEGIN

template <typename T>
void Decode<T>::append(int64_t begin, int64_t end) const {
  const bool stored = !std::is_same_v<T, double> && d.storage != CacheStorage::Model;
  const int64_t width = std::max(d.E, d.Ev);
  Scratch<float> row(stored ? width : 0);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / d.Hk, hk = t % d.Hk;
    const int64_t first = d.lengths[b] - d.L;  // checked >= 0 by the caller
    const T* kn = static_cast<const T*>(d.kn) + b * d.kn_sb + hk * d.kn_sh;
    const T* vn = static_cast<const T*>(d.vn) + b * d.vn_sb + hk * d.vn_sh;
    if (!stored) {
      T* k = const_cast<T*>(this->k_rows(b, hk, first));
      T* v = const_cast<T*>(this->v_rows(b, hk, first));
      for (int64_t i = 0; i < d.L; ++i) {
        std::memcpy(k + i * d.k_sr, kn + i * d.kn_sr, sizeof(T) * d.E);
        std::memcpy(v + i * d.v_sr, vn + i * d.vn_sr, sizeof(T) * d.Ev);
      }
      continue;
    }
    const int64_t es = storage_bytes(d.storage, sizeof(T));
    for (int64_t i = 0; i < d.L; ++i) {
      const int64_t pos = first + i;
      widen_rows(kn + i * d.kn_sr, 0, 1, d.E, row.data());
      quantize_row(d.storage, row.data(), d.E,
                   static_cast<char*>(const_cast<void*>(d.k)) +
                       (b * d.k_sb + hk * d.k_sh + pos * d.k_sr) * es,
                   k_scale(b, hk, pos));
      widen_rows(vn + i * d.vn_sr, 0, 1, d.Ev, row.data());
      quantize_row(d.storage, row.data(), d.Ev,
                   static_cast<char*>(const_cast<void*>(d.v)) +
                       (b * d.v_sb + hk * d.v_sh + pos * d.v_sr) * es,
                   v_scale(b, hk, pos));
    }
  }
}

template <typename T>
void Decode<T>::run(int64_t begin, int64_t end) const {
  using layout::kDecodeBlockK;
  constexpr A kNegInf = Masks<T>::kNegInf;
  const int64_t g = this->group, rows = g * d.L;
  // stored: the cache in fewer bytes (never for fp64: the op refuses it), its products in
  // registers from the stored rows (direct: a few rows) or on a dequantized block.
  const bool stored = !std::is_same_v<T, double> && d.storage != CacheStorage::Model;
  const bool direct = stored && rows <= kStoredRegisterRows;
  const bool wide = stored || (kIsHalf<T> && d.half_on_f32);
  const bool narrow = kIsHalf<T> && !wide;
  const int64_t es = storage_bytes(d.storage, sizeof(T));
  // Rows r = gi * T + t: query head hk * g + gi, new token t.
  Scratch<T> q(rows * d.E), pn(narrow ? rows * kDecodeBlockK : 0);
  Scratch<float> qf(wide ? rows * d.E : 0), k_block(wide && !direct ? kDecodeBlockK * d.E : 0),
      v_block(wide && !direct ? kDecodeBlockK * d.Ev : 0);
  Scratch<A> s(rows * kDecodeBlockK), acc(rows * d.Ev), m(rows), l(rows), bias(kDecodeBlockK);
  Scratch<int32_t> pad(kDecodeBlockK);
  const A mul = this->mul;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bhk = task / d.splits, c = task % d.splits;
    const int64_t b = bhk / d.Hk, hk = bhk % d.Hk;
    const int64_t len = d.lengths[b];
    for (int64_t gi = 0; gi < g; ++gi) {
      for (int64_t t = 0; t < d.L; ++t)
        std::memcpy(q.data() + (gi * d.L + t) * d.E, this->q_rows(b, hk * g + gi, t), sizeof(T) * d.E);
    }
    if (wide) widen_rows(q.data(), d.E, rows, d.E, qf.data());
    std::fill(m.begin(), m.end(), kNegInf);
    std::fill(l.begin(), l.end(), A(0));
    std::fill(acc.begin(), acc.end(), A(0));
    const int64_t j_begin = c * d.split_keys, j_end = std::min(len, j_begin + d.split_keys);
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kDecodeBlockK) {
      const int64_t bk = std::min(kDecodeBlockK, j_end - j0);
      const T* kb = this->k_rows(b, hk, j0);
      const T* vb = this->v_rows(b, hk, j0);
      // The stored rows (elements of the storage; T's own rows are kb, vb).
      const char* k_stored =
          static_cast<const char*>(d.k) + (b * d.k_sb + hk * d.k_sh + j0 * d.k_sr) * es;
      const char* v_stored =
          static_cast<const char*>(d.v) + (b * d.v_sb + hk * d.v_sh + j0 * d.v_sr) * es;
      if (direct) {
        stored_products(d.storage, false, rows, k_stored, d.k_sr, bk, d.E, k_scale(b, hk, j0),
                        d.ks_sr, qf.data(), reinterpret_cast<float*>(s.data()));
      } else if (wide) {
        if (stored) {
          dequantize_rows(d.storage, k_stored, d.k_sr, bk, d.E, k_scale(b, hk, j0), d.ks_sr,
                          k_block.data());
        } else {
          widen_rows(kb, d.k_sr, bk, d.E, k_block.data());
        }
        d.gemm->f32(false, true, rows, bk, d.E, 1.f, qf.data(), d.E, k_block.data(), d.E, 0.f,
                    reinterpret_cast<float*>(s.data()), bk);
      } else {
        this->mm(false, true, rows, bk, d.E, A(1), q.data(), d.E, kb, d.k_sr, A(0), s.data(), bk);
      }
      // The key padding mask of this block, shared by the rows: a float one as a bias (the
      // scores scaled first; mul is then 1), a bool one as the padded positions, which are
      // set to -inf (not added: a NaN key that is padding stays hidden, as in the formula).
      const int64_t masked_to = std::clamp<int64_t>(d.kpm_len - j0, 0, bk);
      int64_t padded = 0;  // Bool: padded positions in pad[0, padded)
      if (d.kpm_kind == MaskKind::Bool && masked_to > 0) {
        const uint8_t* pm = static_cast<const uint8_t*>(d.kpm) + b * d.p_sb + j0 * d.p_sc;
        for (int64_t j = 0; j < masked_to; ++j)
          if (pm[j * d.p_sc] != 0) pad[padded++] = j;
      } else if (d.kpm_kind == MaskKind::Additive && masked_to > 0) {
        std::fill(bias.begin() + masked_to, bias.begin() + bk, A(0));
        const T* pm = static_cast<const T*>(d.kpm) + b * d.p_sb + j0 * d.p_sc;
        for (int64_t j = 0; j < masked_to; ++j) bias[j] = A(to_acc(pm[j * d.p_sc]));
      }
      for (int64_t r = 0; r < rows; ++r) {
        A* row = s.data() + r * bk;
        if (!this->fold) scale_row(row, bk, A(d.scale));
        if (d.kpm_kind == MaskKind::Additive && masked_to > 0) add_row(row, bias.data(), bk);
        for (int64_t i = 0; i < padded; ++i) row[pad[i]] = kNegInf;
        if (d.causal) {  // token t sees positions <= len - T + t
          const int64_t visible = std::clamp<int64_t>(len - d.L + r % d.L + 1 - j0, 0, bk);
          std::fill(row + visible, row + bk, kNegInf);
        }
        const A m_new = max_nan(m[r], row_max(row, bk));
        if (m_new == kNegInf) {  // no visible key yet
          std::fill(row, row + bk, A(0));
          if constexpr (kIsHalf<T>) {
            if (narrow) narrow_row(row, pn.data() + r * bk, bk);
          }
          continue;
        }
        const A block_sum = exp_sum_row(row, bk, mul, m_new * mul);
        if constexpr (kIsHalf<T>) {
          if (narrow) narrow_row(row, pn.data() + r * bk, bk);
        }
        const A alpha = exp_scalar((m[r] - m_new) * mul);  // 0 when m was -inf
        l[r] = l[r] * alpha + block_sum;
        if (alpha != A(1)) scale_row(acc.data() + r * d.Ev, d.Ev, alpha);
        m[r] = m_new;
      }
      if (direct) {
        stored_products(d.storage, true, rows, v_stored, d.v_sr, bk, d.Ev, v_scale(b, hk, j0),
                        d.vs_sr, reinterpret_cast<const float*>(s.data()),
                        reinterpret_cast<float*>(acc.data()));
      } else if (wide) {
        if (stored) {
          dequantize_rows(d.storage, v_stored, d.v_sr, bk, d.Ev, v_scale(b, hk, j0), d.vs_sr,
                          v_block.data());
        } else {
          widen_rows(vb, d.v_sr, bk, d.Ev, v_block.data());
        }
        d.gemm->f32(false, false, rows, d.Ev, bk, 1.f, reinterpret_cast<const float*>(s.data()),
                    bk, v_block.data(), d.Ev, 1.f, reinterpret_cast<float*>(acc.data()), d.Ev);
      } else {
        const T* pv = nullptr;
        if constexpr (kIsHalf<T>) pv = pn.data(); else pv = s.data();
        this->mm(false, false, rows, d.Ev, bk, A(1), pv, bk, vb, d.v_sr, A(1), acc.data(), d.Ev);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = hk * g + r / d.L, t = r % d.L;
      if (d.splits > 1) {
        A* part = partial_row(b, h, t, c);
        part[0] = m[r], part[1] = l[r];
        std::copy(acc.data() + r * d.Ev, acc.data() + (r + 1) * d.Ev, part + 2);
      } else {
        finish_row(b, h, t, m[r], l[r], acc.data() + r * d.Ev);
      }
    }
  }
}

template <typename T>
void Decode<T>::merge(int64_t begin, int64_t end) const {
  constexpr A kNegInf = Masks<T>::kNegInf;
  Scratch<A> acc(d.Ev);
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / d.H, h = bh % d.H;
    for (int64_t t = 0; t < d.L; ++t) {
      A top = kNegInf;  // NaN-keeping: a NaN range makes the row NaN
      for (int64_t c = 0; c < d.splits; ++c) top = max_nan(top, partial_row(b, h, t, c)[0]);
      std::fill(acc.begin(), acc.end(), A(0));
      A l = 0;
      if (top != kNegInf) {
        for (int64_t c = 0; c < d.splits; ++c) {
          const A* part = partial_row(b, h, t, c);
          if (part[0] == kNegInf) continue;  // a range with no visible key
          const A w = exp_scalar((part[0] - top) * this->mul);
          l += part[1] * w;
          add_scaled_row(acc.data(), part + 2, d.Ev, w);
        }
      }
      finish_row(b, h, t, top, l, acc.data());
    }
  }
}

template <typename T>
void Decode<T>::finish_row(int64_t b, int64_t h, int64_t t, A m, A l, const A* acc) const {
  constexpr A kNegInf = Masks<T>::kNegInf;
  // l == 0: no visible key, output 0 and lse -inf; l NaN (a NaN input) stays NaN in both.
  const A inv = l > A(0) ? A(1) / l : (l == A(0) ? A(0) : l);
  store_scaled_row(acc, inv, this->out_rows(b, h, t), d.Ev);
  if (d.lse != nullptr) {
    static_cast<A*>(d.lse)[(b * d.H + h) * d.L + t] =
        l > A(0) ? m * this->mul + std::log(l) : (l == A(0) ? kNegInf : l);
  }
}

#define FUSEDATTN_INSTANTIATE(T)                                  \
  template void Decode<T>::append(int64_t, int64_t) const;       \
  template void Decode<T>::run(int64_t, int64_t) const;          \
  template void Decode<T>::merge(int64_t, int64_t) const;
FUSEDATTN_FOR_EACH_TYPE(FUSEDATTN_INSTANTIATE)
#undef FUSEDATTN_INSTANTIATE

FUSEDATTN_TIER_NS_END
