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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanochat.common import at_least, float_in, print0
from nanochat.model.checkpoint import checkpoint_dir
from nanochat.model.resume import rng_state, save_stage_checkpoint
from nanochat.model.schedules import lr_multiplier, muon_momentum
from nanochat.runtime import Runtime
from nanochat.tasks.custom_chat import add_data_args
from nanochat.tasks.mixtures import mid_mixture, stage_mixtures
from nanochat.training import flags, loop
from nanochat.training.log import Evaluated, TrainLog, finish_stage

# ---------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanochat mid-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flags.add_source_args(p, ["base", "mid"])
    p.add_argument("--model-tag", default=None, help="output tag under checkpoints/mid (default: the source's)")
    p.add_argument("--max-seq-len", type=at_least(1), default=None,
                   help="tokens per row (default: the model's context)")
    p.add_argument("--device-batch-size", type=at_least(1), default=32, help="rows per rank per forward/backward")
    p.add_argument("--total-batch-size", type=int, default=-1,
                   help="tokens per optimizer step over all ranks (-1: one micro-batch per rank)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: one pass over the mixture)")
    g = flags.add_optimizer_args(p, seed_help="seed of the mixture shuffle", init_lr_frac=1.0)
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
    flags.add_checkpoint_args(g)
    flags.add_runtime_args(p, compile_help="torch.compile the model (default: on for CUDA)", dtype=True)
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


@dataclass
class MidState(loop.LoopState):
    """What the loop carries from step to step; checkpoints save it, so a resumed run continues its numbers."""
    val_loss: Evaluated = field(default_factory=lambda: Evaluated("val_loss"))
    smooth_loss: float = 0.0


@dataclass
class MidRun:
    """What the loop runs on, fixed for the run."""
    args: argparse.Namespace
    rt: Runtime
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model, compiled when --compile (or CUDA) says so
    optimizer: torch.optim.Optimizer
    tokenizer: object
    loader: PackedConversations
    val_task: object
    log: TrainLog
    ckpt_dir: Path
    seq_len: int
    total_batch: int  # tokens per optimizer step over all ranks
    grad_accum: int
    num_iterations: int
    source: dict


def plan_batches(args, seq_len: int, world: int) -> tuple[int, int]:
    """(tokens per optimizer step over all ranks, accumulation steps): the total batch must be a whole number of
    micro-batches of every rank."""
    tokens_per_micro = args.device_batch_size * seq_len
    total_batch = args.total_batch_size if args.total_batch_size > 0 else tokens_per_micro * world
    if total_batch % (tokens_per_micro * world):
        raise ValueError(f"--total-batch-size {total_batch} must be a multiple of device batch x sequence length x "
                         f"ranks = {tokens_per_micro * world}")
    return total_batch, total_batch // (tokens_per_micro * world)


def evaluate(run: MidRun, state: MidState, step: int) -> None:
    """Validation loss over --eval-tokens of held-out conversations (the same rows at every evaluation)."""
    args, rt = run.args, run.rt
    val_loader = PackedConversations(run.tokenizer, run.val_task, args.device_batch_size, run.seq_len, rt.device,
                                     rt.rank, rt.world_size)
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * run.seq_len * rt.world_size))
    val_loss = loop.masked_mean_loss(run.model, (next(val_loader) for _ in range(eval_steps)), rt.device)
    state.val_loss.record(val_loss, step, run.log, "validation loss")


def save(run: MidRun, state: MidState, step: int) -> None:
    save_stage_checkpoint(run.ckpt_dir, step, run.model, run.optimizer, run.rt, run.args,
                          num_iterations=run.num_iterations, metrics=state.val_loss.metrics(),
                          loop_state=state.saved(), loader=run.loader, rng=rng_state(), source=run.source)


