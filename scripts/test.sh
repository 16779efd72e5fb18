#!/usr/bin/env bash
# Quick start, part two: set up, build, and run every test suite with ctest,
# then the Python package's tests (scripts/test-python.sh). ctest prints one
# line per test case and writes a JUnit report to build/junit.xml.
# GPU tests skip with a message where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j"${PQKV_JOBS:-2}" --output-junit junit.xml
bash scripts/test-python.sh
