#!/usr/bin/env bash
# Create .venv (if missing) and install exactly uv.lock into it, then nanochat and nanochat_kernels (editable, no
# dependencies, no build isolation: maturin and setuptools come from the lock too). Nothing is resolved against the
# index: a fresh machine gets the same versions, with the same hashes, on any day. Idempotent.
# Needs Python >= 3.10 and a Rust toolchain (cargo). runs/lock.sh refreshes the lock on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
UV_VERSION=$(sed -n 's/^uv==\([0-9.]*\).*/\1/p' runs/uv.requirements.txt)
if [ "$(.uv/bin/uv --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    # uv goes into .uv/ (a plain --target folder), hash-checked; the system Python gets nothing
    rm -rf .uv
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --require-hashes --target .uv \
        -r runs/uv.requirements.txt
fi
UV=.uv/bin/uv
export UV_NO_PROGRESS=1 UV_PROJECT_ENVIRONMENT="$PWD/.venv"
# --locked: fail (instead of re-resolving) if pyproject.toml and uv.lock disagree; exact: anything not in the lock goes
"$UV" sync --quiet --locked --extra dev --no-install-project --python "$PYTHON"
"$UV" pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation -e . -e ./kernels
.venv/bin/python -c "import nanochat._rustbpe, nanochat_kernels; print('nanochat installed in', '$(pwd)/.venv')"
