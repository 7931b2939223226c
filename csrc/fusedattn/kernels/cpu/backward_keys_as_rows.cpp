// The backwards with keys as the GEMMs' rows: bf16 on packed (AMX) GEMMs (avx512_bf16 tier)
// and fp32 on the JIT GEMM (avx512 tiers); the plan chooses them without attn_mask or
// dropout. Other types and tiers run the query-rows backward. Both apply the variants
// (window, ALiBi, softcap, rel_bias) in their one vector pass (Masks' ScoreModsZmm).
#include "fusedattn/kernels/cpu/backward.h"
#include "fusedattn/kernels/cpu/forward.h"  // FUSEDATTN_FOR_EACH_TYPE

FUSEDATTN_TIER_NS_BEGIN

template <typename T>
void Backward<T>::keys_as_rows_task(int64_t t, Work& w) const {
#ifdef FUSEDATTN_AVX512_BF16
  if constexpr (std::is_same_v<T, bf16>) return keys_as_rows_bf16(t, w);
#endif
#ifdef FUSEDATTN_AVX512
  if constexpr (std::is_same_v<T, float>) return keys_as_rows_f32(t, w);
#endif
  query_rows_task(t, w);
}

#ifdef FUSEDATTN_AVX512
// Lanes whose probability is within tol of 1 (rows.h's is_whole_softmax, 16 at a time).
inline __mmask16 whole_softmax_lanes(__m512 pr, float tol) {
  const __m512 gap = _mm512_abs_ps(_mm512_sub_ps(pr, _mm512_set1_ps(1.f)));
  return _mm512_cmp_ps_mask(gap, _mm512_set1_ps(tol), _CMP_LE_OQ);
}
#endif

