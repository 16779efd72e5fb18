#!/usr/bin/env bash
# Installs the Debian packages pqkv builds and tests with. Idempotent: packages
# already present are skipped, so a second run costs seconds.
#   --python   also the Python package's test dependencies (Debian's CPU torch,
#              numpy, pytest, venv and pip for /usr/bin/python3)
set -euo pipefail
pkgs=(build-essential cmake pkg-config
      libfaiss-dev libopenblas-dev libomp-dev
      librocksdb-dev liburing-dev libxxhash-dev libtbb-dev
      libgtest-dev libgmock-dev libbenchmark-dev
      libcli11-dev nlohmann-json3-dev libfmt-dev libspdlog-dev
      libpcre2-dev libsentencepiece-dev python3 python3-pip
      clang libclang-rt-14-dev llvm)  # clang, libFuzzer, llvm-symbolizer: scripts/check-sanitizers.sh
if [ "${1:-}" = "--python" ]; then
  pkgs=(python3 python3-venv python3-pip python3-numpy python3-pytest python3-torch)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -q
  $sudo_cmd apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "note: nvcc found at /usr/local/cuda/bin; the build adds it to the path itself"
fi
# The tokenizer tests' Python reference implementations.
"$(dirname "$0")/install-test-deps.sh"
