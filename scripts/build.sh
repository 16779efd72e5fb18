#!/usr/bin/env bash
# Installs what is missing, then configures and builds pqkv (Release, CPU +
# CUDA when nvcc is present) into build/. Extra arguments go to cmake's
# configure step, e.g. -DCMAKE_CUDA_ARCHITECTURES=90.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
jobs=${PQKV_JOBS:-2}
cmake --preset release "$@"
# PQKV_TARGET builds one target (scripts/bench.sh: the command only).
cmake --build build -j"$jobs" ${PQKV_TARGET:+--target "$PQKV_TARGET"}
