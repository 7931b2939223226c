#pragma once
// The forward's shared pieces: per-thread work buffers, the task split, the packed
// workspace's slots. Its loops are in forward.cpp (query rows), forward_keys_as_rows.cpp
// (bf16, keys as the GEMMs' rows), weights.cpp (returned and head-averaged weights) and
// pack.cpp (the K^T / V blocks).
#include <cstdint>
#include <vector>

#include "fusedattn/kernels/cpu/scratch.h"

#include "fusedattn/kernels/cpu/problem.h"

FUSEDATTN_TIER_NS_BEGIN

template <typename T>
struct Forward : Problem<T> {
  using A = typename Problem<T>::A;
  using Problem<T>::p;

  explicit Forward(const FlashParams& params) : Problem<T>(params) {}

  bool keys_as_rows() const { return p.forward_path == ForwardPath::KeysAsRows; }
  bool packed() const { return kIsHalf<T> && p.packed != nullptr; }
  bool fk() const { return std::is_same_v<T, float> && p.fgemm != nullptr; }
  bool wide() const { return kIsHalf<T> && p.half_on_f32; }
  // fp32 on bf16 products (p.bf16_products): the packed operands hold bf16 K^T and V.
  bool bf16_products() const { return std::is_same_v<T, float> && p.bf16_products; }

  struct Work {
    Scratch<A> s, acc, m, l, bias;  // bias: a block's key bias, then softcap's scratch
    // Scores against all keys (weights): half types', or every type's when averaging.
    Scratch<A> rows;
    Scratch<A> avg;                    // averaging, half types: the heads' weights summed
    Scratch<T> head;                   // averaging, half types: one head's rounded weights
    Scratch<T> narrow, qt, qt_packed;  // the last two: Q^T of the keys-as-rows path
    Scratch<uint16_t> keep;            // its lane masks per key
    Scratch<float> qf;                 // wide(): the task's queries in fp32 (bq x E)
    Scratch<bf16> q16, p16;            // bf16_products(): the task's queries, P, in bf16
    // layout::kt_in_tasks: K^T's blocks of one (b, kv head) (kt_head = b * Hk + hk), in
    // packed_slot(p)-sized slots; kt_ready[jb]: block jb transposed.
    Scratch<T> kt;
    std::vector<char> kt_ready;
    int64_t kt_head = -1;
    explicit Work(const FlashParams& p)
        : s(layout::kFwdBlockQ * layout::kFwdBlockK), acc(layout::kFwdBlockQ * p.Ev),
          m(layout::kFwdBlockQ), l(layout::kFwdBlockQ), bias(2 * layout::kFwdBlockK),
          rows(p.weights && (kIsHalf<T> || p.average_weights) ? layout::kFwdBlockQ * p.S : 0),
          avg(kIsHalf<T> && p.weights && p.average_weights ? layout::kFwdBlockQ * p.S : 0),
          head(avg.size()),
          narrow(kIsHalf<T> ? layout::kFwdBlockQ * layout::kFwdBlockK : 0),
          qt(p.forward_path == ForwardPath::KeysAsRows ? p.E * layout::kFwdBlockQ : 0),
          qt_packed(qt.size()),
          keep(p.forward_path == ForwardPath::KeysAsRows ? 4 * layout::kFwdBlockK : 0),
          qf(p.half_on_f32 ? layout::kFwdBlockQ * p.E : 0),
          q16(p.bf16_products ? layout::kFwdBlockQ * p.E : 0),
          p16(p.bf16_products ? layout::kFwdBlockQ * layout::kFwdBlockK : 0),
          kt(layout::kt_in_tasks(p) ? layout::key_blocks(p) * layout::packed_slot(p) : 0),
          kt_ready(layout::kt_in_tasks(p) ? layout::key_blocks(p) : 0) {}
  };

  // Task t: batch-head bh = (b, h), key/value head hk, queries [i0, i0 + bq).
  struct QTask { int64_t bh, b, h, hk, i0, bq; };
  QTask q_task(int64_t t) const {
    const int64_t nqb = layout::q_blocks(p), bh = t / nqb, h = bh % p.H;
    const int64_t i0 = (t % nqb) * layout::kFwdBlockQ;
    return {bh, bh / p.H, h, h / this->group, i0, std::min(layout::kFwdBlockQ, p.L - i0)};
  }

  // The packed workspace's slot of (b, hk, key block jb): K^T (packed, or plain for fp32 on
  // fgemm) first, then packed V; V^T alone on the keys-as-rows path.
  T* packed_kt(int64_t b, int64_t hk, int64_t jb) const {
    return static_cast<T*>(p.packed_ws) +
           ((b * p.Hk + hk) * layout::key_blocks(p) + jb) * layout::packed_slot(p);
  }
  T* packed_vt(int64_t b, int64_t hk, int64_t jb) const { return packed_kt(b, hk, jb); }
  // wide(): the slot's fp32 K rows (bk x E; K^T on p.fgemm) and V rows (bk x Ev).
  float* wide_k(int64_t b, int64_t hk, int64_t jb) const {
    return reinterpret_cast<float*>(packed_kt(b, hk, jb));
  }
  float* wide_v(int64_t b, int64_t hk, int64_t jb) const {
    return wide_k(b, hk, jb) + layout::wide_k_floats(p);
  }
  // The packed V after K^T, in elements of the products' type PT (T, or bf16 for
  // bf16_products()).
  template <typename PT = T>
  PT* packed_v(int64_t b, int64_t hk, int64_t jb) const {
    return reinterpret_cast<PT*>(packed_kt(b, hk, jb)) + layout::slot_keys(p) * p.E;
  }
  // The depth packed V of the key block starting at j0 was packed with (its bkp): a causal
  // product that stops early still steps over V's panels with it.
  int64_t v_depth(int64_t j0) const {
    const int64_t bk = std::min(layout::kFwdBlockK, p.S - j0);
    return bk + (bk & 1);
  }

  // layout::kt_in_tasks: block jb of (b, hk)'s K^T (E x bk, row stride slot_ld_kt(p)),
  // transposed into w.kt by the first task of this thread that asks for it.
  const T* kt_block(int64_t b, int64_t hk, int64_t jb, Work& w) const;  // forward.cpp
  void run(int64_t begin, int64_t end) const;                       // forward.cpp
  void query_rows_task(int64_t t, Work& w) const;                   // forward.cpp
  template <typename PT>  // the products' operand type: T, or bf16 for bf16_products()
  void query_rows_body(int64_t t, Work& w) const;
  void keys_as_rows_task(int64_t t, Work& w) const;                 // forward.cpp
  void keys_as_rows_bf16(int64_t t, Work& w) const;                 // forward_keys_as_rows.cpp
  void weights_task(int64_t t, Work& w, A* avg = nullptr) const;    // weights.cpp
  void averaged_weights_task(int64_t t, Work& w) const;             // weights.cpp
  void pack(int64_t begin, int64_t end) const;                      // pack.cpp
};

#ifdef FUSEDATTN_AVX512_BF16
template <> void Forward<bf16>::keys_as_rows_bf16(int64_t t, Work& w) const;
#endif

#define FUSEDATTN_FOR_EACH_TYPE(X) X(float) X(double) X(bf16) X(fp16)

FUSEDATTN_TIER_NS_END
