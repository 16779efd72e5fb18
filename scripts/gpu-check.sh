#!/usr/bin/env bash
# Runs every test suite, the micro-benchmarks and the end-to-end GPU
# benchmarks on a machine with a GPU, from built binaries; writes the logs to
# OUT_DIR (and OUT_DIR/logs.tar.gz) and prints a short table last.
#   scripts/gpu-check.sh BIN_DIR OUT_DIR [SHARED_DIR]
# BIN_DIR holds tests/ and tools/pqkv (a build folder). SHARED_DIR holds the
# shared fixtures (models/aidreams260K, data/haystack); the model runs are
# skipped without it. PQKV_SKIP_MICRO=1 skips the micro-benchmarks.
set -uo pipefail
bin=${1:?usage: gpu-check.sh BIN_DIR OUT_DIR [SHARED_DIR]}
out=${2:?usage: gpu-check.sh BIN_DIR OUT_DIR [SHARED_DIR]}
shared=${3:-}
logs="$out/logs"
mkdir -p "$logs"
[ -n "$shared" ] && export PQKV_SHARED_DIR="$shared"
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
  --format=csv > "$logs/gpu.txt" 2>&1
summary=()
note() { summary+=("$1"); echo "$1" >> "$logs/summary.txt"; }

for t in "$bin"/tests/*_test; do
  name=$(basename "$t")
  "$t" --gtest_brief=1 > "$logs/$name.log" 2>&1
  rc=$?
  line=$(grep -E '^\[  (PASSED|FAILED) ' "$logs/$name.log" | tr '\n' ' ')
  note "$(printf '%-16s rc=%d %s' "$name" "$rc" "$line")"
done

pqkv="$bin/tools/pqkv"
"$pqkv" bench --backend cuda --context 32768 --steps 16 --pq pqcache --pq default \
  --json "$logs/bench_cuda_32k_quality.json" > "$logs/bench_cuda_32k_quality.log" 2>&1
note "bench cuda 32K quality rc=$?"
for ctx in 32768 131072; do
  for budget in 0.1 0.05; do
    "$pqkv" bench --backend cuda --layers 32 --context $ctx --steps 4 --budget $budget \
      --no-quality --json "$logs/bench_cuda_${ctx}_${budget}.json" \
      > "$logs/bench_cuda_${ctx}_${budget}.log" 2>&1
    note "bench cuda 32 layers ctx=$ctx budget=$budget rc=$?"
  done
done

if [ -n "$shared" ]; then
  fixture="$shared/models/aidreams260K"
  "$pqkv" generate --model "$fixture" --prompt "Once upon a time" --max-new 32 --backend cuda \
    > "$logs/generate_fixture_cuda.log" 2>&1
  note "generate fixture cuda rc=$?"
  "$pqkv" needle --model "$fixture" --haystack "$shared/data/haystack/haystack.txt" \
    --lengths 512,1024 --depths 0,0.5,1 --backend cuda > "$logs/needle_fixture_cuda.log" 2>&1
  note "needle fixture cuda rc=$?"
  rm -rf /tmp/pqkv-random-model
  "$pqkv" random-model --out /tmp/pqkv-random-model --layers 2 > "$logs/random_model.log" 2>&1
  note "random-model rc=$?"
  "$pqkv" generate --model /tmp/pqkv-random-model --prompt-file "$shared/data/haystack/haystack.txt" \
    --max-new 16 --backend cuda --store-device cuda --ignore-eos --show-ids \
    > "$logs/generate_random_32k_cuda.log" 2>&1
  note "generate random 8B-geometry 32K cuda rc=$?"
fi

if [ -z "${PQKV_SKIP_MICRO:-}" ]; then
  "$pqkv" micro --benchmark_counters_tabular=true --benchmark_out="$logs/micro.json" \
    --benchmark_out_format=json > "$logs/micro.log" 2>&1
  note "micro rc=$?"
fi

tar -C "$out" -czf "$out/logs.tar.gz" logs
echo "== summary"
printf '%s\n' "${summary[@]}"
grep -hE '^(pqkv|faiss)' "$logs"/bench_cuda_*.log 2>/dev/null
tail -3 "$logs/generate_random_32k_cuda.log" 2>/dev/null
