#!/usr/bin/env bash
# Runs every test suite and the GPU benchmarks on a machine with a GPU, from
# built binaries, and writes the logs to OUT_DIR; prints a short table last.
#   scripts/gpu-check.sh BIN_DIR OUT_DIR [quick]
# BIN_DIR holds tests/ and tools/pqkv (a build folder). `quick` skips the long
# end-to-end runs.
set -uo pipefail
bin=${1:?usage: gpu-check.sh BIN_DIR OUT_DIR [quick]}
out=${2:?usage: gpu-check.sh BIN_DIR OUT_DIR [quick]}
mode=${3:-full}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
  --format=csv > "$out/gpu.txt" 2>&1
summary=()
for t in "$bin"/tests/*_test; do
  name=$(basename "$t")
  "$t" --gtest_brief=1 > "$out/$name.log" 2>&1
  rc=$?
  line=$(grep -E '^\[  (PASSED|FAILED) ' "$out/$name.log" | tr '\n' ' ')
  skipped=$(grep -cE '^\[  SKIPPED \] [A-Za-z]' "$out/$name.log")
  summary+=("$(printf '%-16s rc=%d %s skipped=%s' "$name" "$rc" "$line" "$skipped")")
done
pqkv="$bin/tools/pqkv"
"$pqkv" micro --benchmark_counters_tabular=true --benchmark_out="$out/micro.json" \
  --benchmark_out_format=json > "$out/micro.log" 2>&1
summary+=("micro rc=$?")
"$pqkv" bench --backend cuda --context 32768 --steps 16 --pq pqcache --pq default \
  > "$out/bench_cuda_32k.log" 2>&1
summary+=("bench cuda 32K quality rc=$?")
if [ "$mode" = full ]; then
  for ctx in 32768 131072; do
    for budget in 0.1 0.05; do
      "$pqkv" bench --backend cuda --layers 32 --context $ctx --steps 4 --budget $budget \
        --no-quality --json "$out/bench_cuda_${ctx}_${budget}.json" \
        > "$out/bench_cuda_${ctx}_${budget}.log" 2>&1
      summary+=("bench cuda 32 layers ctx=$ctx budget=$budget rc=$?")
    done
  done
fi
echo "== summary"
printf '%s\n' "${summary[@]}"
grep -hE '^(pqkv|faiss)' "$out"/bench_cuda_*.log 2>/dev/null
