#!/usr/bin/env bash
# Everything a fresh machine of this kind (Debian 12, Python 3 with pip) needs, then the build.
# Idempotent: what is already there is not installed again; the CMake build is incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -f /usr/lib/cmake/Catch2/Catch2Config.cmake ] || [ -f /usr/share/cmake/Catch2/Catch2Config.cmake ] || need_apt+=(catch2)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v ninja >/dev/null || need_apt+=(ninja-build)
command -v ccache >/dev/null || need_apt+=(ccache)
command -v g++ >/dev/null || need_apt+=(g++)
command -v clang++ >/dev/null || need_apt+=(clang)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch>=2.11"
fi
# matplotlib: the Nadaraya-Watson example's plot and the benchmark's PNG.
$PY -c "import pytest, numpy, matplotlib" 2>/dev/null || $PY -m pip install -q pytest numpy matplotlib
$PY -c "import setuptools, wheel" 2>/dev/null || $PY -m pip install -q setuptools wheel
# transformers: the optional Hugging Face backend (fusedattn.transformers), tested in CI; the
# range is the one its tests ran against. tqdm: the examples' and benchmarks' progress bars.
$PY -c "import transformers, tqdm, sys; v = tuple(map(int, transformers.__version__.split('.')[:1])); sys.exit(v != (5,))" 2>/dev/null \
  || $PY -m pip install -q "transformers>=5.0,<6" tqdm

# Builds libfusedattn, fusedattn._C and the Catch2 tests in ./build, installs the package.
$PY -m pip install -q --no-build-isolation --no-deps .
