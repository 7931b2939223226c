#!/usr/bin/env bash
# The CUDA kernels under compute-sanitizer: memcheck (out-of-bounds and misaligned accesses,
# leaks) and racecheck (shared-memory hazards), over tests/python/test_cuda.py's
# test_sanitizer_cases (small calls through every code path). Needs a GPU and an installed
# fusedattn built with the kernels. torch's caching allocator is off so that memcheck sees
# each allocation's real bounds. Exits non-zero on the first error found.
#
#   bash scripts/cuda_sanitize.sh            # both tools
#   bash scripts/cuda_sanitize.sh racecheck  # one
set -euo pipefail
cd "$(dirname "$0")/../tests"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 FUSEDATTN_CUDA_KERNEL=fused
tools=("${@:-memcheck racecheck}")
for tool in ${tools[@]}; do
  echo "== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
    "${PYTHON:-python3}" -m pytest -x -q -p no:cacheprovider python/test_cuda.py -k test_sanitizer_cases
done
