#!/usr/bin/env bash
# Installs the Python packages the tokenizer tests compare pqkv with: the
# reference implementations of Hugging Face tokenizers and SentencePiece.
# Idempotent: does nothing when both import.
set -euo pipefail
python="${PYTHON:-python3}"
if "$python" -c "import tokenizers, sentencepiece" 2>/dev/null; then
  exit 0
fi
echo "installing the Python packages tokenizers and sentencepiece (--user)"
flags=(--user --quiet)
# Debian 12's python3 refuses pip installs outside a venv (PEP 668) unless told;
# --user keeps these two out of the system's site-packages all the same.
if "$python" -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
  flags+=(--break-system-packages)
fi
"$python" -m pip install "${flags[@]}" tokenizers sentencepiece
