#!/usr/bin/env bash
# Installs the Debian packages pqkv builds and tests with. Idempotent: packages
# already present are skipped, so a second run costs seconds.
set -euo pipefail
pkgs=(build-essential cmake pkg-config
      libfaiss-dev libopenblas-dev libomp-dev
      librocksdb-dev liburing-dev libxxhash-dev libtbb-dev
      libgtest-dev libgmock-dev libbenchmark-dev
      libcli11-dev nlohmann-json3-dev libfmt-dev libspdlog-dev
      clang libclang-rt-14-dev llvm)  # fuzz targets (libFuzzer) and symbolized sanitizer reports
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
