// The bf16 forward with keys as the GEMMs' rows (avx512_bf16 tier, packed AMX GEMMs; the plan
// chooses it without attn_mask, dropout or weights).
//
// S^T (bk x bq) = K Q^T takes K's rows straight from the input as the A operand and Q^T,
// packed once per task, as B (one panel: bq <= 64); the softmax then runs down S^T's columns,
// 16 queries to a vector (running max and sum as vectors: no horizontal reductions, no call
// per row), and its exp pass writes P^T in the packed layout itself (pairs of keys
// interleaved: vcvtne2ps2bf16 + vpermw), the B operand of O^T (Ev x bq) += V^T P^T. Two
// brgemm calls per block where the query-rows path makes nine (S in 64-column panels, then
// P V), and no packing of K. Everything is in log2 units (scale and the key bias
// pre-multiplied by log2(e)), so that the exponent needs no multiply. Masks: key padding as a
// per-key bias (-inf: the key is skipped), causal and the window as lane masks. The scores
// enter as fma(s, scale, bias - max), so a large |s * scale| costs no extra rounding. The
// other variants (softcap, ALiBi, rel_bias) are applied by the max pass, which writes the
// final scores back for the exp pass.
#include "fusedattn/kernels/cpu/forward.h"

#ifdef FUSEDATTN_AVX512_BF16
FUSEDATTN_TIER_NS_BEGIN

