#!/usr/bin/env bash
# All tests: the Catch2 suite (through CTest) and pytest. Exits non-zero if any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
ctest --test-dir build --output-on-failure -j2
# Run from tests/ so that the installed package is imported, not the source folder.
(cd tests && $PY -m pytest python -q -ra "$@")
