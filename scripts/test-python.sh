#!/usr/bin/env bash
# Tests of the Python package (python/) against build/'s libpqkv: installs
# Debian's CPU torch, numpy and pytest for /usr/bin/python3, makes a venv that
# sees them (build/python-venv) with a pinned transformers, installs ./python
# into it, then runs examples/python/quickstart.py and pytest python/tests.
#
#   PQKV_PYTHON    interpreter (default /usr/bin/python3: Debian's python3-torch
#                  is built for it; a pyenv python3 earlier on PATH would not see it)
#   PQKV_LIBRARY   libpqkv to test (default: the libpqkv.so found under build/)
#   PQKV_BUILD_DIR where to look for it (default build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PQKV_PYTHON:-/usr/bin/python3}
BUILD_DIR=${PQKV_BUILD_DIR:-build}
# The last transformers release that runs on Debian 12's torch 1.13 (4.50 needs
# torch.distributed.tensor, torch >= 2). The code also runs on transformers 5.x.
TRANSFORMERS_VERSION=4.49.0
start=$(date +%s)

bash scripts/install-deps.sh --python

if [ -z "${PQKV_LIBRARY:-}" ]; then
  PQKV_LIBRARY=$(find "$BUILD_DIR" -maxdepth 3 -name 'libpqkv.so' \( -type f -o -type l \) | sort | head -n 1)
  if [ -z "$PQKV_LIBRARY" ]; then
    echo "test-python: no libpqkv.so under $BUILD_DIR/; build it first (bash scripts/build.sh)" >&2
    exit 1
  fi
fi
PQKV_LIBRARY=$(realpath "$PQKV_LIBRARY")
export PQKV_LIBRARY
echo "test-python: $PY ($("$PY" --version 2>&1)), libpqkv $PQKV_LIBRARY"

venv="$BUILD_DIR/python-venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "test-python: making the venv $venv (it sees Debian's torch and numpy)"
  "$PY" -m venv --system-site-packages "$venv"
fi
vpy="$(realpath "$venv")/bin/python"
if ! "$vpy" -c "import transformers, sys; sys.exit(transformers.__version__ != '$TRANSFORMERS_VERSION')" 2>/dev/null; then
  # The first run downloads transformers and its dependencies from PyPI: minutes on a slow link.
  echo "test-python: pip install transformers==$TRANSFORMERS_VERSION into $venv (downloads it the first time)"
fi
"$vpy" -m pip install -q --disable-pip-version-check "transformers==$TRANSFORMERS_VERSION"
"$vpy" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps ./python
"$vpy" -c 'import numpy, torch, transformers, pqkv
print(f"numpy {numpy.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, pqkv {pqkv.__version__}")'

# From outside the source tree, so that the installed package is the one tested.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
repo=$(pwd)
(cd "$tmp" && "$vpy" "$repo/examples/python/quickstart.py")

set +e
(cd "$tmp" && "$vpy" -m pytest -q -rs -p no:cacheprovider "$repo/python/tests") | tee "$tmp/pytest.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -eq 5 ] || { [ "$rc" -eq 0 ] && ! grep -Eq '[0-9]+ passed' "$tmp/pytest.log"; }; then
  echo "test-python: pytest ran no test (exit $rc): the Python tests did not run" >&2
  exit 1
fi
echo "test-python: done in $(( $(date +%s) - start )) s"
exit "$rc"
