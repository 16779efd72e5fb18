#!/usr/bin/env bash
# Quick start, part two: set up, build, and run every test suite with ctest.
# GPU tests skip with a message where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j"${PQKV_JOBS:-2}"