#ifdef FUSEDATTN_AVX512_BF16
// bf16, the forward's keys-as-rows layout. Per query head: Q^T and dO^T packed in 64-query
// panels (B of S^T = K Q^T and dP^T = V dO^T, whose A are K's and V's rows straight from the
// inputs), Q and dO packed whole (B of dK += dS^T Q and dV += P^T dO, any 64-aligned run of
// rows), dQ^T (E x Lp, fp32) accumulated by dQ^T += K^T dS^T, K^T transposed once per task.
// Per block of kBwdBlockK keys and chunk of up to kKrQ queries: two products; one pass over
// S^T and dP^T, 16 queries to a vector (lse and D per lane, causal as lane masks, key padding
// per row), writing P^T and dS^T row-major (A operands) and dS^T packed in key pairs (B);
// three products. The query-rows backward's MKL calls transpose P and dS for dV and dK and
// pack every B per call: 56% of a bf16 backward in MKL, a fifth of it copies (perf, L=1024).
template <>
void Backward<bf16>::keys_as_rows_bf16(int64_t t, Work& w) const {
  using T = bf16;
  using layout::kBwdBlockK;
  using layout::kKrQ;
  const int64_t b = t / p.Hk, hk = t % p.Hk, Lp = layout::l_pad(p), ldkt = layout::ld_kt(p);
  // Keys past key_end (trailing padding) are never read. An odd last block's dQ^T product
  // still runs one key deeper (bkp, the packed pairs): that column of K^T is zeroed below, as
  // its dS is, since the padded key's K may hold anything (0 * NaN would reach dQ).
  const int64_t ke = this->key_end(b);
  const __m512 scale = _mm512_set1_ps(float(p.scale)), l2e = _mm512_set1_ps(kLog2e);
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
  const __m512i inter = _mm512_load_si512(kInterleave);
  const int64_t causal_shift = this->causal_shift();

  // K^T (E x S, row stride ldkt; column S zero, so that an odd last block has an even depth).
  T* kt = w.kt.data();
  transpose(this->k_rows(b, hk, 0), p.k_sr, p.S, p.E, kt, ldkt);
  for (int64_t e = 0; e < p.E; ++e) std::fill(kt + e * ldkt + std::min(ke, p.S), kt + (e + 1) * ldkt, T{});
  std::fill(w.dk.begin(), w.dk.end(), 0.f);
  std::fill(w.dv.begin(), w.dv.end(), 0.f);
  T* tmp = w.tmp.data();
  // C (m x n, row stride n) += A (m x k, row stride k) times rows i0 .. i0 + k of x, packed
  // whole (Lp x n): panel c (64 columns, the last round16(w) wide) at Lp * 64 * c, its pair
  // rows 2 * round16(w) apart.
  const auto rows_product = [&](int64_t m, int64_t n, int64_t k, const T* a, const T* x_packed,
                                int64_t i0, float* c) {
    for (int64_t c0 = 0; c0 < n; c0 += 64) {
      const int64_t wc = std::min<int64_t>(64, n - c0), ldb = (wc + 15) / 16 * 16;
      p.packed->gemm(m, wc, k, k, k, n, true, a, x_packed + Lp * c0 + i0 * ldb, c + c0);
    }
  };
  for (int64_t h = hk * this->group; h < (hk + 1) * this->group; ++h) {
    kr_lse_and_d(b, h, w);
    // This head's packed operands (rows past L zero).
    for (const bool is_q : {true, false}) {
      const T* x = is_q ? this->q_rows(b, h, 0) : this->dout_rows(b, h, 0);
      const int64_t ld = is_q ? p.q_sr : p.do_sr, n = is_q ? p.E : p.Ev;
      T* xt = is_q ? w.qt.data() : w.dot.data();
      for (int64_t i0 = 0; i0 < p.L; i0 += 64) {  // x^T by 64-query panels (n x 64 each)
        std::fill(tmp, tmp + n * 64, T{});
        transpose(x + i0 * ld, ld, std::min<int64_t>(64, p.L - i0), n, tmp, 64);
        p.packed->pack(n, 64, 64, tmp, xt + i0 * n);
      }
      for (int64_t r = 0; r < Lp; ++r) {  // x whole (Lp x n)
        if (r < p.L) std::copy(x + r * ld, x + r * ld + n, tmp + r * n);
        else std::fill(tmp + r * n, tmp + (r + 1) * n, T{});
      }
      p.packed->pack(Lp, n, n, tmp, is_q ? w.qp.data() : w.dop.data());
    }
    float* dqt = w.dq.data();  // E x Lp
    std::fill(dqt, dqt + p.E * Lp, 0.f);
    const ScoreModsZmm mods(p, b, h);
    float* d_table = this->rel_grad_row(b, h);

    for (int64_t j0 = 0; j0 < ke; j0 += kBwdBlockK) {
      const int64_t bk = std::min(kBwdBlockK, ke - j0), bkp = bk + (bk & 1);
      float* bias = w.bias.data();
      this->key_bias(b, j0, bk, bias);
      // Queries that see any key of this block (causal and the window).
      const auto [i_first, i_end] = this->seeing_queries(j0, j0 + bk);
      for (int64_t i0 = i_first / 64 * 64; i0 < i_end; i0 += kKrQ) {
        const int64_t nq = std::min(kKrQ, Lp - i0), nv = nq / 16;  // columns; query vectors
        float* st = w.s.data();   // S^T, bk x nq
        float* dpt = w.dp.data(); // dP^T, bk x nq
        p.packed->gemm(bk, nq, p.E, p.E, p.k_sr, nq, false, this->k_rows(b, hk, j0),
                       w.qt.data() + i0 * p.E, st);
        p.packed->gemm(bk, nq, p.Ev, p.Ev, p.v_sr, nq, false, this->v_rows(b, hk, j0),
                       w.dot.data() + i0 * p.Ev, dpt);
        T* pt = w.narrow_s.data();    // P^T, bk x nq
        T* dst = w.narrow_dp.data();  // dS^T * scale, bk x nq
        T* dsp = w.ds_packed.data();  // the same packed (pairs of keys), panel c at c * bkp * 64
        const float* lse = w.lse.data() + i0;
        const float* dd = w.d.data() + i0;
        const float* d1 = w.d_one.data() + i0;
        const uint16_t* one_key = w.one_key_lanes.data() + i0 / 16;
        for (int64_t j = 0; j < bkp; j += 2) {
          for (int64_t c = 0; c < nv; ++c) {
            __m512 ds2[2];
            for (int u = 0; u < 2; ++u) {
              const int64_t jj = j + u;
              if (jj >= bk) {  // the zero key that pads an odd block
                ds2[u] = zero;
                continue;
              }
              __mmask16 keep = bias[jj] == kNegInfF ? 0 : 0xffff;
              if (p.causal) {  // query i0 + 16 c + l sees key j0 + jj iff l >= cut
                const int64_t cut = std::clamp<int64_t>(j0 + jj - causal_shift - i0 - 16 * c, 0, 16);
                keep &= __mmask16(0xffffu << cut);
              }
              const __m512 bias_lse = _mm512_sub_ps(_mm512_set1_ps(bias[jj]), _mm512_loadu_ps(lse + 16 * c));
              __m512 x, cap_d = one;
              int64_t base = 0;
              if (!mods.any) {
                x = _mm512_fmadd_ps(_mm512_loadu_ps(st + jj * nq + 16 * c), scale, bias_lse);
              } else {  // key j0 + jj is at base - l from lane l's diagonal
                base = mods.base(j0 + jj, i0 + 16 * c);
                x = _mm512_add_ps(mods.apply(_mm512_mul_ps(_mm512_loadu_ps(st + jj * nq + 16 * c), scale),
                                             base, &cap_d),
                                  bias_lse);
                keep &= mods.window(base);
              }
              const __m512 pr = exp2_zmm<true>(_mm512_mul_ps(x, l2e), keep);
              const __m512 dp = _mm512_loadu_ps(dpt + jj * nq + 16 * c);
              const __m512 dv = _mm512_loadu_ps(dd + 16 * c);
              const __mmask16 exact = one_key[c] & whole_softmax_lanes(pr, kExactOneTolShort);
              const __m512 d = _mm512_mask_add_ps(dv, exact, _mm512_loadu_ps(d1 + 16 * c), dp);
              const __m512 g = _mm512_mul_ps(pr, _mm512_sub_ps(dp, d));  // d loss / d score
              if (d_table) mods.add_rel_grad(d_table, g, base);
              const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(g, cap_d), scale);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(pt + jj * nq + 16 * c), to_bf16_zmm(pr));
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + jj * nq + 16 * c), to_bf16_zmm(ds));
              ds2[u] = ds;
            }
            const __m512i pair = _mm512_permutexvar_epi16(inter, __m512i(_mm512_cvtne2ps_pbh(ds2[1], ds2[0])));
            _mm512_storeu_si512(dsp + (c / 4) * bkp * 64 + (j / 2) * 128 + (c % 4) * 32, pair);
          }
        }
        rows_product(bk, p.Ev, nq, pt, w.dop.data(), i0, w.dv.data() + j0 * p.Ev);
        rows_product(bk, p.E, nq, dst, w.qp.data(), i0, w.dk.data() + j0 * p.E);
        p.packed->gemm(p.E, nq, bkp, bkp, ldkt, Lp, true, kt + j0, dsp, dqt + i0);
      }
    }
    // dQ^T back to dQ's rows: 16 dims a gather, rounded, by non-temporal stores where
    // aligned (was a scalar loop, one element a store).
    T* dq = this->dq_rows(b, h);
    const __m512i dims = _mm512_mullo_epi32(lane_index(), _mm512_set1_epi32(int32_t(Lp)));
    const bool nt = reinterpret_cast<uintptr_t>(dq) % 32 == 0 && p.dq_sr % 16 == 0;
    const bool gather = 15 * Lp + p.L < (int64_t(1) << 31);  // 32-bit indices
    for (int64_t i = 0; i < p.L && !gather; ++i) {
      for (int64_t e = 0; e < p.E; ++e) store(dqt[e * Lp + i], dq + i * p.dq_sr + e);
    }
    for (int64_t i = 0; i < p.L && gather; ++i) {
      column_to_bf16_row(dqt + i, Lp, dims, p.E, _mm512_set1_ps(1.f), dq + i * p.dq_sr, nt);
    }
    out_rows_done();
  }
  store_dk_dv(b, hk, w);
}
#endif  // FUSEDATTN_AVX512_BF16

