#!/usr/bin/env bash
# The speedrun: the full pipeline on one node of GPUs with internet (8 x H100 80GB in about 4 hours).
#   tokenizer on ~2B characters of FineWeb-Edu -> depth-20 pretraining (tokens = 20 x params) -> midtraining ->
#   SFT -> optional RL (RUN_RL=1) -> every evaluation -> report card.
# Resumable stage by stage: rerunning it skips completed stages and training stages resume from their last
# checkpoint. Knobs (environment): DEPTH (20), NUM_SHARDS (240), RUN_RL (0), DEVICE_BATCH_SIZE (auto from memory),
# GPU_HOUR_PRICE (3.0 USD), GSM8K_TRAIN (a local GSM8K train JSONL; RL needs it).
#
# SMOKE=1 SMOKE_DATA=<folder of parquet shards>: every stage below with its exact commands and flags, at toy sizes
# on CPU under torchrun with 2 gloo processes (as if 2 GPUs of SMOKE_MEM_GB), in a fresh NANOCHAT_BASE_DIR (a
# temporary one unless set), with RL; the shards are seeded from SMOKE_DATA so the download finds them present.
# Only sizes are added (argparse: the last flag wins), so a typo, a wrong path or bad batch sizing fails here in a
# few minutes instead of on the GPUs (tests/test_speedrun_smoke.py runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$(mktemp -d)}; fi
. runs/lib.sh
export OMP_NUM_THREADS=1

DEPTH=${DEPTH:-20}
NUM_SHARDS=${NUM_SHARDS:-240}   # ~250M characters each; d20 needs ~11B tokens ≈ 54B characters ≈ 220 shards
RUN_RL=${RUN_RL:-0}
GPU_HOUR_PRICE=${GPU_HOUR_PRICE:-3.0}
# per-stage size overrides, appended to the real commands (empty unless SMOKE=1)
TOK=() BASE=() BASE_EVAL=() MID=() SFT=() RL=() CHAT_EVAL=()
if [ "$SMOKE" = 1 ]; then
    : "${SMOKE_DATA:?SMOKE=1 needs SMOKE_DATA=<folder of parquet shards with a text column>}"
    DEPTH=2 NUM_SHARDS=8 RUN_RL=1  # 8: the first download stage asks for 8 shards
    python - "$SMOKE_DATA" "$NANOCHAT_BASE_DIR/base_data" "$NUM_SHARDS" <<'PY'
import sys
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from nanochat.data.shards import VAL_SHARD_INDEX, shard_name
src, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
table = pa.concat_tables([pq.read_table(f, columns=["text"]) for f in sorted(src.glob("*.parquet"))])
cut = int(0.8 * len(table))  # the first 80% of the rows in every train shard, the rest is validation
out.mkdir(parents=True, exist_ok=True)
for i in range(n):
    pq.write_table(table.slice(0, cut), out / shard_name(i), row_group_size=16)
pq.write_table(table.slice(cut), out / shard_name(VAL_SHARD_INDEX), row_group_size=16)
PY
    TOK=(--vocab-size 1024 --max-chars 2000000)
    # T=64 instead of 2048 (the total batch, 2 micro-batches per rank, is added below, once the sizing has run)
    BASE=(--device cpu --max-seq-len 64 --num-iterations 4 --eval-every 2 --eval-tokens 8192 --sample-every 4
          --save-every 2)
    BASE_EVAL=(--device cpu --eval-tokens 8192 --max-per-task 4 --max-new-tokens 8)
    MID=(--device cpu --max-seq-len 64 --num-iterations 3 --eval-every 2 --eval-tokens 8192 --save-every 2
         --smoltalk-limit 200 --mmlu-limit 100 --spelling-size 100)
    SFT=(--device cpu --max-seq-len 64 --num-iterations 3 --device-batch-size 2 --examples-per-step 4 --eval-every 2
         --eval-conversations 8 --smoltalk-limit 100 --spelling-size 50 --save-every 2)
    RL=(--device cpu --num-iterations 2 --examples-per-step 2 --num-samples 2 --device-batch-size 2
        --max-new-tokens 16 --eval-every 2 --eval-examples 4 --train-limit 8 --save-every 1)
    CHAT_EVAL=(--device cpu --max-problems 2 --max-new-tokens 16)
fi

