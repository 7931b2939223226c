#!/usr/bin/env bash
# The kernels and ops under AddressSanitizer + UndefinedBehaviorSanitizer: a separate build
# (build-sanitize/, CUDA off: nvcc crashes under the preloaded sanitizer runtime) of the
# library, the Python extension and the Catch2 tests, then the Catch2 suite and the CPU kernel
# and op tests at every tier this CPU runs (and on the portable packed GEMM where the CPU has
# AVX512-BF16 without AMX). Work buffers and workspaces are exact-size allocations in this
# build (scratch.h), so an overflow reaches ASan. Run it whenever kernels change; it exits
# non-zero on the first report. Extra arguments go to pytest (e.g. -k bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/tiers.sh
PY=${PYTHON:-python3}
BUILD=${FUSEDATTN_SANITIZE_BUILD:-build-sanitize}
PKG="$PWD/$BUILD/package"
sanitize="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined"

torch_prefix=$($PY -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
generator=()
command -v ninja >/dev/null && [ ! -f "$BUILD/CMakeCache.txt" ] && generator=(-G Ninja)
cmake -S . -B "$BUILD" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_PREFIX_PATH="$torch_prefix" -DPython3_EXECUTABLE="$(command -v "$PY")" \
  -DFUSEDATTN_CUDA=OFF -DFUSEDATTN_INSTALL_PYTHON_LAYOUT=ON \
  -DCMAKE_INSTALL_PREFIX="$PKG/fusedattn" \
  -DCMAKE_CXX_FLAGS="$sanitize -fno-omit-frame-pointer" \
  -DCMAKE_SHARED_LINKER_FLAGS="$sanitize" -DCMAKE_EXE_LINKER_FLAGS="$sanitize" >/dev/null
cmake --build "$BUILD" -j "${MAX_JOBS:-$(nproc)}"
cmake --install "$BUILD" >/dev/null
cp python/fusedattn/*.py "$PKG/fusedattn/"

# Python and torch are not instrumented: the runtimes are preloaded, leaks (the interpreter's
# own) not reported.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

"$BUILD/fusedattn_tests"

cd tests
export PYTHONPATH="$PKG"
where=$($PY -c "import fusedattn, os; print(os.path.dirname(fusedattn.__file__))")
[ "$where" = "$PKG/fusedattn" ] || { echo "imported fusedattn from $where, not $PKG" >&2; exit 1; }
suite=(python/test_cpu_kernels.py python/test_attention.py python/test_variants.py
       python/test_varlen.py python/test_kv_cache.py)
tiers=$($PY -c "import fusedattn; print(' '.join(fusedattn.cpu_capabilities_supported()))")
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'); tiers: $tiers"
for tier in $tiers; do
  onednn=$(onednn_isa "$tier")
  echo "== sanitized kernel and op tests at tier $tier"
  FUSEDATTN_CPU_CAPABILITY=$tier ONEDNN_MAX_CPU_ISA=$onednn $PY -m pytest "${suite[@]}" -q -x "$@"
done
case " $tiers " in
  *" amx "*) ;;
  *" avx512_bf16 "*)
    echo "== sanitized kernel and op tests on the portable packed GEMM"
    FUSEDATTN_PACKED_GEMM=reference $PY -m pytest "${suite[@]}" -q -x "$@" ;;
esac
echo "sanitizers: clean"
