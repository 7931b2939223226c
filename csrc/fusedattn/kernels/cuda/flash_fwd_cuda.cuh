#pragma once
// The forward kernel of flash_cuda.h, a template over (element type, head-dim tile). Each
// instantiation is compiled in its own translation unit (CMake generates one per dtype and
// head dim), so the build runs them in parallel and a flag can leave some out.
//
// One block: kBlockM queries of one (batch, head); 4 warps, each owning 16 * kMTiles query
// rows. The Q tile is loaded once; K and V tiles of kBlockN keys stream through shared memory
// with cp.async, the load of the next K overlapping P V and the load of V overlapping Q K^T.
// Scores stay in registers: the accumulator fragment of S = Q K^T (m16n8) is, element for
// element, the A fragment of the following P V product (m16k16), so P never leaves them.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, lane = 4 * g + t): C holds rows g and g + 8,
// columns 2t and 2t + 1; A holds rows g, g + 8 and columns 2t, 2t + 1, 2t + 8, 2t + 9; B holds
// k rows 2t, 2t + 1, 2t + 8, 2t + 9 of column g. ldmatrix gives B of K^T from K's rows
// untransposed and B of V from V's rows transposed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fusedattn/kernels/common/dropout.h"
#include "fusedattn/kernels/cuda/flash_cuda.h"

namespace fusedattn::kernels::flash_cuda {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Tile shapes per head dim, FlashAttention-2's for sm_80/sm_90 with 4 warps: (128 x 64) up
// to 128 (the O accumulator of 32 rows x 128 columns is 128 registers a thread), 64 x 64
// above (O of 16 rows x 256 = 128 registers; 101 KB of shared memory at 256).
template <int kD>
struct Tiles {
  static_assert(kD % 16 == 0 && kD <= 256, "head-dim tile must be a multiple of 16, <= 256");
  static constexpr int kBlockM = kD <= 128 ? 128 : 64;
  static constexpr int kBlockN = kD == 128 ? 32 : 64;
  static constexpr int kMTiles = kBlockM / (16 * kWarps);  // m16 tiles per warp
  // Rows padded by 16 bytes: the 8 row addresses of an ldmatrix phase land in 8 different
  // 16-byte bank groups, so it is conflict-free without a swizzle.
  static constexpr int kStride = kD + 8;
  static constexpr int kSmemElems = (kBlockM + 2 * kBlockN) * kStride;
  // With a mask, its tile (and the key padding's) is staged as one fp32 bias in base 2
  // (-inf where masked) behind Q, K, V: reading masks per element in the score loop made
  // ptxas hoist 64 global loads a thread and spill (604 bytes at head dim 64). Row stride
  // = 8 mod 32 words: a warp's float2 reads (8 rows x 4 lanes) take the minimum 2 wavefronts.
  static constexpr int kBiasStride = kBlockN + 8;
  static constexpr int kBiasBytes = kBlockM * kBiasStride * 4;
};

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

// Two floats as the packed pair of an A fragment register: lo in the low half (lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&r, &h, 4);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &h, 4);
  }
  return r;
}

template <int M, int N>
__device__ __forceinline__ void zero(float (&x)[M][N][4]) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) x[m][n][e] = 0.f;
}

// c += a b for one m16n8k16 tile.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// 16 bytes global -> shared, bypassing L1; src_bytes 0 writes zeros (rows past the end).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// rows x kD tile of a row-major matrix (row stride ld) into shared memory (row stride
// kStride); rows >= valid_rows and columns >= valid_cols become 0. valid_cols % 8 == 0.
template <int kRows, int kD, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t ld, int valid_rows,
                                          int valid_cols) {
  constexpr int kChunks = kD / 8;
  constexpr int kStride = Tiles<kD>::kStride;
  constexpr int kTotal = kRows * kChunks;
#pragma unroll
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int i = threadIdx.x + it * kThreads;
    if (kTotal % kThreads != 0 && i >= kTotal) break;
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool ok = r < valid_rows && c < valid_cols;
    cp_async16(dst + r * kStride + c, ok ? src + r * ld + c : src, ok ? 16 : 0);
  }
}

// This block's (b, h) slices of the masks.
struct MaskBase {
  const void* mask = nullptr;  // at (b, h, 0, 0)
  const void* kpm = nullptr;   // at (b, 0)
};

