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
"$python" -m pip install --user --quiet tokenizers sentencepiece ||
  "$python" -m pip install --user --quiet --break-system-packages tokenizers sentencepiece
