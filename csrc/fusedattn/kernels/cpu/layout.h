#pragma once
// Block sizes and the forward's packed workspace: shared by the plan (which sizes it) and
// every tier's kernels (which fill and read it). Tier-free.
#include <algorithm>
#include <cstdint>

#include "fusedattn/kernels/cpu/params.h"

namespace fusedattn::kernels::cpu::layout {

// Forward: a 64 x 512 fp32 score block is 128 KiB and stays in L2 (2 MiB per core on the
// Xeon these were measured on) next to the K/V blocks; backward keeps two 64 x 256 blocks (P
// and dP).
constexpr int64_t kFwdBlockQ = 64, kFwdBlockK = 512;
constexpr int64_t kBwdBlockQ = 64, kBwdBlockK = 256;
// Keys-as-rows backward: blocks of kBwdBlockK keys against chunks of up to kKrQ queries
// (64-query panels): dV's and dK's products then run 256 deep per load of their
// accumulators.
constexpr int64_t kKrQ = 256;
// Decode: key blocks of 256 against the task's few query rows (heads of a group x new
// tokens); the split ranges are whole blocks.
constexpr int64_t kDecodeBlockK = 256;

// n rounded up to whole 64-column panels of the packed layout.
constexpr int64_t round64(int64_t n) { return (n + 63) / 64 * 64; }

inline int64_t q_blocks(const FlashParams& p) { return (p.L + kFwdBlockQ - 1) / kFwdBlockQ; }
inline int64_t key_blocks(const FlashParams& p) { return (p.S + kFwdBlockK - 1) / kFwdBlockK; }

// Packed workspace: per (b, hk, key block jb) a slot of packed_slot(p) elements.
// Keys a slot is sized for: a whole block, or all S keys rounded up to 64 when fewer (a
// multiple of 64 either way, so packed panels fit). Sized for 512 keys at S = 128, the
// workspace was 4x too large, 32 MiB of fresh pages a call at B=32, H=8: their first-touch
// faults (clear_page) took 15% of a bf16 forward with weights (perf).
inline int64_t slot_keys(const FlashParams& p) { return std::min(kFwdBlockK, round64(p.S)); }
// fp32 on p.fgemm: the slot holds K^T (E x bk, row stride slot_ld_kt, 16 floats more than the
// block: at a power-of-two stride the product's B rows would share L1 sets).
inline int64_t slot_ld_kt(const FlashParams& p) { return slot_keys(p) + 16; }
// Keys-as-rows: the slot holds V^T (Ev x bkp, row stride slot_ld_vt; column bk zero when bk is
// odd), the A operand of O^T += V^T P^T; a cache line more than the block.
inline int64_t slot_ld_vt(const FlashParams& p) { return slot_keys(p) + 32; }
// Query rows on packed half types: K^T packed (E x bk) first, then V packed (bkp x Ev, bkp =
// bk rounded up to even, a zero row appended: the packed layout pairs rows along the
// product's depth). A packed k x n matrix takes up to k * round_up(n, 64) elements.
// Half types on fp32 products (p.half_on_f32): K's rows widened to fp32 (bk x E; on p.fgemm
// K^T, E x bk at row stride slot_ld_kt), then V's rows (bk x Ev), counted in elements of the
// input type (two per float).
inline int64_t wide_k_floats(const FlashParams& p) {
  return p.fgemm ? p.E * slot_ld_kt(p) : slot_keys(p) * p.E;
}
inline int64_t packed_slot(const FlashParams& p) {
  // fp32 on bf16 products: the half types' packed K^T and V in bf16, counted in floats (a
  // multiple of 64 bf16 values: the slots stay cache-line aligned).
  if (p.bf16_products) return slot_keys(p) * (p.E + round64(p.Ev)) / 2;
  if (p.half_on_f32) return 2 * (wide_k_floats(p) + slot_keys(p) * p.Ev);
  if (p.fgemm) return p.E * slot_ld_kt(p);
  if (p.forward_path == ForwardPath::KeysAsRows) return p.Ev * slot_ld_vt(p);
  return slot_keys(p) * (p.E + round64(p.Ev));
}
inline int64_t pack_tasks(const FlashParams& p) { return p.B * p.Hk * key_blocks(p); }
// fp32 query rows on p.fgemm: no pack tasks; each thread transposes a (b, kv head)'s K blocks
// into its own packed_slot(p)-sized slots when its tasks first reach them (Forward::kt_block),
// where they stay in L2 for the head's other query blocks. The call-wide K^T workspace made
// every K element cross memory three times (read, written, read back): the pack was 4% of
// an fp32 causal forward at L = 1024 (perf, AMD EPYC). The weights paths keep the pack tasks
// (the head-averaged one visits every head per task).
inline bool kt_in_tasks(const FlashParams& p) {
  return p.dtype == DType::Float && p.fgemm != nullptr && !p.bf16_products &&
         p.forward_path == ForwardPath::QueryRows;
}

// Keys-as-rows backward: Lp = L rounded up to 64; K^T's row stride; fp32: the row stride of
// Q^T, dO^T and dQ^T, 16 floats more than Lp (at Lp = 1024, a 4 KiB stride put the products'
// B rows into the same L1 sets: 146 ms, 120 with the + 16).
inline int64_t l_pad(const FlashParams& p) { return round64(p.L); }
inline int64_t ld_kt(const FlashParams& p) { return (p.S + 1) / 2 * 2 + 32; }
inline int64_t ld_qt(const FlashParams& p) { return l_pad(p) + 16; }

}  // namespace fusedattn::kernels::cpu::layout