template <typename T>
__device__ __forceinline__ MaskBase mask_base(const FlashCudaParams& p, int64_t b, int64_t h) {
  MaskBase mb;
  if (p.mask_kind != MaskKind::None) {
    mb.mask = static_cast<const char*>(p.mask) +
              (b * p.m_sb + h * p.m_sh) * (p.mask_kind == MaskKind::Bool ? 1 : sizeof(T));
  }
  if (p.kpm_kind != MaskKind::None) {
    mb.kpm = static_cast<const char*>(p.kpm) +
             b * p.p_sb * (p.kpm_kind == MaskKind::Bool ? 1 : sizeof(T));
  }
  return mb;
}

// attn_mask + key_padding_mask of the kBlockM x kBlockN tile at (row0, col0) into sB, as a
// base-2 bias (-inf where a bool mask forbids); 0 outside [0, L) x [0, S). Coalesced where the
// mask's column stride is 1. The caller synchronises before the scores read it.
template <typename T, int kD>
__device__ __forceinline__ void stage_bias(const FlashCudaParams& p, const MaskBase& mb,
                                           float* sB, int row0, int col0) {
  using Tl = Tiles<kD>;
  constexpr int kTotal = Tl::kBlockM * Tl::kBlockN;
#pragma unroll 8
  for (int i = threadIdx.x; i < kTotal; i += kThreads) {
    const int r = i / Tl::kBlockN, c = i % Tl::kBlockN;
    const int row = row0 + r, col = col0 + c;
    float bias = 0.f;
    if (row < p.L && col < p.S) {
      if (p.mask_kind == MaskKind::Bool) {
        if (static_cast<const uint8_t*>(mb.mask)[row * p.m_sr + col * p.m_sc] == 0) bias = -INFINITY;
      } else if (p.mask_kind == MaskKind::Additive) {
        bias = to_float(static_cast<const T*>(mb.mask)[row * p.m_sr + col * p.m_sc]) * kLog2e;
      }
      if (p.kpm_kind == MaskKind::Bool) {
        if (static_cast<const uint8_t*>(mb.kpm)[col * p.p_sc] != 0) bias = -INFINITY;
      } else if (p.kpm_kind == MaskKind::Additive) {
        bias += to_float(static_cast<const T*>(mb.kpm)[col * p.p_sc]) * kLog2e;
      }
    }
    sB[r * Tl::kBiasStride + c] = bias;
  }
}

// The variants of one call as a block reads them (MaskParams' window, ALiBi, softcap,
// rel_bias): uniform per block, so a tile's loop branches on them without divergence.
struct Variants {
  bool any = false;         // any of the four: the per-element path for every tile
  float slope_log2 = 0.f;   // ALiBi: this (b, h)'s slope in base 2 (0: none)
  const float* table = nullptr;  // rel_bias: this head's 2 D + 1 entries (natural log units)
};

__device__ __forceinline__ Variants block_variants(const FlashCudaParams& p, int64_t b, int64_t h) {
  Variants v;
  v.any = p.window_left >= 0 || p.window_right >= 0 || p.alibi != nullptr || p.softcap > 0 ||
          p.rel_bias != nullptr;
  if (p.alibi) v.slope_log2 = p.alibi[b * p.al_sb + h * p.al_sh] * kLog2e;
  if (p.rel_bias) v.table = static_cast<const float*>(p.rel_bias) + h * (2 * p.rel_max + 1);
  return v;
}

