#!/usr/bin/env bash
# All tests: the Catch2 suite (through CTest) and pytest at the CPU's own tier, then the CPU
# kernel tests again at every lower instruction-set tier this CPU runs, each in its own
# process (FUSEDATTN_CPU_CAPABILITY, with oneDNN capped to match), so that an
# AVX-512/AMX machine also tests the avx2 and scalar code. Exits non-zero if any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/tiers.sh
bash scripts/setup.sh
PY=${PYTHON:-python3}
bash scripts/check_clang.sh
ctest --test-dir build --output-on-failure -j2
# Run from tests/ so that the installed package is imported, not the source folder.
cd tests
top=$($PY -c "import fusedattn; print(fusedattn.cpu_capability())")
tiers=$($PY -c "import fusedattn; print(' '.join(fusedattn.cpu_capabilities_supported()))")
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'); tiers: $tiers"
for tier in $tiers; do
  [ "$tier" = "$top" ] && continue
  onednn=$(onednn_isa "$tier")
  # ATen keeps its own tier: the references are torch's, and torch.compile's generated code
  # does not build under ATEN_CPU_CAPABILITY=default with -march=native (torch 2.15).
  echo "== CPU kernel tests at tier $tier (ONEDNN_MAX_CPU_ISA=$onednn)"
  FUSEDATTN_CPU_CAPABILITY=$tier ONEDNN_MAX_CPU_ISA=$onednn \
    $PY -m pytest python/test_cpu_kernels.py python/test_attention.py \
    python/test_multihead_attention.py python/test_capability.py python/test_variants.py python/test_varlen.py \
    python/test_kv_cache.py python/test_kv_cache_storage.py -q -ra
done
# The AMX paths' own code (keys as rows, the packed forward) on the portable implementation of
# the packed layout (FUSEDATTN_PACKED_GEMM=reference), where the CPU runs avx512_bf16 but has
# no AMX; on an AMX CPU the suite below runs that code on oneDNN's kernels.
case " $tiers " in
  *" amx "*) ;;
  *" avx512_bf16 "*)
    echo "== CPU kernel tests on the portable packed GEMM (no AMX here)"
    FUSEDATTN_PACKED_GEMM=reference $PY -m pytest python/test_cpu_kernels.py python/test_attention.py \
      python/test_variants.py python/test_varlen.py -q -ra ;;
esac
# torch's route (the default for CUDA tensors) on CPU tensors: the op, module, variant, packed
# and decoding tests again with every call torch's SDPA serves sent to it.
echo "== op, module and variant tests through torch's route (FUSEDATTN_ROUTE=torch)"
FUSEDATTN_ROUTE=torch $PY -m pytest python/test_attention.py python/test_multihead_attention.py \
  python/test_variants.py python/test_varlen.py python/test_kv_cache.py \
  python/test_kv_cache_storage.py python/test_route.py -q -ra
echo "== all tests at tier $top"
$PY -m pytest python -q -ra "$@"
