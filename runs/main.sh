#!/usr/bin/env bash
# The main job. Sets up, then:
#   - with CUDA GPUs and the Hugging Face hub reachable: the speedrun (runs/speedrun.sh);
#   - otherwise: the offline CPU default (runs/cpu_default.sh), a tiny model end to end in 13-32 minutes
#     (2 cores; the faster figure where the CPU has avx512_bf16).
# NANOCHAT_MODE=cpu or NANOCHAT_MODE=speedrun forces one of them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
. .venv/bin/activate

mode=${NANOCHAT_MODE:-auto}
if [ "$mode" = auto ]; then
    gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if [ "$gpus" -gt 0 ] && python - <<'PY' 2>/dev/null
import sys, urllib.request
try:
    urllib.request.urlopen("https://huggingface.co/api/datasets/karpathy/fineweb-edu-100b-shuffle", timeout=5)
except Exception:
    sys.exit(1)
PY
    then
        mode=speedrun
    else
        mode=cpu
        echo "main: no CUDA GPU or no Hugging Face hub access (GPUs: $gpus): running the offline CPU default"
    fi
fi

case "$mode" in
    speedrun) exec bash runs/speedrun.sh ;;
    cpu) exec bash runs/cpu_default.sh ;;
    *) echo "main: NANOCHAT_MODE must be auto, cpu or speedrun, got '$mode'" >&2; exit 2 ;;
esac