template <>
void Forward<bf16>::keys_as_rows_bf16(int64_t t, Work& w) const {
  using T = bf16;
  using layout::kFwdBlockK;
  using layout::kFwdBlockQ;
  static_assert(kFwdBlockQ <= 64, "Q^T must be one packed panel");
  constexpr int64_t kLd = kFwdBlockQ;  // row stride of S^T and O^T
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const auto [bh, b, h, hk, i0, bq] = q_task(t);
  const int64_t nc = (bq + 15) / 16, ldb = 16 * nc;  // vectors of queries; P^T's pair stride
  // Scores enter in log2 units: s * scale * log2(e) + bias_j * log2(e).
  const __m512 scale = _mm512_set1_ps(float(p.scale * double(kLog2e)));
  const bool has_bias = p.kpm_kind != MaskKind::None;
  const __m512 ninf = _mm512_set1_ps(-kInf), zero = _mm512_setzero_ps();
  __m512 m[4], l[4];  // per 16 queries: running max (of the scores in log2 units) and sum
  __mmask16 qmask[4];  // lanes that are queries of this task
  for (int c = 0; c < 4; ++c) {
    m[c] = ninf, l[c] = zero;
    qmask[c] = tail_mask(std::clamp<int64_t>(bq - 16 * c, 0, 16));
  }
  // Key j is hidden from query i < j - causal_offset.
  const int64_t causal_shift = this->causal_shift();
  const __m512i lane = lane_index();
  const __m512i inter = _mm512_load_si512(kInterleave);

  const T* q = this->q_rows(b, h, i0);
  if (15 * p.q_sr + p.E < (int64_t(1) << 30)) {
    // Packed Q^T straight from Q: word (r, i) of the layout (checked by the plan) is the
    // element pair Q[i][2r], Q[i][2r + 1], gathered for 16 queries at a time (the pairs need
    // no alignment: byte offsets, scale 2).
    int32_t* qt = reinterpret_cast<int32_t*>(w.qt_packed.data());
    const __m512i rows = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int32_t(p.q_sr)));
    for (int c = 0; c < nc; ++c) {
      const T* qc = q + 16 * c * p.q_sr;
      for (int64_t r = 0; r < p.E / 2; ++r) {
        const __m512i idx = _mm512_add_epi32(rows, _mm512_set1_epi32(int32_t(2 * r)));
        _mm512_storeu_si512(qt + r * ldb + 16 * c,
                            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), qmask[c], idx, qc, 2));
      }
    }
  } else {  // row stride too large for 32-bit gather indices: transpose, then pack
    transpose_plain(q, p.q_sr, bq, p.E, w.qt.data(), kLd);
    p.packed->pack(p.E, bq, kLd, w.qt.data(), w.qt_packed.data());
  }
  float* ot = w.acc.data();
  std::fill(ot, ot + p.Ev * kLd, 0.f);
  const ScoreModsZmm mods(p, b, h);
  const __m512 l2e = _mm512_set1_ps(kLog2e), scale_nat = _mm512_set1_ps(float(p.scale));

  // Keys [kv_begin, kv_end) in ranges that end at V^T's block edges (its slots are per block
  // of kFwdBlockK); a window's left edge, rounded down to a key pair (P^T's packed pairs),
  // starts the first range inside its block.
  const int64_t kv_end = this->kv_end(b, i0 + bq - 1);
  const int64_t kv_begin = std::min(this->visible_begin(i0) / 2 * 2, kv_end);
  for (int64_t j0 = kv_begin, next; j0 < kv_end; j0 = next) {
    next = std::min((j0 / kFwdBlockK + 1) * kFwdBlockK, kv_end);
    const int64_t bk = next - j0, bkp = bk + (bk & 1);
    // An odd range that ends before S: the pair partner of its last key is a real key past
    // kv_end (padding, or past the causal frontier) whose V may hold anything, and 0 * NaN
    // would reach O. Its last key then joins O^T by a rank-1 update and the product stops a
    // key short. (Ending at S, the partner is the slot's zero column.)
    const bool odd_tail = (bk & 1) && next < p.S;
    alignas(64) float p_last[64];
    float* st = w.s.data();
    p.packed->gemm(bk, bq, p.E, p.E, p.k_sr, kLd, false, this->k_rows(b, hk, j0), w.qt_packed.data(), st);
    float* bias = w.bias.data();
    this->key_bias(b, j0, bk, bias);
    if (has_bias)
      for (int64_t j = 0; j < bk; ++j) bias[j] *= kLog2e;

    // keep[c * kFwdBlockK + j]: the lanes of query vector c that see key j (causal; padding,
    // a bias of -inf, hides a key from all), 16 keys at a time.
    uint16_t* keep = w.keep.data();
    for (int64_t j = 0; j < bk; j += 16) {
      const __mmask16 in = tail_mask(bk - j);
      const __m512 bj = _mm512_maskz_loadu_ps(in, bias + j);
      const __mmask16 alive = _mm512_mask_cmp_ps_mask(in, bj, ninf, _CMP_NEQ_UQ);
      // Lanes below cut(j) = j - offset - i0 - 16 c are hidden by causality.
      const __m512i cut0 = _mm512_add_epi32(_mm512_set1_epi32(int32_t(j0 + j - causal_shift - i0)), lane);
      for (int c = 0; c < nc; ++c) {
        __m512i k = _mm512_set1_epi32(qmask[c]);
        if (p.causal) {
          const __m512i cut = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(cut0, _mm512_set1_epi32(16 * c)),
                                                                _mm512_setzero_si512()), _mm512_set1_epi32(16));
          k = _mm512_and_si512(k, _mm512_sllv_epi32(_mm512_set1_epi32(0xffff), cut));
        }
        _mm512_mask_cvtepi32_storeu_epi16(keep + c * kFwdBlockK + j, in, _mm512_maskz_mov_epi32(alive, k));
      }
    }
    if (p.windowed()) {
      for (int c = 0; c < nc; ++c)
        for (int64_t j = 0; j < bk; ++j) keep[c * kFwdBlockK + j] &= mods.window(mods.base(j0 + j, i0 + 16 * c));
    }
    T* pt = w.narrow.data();
    // One vector of queries at a time, so that its max and sum stay in registers.
    for (int c = 0; c < nc; ++c, keep += kFwdBlockK) {
      const float* col = st + 16 * c;
      __m512 mb0 = ninf, mb1 = ninf;  // two chains: vmaxps' latency, not its throughput
      int64_t j = 0;
      if (mods.scores) {
        // The variants: each score in log2 units, (mods(s * scale) + bias_j) * log2(e),
        // written back over S^T for the exp pass, which then takes it as it is.
        float* colw = st + 16 * c;
        const int64_t q0 = i0 + 16 * c;  // (a lambda may not capture a structured binding)
        const auto score = [&](int64_t jj) {
          __m512 cap_d;
          const __m512 xs = mods.apply(_mm512_mul_ps(_mm512_loadu_ps(colw + jj * kLd), scale_nat),
                                       mods.base(j0 + jj, q0), &cap_d);
          const __m512 v = _mm512_fmadd_ps(xs, l2e, _mm512_set1_ps(bias[jj]));
          _mm512_storeu_ps(colw + jj * kLd, v);
          return v;
        };
        for (; j + 1 < bk; j += 2) {
          mb0 = _mm512_mask_max_ps(mb0, keep[j], mb0, score(j));
          mb1 = _mm512_mask_max_ps(mb1, keep[j + 1], mb1, score(j + 1));
        }
        if (j < bk) {
          mb0 = _mm512_mask_max_ps(mb0, keep[j], mb0, score(j));
          ++j;
        }
      } else if (has_bias) {
        for (; j + 1 < bk; j += 2) {
          const __m512 v0 = _mm512_fmadd_ps(_mm512_loadu_ps(col + j * kLd), scale, _mm512_set1_ps(bias[j]));
          const __m512 v1 = _mm512_fmadd_ps(_mm512_loadu_ps(col + (j + 1) * kLd), scale,
                                            _mm512_set1_ps(bias[j + 1]));
          mb0 = _mm512_mask_max_ps(mb0, keep[j], mb0, v0);
          mb1 = _mm512_mask_max_ps(mb1, keep[j + 1], mb1, v1);
        }
      } else {
        for (; j + 1 < bk; j += 2) {
          mb0 = _mm512_mask_max_ps(mb0, keep[j], mb0, _mm512_mul_ps(_mm512_loadu_ps(col + j * kLd), scale));
          mb1 = _mm512_mask_max_ps(mb1, keep[j + 1], mb1,
                                   _mm512_mul_ps(_mm512_loadu_ps(col + (j + 1) * kLd), scale));
        }
      }
      if (j < bk) {
        const __m512 v0 = _mm512_fmadd_ps(_mm512_loadu_ps(col + j * kLd), scale, _mm512_set1_ps(bias[j]));
        mb0 = _mm512_mask_max_ps(mb0, keep[j], mb0, v0);
      }
      // The new max, and where it is still -inf (no visible key yet) 0 for the exponents, so
      // that exp(-inf - 0) = 0 instead of NaN. (vmaxps may drop a NaN score from the max; the
      // exp pass below does not: its NaN reaches the sum, so the output and lse.)
      const __m512 mn = _mm512_max_ps(m[c], _mm512_max_ps(mb0, mb1));
      const __m512 ms = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mn, ninf, _CMP_EQ_OQ), mn, zero);
      const __m512 alpha = exp2_zmm<false>(_mm512_sub_ps(m[c], ms));
      m[c] = mn;
      for (int64_t r = 0; r < p.Ev; ++r) {
        float* o = ot + r * kLd + 16 * c;
        _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), alpha));
      }
      // 2^(s * scale + bias_j - m) for keys j, j + 1, rounded and interleaved in pairs.
      __m512 sum = _mm512_mul_ps(l[c], alpha);
      T* pc = pt + 32 * c;
      const __m512 neg_ms = _mm512_sub_ps(zero, ms);
      // (The variants' scores are final: multiplier 1, no bias.)
      const __m512 mul = mods.scores ? _mm512_set1_ps(1.f) : scale;
      const auto exps = [&](auto biased) {
        for (int64_t j = 0; j < bk; j += 2) {
          const __m512 b0 = biased ? _mm512_add_ps(_mm512_set1_ps(bias[j]), neg_ms) : neg_ms;
          const __m512 e0 = exp2_zmm<true>(_mm512_fmadd_ps(_mm512_loadu_ps(col + j * kLd), mul, b0), keep[j]);
          __m512 e1 = zero;  // the zero key that pads an odd block
          if (j + 1 < bk) {
            const __m512 b1 = biased ? _mm512_add_ps(_mm512_set1_ps(bias[j + 1]), neg_ms) : neg_ms;
            e1 = exp2_zmm<true>(_mm512_fmadd_ps(_mm512_loadu_ps(col + (j + 1) * kLd), mul, b1), keep[j + 1]);
          } else if (odd_tail) {  // rounded as the product would round it
            _mm512_store_ps(p_last + 16 * c, _mm512_castsi512_ps(_mm512_slli_epi32(
                                                 _mm512_cvtepu16_epi32(to_bf16_zmm(e0)), 16)));
          }
          sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
          const __m512i pair = _mm512_permutexvar_epi16(inter, __m512i(_mm512_cvtne2ps_pbh(e1, e0)));
          _mm512_storeu_si512(pc + (j / 2) * 2 * ldb, pair);
        }
      };
      if (has_bias && !mods.scores) {
        exps(std::true_type{});
      } else {
        exps(std::false_type{});
      }
      l[c] = sum;
    }
    const T* vt = packed_vt(b, hk, j0 / kFwdBlockK) + j0 % kFwdBlockK;  // V^T, Ev x bkp
    const int64_t ld_vt = layout::slot_ld_vt(p);
    if (odd_tail) {
      for (int64_t r = 0; r < p.Ev; ++r) {
        const __m512 vr = _mm512_set1_ps(to_acc(vt[r * ld_vt + bk - 1]));
        for (int c = 0; c < nc; ++c) {
          float* o = ot + r * kLd + 16 * c;
          _mm512_storeu_ps(o, _mm512_fmadd_ps(vr, _mm512_load_ps(p_last + 16 * c), _mm512_loadu_ps(o)));
        }
      }
    }
    const int64_t depth = odd_tail ? bk - 1 : bkp;
    if (depth > 0) p.packed->gemm(p.Ev, bq, depth, bkp, ld_vt, kLd, true, vt, pt, ot);
  }
  alignas(64) float mf[64], lf[64];
  for (int c = 0; c < nc; ++c) _mm512_store_ps(mf + 16 * c, m[c]), _mm512_store_ps(lf + 16 * c, l[c]);
  A* lse = this->lse_row(b, h) + i0;
  const __m512i cols = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int32_t(kLd)));
  for (int64_t i = 0; i < bq; ++i) {  // row i of the output is column i of O^T: gathered
    // no visible key: 0; a NaN sum stays NaN
    const float li = lf[i], inv = li > 0.f ? 1.f / li : (li == 0.f ? 0.f : li);
    if (p.out_f32) {
      column_to_f32_row(ot + i, kLd, cols, p.Ev, _mm512_set1_ps(inv), this->out_rows_f32(b, h, i0 + i));
    } else {
      column_to_bf16_row(ot + i, kLd, cols, p.Ev, _mm512_set1_ps(inv), this->out_rows(b, h, i0 + i),
                         /*nt=*/false);
    }
    lse[i] = li > 0.f ? mf[i] * kLn2 + std::log(li) : (li == 0.f ? -kInf : li);
  }
}

FUSEDATTN_TIER_NS_END
#endif  // FUSEDATTN_AVX512_BF16
