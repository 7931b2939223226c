#!/usr/bin/env bash
# The prepared GPU check, one command: builds fusedattn against this machine's own torch (CUDA
# kernels for this GPU's architecture only), then
#   1. tests/python/test_cuda.py: fusedattn's CUDA kernels (forced on) and the default route
#      (torch's SDPA for what it serves), against fp64 references;
#   2. scripts/cuda_sanitize.sh: memcheck and racecheck over the kernels' code paths;
#   3. benchmarks/bench_cuda.py: TFLOP/s of fusedattn (default route and its own kernel) against
#      SDPA's flash, cuDNN and memory-efficient backends; MultiheadAttention against torch's.
# Every log and JSON goes under $OUT (default ./gpu_check_out); the steps run on after a failure
# and the exit status is the first failure's. Sized for ten minutes on an H100.
#
# Without a CUDA GPU it checks what it can (the build, the route's tests on CPU tensors) and
# stops with a line saying so, exit status 2: nothing has run on a GPU.
#
#   bash scripts/gpu_check.sh            # bench: bf16, L 512/2k/8k/16k, head dims 64 and 128
#   FULL=1 bash scripts/gpu_check.sh     # bench: bf16 and fp16, L 512 to 16k (longer)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0
step() {  # step NAME COMMAND...: runs it, its output teed to $OUT/NAME.log
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  [ "$rc" = 0 ] || [ "$status" != 0 ] || status=$rc
  return 0
}

has_gpu=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
{
  echo "host: $(hostname); $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  [ "$has_gpu" = 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  command -v nvcc >/dev/null && nvcc --version | tail -1
} 2>&1 | tee "$OUT/summary.txt"

# The build: into a separate folder and site directory, so the machine's packages stay as they
# are. The CUDA kernels for this GPU's architecture (sm_90 on Hopper), every head-dim tile.
SITE=${SITE:-$ROOT/build-gpu/site}
arch=80
if [ "$has_gpu" = 1 ]; then
  arch=$($PY -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")
fi
build() {
  FUSEDATTN_BUILD_DIR=$ROOT/build-gpu/cmake FUSEDATTN_BUILD_TESTS=OFF \
    FUSEDATTN_CUDA_ARCHS="$arch" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    $PY -m pip install -q --no-deps --no-build-isolation --target "$SITE" --upgrade .
}
if [ "$has_gpu" = 1 ] || [ -n "${GPU_CHECK_BUILD:-}" ]; then
  step build build
else
  # No GPU: the machine's usual build (scripts/setup.sh) is the one the route tests use.
  step build bash scripts/setup.sh
  SITE=""
fi
export PYTHONPATH=${SITE:+$SITE:}${PYTHONPATH:-}
$PY -c "import fusedattn, sys; print('fusedattn from', fusedattn.__file__, '; CUDA kernels built:',
        fusedattn._C._cuda_kernels_built())" 2>&1 | tee -a "$OUT/summary.txt"

cd "$ROOT/tests"
step route_cpu $PY -m pytest python/test_route.py -q -ra -p no:cacheprovider
if [ "$has_gpu" != 1 ]; then
  echo "gpu_check: no CUDA GPU on this machine: checked the build and the route on CPU tensors;" \
       "test_cuda.py, cuda_sanitize.sh and bench_cuda.py need a GPU and did not run" | tee -a "$OUT/summary.txt"
  exit 2
fi
step test_cuda $PY -m pytest python/test_cuda.py -q -ra -p no:cacheprovider \
  --junitxml="$OUT/test_cuda.xml"
cd "$ROOT"
step sanitize bash scripts/cuda_sanitize.sh
bench_args=(--lengths 512 2048 8192 16384 --dtypes bf16 --repeats 5)
[ -n "${FULL:-}" ] && bench_args=()
step bench_cuda $PY benchmarks/bench_cuda.py --out "$OUT" "${bench_args[@]}"
cat "$OUT/summary.txt"
exit $status