# -- hardware check: GPU count and memory decide the per-GPU batch (the total batch stays 524,288 tokens; gradient
#    accumulation makes up the difference), so a smaller card gets a smaller batch instead of running out of memory.
if [ "$SMOKE" = 1 ]; then NGPU=2 MEM_GB=${SMOKE_MEM_GB:-80}; else
read -r NGPU MEM_GB < <(python - <<'PY'
import torch
n = torch.cuda.device_count()
mem = min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / 2**30 if n else 0
print(n, int(mem))
PY
)
fi
if [ "$NGPU" -lt 1 ]; then echo "speedrun: no CUDA GPU found; run runs/cpu_default.sh instead" >&2; exit 1; fi
if [ -z "${DEVICE_BATCH_SIZE:-}" ]; then
    # Memory model per GPU (bf16 autocast, torch.compile, the fused loss; an estimate, not yet measured on a GPU):
    # - fixed: 16 bytes per parameter (fp32 weights and gradients, Muon momentum and AdamW moments; ZeRO-2 shards
    #   the state, counted whole here) + 3.5 GB (CUDA context, cuBLAS workspace, the fused loss's 1 GiB chunk of
    #   bf16 logits and its fp32 dW)
    # - per token: ~11 x n_embd x n_layer bf16 activations kept for the backward (the inputs of the matmuls: two
    #   normed residuals, q, k, v, the attention output, the MLP's 4 x n_embd pre-activation; compile recomputes
    #   the elementwise ops) and nothing for the logits: the fused loss never holds the (B, T, V) fp32 logits,
    #   which at 32 x 2048 x 65,536 were 17 GB per copy (the old rule gave d20 ~70 GB at batch 32)
    # - d20: 9 + 3.5 GB fixed, 1.15 GB per 2048-token row: 32 rows in 80 GB, 16 in 40 GB, 8 in 24 GB (15% headroom)
    DEVICE_BATCH_SIZE=$(python - "$DEPTH" "$MEM_GB" <<'PY'
import sys
import torch
from nanochat.model.gpt import GPT, GPTConfig
depth, mem_gb = int(sys.argv[1]), float(sys.argv[2])
with torch.device("meta"):
    model = GPT(GPTConfig.from_depth(depth))
fixed = 16 * model.num_params() + 3.5e9
per_row = 11 * model.config.n_embd * model.config.n_layer * 2 * 2048
rows = int((0.85 * mem_gb * 2**30 - fixed) // per_row)
batch = 1
while batch * 2 <= min(rows, 32):
    batch *= 2
print(batch)
PY
)
fi
# 524,288 tokens per step must be a multiple of batch x 2048 x GPUs
while [ $((524288 % (DEVICE_BATCH_SIZE * 2048 * NGPU))) -ne 0 ] && [ "$DEVICE_BATCH_SIZE" -gt 1 ]; do
    DEVICE_BATCH_SIZE=$((DEVICE_BATCH_SIZE / 2))
done
if [ "$SMOKE" = 1 ]; then BASE+=(--total-batch-size $((2 * DEVICE_BATCH_SIZE * 64 * NGPU))); fi

# -- estimate before starting: FLOPs of the pretraining at 45% MFU on H100-class bf16 peak (989 TFLOP/s), plus about
#    30% for tokenizer, midtraining, SFT and evaluations.
python - "$DEPTH" "$NGPU" "$GPU_HOUR_PRICE" <<'PY'
import sys
from nanochat.model.gpt import GPT, GPTConfig
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
stage evaldata  nanochat data evals ${GSM8K_TRAIN:+--gsm8k-train "$GSM8K_TRAIN"}
stage tokenizer nanochat tok-train --max-chars 2000000000 "${TOK[@]}"
stage tok-eval  nanochat tok-eval
wait "$DOWNLOAD_PID" || { echo "speedrun: shard download failed, see $NANOCHAT_BASE_DIR/report/download.log" >&2; exit 1; }

stage base      $TR -m nanochat.training.base_train -- --depth "$DEPTH" --device-batch-size "$DEVICE_BATCH_SIZE" \
                    --save-every 1000 --keep-last 2 --resume "${BASE[@]}"
stage base-eval $TR -m nanochat.evals.base_eval -- --eval bpb,samples,core "${BASE_EVAL[@]}"
stage mid       $TR -m nanochat.training.mid_train -- --device-batch-size "$DEVICE_BATCH_SIZE" --resume "${MID[@]}"
stage mid-eval  $TR -m nanochat.evals.chat_eval -- --source mid "${CHAT_EVAL[@]}"
stage sft       $TR -m nanochat.training.chat_sft -- --resume "${SFT[@]}"
stage sft-eval  $TR -m nanochat.evals.chat_eval -- --source sft "${CHAT_EVAL[@]}"
if [ "$RUN_RL" = 1 ]; then
    stage rl      $TR -m nanochat.training.chat_rl -- --resume "${RL[@]}"
    stage rl-eval $TR -m nanochat.evals.chat_eval -- --source rl --tasks GSM8K "${CHAT_EVAL[@]}"
fi
nanochat report --price-per-hour "$(python -c "print($GPU_HOUR_PRICE * $NGPU)")"
cat <<MSG

Done. The report card is $NANOCHAT_BASE_DIR/report/report.md. Talk to the model:
    nanochat chat                      # terminal
    nanochat serve --host 0.0.0.0      # browser at http://<this machine>:8000 (one replica per GPU)
MSG
