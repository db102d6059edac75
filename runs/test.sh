#!/usr/bin/env bash
# The README's test command: set up (idempotent), then the Rust crate's tests and the Python suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
cargo test --release --manifest-path rust/rustbpe/Cargo.toml
python -m pytest -q --durations=20 "$@"