#ifdef FUSEDATTN_AVX512
// fp32, the bf16 version's order of work on p.fgemm, whose operands are plain row-major
// matrices, so nothing is packed and every product reads its operands where they are: S^T =
// K Q^T and dP^T = V dO^T (A: K's and V's rows from the inputs; B: Q^T and dO^T, transposed
// once per head); P^T and dS^T * scale overwrite S^T and dP^T in one AVX-512 pass (16 queries
// to a vector); then dV += P^T dO and dK += dS^T Q (B: dO's and Q's rows from the inputs, the
// chunk's real queries only) and dQ^T += K^T dS^T (A: K^T, transposed once per task). The
// query-rows backward's MKL calls transpose P and dS for dV and dK and copy their B operands
// on every call. The variants (window, ALiBi, softcap, rel_bias) are applied in the same
// pass, 16 queries to a vector: key j0 + j's offset from lane l's diagonal is d = base - l.
template <>
void Backward<float>::keys_as_rows_f32(int64_t t, Work& w) const {
  using layout::kBwdBlockK;
  using layout::kKrQ;
  const int64_t b = t / p.Hk, hk = t % p.Hk, Lp = layout::l_pad(p), ldkt = layout::ld_kt(p);
  const int64_t ldq = layout::ld_qt(p);
  const int64_t ke = this->key_end(b);  // keys past it are padding: skipped
  const __m512 scale = _mm512_set1_ps(float(p.scale)), l2e = _mm512_set1_ps(kLog2e);
  const __m512 one = _mm512_set1_ps(1.f);
  const int64_t causal_shift = this->causal_shift();
  float* kt = w.kt.data();  // K^T, E x S (row stride ldkt)
  transpose(this->k_rows(b, hk, 0), p.k_sr, p.S, p.E, kt, ldkt);
  std::fill(w.dk.begin(), w.dk.end(), 0.f);
  std::fill(w.dv.begin(), w.dv.end(), 0.f);
  for (int64_t h = hk * this->group; h < (hk + 1) * this->group; ++h) {
    kr_lse_and_d(b, h, w);
    // Q^T (E x Lp) and dO^T (Ev x Lp), row stride ldq, columns L.. zero.
    float* qt = w.qt.data();
    float* dot = w.dot.data();
    transpose(this->q_rows(b, h, 0), p.q_sr, p.L, p.E, qt, ldq);
    transpose(this->dout_rows(b, h, 0), p.do_sr, p.L, p.Ev, dot, ldq);
    for (int64_t e = 0; e < p.E; ++e) std::fill(qt + e * ldq + p.L, qt + e * ldq + Lp, 0.f);
    for (int64_t e = 0; e < p.Ev; ++e) std::fill(dot + e * ldq + p.L, dot + e * ldq + Lp, 0.f);
    float* dqt = w.dq.data();  // E x Lp, row stride ldq
    std::fill(dqt, dqt + p.E * ldq, 0.f);
    const ScoreModsZmm mods(p, b, h);
    float* d_table = this->rel_grad_row(b, h);

    // One key block holds every key the queries see: each column's softmax is whole.
    const bool own_rows = ke <= kBwdBlockK;
    for (int64_t j0 = 0; j0 < ke; j0 += kBwdBlockK) {
      const int64_t bk = std::min(kBwdBlockK, ke - j0);
      float* bias = w.bias.data();
      this->key_bias(b, j0, bk, bias);
      // Queries that see any key of this block (causal and the window).
      const auto [i_first, i_end] = this->seeing_queries(j0, j0 + bk);
      for (int64_t i0 = i_first / 64 * 64; i0 < i_end; i0 += kKrQ) {
        // nq columns (whole vectors, padding queries past L included), kq of them real.
        const int64_t nq = std::min(kKrQ, Lp - i0), nv = nq / 16, kq = std::min(nq, p.L - i0);
        float* st = w.s.data();    // S^T, then P^T; bk x nq
        float* dpt = w.dp.data();  // dP^T, then dS^T * scale
        p.fgemm(bk, nq, p.E, p.k_sr, ldq, nq, false, this->k_rows(b, hk, j0), qt + i0, st);
        p.fgemm(bk, nq, p.Ev, p.v_sr, ldq, nq, false, this->v_rows(b, hk, j0), dot + i0, dpt);
        const float* lse = w.lse.data() + i0;
        const float* d1 = w.d_one.data() + i0;
        const uint16_t* one_key = w.one_key_lanes.data() + i0 / 16;
        // Key j0 + j against queries i0 + 16 c ..: s * scale (through the variants) + the
        // key's bias - sub; keep loses the lanes the masks hide, cap_d is softcap's
        // derivative, base the key's offset from lane 0's diagonal.
        const auto score = [&](int64_t j, int64_t c, __m512 sub, __mmask16& keep, __m512& cap_d,
                               int64_t& base) {
          keep = bias[j] == kNegInfF ? 0 : 0xffff;
          if (p.causal) {  // query i0 + 16 c + l sees key j0 + j iff l >= cut
            const int64_t cut = std::clamp<int64_t>(j0 + j - causal_shift - i0 - 16 * c, 0, 16);
            keep &= __mmask16(0xffffu << cut);
          }
          const float* sp = st + j * nq + 16 * c;
          const __m512 bj = _mm512_sub_ps(_mm512_set1_ps(bias[j]), sub);
          cap_d = one, base = 0;
          if (!mods.any) return _mm512_fmadd_ps(_mm512_loadu_ps(sp), scale, bj);
          base = mods.base(j0 + j, i0 + 16 * c);
          const __m512 xs = mods.apply(_mm512_mul_ps(_mm512_loadu_ps(sp), scale), base, &cap_d);
          keep &= mods.window(base);
          return _mm512_add_ps(xs, bj);
        };
        // P = exp(x - lse) from the forward's lse, or, where this block holds every key
        // (own_rows), each column's own softmax, P = exp(x - m) / l from its maximum m and sum
        // l, and D = sum P dP, as SDPA's math path forms them: exp(x - lse) carries lse's
        // rounding (|lse| x 6e-8), and dO . O's rounding does not cancel dP's in dP - D as D's
        // does (dQ, dK at 2-8x SDPA's error at peaked rows, S = 2, E = 1, GQA, causal). A
        // column whose m + log l is not its lse to within 4 ulp of |lse| + 1 (ring attention's
        // lse, merged over more keys than this call's) keeps exp(x - lse) = e * exp(m - lse).
        // Without the variants the sum pass stores e = exp(x - m) over S^T and the dS pass
        // reads it back (P = e * pmul): one exp per score either way.
        alignas(64) float shift[kKrQ], pmul[kKrQ], dcol[kKrQ];
        std::copy(lse, lse + nq, shift);
        std::fill(pmul, pmul + nq, 1.f);
        std::copy(w.d.data() + i0, w.d.data() + i0 + nq, dcol);
        const bool stored = own_rows && !mods.any;  // S^T holds e
        if (own_rows) {
          __m512 m[kKrQ / 16], l[kKrQ / 16], de[kKrQ / 16];
          for (int64_t c = 0; c < nv; ++c) {
            m[c] = _mm512_set1_ps(kNegInfF), l[c] = de[c] = _mm512_setzero_ps();
          }
          __mmask16 keep;
          __m512 cap_d;
          int64_t base;
          for (int64_t j = 0; j < bk; ++j) {
            for (int64_t c = 0; c < nv; ++c) {
              const __m512 x = score(j, c, _mm512_setzero_ps(), keep, cap_d, base);
              m[c] = _mm512_mask_max_ps(m[c], keep, m[c], x);
            }
          }
          for (int64_t j = 0; j < bk; ++j) {
            for (int64_t c = 0; c < nv; ++c) {
              const __m512 x = score(j, c, m[c], keep, cap_d, base);
              const __m512 e = exp2_zmm<false>(_mm512_mul_ps(x, l2e), keep);
              if (stored) _mm512_storeu_ps(st + j * nq + 16 * c, e);
              l[c] = _mm512_add_ps(l[c], e);
              de[c] = _mm512_fmadd_ps(e, _mm512_loadu_ps(dpt + j * nq + 16 * c), de[c]);
            }
          }
          alignas(64) float mf[kKrQ], lf[kKrQ], df[kKrQ];
          for (int64_t c = 0; c < nv; ++c) {
            _mm512_store_ps(mf + 16 * c, m[c]), _mm512_store_ps(lf + 16 * c, l[c]);
            _mm512_store_ps(df + 16 * c, de[c]);
          }
          constexpr float kTol = 4 * std::numeric_limits<float>::epsilon();
          for (int64_t i = 0; i < nq; ++i) {
            const float own = mf[i] + std::log(lf[i]);
            if (i < kq && lf[i] > 0.f && std::abs(own - lse[i]) <= kTol * (std::abs(lse[i]) + 1.f)) {
              shift[i] = mf[i], pmul[i] = 1.f / lf[i], dcol[i] = df[i] / lf[i] + d1[i];
            } else if (stored) {  // e * exp(m - lse): 0 past L and where no key is seen
              pmul[i] = std::exp(mf[i] - lse[i]);
            }
          }
        }
        for (int64_t j = 0; j < bk; ++j) {
          for (int64_t c = 0; c < nv; ++c) {
            float* sp = st + j * nq + 16 * c;
            float* dp = dpt + j * nq + 16 * c;
            __m512 e, cap_d = one;
            int64_t base = 0;
            if (stored) {
              e = _mm512_loadu_ps(sp);
            } else {
              __mmask16 keep;
              const __m512 x = score(j, c, _mm512_load_ps(shift + 16 * c), keep, cap_d, base);
              e = exp2_zmm<false>(_mm512_mul_ps(x, l2e), keep);
            }
            const __m512 pr = _mm512_mul_ps(e, _mm512_load_ps(pmul + 16 * c));
            const __m512 dpv = _mm512_loadu_ps(dp), dv = _mm512_load_ps(dcol + 16 * c);
            const __mmask16 exact = one_key[c] & whole_softmax_lanes(pr, kExactOneTol);
            const __m512 d = _mm512_mask_add_ps(dv, exact, _mm512_loadu_ps(d1 + 16 * c), dpv);
            const __m512 g = _mm512_mul_ps(pr, _mm512_sub_ps(dpv, d));  // d loss / d score
            if (d_table) mods.add_rel_grad(d_table, g, base);
            const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(g, cap_d), scale);
            _mm512_storeu_ps(sp, pr);
            _mm512_storeu_ps(dp, ds);
          }
        }
        p.fgemm(bk, p.Ev, kq, nq, p.do_sr, p.Ev, true, st, this->dout_rows(b, h, i0), w.dv.data() + j0 * p.Ev);
        p.fgemm(bk, p.E, kq, nq, p.q_sr, p.E, true, dpt, this->q_rows(b, h, i0), w.dk.data() + j0 * p.E);
        p.fgemm(p.E, nq, bk, ldkt, nq, ldq, true, kt + j0, dpt, dqt + i0);
      }
    }
    // dQ^T back to dQ's rows, by non-temporal stores where aligned.
    transpose_zmm(dqt, ldq, p.E, p.L, this->dq_rows(b, h), p.dq_sr, /*stream=*/true);
  }
  store_dk_dv(b, hk, w);
}
#endif  // FUSEDATTN_AVX512

#define FUSEDATTN_INSTANTIATE(T) \
  template void Backward<T>::keys_as_rows_task(int64_t, typename Backward<T>::Work&) const;
FUSEDATTN_FOR_EACH_TYPE(FUSEDATTN_INSTANTIATE)
#undef FUSEDATTN_INSTANTIATE

FUSEDATTN_TIER_NS_END
