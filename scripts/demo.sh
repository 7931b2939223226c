#!/usr/bin/env bash
# The main job: set up, build, and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
cd examples && $PY demo.py "$@"
