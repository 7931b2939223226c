#pragma once
// The backward's shared pieces: one task per (b, key/value head), looping over the query heads
// that share it, so dK and dV are summed without atomics; dq, dk, dv are fully written. The
// loops are in backward.cpp (query rows, on p.gemm) and backward_keys_as_rows.cpp.
#include <cstdint>
#include <vector>

#include "fusedattn/kernels/cpu/scratch.h"

#include "fusedattn/kernels/cpu/problem.h"

FUSEDATTN_TIER_NS_BEGIN

template <typename T>
struct Backward : Problem<T> {
  using A = typename Problem<T>::A;
  using Problem<T>::p;

  explicit Backward(const FlashParams& params) : Problem<T>(params) {}

  struct Work {
    Scratch<A> s, dp, dq, dk, dv, d, bias, lse;
    Scratch<A> cap;  // softcap: its derivative per score of the block
    // Per query: it sees exactly one key (Masks::sees_one_key); keys-as-rows: as lane masks,
    // bit l of one_key_lanes[v] for query 16 v + l.
    Scratch<uint8_t> one_key;
    Scratch<uint8_t> own;  // per row of a query block: its P from its own softmax
    Scratch<uint16_t> one_key_lanes;
    Scratch<A> d_one;  // keys-as-rows: -dlse, D's part for a query with one key and p = 1
    Scratch<T> narrow_s, narrow_dp, ds_packed, kt, qt, dot, qp, dop, tmp;
    // half_on_f32: K and V of the task, Q and dO of the head, in fp32 (contiguous rows).
    Scratch<float> kf, vf, qf, dof;
    // bf16_products (T = float): the same rounded to bf16, and P, dS in bf16.
    Scratch<bf16> k16, v16, q16, do16, s16, ds16;
    Work(const FlashParams& p, bool kr)
        : s((kr ? layout::kKrQ : layout::kBwdBlockQ) * layout::kBwdBlockK), dp(s.size()),
          dq((kr ? layout::ld_qt(p) : p.L) * p.E), dk(p.S * p.E), dv(p.S * p.Ev),
          d(kr ? layout::l_pad(p) : p.L), bias(2 * layout::kBwdBlockK), lse(kr ? layout::l_pad(p) : 0),
          cap(p.softcap > 0 ? s.size() : 0),
          one_key(d.size()), own(layout::kKrQ), one_key_lanes(kr ? layout::l_pad(p) / 16 : 0),
          d_one(kr ? layout::l_pad(p) : 0),
          narrow_s(kIsHalf<T> && !p.half_on_f32 ? s.size() : 0), narrow_dp(narrow_s.size()),
          ds_packed(kr && kIsHalf<T> ? s.size() : 0), kt(kr ? p.E * layout::ld_kt(p) : 0),
          qt(kr ? p.E * layout::ld_qt(p) : 0), dot(kr ? p.Ev * layout::ld_qt(p) : 0),
          qp(kr && kIsHalf<T> ? layout::l_pad(p) * layout::round64(p.E) : 0),
          dop(kr && kIsHalf<T> ? layout::l_pad(p) * layout::round64(p.Ev) : 0),
          tmp(kr && kIsHalf<T> ? layout::l_pad(p) * std::max(p.E, p.Ev) : 0),
          kf(p.half_on_f32 ? p.S * p.E : 0), vf(p.half_on_f32 ? p.S * p.Ev : 0),
          qf(p.half_on_f32 ? p.L * p.E : 0), dof(p.half_on_f32 ? p.L * p.Ev : 0),
          k16(p.bf16_products ? p.S * p.E : 0), v16(p.bf16_products ? p.S * p.Ev : 0),
          q16(p.bf16_products ? p.L * p.E : 0), do16(p.bf16_products ? p.L * p.Ev : 0),
          s16(p.bf16_products ? s.size() : 0), ds16(s16.size()) {}
  };

  // The task's accumulated dK, dV (fp32/fp64) into the outputs.
  void store_dk_dv(int64_t b, int64_t hk, const Work& w) const {
    T* dk = static_cast<T*>(p.dk) + b * p.dk_sb + hk * p.dk_sh;
    T* dv = static_cast<T*>(p.dv) + b * p.dv_sb + hk * p.dv_sh;
    for (int64_t j = 0; j < p.S; ++j) {
      store_out_row(w.dk.data() + j * p.E, A(1), dk + j * p.dk_sr, p.E);
      store_out_row(w.dv.data() + j * p.Ev, A(1), dv + j * p.dv_sr, p.Ev);
    }
    out_rows_done();
  }
  // Keys-as-rows backwards, per query head h: w.lse and w.d for queries 0 .. Lp - 1: lse
  // (+inf where the query sees no key, or is padding past L: exp gives 0) and D =
  // rowsum(dO * O) - dlse (softmax's backward term and lse's own gradient); for a query that
  // sees one key also w.d_one = -dlse and its bit in w.one_key_lanes: where its probability is
  // 1 the loops take D = dP + w.d_one (one_key_grad_row's exact zero), else w.d.
  void kr_lse_and_d(int64_t b, int64_t h, Work& w) const {
    const A* lse_in = this->lse_row(b, h);
    const A* dlse = this->dlse_row(b, h);
    const int64_t ke = this->key_end(b);
    std::fill(w.one_key_lanes.begin(), w.one_key_lanes.end(), uint16_t(0));
    for (int64_t i = 0; i < layout::l_pad(p); ++i) {
      if (i >= p.L) {
        w.lse[i] = std::numeric_limits<A>::infinity(), w.d[i] = w.d_one[i] = A(0);
        continue;
      }
      w.lse[i] = lse_in[i] == Masks<T>::kNegInf ? std::numeric_limits<A>::infinity() : lse_in[i];
      const bool one = this->sees_one_key(b, h, i, ke);
      w.d_one[i] = -(dlse ? dlse[i] : A(0));
      w.d[i] = this->out_dot_dout(b, h, i) + w.d_one[i];
      if (one) w.one_key_lanes[i / 16] |= uint16_t(1u << (i % 16));
    }
  }

  void run(int64_t begin, int64_t end) const;           // backward.cpp
  void query_rows_task(int64_t t, Work& w) const;       // backward.cpp
  // The products' operand type: T, float under p.half_on_f32, bf16 under p.bf16_products.
  template <typename U>
  void query_rows_body(int64_t t, Work& w) const;
  void keys_as_rows_task(int64_t t, Work& w) const;     // backward_keys_as_rows.cpp
  void keys_as_rows_bf16(int64_t t, Work& w) const;     // the same, per type
  void keys_as_rows_f32(int64_t t, Work& w) const;
};

#ifdef FUSEDATTN_AVX512_BF16
template <> void Backward<bf16>::keys_as_rows_bf16(int64_t t, Work& w) const;
#endif
#ifdef FUSEDATTN_AVX512
template <> void Backward<float>::keys_as_rows_f32(int64_t t, Work& w) const;
#endif

FUSEDATTN_TIER_NS_END
