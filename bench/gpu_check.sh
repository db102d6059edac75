#!/usr/bin/env bash
# The one GPU check of nanochat's kernels: bf16 parity tests at real shapes (pytest -m gpu; full-causal and
# sliding-window attention, decode, Newton-Schulz, fused loss), bench/kernels.py (its rows include the windowed
# attention and decode) and bench/fused_loss.py (the fused loss against the materialized logits at d20, B=32,
# T=2048), then a summary. Written for one H100 (python3 with torch, triton and pytest; no network); it needs no install:
# when `nanochat_kernels` does not import, kernels/ and python/ go on PYTHONPATH. Without CUDA it runs the CPU
# smoke path instead (interpreter parity tests of the dispatch, bench in smoke mode), so it can be checked anywhere.
#
#   bash bench/gpu_check.sh [OUT_DIR]          # logs and bench JSON go to OUT_DIR (default: $OUT, else a temp dir)
#   bash bench/gpu_check.sh --sweep [OUT_DIR]  # tuning aid instead: time candidate block sizes of each kernel
#   bash bench/gpu_check.sh --decode [OUT_DIR] # instead: decode MBU per weight format (bench/decode_bandwidth.py)
#                                              # plus the int8/bf16 parity tests (tests/test_quantize.py)
#
# Budget: fits one 10-minute device command (tests <= 200 s, kernels bench <= 270 s, fused loss bench <= 120 s;
# the sweep <= 420 s; all capped by `timeout`).
set -uo pipefail

MODE=check
if [ "${1:-}" = "--sweep" ]; then MODE=sweep; shift; fi
if [ "${1:-}" = "--decode" ]; then MODE=decode; shift; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT_DIR="${1:-${OUT:-$(mktemp -d)}}"
mkdir -p "$OUT_DIR"
if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY="${PYTHON:-python3}"; fi
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET NANOCHAT_KERNELS

if ! "$PY" -c "import nanochat_kernels" 2>/dev/null; then
    export PYTHONPATH="$REPO/kernels:$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== nanochat gpu_check  $(date -u '+%Y-%m-%d %H:%M UTC')  commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
"$PY" - <<'EOF'
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as exc:
    tv = f"missing ({exc})"
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {tv}  device: {dev}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
status=0
if [ "$MODE" = "sweep" ]; then
    [ "$HAS_CUDA" = "1" ] || echo "== no CUDA: the sweep runs in smoke mode (interpreter; configs have no effect)"
    timeout 420 "$PY" bench/kernels.py --sweep --json "$OUT_DIR/sweep.json" 2>&1 | tee "$OUT_DIR/sweep.txt" || status=1
    if [ "$status" -ne 0 ]; then echo "gpu_check --sweep: FAILED"; else echo "gpu_check --sweep: OK"; fi
    exit "$status"
fi
if [ "$MODE" = "decode" ]; then
    # d20 and d32 in fp32 / bf16 / int8 at batch 1, 4, 16 (CUDA graphs, as the engine decodes), then the weight-format
    # tests; <= 420 s. Without CUDA: the smoke path (a d2 model on CPU, seconds).
    if [ "$HAS_CUDA" = "1" ]; then
        timeout 360 "$PY" bench/decode_bandwidth.py --device cuda --shapes d20,d32 --hf off --repeats 10 \
            --json "$OUT_DIR/decode.json" 2>&1 | tee "$OUT_DIR/decode.txt" || status=1
    else
        echo "== no CUDA: decode bench smoke (d2 on CPU)"
        timeout 120 "$PY" bench/decode_bandwidth.py --shapes d2 --batches 1 --context 32 --repeats 1 --hf off \
            --json "$OUT_DIR/decode.json" 2>&1 | tee "$OUT_DIR/decode.txt" || status=1
    fi
    timeout 60 "$PY" -m pytest tests/test_quantize.py -q -p no:cacheprovider -o addopts="" \
        -k "linear or convert or cuda" 2>&1 | tee "$OUT_DIR/quantize_tests.log" || status=1
    if [ "$status" -ne 0 ]; then echo "gpu_check --decode: FAILED"; else echo "gpu_check --decode: OK"; fi
    exit "$status"
fi
if [ "$HAS_CUDA" = "1" ]; then
    echo "== parity tests, bf16 at real shapes (pytest -m gpu)"
    timeout 200 "$PY" -m pytest tests/test_kernels.py tests/test_kernels_gpu.py tests/test_fused_loss.py -m gpu -q -p no:cacheprovider \
        -o addopts="" -rfEs 2>&1 | tee "$OUT_DIR/gpu_tests.log" || status=1
    echo "== bench/kernels.py"
    timeout 270 "$PY" bench/kernels.py --json "$OUT_DIR/bench.json" 2>&1 | tee "$OUT_DIR/bench.txt" || status=1
    echo "== bench/fused_loss.py (d20 loss: N=32x2048, D=1280, V=65536, bf16 autocast)"
    timeout 120 "$PY" bench/fused_loss.py --json "$OUT_DIR/fused_loss.json" 2>&1 | tee "$OUT_DIR/fused_loss.txt" \
        || status=1
else
    echo "== no CUDA: CPU smoke path (dispatch tests + bench smoke mode in the Triton interpreter)"
    timeout 240 "$PY" -m pytest tests/test_kernels.py -q -p no:cacheprovider -o addopts="" \
        -k "dispatch or choose_num_splits or window_public or test_interpreter_group and attention" 2>&1 \
        | tee "$OUT_DIR/cpu_tests.log" || status=1
    timeout 300 "$PY" bench/kernels.py --smoke --json "$OUT_DIR/bench.json" 2>&1 | tee "$OUT_DIR/bench.txt" || status=1
    timeout 120 "$PY" bench/fused_loss.py --device cpu --rows 512 --dim 64 --vocab 4096 --reps 1 \
        --json "$OUT_DIR/fused_loss.json" 2>&1 | tee "$OUT_DIR/fused_loss.txt" || status=1
fi

echo "== summary"
tests_log="$OUT_DIR/gpu_tests.log"; [ "$HAS_CUDA" = "1" ] || tests_log="$OUT_DIR/cpu_tests.log"
echo "tests: $(grep -E '[0-9]+ (passed|failed|error)' "$tests_log" | tail -n 1)"
grep -E '^(attention|decode|Newton|MuonAdamW)' "$OUT_DIR/bench.txt" || echo "bench: no rows (see $OUT_DIR/bench.txt)"
grep -E '^fused vs' "$OUT_DIR/fused_loss.txt" || echo "fused loss: no rows (see $OUT_DIR/fused_loss.txt)"
echo "logs and bench JSON in $OUT_DIR"
if [ "$status" -ne 0 ]; then echo "gpu_check: FAILED (see the logs above)"; else echo "gpu_check: OK"; fi
exit "$status"