// The scores of one kBlockN-key tile for this thread's rows, scaled to base 2 and masked:
// s[mt][nt][e] is row row0 + warp_row + 16 mt + g + 8 (e / 2), key col0 + 8 nt + 2 t + (e % 2).
// Masked entries, keys past S and rows past L are -inf. sB: stage_bias's tile, read only when
// there is a mask. Row and column indices are int: the launcher keeps L and S below 2^31.
template <typename T, int kD>
__device__ __forceinline__ void scores_tile(
    const FlashCudaParams& p, const Variants& var, const T* sQ, const T* sK, const float* sB,
    int warp_row, int lane, int row0, int col0,
    float (&s)[Tiles<kD>::kMTiles][Tiles<kD>::kBlockN / 8][4]) {
  using Tl = Tiles<kD>;
  constexpr int kN8 = Tl::kBlockN / 8;
  zero(s);
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    uint32_t a[Tl::kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < Tl::kMTiles; ++mt) {
      ldsm_x4(a[mt], sQ + (warp_row + mt * 16 + (lane % 16)) * Tl::kStride + kk * 16 +
                         (lane / 16) * 8);
    }
#pragma unroll
    for (int np = 0; np < kN8 / 2; ++np) {
      uint32_t bk[4];
      ldsm_x4(bk, sK + (np * 16 + (lane % 8) + (lane / 16) * 8) * Tl::kStride + kk * 16 +
                      ((lane / 8) % 2) * 8);
#pragma unroll
      for (int mt = 0; mt < Tl::kMTiles; ++mt) {
        mma<T>(s[mt][2 * np], a[mt], bk[0], bk[1]);
        mma<T>(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
      }
    }
  }
  // Masks, bounds and causality only where this tile can meet them (uniform per block).
  const int L = static_cast<int>(p.L), S = static_cast<int>(p.S);
  const int causal_offset = static_cast<int>(p.causal_offset);
  const bool ragged = row0 + Tl::kBlockM > L || col0 + Tl::kBlockN > S;
  const bool diagonal = p.causal && col0 + Tl::kBlockN - 1 > row0 + causal_offset;
  const int g = lane / 4, t = lane % 4;
  const bool masked = p.mask_kind != MaskKind::None || p.kpm_kind != MaskKind::None;
  // The variants' constants as int / float (the launcher keeps positions below 2^31).
  const int pos_offset = static_cast<int>(p.pos_offset), rel_max = static_cast<int>(p.rel_max);
  const int window_left = static_cast<int>(p.window_left), window_right = static_cast<int>(p.window_right);
  const float softcap = static_cast<float>(p.softcap);
  if (!ragged && !diagonal && !masked && !var.any) {
#pragma unroll
    for (int mt = 0; mt < Tl::kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kN8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] *= p.scale_log2;
    return;
  }
#pragma unroll
  for (int mt = 0; mt < Tl::kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kN8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = row0 + warp_row + mt * 16 + g + 8 * (e / 2);
        const int col = col0 + nt * 8 + 2 * t + (e % 2);
        float x = s[mt][nt][e] * p.scale_log2;
        bool visible = row < L && col < S && (!p.causal || col <= row + causal_offset);
        if (var.any) {
          // In the reference's order: soft-cap the scaled score, then ALiBi and rel_bias by
          // the key's offset d = j - (i + o) from the query's diagonal; the window removes.
          const int d = col - (row + pos_offset);
          if (p.softcap > 0) x = softcap * tanhf(x * kLn2 / softcap) * kLog2e;
          x -= var.slope_log2 * fabsf(static_cast<float>(d));
          if (var.table) x += var.table[(d < -rel_max ? -rel_max : d > rel_max ? rel_max : d) + rel_max] * kLog2e;
          visible = visible && (p.window_left < 0 || d >= -window_left) &&
                    (p.window_right < 0 || d <= window_right);
        }
        if (masked) x += sB[(row - row0) * Tl::kBiasStride + (col - col0)];
        s[mt][nt][e] = visible ? x : -INFINITY;
      }
    }
  }
}

// Where a block works: its (batch, head), its first query row, this thread's warp rows, the
// block's slices of q, k and the masks. Block i of m_blocks per (b, h); heaviest_first numbers
// the query blocks from the last (under causality the last ones see the most keys).
template <typename T, int kD>
struct Block {
  int64_t bh, b, h, hk;
  int row0, valid_q, warp_row, lane;
  bool masked;
  MaskBase mb;
  Variants var;
  const T* q;  // at (b, h, row0, 0)
  const T* k;  // at (b, hk, 0, 0)

  __device__ __forceinline__ Block(const FlashCudaParams& p, bool heaviest_first) {
    using Tl = Tiles<kD>;
    const int m_blocks = static_cast<int>((p.L + Tl::kBlockM - 1) / Tl::kBlockM);
    bh = blockIdx.x / m_blocks;
    const int i = static_cast<int>(blockIdx.x % m_blocks);
    b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hk);
    row0 = (heaviest_first ? m_blocks - 1 - i : i) * Tl::kBlockM;
    valid_q = static_cast<int>(p.L - row0 < Tl::kBlockM ? p.L - row0 : Tl::kBlockM);
    lane = threadIdx.x % 32;
    warp_row = (threadIdx.x / 32) * 16 * Tl::kMTiles;
    masked = p.mask_kind != MaskKind::None || p.kpm_kind != MaskKind::None;
    mb = mask_base<T>(p, b, h);
    var = block_variants(p, b, h);
    q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + row0 * p.q_sr;
    k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  }
};

