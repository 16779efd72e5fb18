#!/usr/bin/env bash
# CI, after scripts/test.sh: the CPU test suites built with AddressSanitizer
# and UndefinedBehaviorSanitizer (preset asan, build-asan/), then every
# libFuzzer target (preset fuzz, clang, build-fuzz/) for a bounded time on its
# seed corpus in fuzz/corpus/<target>/. Any sanitizer report or fuzz finding
# fails the script; a fuzz finding is saved as build-fuzz/findings/<target>/crash-*.
#   PQKV_FUZZ_SECONDS  seconds per fuzz target (default 30)
#   PQKV_JOBS          parallel build and test jobs (default 2)
#   PQKV_SKIP_ASAN=1 / PQKV_SKIP_FUZZ=1 run only the other part
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${PQKV_JOBS:-2}
fuzz_seconds=${PQKV_FUZZ_SECONDS:-30}
bash scripts/install-deps.sh

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/scripts/lsan.supp:print_suppressions=0}

timings=()
stage() {  # stage NAME COMMAND...: runs it and records how long it took
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@"
  timings+=("$(printf '%-28s %5d s' "$name" $((SECONDS - start)))")
}

if [ -z "${PQKV_SKIP_ASAN:-}" ]; then
  stage "asan configure" cmake --preset asan
  stage "asan build" cmake --build build-asan -j"$jobs"
  # install_consumer links an uninstrumented program against the library: not a sanitizer test.
  stage "asan tests" ctest --test-dir build-asan --output-on-failure -j"$jobs" -E install_consumer
fi

if [ -z "${PQKV_SKIP_FUZZ:-}" ]; then
  stage "fuzz configure" cmake --preset fuzz
  stage "fuzz build" cmake --build build-fuzz -j"$jobs"
  run_fuzzers() {
    local bin target work findings
    for bin in build-fuzz/fuzz/*_fuzz; do
      target=$(basename "$bin")
      work=build-fuzz/corpus/$target  # new inputs go here; the seeds stay untouched
      findings=build-fuzz/findings/$target
      mkdir -p "$work" "$findings"
      echo "-- $target (${fuzz_seconds}s)"
      if ! "$bin" -max_total_time="$fuzz_seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$findings/" "$work" "fuzz/corpus/$target" \
        > "build-fuzz/$target.log" 2>&1; then
        tail -n 60 "build-fuzz/$target.log"
        echo "$target found a failure: the input is in $findings/"
        return 1
      fi
      grep -E '^(stat::number_of_executed_units|stat::new_units_added|Done )' "build-fuzz/$target.log" || true
    done
  }
  stage "fuzz runs" run_fuzzers
fi

echo "== sanitizer and fuzz timings"
printf '%s\n' "${timings[@]}"
