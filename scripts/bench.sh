#!/usr/bin/env bash
# Quick start, part one: set up, build, and run the default benchmark
# (Llama-3.1-8B geometry, 32K tokens, 10% budget, on the CPU). Arguments are
# passed to `pqkv bench`, e.g. `scripts/bench.sh --context 65536 --json out.json`.
set -euo pipefail
cd "$(dirname "$0")/.."
PQKV_TARGET=pqkv_cli bash scripts/build.sh
exec ./build/tools/pqkv bench "$@"