def train_step(run: MidRun, state: MidState, step: int) -> bool:
    """One optimizer step at the scheduled lr (constant, then the warmdown to 0); False when the loss was not
    finite (nothing updated)."""
    rt = run.rt
    t0 = time.perf_counter()
    loss_value = loop.accumulate_gradients(run.train_model, run.loader, run.grad_accum, rt.device, rt.world_size,
                                      rt.autocast)
    if loop.stopped_on_non_finite(loss_value, "loss", step, run.ckpt_dir, run.log):
        return False
    lrm = lr_multiplier(step, run.num_iterations, 0.0, run.args.warmdown_ratio, 0.0)
    loop.apply_update(run.optimizer, lrm, muon_momentum(step))
    dt = time.perf_counter() - t0
    state.smooth_loss = 0.9 * state.smooth_loss + 0.1 * loss_value
    print0(f"step {step + 1:05d}/{run.num_iterations:05d} | loss {loss_value:.4f} | lrm {lrm:.3f} | "
           f"dt {dt * 1000:.0f}ms | tok/s {run.total_batch / dt:,.0f} | pass {run.loader.progress:.3f}")
    run.log({"step": step, "loss": loss_value, "lr": lrm, "tok_per_s": run.total_batch / dt, "dt": dt})
    return True


def train(args: argparse.Namespace, rt: Runtime) -> int:
    model, tokenizer, source_meta = loop.load_source(args, rt)
    config = model.config
    seq_len = args.max_seq_len or config.sequence_len
    if seq_len > config.sequence_len:
        raise ValueError(f"--max-seq-len {seq_len} exceeds the model's context of {config.sequence_len}")
    model_tag = args.model_tag or (source_meta.get("args", {}) or {}).get("model_tag") or f"d{config.n_layer}"
    ckpt_dir = checkpoint_dir("mid", model_tag)

    # data, batch and horizon: by default one pass over the mixture
    train_task, val_task = stage_mixtures(args, mid_mixture)
    total_batch, grad_accum = plan_batches(args, seq_len, rt.world_size)
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    else:
        est_tokens = mean_tokens_per_conversation(tokenizer, train_task) * len(train_task)
        num_iterations = max(1, int(est_tokens // total_batch))
    print0(f"mid: {len(train_task):,} training conversations, {len(val_task):,} validation; {num_iterations} steps "
           f"of {total_batch:,} tokens ({grad_accum} accumulation step(s)); skipped sources: {train_task.skipped}")

    optimizer = flags.stage_optimizer(model, args)
    resumed = loop.resume_or_start(args, ckpt_dir, model, optimizer, rt, num_iterations)
    state = MidState.restored(resumed.loop_state)
    loader = PackedConversations(tokenizer, train_task, args.device_batch_size, seq_len, rt.device, rt.rank,
                                 rt.world_size, resumed.data_state)
    use_compile = rt.device.type == "cuda" if args.compile is None else args.compile
    print0(f"runtime: dtype {str(rt.dtype).removeprefix('torch.')} ({rt.dtype_reason}); compile "
           f"{'on' if use_compile else 'off'}")
    run = MidRun(args, rt, model, torch.compile(model, dynamic=False) if use_compile else model, optimizer,
                 tokenizer, loader, val_task, TrainLog(ckpt_dir, rt.is_master), ckpt_dir, seq_len, total_batch,
                 grad_accum, num_iterations, loop.source_record(args, source_meta))

    model.train()
    t_start = time.time()
    try:
        for step in range(resumed.step, num_iterations + 1):  # the last pass only looks at the final weights
            last = step == num_iterations
            if loop.eval_due(step, resumed.step, last, args.eval_every):
                evaluate(run, state, step)
            if loop.save_due(step, resumed.step, last, args.save_every):
                save(run, state, step)
            if not last and not train_step(run, state, step):
                return 1
    finally:
        run.log.close()
    return finish_stage(ckpt_dir, {"stage": "mid", "model_tag": model_tag, "steps": num_iterations,
                                   **state.val_loss.metrics(), "train_conversations": len(train_task),
                                   "skipped_sources": train_task.skipped}, rt.is_master, t_start, state.val_loss)


def main(argv: list[str] | None = None) -> int:
    return flags.run_main(train, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
