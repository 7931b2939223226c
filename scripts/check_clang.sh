#!/usr/bin/env bash
# Compiles the torch-free CPU kernel sources with Clang at every tier (syntax and warnings,
# no objects), so that a Clang build cannot break unseen. Skipped, with a note, where no
# clang++ is installed (scripts/setup.sh installs it on Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${CLANGXX:-clang++}
if ! command -v "$CXX" >/dev/null; then
  echo "check_clang: no $CXX, skipped"
  exit 0
fi
avx2="-mavx2 -mfma -mf16c"
avx512="$avx2 -mavx512f -mavx512dq -mavx512bw -mavx512vl"
declare -A flags=([scalar]="" [avx2]="$avx2" [avx512]="$avx512" [avx512_bf16]="$avx512 -mavx512bf16")
for tier in scalar avx2 avx512 avx512_bf16; do
  for src in csrc/fusedattn/kernels/cpu/*.cpp; do
    case $src in */capability.cpp|*/plan.cpp) [ "$tier" = scalar ] || continue ;; esac
    # shellcheck disable=SC2086
    "$CXX" -std=c++17 -O2 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -Werror -Icsrc \
      -DFUSEDATTN_TIER="$tier" ${flags[$tier]} "$src"
  done
done
echo "check_clang: $("$CXX" --version | head -1): kernel sources compile at every tier"
