// The forward's pack tasks, one per (b, key/value head, block of keys), run before the
// forward tasks when the plan set p.packed or p.fgemm (see layout.h for the slots).
#include "fusedattn/kernels/cpu/forward.h"

FUSEDATTN_TIER_NS_BEGIN

namespace {
// One key block of a half type for the packed query-rows forward: K^T (E x bk) packed into
// kt_out, V (bkp x Ev, bkp = bk rounded up to even, a zero row appended) into v_out. k, v are
// bk rows (row strides k_sr, v_sr); staging holds K^T at row stride ld, then an odd block's V.
template <typename H>
void pack_half_block(const PackedGemm& g, const H* k, int64_t k_sr, const H* v, int64_t v_sr,
                     int64_t bk, int64_t E, int64_t Ev, H* staging, int64_t ld, void* kt_out,
                     void* v_out) {
  const int64_t bkp = bk + (bk & 1);
  transpose(k, k_sr, bk, E, staging, ld);
  g.pack(E, bk, ld, staging, kt_out);
  if (bkp == bk) return g.pack(bk, Ev, v_sr, v, v_out);
  for (int64_t r = 0; r < bk; ++r) std::copy(v + r * v_sr, v + r * v_sr + Ev, staging + r * Ev);
  std::fill(staging + bk * Ev, staging + bkp * Ev, H{});
  g.pack(bkp, Ev, Ev, staging, v_out);
}
}  // namespace

template <typename T>
void Forward<T>::pack(int64_t begin, int64_t end) const {
  using layout::kFwdBlockK;
  const int64_t nb = layout::key_blocks(p);
  // K^T's row stride in kt: one cache line more than the block, so that the transposing
  // stores (a column of K^T per row of K) do not all fall into the same few L1 sets; at a
  // power-of-two stride (1 KiB) they did, and the transpose was 10% of a bf16 forward.
  constexpr int64_t kLdT = kFwdBlockK + 64 / sizeof(T);
  // One block's staging, once per range of tasks: K widened before its transpose (half
  // types on fgemm), or K^T (and an odd block's V) before packing (half types, packed).
  const bool staged_wide = wide() && p.fgemm;
  const bool staged_packed = kIsHalf<T> && packed() && !keys_as_rows();
  Scratch<float> kf(staged_wide ? kFwdBlockK * p.E : 0);
  Scratch<T> kt(staged_packed ? kLdT * std::max(p.E, p.Ev) : 0);
  // bf16_products(): the block's K and V rounded to bf16 (k16, v16), then staged as above.
  constexpr int64_t kLdT16 = kFwdBlockK + 64 / sizeof(bf16);
  const bool rounded = bf16_products();
  Scratch<bf16> k16(rounded ? kFwdBlockK * p.E : 0), v16(rounded ? kFwdBlockK * p.Ev : 0);
  Scratch<bf16> kt16(rounded ? kLdT16 * std::max(p.E, p.Ev) : 0);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t jb = t % nb, b = t / nb / p.Hk, hk = t / nb % p.Hk;
    const int64_t j0 = jb * kFwdBlockK, bk = std::min(kFwdBlockK, p.S - j0);
    if (keys_as_rows()) {  // V^T (Ev x bkp), its column bk zero when bk is odd
      const T* v = this->v_rows(b, hk, j0);
      T* vt = packed_vt(b, hk, jb);
      const int64_t ldvt = layout::slot_ld_vt(p);
      transpose(v, p.v_sr, bk, p.Ev, vt, ldvt);
      if (bk & 1)
        for (int64_t c = 0; c < p.Ev; ++c) vt[c * ldvt + bk] = T{};
    } else if (wide()) {  // K's rows (K^T on fgemm) and V's rows in fp32
      if (p.fgemm) {
        widen_rows(this->k_rows(b, hk, j0), p.k_sr, bk, p.E, kf.data());
        transpose(kf.data(), p.E, bk, p.E, wide_k(b, hk, jb), layout::slot_ld_kt(p));
      } else {
        widen_rows(this->k_rows(b, hk, j0), p.k_sr, bk, p.E, wide_k(b, hk, jb));
      }
      widen_rows(this->v_rows(b, hk, j0), p.v_sr, bk, p.Ev, wide_v(b, hk, jb));
    } else if (rounded) {  // fp32 K and V rounded to bf16, then packed as bf16's are
      if constexpr (std::is_same_v<T, float>) {
        for (int64_t r = 0; r < bk; ++r) {
          narrow_row(this->k_rows(b, hk, j0 + r), &k16[r * p.E], p.E);
          narrow_row(this->v_rows(b, hk, j0 + r), &v16[r * p.Ev], p.Ev);
        }
        pack_half_block(*p.packed, k16.data(), p.E, v16.data(), p.Ev, bk, p.E, p.Ev, kt16.data(),
                        kLdT16, packed_kt(b, hk, jb), packed_v<bf16>(b, hk, jb));
      }
    } else if constexpr (std::is_same_v<T, float>) {  // K^T for fgemm (the weights paths)
      transpose(this->k_rows(b, hk, j0), p.k_sr, bk, p.E, packed_kt(b, hk, jb), layout::slot_ld_kt(p));
    } else if constexpr (kIsHalf<T>) {
      pack_half_block(*p.packed, this->k_rows(b, hk, j0), p.k_sr, this->v_rows(b, hk, j0),
                      p.v_sr, bk, p.E, p.Ev, kt.data(), kLdT, packed_kt(b, hk, jb),
                      packed_v(b, hk, jb));
    }
  }
}

#define FUSEDATTN_INSTANTIATE(T) template void Forward<T>::pack(int64_t, int64_t) const;
FUSEDATTN_FOR_EACH_TYPE(FUSEDATTN_INSTANTIATE)
#undef FUSEDATTN_INSTANTIATE

FUSEDATTN_TIER_NS_END
