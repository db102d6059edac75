#!/usr/bin/env bash
# Create .venv (if missing) and install nanochat, nanochat_kernels and the test/benchmark tools into it.
# Idempotent: a second run only rebuilds what changed. Needs Python >= 3.10 and a Rust toolchain (cargo).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# One command installs both packages: nanochat (maturin builds the Rust tokenizer, release profile) and the
# top-level kernels/ folder as nanochat_kernels; [dev] brings the anchors (tiktoken, tokenizers, rustbpe) and test tools.
python -m pip install --quiet -e ".[dev]" -e ./kernels
python -c "import nanochat._rustbpe, nanochat_kernels; print('nanochat installed in', '$(pwd)/.venv')"
