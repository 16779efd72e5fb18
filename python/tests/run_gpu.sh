#!/usr/bin/env bash
# Runs the Python package's tests on a GPU machine whose Python already has
# torch (CUDA) and transformers (e.g. torch 2.11, transformers 5.17): puts
# ./python (pure Python) on PYTHONPATH, installing nothing, then runs the
# quickstart and every test, the CUDA ones included. Needs numpy and pytest
# beside torch, and a built libpqkv.
#
#   python/tests/run_gpu.sh [pytest args...]
#   PQKV_PYTHON=python3  PQKV_LIBRARY=build/libpqkv.so  PQKV_BUILD_DIR=build
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PQKV_PYTHON:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
if [ -z "${PQKV_LIBRARY:-}" ]; then
  PQKV_LIBRARY=$(find "${PQKV_BUILD_DIR:-build}" -maxdepth 3 -name 'libpqkv.so' \( -type f -o -type l \) | sort | head -n 1)
fi
[ -n "$PQKV_LIBRARY" ] || { echo "run_gpu: no libpqkv.so under build/; set PQKV_LIBRARY" >&2; exit 1; }
export PQKV_LIBRARY=$(realpath "$PQKV_LIBRARY")
export PYTHONPATH="$(pwd)/python${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import torch, transformers, pqkv
print(f"torch {torch.__version__} (cuda {torch.version.cuda}, gpu: {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}, libpqkv {pqkv.library_version()} at {pqkv.library_path()}")'
repo=$(pwd)
cd "$(mktemp -d)"
status=0
"$PY" "$repo/examples/python/quickstart.py" || status=$?
"$PY" -m pytest -q -rs -p no:cacheprovider "$repo/python/tests" "$@" || status=$?
exit "$status"
