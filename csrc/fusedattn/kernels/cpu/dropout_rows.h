#pragma once
// Dropout on rows of probabilities, from the counter-based generator every backend shares
// (kernels/common/dropout.h): element index ((b * H + h) * L + i) * S + j, as the reference, so the
// backward regenerates the forward's mask.
#include <cstdint>

#include "fusedattn/kernels/cpu/params.h"
#include "fusedattn/kernels/cpu/tier.h"

FUSEDATTN_TIER_NS_BEGIN

// Kept probabilities scaled by 1 / (1 - p), the others 0: row of query i, keys j0 .. j0 + bk.
template <typename A>
void drop_row(const FlashParams& p, A* row, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t bk) {
  const uint64_t base = uint64_t(((b * p.H + h) * p.L + i) * p.S + j0);
  const A ks = A(p.drop.keep_scale);
  for (int64_t c = 0; c < bk; ++c) row[c] = p.drop.keep(base + uint64_t(c)) ? row[c] * ks : A(0);
}

FUSEDATTN_TIER_NS_END
