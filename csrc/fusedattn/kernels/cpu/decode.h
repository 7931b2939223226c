#pragma once
// Decoding over a KV cache: the tasks of one call (decode.cpp; planned by plan.cpp's
// plan_decode, parameters in params.h's DecodeParams).
#include <cstdint>

#include "fusedattn/kernels/cpu/problem.h"

FUSEDATTN_TIER_NS_BEGIN

template <typename T>
struct Decode : Problem<T> {
  using A = typename Problem<T>::A;
  const DecodeParams& d;

  explicit Decode(const DecodeParams& params) : Problem<T>(params), d(params) {}

  void append(int64_t begin, int64_t end) const;  // tasks (b, hk): the new rows into the cache
  void run(int64_t begin, int64_t end) const;     // tasks (b, hk, key range)
  void merge(int64_t begin, int64_t end) const;   // tasks (b, h), with splits > 1

 private:
  // The partial state of (b, h, token t, range c): max (raw score units), sum, Ev outputs.
  A* partial_row(int64_t b, int64_t h, int64_t t, int64_t c) const {
    return static_cast<A*>(d.partial) + (((b * d.H + h) * d.L + t) * d.splits + c) * (2 + d.Ev);
  }
  // The int8 scale of (b, hk, position j) and on; null for other storages.
  float* k_scale(int64_t b, int64_t hk, int64_t j) const {
    return d.k_scale ? d.k_scale + b * d.ks_sb + hk * d.ks_sh + j * d.ks_sr : nullptr;
  }
  float* v_scale(int64_t b, int64_t hk, int64_t j) const {
    return d.v_scale ? d.v_scale + b * d.vs_sb + hk * d.vs_sh + j * d.vs_sr : nullptr;
  }
  void finish_row(int64_t b, int64_t h, int64_t t, A m, A l, const A* acc) const;
};

FUSEDATTN_TIER_NS_END
