"""Midtraining: `nanochat mid-train`, `python -m nanochat.training.mid_train`, or `torchrun ... -m nanochat.training.mid_train -- ...`.

Continues a base checkpoint on the conversation mixture (tasks/mixtures.py: SmolTalk, MMLU auxiliary train, GSM8K
with tool calls, identity, spelling) so the model learns the chat format, the special tokens and the python tool.

- packed rows: each rank renders its share of the shuffled mixture (conversation i goes to rank i % world),
  concatenates the token streams and cuts rows of T + 1 tokens; every token is learned (no mask), as in pretraining
- optimizer: MuonAdamW with the base run's learning rates x --init-lr-frac; lr constant, then linearly decayed to
  0 over the last --warmdown-ratio of the steps
- horizon: --num-iterations, or by default one pass over the mixture (estimated from a sample of renders)
- metric: validation loss (nats/token) on held-out conversations (SmolTalk test, synthetic test streams) at step 0
  (the base model) and every --eval-every steps; it must go down
- checkpoints under checkpoints/mid/<tag> with each rank's loader position, optimizer shard and RNG state, so
  `--resume` continues the same curve; train_log.jsonl and metrics.json (final numbers, for the report) beside them
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from nanochat.common import at_least, float_in, print0
from nanochat.model.checkpoint import checkpoint_dir
from nanochat.model.schedules import lr_multiplier, muon_momentum
from nanochat.tasks.custom_chat import add_data_args
from nanochat.tasks.mixtures import mid_mixture, stage_mixtures
from nanochat.training.plumbing import (
    FRESH_START,
    TrainLog,
    accumulate_gradients,
    add_checkpoint_args,
    add_optimizer_args,
    add_runtime_args,
    add_source_args,
    apply_update,
    eval_due,
    finish_stage,
    load_source,
    masked_mean_loss,
    record_eval,
    resume_stage,
    rng_state,
    run_main,
    save_due,
    save_stage_checkpoint,
    stage_optimizer,
    stopped_on_non_finite,
)

# ---------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanochat mid-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_source_args(p, ["base", "mid"])
    p.add_argument("--model-tag", default=None, help="output tag under checkpoints/mid (default: the source's)")
    p.add_argument("--max-seq-len", type=at_least(1), default=None,
                   help="tokens per row (default: the model's context)")
    p.add_argument("--device-batch-size", type=at_least(1), default=32, help="rows per rank per forward/backward")
    p.add_argument("--total-batch-size", type=int, default=-1,
                   help="tokens per optimizer step over all ranks (-1: one micro-batch per rank)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: one pass over the mixture)")
    g = add_optimizer_args(p, seed_help="seed of the mixture shuffle", init_lr_frac=1.0)
    g.add_argument("--warmdown-ratio", type=float_in(0.0, 1.0), default=0.2,
                   help="fraction of steps of linear decay to 0")
    g = p.add_argument_group("data (caps make small runs fast)")
    g.add_argument("--smoltalk-limit", type=int, default=None, help="max SmolTalk conversations")
    g.add_argument("--mmlu-limit", type=int, default=None, help="max MMLU training questions")
    g.add_argument("--gsm8k-limit", type=int, default=None, help="max GSM8K training problems")
    g.add_argument("--spelling-size", type=at_least(0), default=20000, help="synthetic spelling conversations per task")
    g.add_argument("--arithmetic-size", type=at_least(0), default=20000,
                   help="synthetic arithmetic conversations (0: none)")
    g.add_argument("--strict-data", action="store_true", help="fail when a mixture source is missing")
    add_data_args(g)
    g = p.add_argument_group("evaluation, checkpoints")
    g.add_argument("--eval-every", type=int, default=150, help="steps between validation losses (<= 0: ends only)")
    g.add_argument("--eval-tokens", type=at_least(1), default=20 * 524288 // 8, help="validation tokens per evaluation")
    add_checkpoint_args(g)
    add_runtime_args(p, compile_help="torch.compile the model (default: on for CUDA)", dtype=True)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Packed conversation rows


class PackedConversations:
    """(inputs, targets) of shape (B, T) cut from the concatenated renders of this rank's conversations.

    State (JSON): the next conversation index, the pass number and the leftover tokens, so a resumed loader yields
    exactly the batches an uninterrupted one would.
    """

    def __init__(self, tokenizer, task, batch_size: int, seq_len: int, device="cpu", rank: int = 0,
                 world_size: int = 1, state: dict | None = None):
        if len(task) < world_size:
            raise ValueError(f"the mixture has {len(task)} conversations, fewer than the {world_size} ranks")
        self.tokenizer, self.task = tokenizer, task
        self.B, self.T, self.device = batch_size, seq_len, device
        self.rank, self.world = rank, world_size
        state = state or {}
        self.cursor = state.get("cursor", rank)
        self.epoch = state.get("epoch", 0)
        self.buffer: list[int] = list(state.get("buffer", []))

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "buffer": list(self.buffer)}

    @property
    def progress(self) -> float:
        """Passes over the mixture so far (fractional)."""
        return self.epoch + self.cursor / len(self.task)

    def __iter__(self):
        return self

    def __next__(self):
        need = self.B * (self.T + 1)
        while len(self.buffer) < need:
            ids, _ = self.tokenizer.render_conversation(self.task[self.cursor], max_tokens=1 << 20)
            self.buffer.extend(ids)
            self.cursor += self.world
            if self.cursor >= len(self.task):
                self.cursor -= len(self.task)
                self.epoch += 1
        rows = torch.tensor(self.buffer[:need], dtype=torch.long).view(self.B, self.T + 1)
        del self.buffer[:need]
        rows = rows.to(self.device)
        return rows[:, :-1], rows[:, 1:]


def mean_tokens_per_conversation(tokenizer, task, sample: int = 256, seed: int = 0) -> float:
    rng = random.Random(seed)
    idx = [rng.randrange(len(task)) for _ in range(min(sample, len(task)))]
    return sum(len(tokenizer.render_conversation(task[i], max_tokens=1 << 20)[0]) for i in idx) / len(idx)


# ---------------------------------------------------------------------------------------------------------------
# Training


def train(args: argparse.Namespace, rt) -> int:

    device, rank, world, master = rt.device, rt.rank, rt.world_size, rt.is_master
    model, tokenizer, source_meta = load_source(args, rt)
    config = model.config
    seq_len = args.max_seq_len or config.sequence_len
    if seq_len > config.sequence_len:
        raise ValueError(f"--max-seq-len {seq_len} exceeds the model's context of {config.sequence_len}")
    model_tag = args.model_tag or (source_meta.get("args", {}) or {}).get("model_tag") or f"d{config.n_layer}"
    ckpt_dir = checkpoint_dir("mid", model_tag)

    # -- data, batch and horizon: by default one pass over the mixture --------------------------------------------
    train_task, val_task = stage_mixtures(args, mid_mixture)
    tokens_per_micro = args.device_batch_size * seq_len
    total_batch = args.total_batch_size if args.total_batch_size > 0 else tokens_per_micro * world
    if total_batch % (tokens_per_micro * world):
        raise ValueError(f"--total-batch-size {total_batch} must be a multiple of device batch x sequence length x "
                         f"ranks = {tokens_per_micro * world}")
    grad_accum = total_batch // (tokens_per_micro * world)
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    else:
        est_tokens = mean_tokens_per_conversation(tokenizer, train_task) * len(train_task)
        num_iterations = max(1, int(est_tokens // total_batch))
    print0(f"mid: {len(train_task):,} training conversations, {len(val_task):,} validation; {num_iterations} steps "
           f"of {total_batch:,} tokens ({grad_accum} accumulation step(s)); skipped sources: {train_task.skipped}")

    # -- optimizer, then (with --resume) the newest checkpoint into both -------------------------------------------
    optimizer = stage_optimizer(model, args)
    resumed = resume_stage(ckpt_dir, model, optimizer, rt, num_iterations) if args.resume else FRESH_START
    start_step = resumed.step
    loop = {"val_loss": None, "initial_val_loss": None, "smooth_loss": 0.0, **resumed.loop_state}

    # -- what the loop runs on -------------------------------------------------------------------------------------
    loader = PackedConversations(tokenizer, train_task, args.device_batch_size, seq_len, device, rank, world,
                                 resumed.data_state)
    eval_steps = max(1, args.eval_tokens // (tokens_per_micro * world))
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    print0(f"runtime: dtype {str(rt.dtype).removeprefix('torch.')} ({rt.dtype_reason}); compile "
           f"{'on' if use_compile else 'off'}")
    log = TrainLog(ckpt_dir, master)

    # -- the loop: look at the weights of `step` (evaluate, save), then train on one batch; the last pass only looks
    model.train()
    step, t_start = start_step, time.time()
    try:
        while True:
            last = step == num_iterations
            if eval_due(step, start_step, last, args.eval_every):
                val_loader = PackedConversations(tokenizer, val_task, args.device_batch_size, seq_len, device, rank,
                                                 world)
                val_loss = masked_mean_loss(model, (next(val_loader) for _ in range(eval_steps)), device)
                record_eval(loop, "val_loss", val_loss, step, log, "validation loss")
            if save_due(step, start_step, last, args.save_every):
                save_stage_checkpoint(ckpt_dir, step, model, optimizer, rt, args, num_iterations=num_iterations,
                                      metrics={k: loop[k] for k in ("val_loss", "initial_val_loss")},
                                      loop_state=loop, loader=loader, rng=rng_state(), source_meta=source_meta)
            if last:
                break

            t0 = time.perf_counter()
            loss_value = accumulate_gradients(train_model, loader, grad_accum, device, world, rt.autocast)
            if stopped_on_non_finite(loss_value, "loss", step, ckpt_dir, log):
                return 1
            lrm = lr_multiplier(step, num_iterations, 0.0, args.warmdown_ratio, 0.0)
            apply_update(optimizer, lrm, muon_momentum(step))
            dt = time.perf_counter() - t0

            loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * loss_value
            print0(f"step {step + 1:05d}/{num_iterations:05d} | loss {loss_value:.4f} | lrm {lrm:.3f} | "
                   f"dt {dt * 1000:.0f}ms | tok/s {total_batch / dt:,.0f} | pass {loader.progress:.3f}")
            log({"step": step, "loss": loss_value, "lr": lrm, "tok_per_s": total_batch / dt, "dt": dt})
            step += 1
    finally:
        log.close()
    return finish_stage(ckpt_dir, {"stage": "mid", "model_tag": model_tag, "steps": num_iterations,
                                   "initial_val_loss": loop["initial_val_loss"], "val_loss": loop["val_loss"],
                                   "train_conversations": len(train_task), "skipped_sources": train_task.skipped},
                        master, t_start, "val_loss")


def main(argv: list[str] | None = None) -> int:
    return run_main(train, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