// Keys [0, n_end) can be visible to some query of the block starting at row0: causal and
// the window's right edge.
__device__ __forceinline__ int64_t visible_keys(const FlashCudaParams& p, int64_t row0,
                                                int block_m) {
  auto clamp_keys = [&](int64_t end) { return end < 0 ? 0 : (end < p.S ? end : p.S); };
  int64_t end = p.S;
  if (p.causal) end = clamp_keys(row0 + block_m - 1 + p.causal_offset + 1);
  if (p.window_right >= 0) {
    const int64_t w = clamp_keys(row0 + block_m - 1 + p.pos_offset + p.window_right + 1);
    end = w < end ? w : end;
  }
  return end;
}
// The first key any query of the block sees: the window's left edge (else 0).
__device__ __forceinline__ int64_t first_visible_key(const FlashCudaParams& p, int64_t row0) {
  if (p.window_left < 0) return 0;
  const int64_t first = row0 + p.pos_offset - p.window_left;
  return first < 0 ? 0 : (first < p.S ? first : p.S);
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) forward_kernel(const FlashCudaParams p) {
  using Tl = Tiles<kD>;
  constexpr int kN8 = Tl::kBlockN / 8;
  constexpr int kD8 = kD / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Tl::kBlockM * Tl::kStride;
  T* sV = sK + Tl::kBlockN * Tl::kStride;
  float* sB = reinterpret_cast<float*>(sV + Tl::kBlockN * Tl::kStride);  // only with a mask

  // Blocks are numbered heaviest first under causality: the last query blocks see most keys.
  const Block<T, kD> blk(p, /*heaviest_first=*/true);
  const int64_t bh = blk.bh, b = blk.b, hk = blk.hk;
  const int row0 = blk.row0, valid_q = blk.valid_q, warp_row = blk.warp_row, lane = blk.lane;
  const int g = lane / 4, t = lane % 4;
  const MaskBase& mb = blk.mb;
  const bool masked = blk.masked;
  const T* q = blk.q;
  const T* k = blk.k;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const int64_t n_end = visible_keys(p, row0, Tl::kBlockM);
  const int n_blocks = static_cast<int>((n_end + Tl::kBlockN - 1) / Tl::kBlockN);
  // A sliding window's tiles before its left edge are skipped.
  const int nb_first = static_cast<int>(first_visible_key(p, row0) / Tl::kBlockN);
  auto rows_at = [&](int nb) {
    const int64_t left = p.S - static_cast<int64_t>(nb) * Tl::kBlockN;
    return static_cast<int>(left < Tl::kBlockN ? left : Tl::kBlockN);
  };

  DropoutParams drop = p.drop;
  if (p.dropout) drop.seed = static_cast<uint64_t>(*p.dropout_seed);
  const float keep_scale = static_cast<float>(drop.keep_scale);

  float o[Tl::kMTiles][kD8][4];
  zero(o);
  float row_max[Tl::kMTiles][2], row_sum[Tl::kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < Tl::kMTiles; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) row_max[mt][i] = -INFINITY, row_sum[mt][i] = 0.f;

  // cp.async groups in flight: [Q, K0], [V0], then per iteration [K next], [V next].
  if (n_blocks > nb_first) {
    const int64_t first = static_cast<int64_t>(nb_first) * Tl::kBlockN;
    load_tile<Tl::kBlockM, kD>(sQ, q, p.q_sr, valid_q, static_cast<int>(p.E));
    load_tile<Tl::kBlockN, kD>(sK, k + first * p.k_sr, p.k_sr, rows_at(nb_first), static_cast<int>(p.E));
    cp_async_commit();
    load_tile<Tl::kBlockN, kD>(sV, v + first * p.v_sr, p.v_sr, rows_at(nb_first), static_cast<int>(p.Ev));
    cp_async_commit();
  }
  for (int nb = nb_first; nb < n_blocks; ++nb) {
    const int col0 = nb * Tl::kBlockN;
    if (masked) stage_bias<T, kD>(p, mb, sB, row0, col0);
    cp_async_wait<1>();  // Q and this K
    __syncthreads();
    float s[Tl::kMTiles][kN8][4];
    scores_tile<T, kD>(p, blk.var, sQ, sK, sB, warp_row, lane, row0, col0, s);
    __syncthreads();  // every warp is done with sK
    if (nb + 1 < n_blocks) {
      load_tile<Tl::kBlockN, kD>(sK, k + (col0 + Tl::kBlockN) * p.k_sr, p.k_sr, rows_at(nb + 1),
                                 static_cast<int>(p.E));
      cp_async_commit();
    }

    // Online softmax, base 2. A row whose maximum is still -inf (nothing visible yet) uses 0
    // as its reference so exp2(-inf - ref) = 0 instead of NaN.
    uint32_t pa[Tl::kMTiles][kN8 / 2][4];
#pragma unroll
    for (int mt = 0; mt < Tl::kMTiles; ++mt) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = row_max[mt][i];
#pragma unroll
        for (int nt = 0; nt < kN8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * i], s[mt][nt][2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float ref = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(row_max[mt][i] - ref);
        row_max[mt][i] = mx;
        row_sum[mt][i] *= alpha;
#pragma unroll
        for (int dt = 0; dt < kD8; ++dt) o[mt][dt][2 * i] *= alpha, o[mt][dt][2 * i + 1] *= alpha;
        // Dropout counter of (row, col0 + 2t) in this (b, h)'s L x S matrix.
        const uint64_t drop_base =
            static_cast<uint64_t>((bh * p.L + row0 + warp_row + mt * 16 + g + 8 * i) * p.S) +
            col0 + 2 * t;
#pragma unroll
        for (int nt = 0; nt < kN8; ++nt) {
          float p0 = exp2f(s[mt][nt][2 * i] - ref), p1 = exp2f(s[mt][nt][2 * i + 1] - ref);
          row_sum[mt][i] += p0 + p1;
          if (p.dropout) {
            const uint64_t idx = drop_base + nt * 8;
            p0 = drop.keep(idx) ? p0 * keep_scale : 0.f;
            p1 = drop.keep(idx + 1) ? p1 * keep_scale : 0.f;
          }
          // C fragment (rows g, g+8; cols 2t, 2t+1) of n-tile nt -> A fragment of k-chunk nt/2.
          pa[mt][nt / 2][(nt % 2) * 2 + i] = pack2<T>(p0, p1);
        }
      }
    }

    if (nb + 1 < n_blocks) cp_async_wait<1>(); else cp_async_wait<0>();  // this V
    __syncthreads();
#pragma unroll
    for (int kc = 0; kc < kN8 / 2; ++kc) {
#pragma unroll
      for (int dp = 0; dp < kD8 / 2; ++dp) {
        uint32_t bv[4];
        ldsm_x4_trans(bv, sV + (kc * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * Tl::kStride +
                              dp * 16 + (lane / 16) * 8);
#pragma unroll
        for (int mt = 0; mt < Tl::kMTiles; ++mt) {
          mma<T>(o[mt][2 * dp], pa[mt][kc], bv[0], bv[1]);
          mma<T>(o[mt][2 * dp + 1], pa[mt][kc], bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with sV
    if (nb + 1 < n_blocks) {
      load_tile<Tl::kBlockN, kD>(sV, v + (col0 + Tl::kBlockN) * p.v_sr, p.v_sr, rows_at(nb + 1),
                                 static_cast<int>(p.Ev));
      cp_async_commit();
    }
  }

  // Epilogue: O / l through this warp's own rows of sQ (no other warp reads them now), then
  // 16-byte coalesced stores. Rows with l = 0 (every key masked) give 0 and lse = -inf.
  __syncwarp();
  float* lse = p.lse + bh * p.L;
#pragma unroll
  for (int mt = 0; mt < Tl::kMTiles; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float l = row_sum[mt][i];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int r = warp_row + mt * 16 + g + 8 * i;
#pragma unroll
      for (int dt = 0; dt < kD8; ++dt) {
        *reinterpret_cast<uint32_t*>(sQ + r * Tl::kStride + dt * 8 + 2 * t) =
            pack2<T>(o[mt][dt][2 * i] * inv, o[mt][dt][2 * i + 1] * inv);
      }
      if (t == 0 && r < valid_q) {
        lse[row0 + r] = l > 0.f ? (row_max[mt][i] + log2f(l)) * kLn2 : -INFINITY;
      }
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + b * p.o_sb + blk.h * p.o_sh + row0 * p.o_sr;
  constexpr int kWarpRows = 16 * Tl::kMTiles;
#pragma unroll
  for (int i = lane; i < kWarpRows * kD8; i += 32) {
    const int r = warp_row + i / kD8, c = (i % kD8) * 8;
    if (r < valid_q && c < p.Ev) {
      *reinterpret_cast<uint4*>(out + r * p.o_sr + c) =
          *reinterpret_cast<const uint4*>(sQ + r * Tl::kStride + c);
    }
  }
}

// weights[b, h, i, j] = exp(s_ij - lse_i): the forward's scores again, one key tile at a time,
// every tile written (masked ones as 0). Only Q and K pass through shared memory.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) weights_kernel(const FlashCudaParams p) {
  using Tl = Tiles<kD>;
  constexpr int kN8 = Tl::kBlockN / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Tl::kBlockM * Tl::kStride;
  float* sB = reinterpret_cast<float*>(sK + Tl::kBlockN * Tl::kStride);  // only with a mask

  const Block<T, kD> blk(p, /*heaviest_first=*/false);
  const int64_t bh = blk.bh;
  const int row0 = blk.row0, valid_q = blk.valid_q, warp_row = blk.warp_row, lane = blk.lane;
  const int g = lane / 4, t = lane % 4;
  const MaskBase& mb = blk.mb;
  const bool masked = blk.masked;
  const T* q = blk.q;
  const T* k = blk.k;
  T* w = static_cast<T*>(p.weights) + bh * p.L * p.S;
  // lse in base 2 per row; +inf for fully masked rows makes every exp2 0.
  float lse2[Tl::kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < Tl::kMTiles; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = row0 + warp_row + mt * 16 + g + 8 * i;
      const float x = row < p.L ? p.lse[bh * p.L + row] : -INFINITY;
      lse2[mt][i] = x == -INFINITY ? INFINITY : x * kLog2e;
    }

  load_tile<Tl::kBlockM, kD>(sQ, q, p.q_sr, valid_q, static_cast<int>(p.E));
  const int n_blocks = static_cast<int>((p.S + Tl::kBlockN - 1) / Tl::kBlockN);
  for (int nb = 0; nb < n_blocks; ++nb) {
    const int col0 = nb * Tl::kBlockN;
    const int64_t left = p.S - col0;
    load_tile<Tl::kBlockN, kD>(sK, k + col0 * p.k_sr, p.k_sr,
                               static_cast<int>(left < Tl::kBlockN ? left : Tl::kBlockN),
                               static_cast<int>(p.E));
    cp_async_commit();
    if (masked) stage_bias<T, kD>(p, mb, sB, row0, col0);
    cp_async_wait<0>();
    __syncthreads();
    float s[Tl::kMTiles][kN8][4];
    scores_tile<T, kD>(p, blk.var, sQ, sK, sB, warp_row, lane, row0, col0, s);
#pragma unroll
    for (int mt = 0; mt < Tl::kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kN8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = row0 + warp_row + mt * 16 + g + 8 * (e / 2);
          const int col = col0 + nt * 8 + 2 * t + (e % 2);
          if (row < p.L && col < p.S) {
            w[static_cast<int64_t>(row) * p.S + col] = from_float<T>(exp2f(s[mt][nt][e] - lse2[mt][e / 2]));
          }
        }
    __syncthreads();  // sK is reloaded next
  }
}

template <typename T, int kD>
cudaError_t launch(const FlashCudaParams& p, cudaStream_t stream, bool weights) {
  using Tl = Tiles<kD>;
  const int64_t blocks = (p.L + Tl::kBlockM - 1) / Tl::kBlockM * p.B * p.H;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto kernel = weights ? weights_kernel<T, kD> : forward_kernel<T, kD>;
  const bool masked = p.mask_kind != MaskKind::None || p.kpm_kind != MaskKind::None;
  const int smem = static_cast<int>(
      (weights ? (Tl::kBlockM + Tl::kBlockN) * Tl::kStride : Tl::kSmemElems) * sizeof(T) +
      (masked ? Tl::kBiasBytes : 0));
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Declared in flash_cuda.h; each generated translation unit instantiates one (T, kD).
template <typename T, int kD>
cudaError_t run(const FlashCudaParams& p, cudaStream_t stream, bool weights) {
  return launch<T, kD>(p, stream, weights);
}

}  // namespace fusedattn::kernels::flash_cuda
