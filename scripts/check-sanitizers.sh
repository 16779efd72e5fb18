#!/usr/bin/env bash
# CI, after scripts/test.sh (.ci/run calls both): the CPU test suites built
# with AddressSanitizer and UndefinedBehaviorSanitizer (preset asan,
# build-asan/), then every libFuzzer target (preset fuzz, clang, build-fuzz/)
# for a bounded time on its seed corpus in fuzz/corpus/<target>/. Any sanitizer
# report or fuzz finding fails the script; a fuzz finding is saved as
# build-fuzz/findings/<target>/crash-*. ctest prints one line per test case and
# writes build-asan/junit.xml.
#
# Usage: scripts/check-sanitizers.sh [--fuzz-seconds N] [--skip-asan] [--skip-fuzz]
#   --fuzz-seconds N   seconds each fuzz target runs (default 30, or
#                      $PQKV_FUZZ_SECONDS); the fuzz runs take about 6 x N
#   --skip-asan / --skip-fuzz   run only the other part
#                      (also PQKV_SKIP_ASAN=1 / PQKV_SKIP_FUZZ=1)
#   PQKV_JOBS          parallel build and test jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${PQKV_JOBS:-2}
fuzz_seconds=${PQKV_FUZZ_SECONDS:-30}
skip_asan=${PQKV_SKIP_ASAN:-}
skip_fuzz=${PQKV_SKIP_FUZZ:-}
while [ $# -gt 0 ]; do
  case $1 in
    --fuzz-seconds)
      [ $# -ge 2 ] || { echo "--fuzz-seconds needs a number of seconds" >&2; exit 2; }
      fuzz_seconds=$2
      shift 2
      ;;
    --fuzz-seconds=*) fuzz_seconds=${1#*=}; shift ;;
    --skip-asan) skip_asan=1; shift ;;
    --skip-fuzz) skip_fuzz=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument '$1'; see $0 --help" >&2; exit 2 ;;
  esac
done
if ! [[ $fuzz_seconds =~ ^[1-9][0-9]*$ ]]; then
  echo "--fuzz-seconds takes a positive whole number of seconds, got '$fuzz_seconds'" >&2
  exit 2
fi
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

if [ -z "$skip_asan" ]; then
  stage "asan configure" cmake --preset asan
  stage "asan build" cmake --build build-asan -j"$jobs"
  # install_consumer links an uninstrumented program against the library: not a sanitizer test.
  stage "asan tests" ctest --test-dir build-asan --output-on-failure -j"$jobs" -E install_consumer \
    --output-junit junit.xml
fi

if [ -z "$skip_fuzz" ]; then
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
