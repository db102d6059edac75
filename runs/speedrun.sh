#!/usr/bin/env bash
# The speedrun: the full pipeline on one node of GPUs with internet (8 x H100 80GB in about 4 hours).
#   tokenizer on ~2B characters of FineWeb-Edu -> depth-20 pretraining (tokens = 20 x params) -> midtraining ->
#   SFT -> optional RL (RUN_RL=1) -> every evaluation -> report card.
# Resumable stage by stage: rerunning it skips completed stages and training stages resume from their last
# checkpoint. Knobs (environment): DEPTH (20), NUM_SHARDS (240), RUN_RL (0), DEVICE_BATCH_SIZE (auto from memory),
# GPU_HOUR_PRICE (3.0 USD).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
. runs/lib.sh
export OMP_NUM_THREADS=1

DEPTH=${DEPTH:-20}
NUM_SHARDS=${NUM_SHARDS:-240}   # ~250M characters each; d20 needs ~11B tokens ≈ 54B characters ≈ 220 shards
RUN_RL=${RUN_RL:-0}
GPU_HOUR_PRICE=${GPU_HOUR_PRICE:-3.0}

# -- hardware check: GPU count and memory decide the per-GPU batch (the total batch stays 524,288 tokens; gradient
#    accumulation makes up the difference), so a smaller card gets a smaller batch instead of running out of memory.
read -r NGPU MEM_GB < <(python - <<'PY'
import torch
n = torch.cuda.device_count()
mem = min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / 2**30 if n else 0
print(n, int(mem))
PY
)
if [ "$NGPU" -lt 1 ]; then echo "speedrun: no CUDA GPU found; run runs/cpu_default.sh instead" >&2; exit 1; fi
if [ -z "${DEVICE_BATCH_SIZE:-}" ]; then
    # depth 20 at T=2048 in bf16 needs ~70 GB at batch 32; activations scale linearly with the batch
    if   [ "$MEM_GB" -ge 75 ]; then DEVICE_BATCH_SIZE=32
    elif [ "$MEM_GB" -ge 38 ]; then DEVICE_BATCH_SIZE=16
    elif [ "$MEM_GB" -ge 20 ]; then DEVICE_BATCH_SIZE=8
    else DEVICE_BATCH_SIZE=4; fi
fi
# 524,288 tokens per step must be a multiple of batch x 2048 x GPUs
while [ $((524288 % (DEVICE_BATCH_SIZE * 2048 * NGPU))) -ne 0 ] && [ "$DEVICE_BATCH_SIZE" -gt 1 ]; do
    DEVICE_BATCH_SIZE=$((DEVICE_BATCH_SIZE / 2))
done

# -- estimate before starting: FLOPs of the pretraining at 45% MFU on H100-class bf16 peak (989 TFLOP/s), plus about
#    30% for tokenizer, midtraining, SFT and evaluations.
python - "$DEPTH" "$NGPU" "$GPU_HOUR_PRICE" <<'PY'
import sys
from nanochat.gpt import GPT, GPTConfig
import torch
depth, ngpu, price = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
with torch.device("meta"):
    model = GPT(GPTConfig.from_depth(depth))
params = model.num_params()
tokens = 20 * params
flops = model.estimate_flops() * tokens
hours = flops / (0.45 * 989e12 * ngpu) / 3600 * 1.3
print(f"speedrun: depth {depth}, {params / 1e6:.0f}M parameters, {tokens / 1e9:.1f}B training tokens, "
      f"{flops:.2e} FLOPs")
print(f"speedrun: estimate {hours:.1f} h on {ngpu} GPU(s), about ${hours * ngpu * price:.0f} at ${price}/GPU-hour")
PY
echo "speedrun: $NGPU GPU(s) with ${MEM_GB} GiB each -> device batch size $DEVICE_BATCH_SIZE"

TR="torchrun --standalone --nproc_per_node=$NGPU"
[ -f "$STAGE_DIR/start.done" ] || { nanochat report --start && touch "$STAGE_DIR/start.done"; }

stage data-tok  nanochat data download -n 8
# the rest of the shards download in the background while the tokenizer trains
nanochat data download -n "$NUM_SHARDS" > "$NANOCHAT_BASE_DIR/report/download.log" 2>&1 &
DOWNLOAD_PID=$!
stage evaldata  nanochat data evals
stage tokenizer nanochat tok-train --max-chars 2000000000
stage tok-eval  nanochat tok-eval
wait "$DOWNLOAD_PID" || { echo "speedrun: shard download failed, see $NANOCHAT_BASE_DIR/report/download.log" >&2; exit 1; }

stage base      $TR -m nanochat.base_train -- --depth "$DEPTH" --device-batch-size "$DEVICE_BATCH_SIZE" \
                    --save-every 1000 --keep-last 2 --resume
stage base-eval $TR -m nanochat.base_eval -- --eval bpb,samples,core
stage mid       $TR -m nanochat.mid_train -- --device-batch-size "$DEVICE_BATCH_SIZE" --resume
stage mid-eval  $TR -m nanochat.chat_eval -- --source mid
stage sft       $TR -m nanochat.chat_sft -- --resume
stage sft-eval  $TR -m nanochat.chat_eval -- --source sft
if [ "$RUN_RL" = 1 ]; then
    stage rl      $TR -m nanochat.chat_rl -- --resume
    stage rl-eval $TR -m nanochat.chat_eval -- --source rl --tasks GSM8K
fi
nanochat report --price-per-hour "$(python -c "print($GPU_HOUR_PRICE * $NGPU)")"
cat <<MSG

Done. The report card is $NANOCHAT_BASE_DIR/report/report.md. Talk to the model:
    nanochat chat                      # terminal
    nanochat serve --host 0.0.0.0      # browser at http://<this machine>:8000 (one replica per GPU)
MSG
