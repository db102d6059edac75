"""Midtraining: `nanochat mid-train`, `python -m nanochat.mid_train`, or `torchrun ... -m nanochat.mid_train -- ...`.

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
import math
import random
import sys
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint import checkpoint_dir, latest_step, load_model
from nanochat.common import at_least, float_in, is_distributed, print0
from nanochat.schedules import lr_multiplier, muon_momentum
from nanochat.stage_plumbing import (TrainLog, accumulate_gradients, add_checkpoint_args, add_optimizer_args,
                                     add_source_args, resume_stage, rng_state, run_main, save_stage_checkpoint,
                                     write_stage_metrics)
from nanochat.tasks.custom_chat import add_data_args, with_custom_data

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
    g = p.add_argument_group("optimization")
    add_optimizer_args(g, init_lr_frac=1.0)
    g.add_argument("--warmdown-ratio", type=float_in(0.0, 1.0), default=0.2,
                   help="fraction of steps of linear decay to 0")
    g.add_argument("--seed", type=int, default=42, help="seed of the mixture shuffle")
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
    g = p.add_argument_group("runtime")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="matmul dtype on CPU: auto = bf16 autocast when the CPU has native bf16 dot products, as in "
                        "base-train; CUDA always runs bf16 autocast")
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


@torch.no_grad()
def validation_loss(model, loader, steps: int, device) -> float:
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(steps):
        x, y = next(loader)
        total += model(x, y, loss_reduction="sum").double()
        count += (y >= 0).sum()
    if is_distributed():
        dist.all_reduce(total)
        dist.all_reduce(count)
    model.train()
    return float(total / count)


# ---------------------------------------------------------------------------------------------------------------
# Training


def train(args: argparse.Namespace, rt) -> int:
    from nanochat.tasks.mixtures import MixtureSizes, mid_mixture

    device, rank, world, master = rt.device, rt.rank, rt.world_size, rt.is_master
    torch.manual_seed(args.seed)
    model, tokenizer, source_meta = load_model(args.source, device=device, model_tag=args.source_tag,
                                               step=args.source_step)
    config = model.config
    seq_len = args.max_seq_len or config.sequence_len
    if seq_len > config.sequence_len:
        raise ValueError(f"--max-seq-len {seq_len} exceeds the model's context of {config.sequence_len}")
    model_tag = args.model_tag or (source_meta.get("args", {}) or {}).get("model_tag") or f"d{config.n_layer}"
    ckpt_dir = checkpoint_dir("mid", model_tag)

    sizes = MixtureSizes(smoltalk=args.smoltalk_limit, mmlu=args.mmlu_limit, gsm8k=args.gsm8k_limit,
                         spelling=args.spelling_size, arithmetic=args.arithmetic_size)
    train_task, val_task = with_custom_data(  # the built-in mixture, plus or replaced by the --data files
        lambda split: mid_mixture(split, sizes, strict=args.strict_data, seed=args.seed), args.data, args.data_only,
        args.seed)
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

    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * args.init_lr_frac,
                                      embedding_lr=args.embedding_lr * args.init_lr_frac,
                                      matrix_lr=args.matrix_lr * args.init_lr_frac, weight_decay=args.weight_decay)
    start_step, data_state, saved_loop = (resume_stage(ckpt_dir, model, optimizer, rt, num_iterations)
                                          if args.resume else (0, None, {}))
    loop = {"val_loss": None, "initial_val_loss": None, "smooth_loss": 0.0, **saved_loop}
    model.train()
    loader = PackedConversations(tokenizer, train_task, args.device_batch_size, seq_len, device, rank, world,
                                 data_state)
    eval_steps = max(1, args.eval_tokens // (tokens_per_micro * world))
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    log = TrainLog(ckpt_dir, master)
    print0(f"runtime: dtype {str(rt.dtype).removeprefix('torch.')} ({rt.dtype_reason}); compile "
           f"{'on' if use_compile else 'off'}")

    def save(step: int) -> None:
        save_stage_checkpoint(ckpt_dir, step, model, optimizer, rt, args, num_iterations=num_iterations,
                              metrics={"val_loss": loop["val_loss"], "initial_val_loss": loop["initial_val_loss"]},
                              loop_state=loop, loader=loader, rng=rng_state(), source_meta=source_meta)

    step, t_start = start_step, time.time()
    try:
        while True:
            last = step == num_iterations
            if last or step == start_step == 0 or (args.eval_every > 0 and step % args.eval_every == 0):
                val_loader = PackedConversations(tokenizer, val_task, args.device_batch_size, seq_len, device, rank,
                                                 world)
                loop["val_loss"] = validation_loss(model, val_loader, eval_steps, device)
                if loop["initial_val_loss"] is None:
                    loop["initial_val_loss"] = loop["val_loss"]
                print0(f"step {step:05d} | validation loss {loop['val_loss']:.4f}")
                log({"step": step, "val_loss": loop["val_loss"]})
            if last or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
                save(step)
            if last:
                break
            t0 = time.perf_counter()
            loss_value = accumulate_gradients(train_model, loader, grad_accum, device, world, rt.autocast)
            if not math.isfinite(loss_value):
                print0(f"error: loss is {loss_value} at step {step}; stopping (last good checkpoint: "
                       f"{latest_step(ckpt_dir)})")
                return 1
            lrm = lr_multiplier(step, num_iterations, 0.0, args.warmdown_ratio, 0.0)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if group["kind"] == "muon":
                    group["momentum"] = muon_momentum(step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * loss_value
            print0(f"step {step + 1:05d}/{num_iterations:05d} | loss {loss_value:.4f} | lrm {lrm:.3f} | "
                   f"dt {dt * 1000:.0f}ms | tok/s {total_batch / dt:,.0f} | pass {loader.progress:.3f}")
            log({"step": step, "loss": loss_value, "lr": lrm, "tok_per_s": total_batch / dt, "dt": dt})
            step += 1
    finally:
        log.close()
    write_stage_metrics(ckpt_dir, {"stage": "mid", "model_tag": model_tag, "steps": num_iterations,
                                   "initial_val_loss": loop["initial_val_loss"], "val_loss": loop["val_loss"],
                                   "train_conversations": len(train_task), "skipped_sources": train_task.skipped},
                        master, t_start)
    print0(f"done: validation loss {loop['initial_val_loss']:.4f} -> {loop['val_loss']:.4f}; "
           f"checkpoints in {ckpt_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(train, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
