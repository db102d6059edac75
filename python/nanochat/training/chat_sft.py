"""Supervised finetuning: `nanochat chat-sft`, `python -m nanochat.training.chat_sft`, or `torchrun ... -m nanochat.training.chat_sft`.

Finetunes a midtrained (or base) checkpoint on the SFT mixture (tasks/mixtures.py: ARC, GSM8K with tool calls,
SmolTalk, identity, spelling), one conversation per row.

- rows: a conversation rendered with its loss mask; targets are the next tokens where the mask is 1 (assistant text,
  python calls, <|assistant_end|>) and -1 elsewhere (user text, tool outputs, start tokens); rows of a micro-batch
  are right-padded (inputs with <|bos|>, targets with -1), so padding carries no loss
- loss: summed over target tokens and divided by the number of target tokens of the whole optimizer step over all
  ranks (every assistant token weighs the same, however the step splits into micro-batches and ranks)
- lr: the base learning rates x --init-lr-frac (0.02), decayed linearly to 0 over the run
- metric: mean loss (negative log-probability, nats/token) on the assistant tokens of held-out conversations
  (SmolTalk test, synthetic test streams) at step 0 and every --eval-every steps; optional multiple-choice accuracy
  (--eval-mc-problems) on ARC-Easy test through evals/chat.py
- checkpoints under checkpoints/sft/<tag> (resumable), train_log.jsonl and metrics.json beside them
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanochat.common import at_least, print0, sum_over_ranks
from nanochat.evals.chat import run_chat_eval
from nanochat.model.checkpoint import checkpoint_dir
from nanochat.model.resume import rng_state, save_stage_checkpoint
from nanochat.runtime import Runtime
from nanochat.tasks.custom_chat import add_data_args
from nanochat.tasks.mixtures import sft_mixture, stage_mixtures
from nanochat.training import flags, loop
from nanochat.training.log import Evaluated, TrainLog, finish_stage

# ---------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanochat chat-sft", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flags.add_source_args(p, ["mid", "base", "sft"])
    p.add_argument("--model-tag", default=None, help="output tag under checkpoints/sft (default: d<depth>)")
    p.add_argument("--max-seq-len", type=at_least(1), default=None,
                   help="tokens per conversation (default: model context)")
    p.add_argument("--device-batch-size", type=at_least(1), default=4,
                   help="conversations per rank per forward/backward")
    p.add_argument("--examples-per-step", type=at_least(1), default=32,
                   help="conversations per optimizer step, all ranks")
    flags.add_horizon_args(p, "mixture")
    flags.add_optimizer_args(p, seed_help="seed of the mixture shuffle", init_lr_frac=0.02)
    g = p.add_argument_group("data (caps make small runs fast)")
    g.add_argument("--smoltalk-limit", type=int, default=10000, help="max SmolTalk conversations")
    g.add_argument("--arc-limit", type=int, default=None, help="max ARC questions per subset")
    g.add_argument("--gsm8k-limit", type=int, default=None, help="max GSM8K training problems")
    g.add_argument("--spelling-size", type=at_least(0), default=600,
                   help="synthetic spelling conversations (both tasks)")
    g.add_argument("--arithmetic-size", type=at_least(0), default=2000,
                   help="synthetic arithmetic conversations (0: none)")
    g.add_argument("--strict-data", action="store_true", help="fail when a mixture source is missing")
    add_data_args(g)
    g = p.add_argument_group("evaluation, checkpoints")
    g.add_argument("--eval-every", type=int, default=100, help="steps between validation losses (<= 0: ends only)")
    g.add_argument("--eval-conversations", type=at_least(0), default=256, help="held-out conversations per evaluation")
    g.add_argument("--eval-mc-problems", type=at_least(0), default=0,
                   help="ARC-Easy test questions at the end (0: skip)")
    flags.add_checkpoint_args(g)
    flags.add_runtime_args(p)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Rows: one conversation each, loss only where the render mask is 1


def conversation_rows(tokenizer, conversations: list[dict], max_len: int, device="cpu"):
    """-> inputs (B, T) and targets (B, T): targets are the next token where the mask is 1, else -1; right-padded."""
    xs, ys = [], []
    for conv in conversations:
        ids, mask = tokenizer.render_conversation(conv, max_tokens=max_len + 1)
        xs.append(ids[:-1])
        ys.append([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    return loop.right_padded(xs, ys, tokenizer.get_bos_token_id(), device)


class ConversationBatches:
    """Micro-batches of this rank's conversations (index rank, rank + world, ... of the mixture), in passes."""

    def __init__(self, tokenizer, task, batch_size: int, max_len: int, device="cpu", rank: int = 0,
                 world_size: int = 1, state: dict | None = None):
        self.tokenizer, self.task, self.B, self.max_len, self.device = tokenizer, task, batch_size, max_len, device
        self.indices = list(range(rank, len(task), world_size))
        if not self.indices:
            raise ValueError(f"the mixture has {len(task)} conversations, too few for rank {rank} of {world_size}")
        state = state or {}
        self.position, self.epoch = state.get("position", 0), state.get("epoch", 0)

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch}

    def __iter__(self):
        return self

    def __next__(self):
        chunk = []
        for _ in range(self.B):
            chunk.append(self.task[self.indices[self.position]])
            self.position += 1
            if self.position == len(self.indices):
                self.position, self.epoch = 0, self.epoch + 1
        return conversation_rows(self.tokenizer, chunk, self.max_len, self.device)


def assistant_loss(model, tokenizer, conversations: list[dict], max_len: int, device, batch_size: int = 8) -> float:
    """Mean negative log-probability (nats) of the assistant tokens of `conversations` (summed over ranks' shares)."""
    batches = (conversation_rows(tokenizer, conversations[lo:lo + batch_size], max_len, device)
               for lo in range(0, len(conversations), batch_size))
    return loop.masked_mean_loss(model, batches, device)


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class SFTState(loop.LoopState):
    """What the loop carries from step to step; checkpoints save it, so a resumed run continues its numbers."""
    val_loss: Evaluated = field(default_factory=lambda: Evaluated("val_loss"))


@dataclass
class SFTRun:
    """What the loop runs on, fixed for the run."""
    args: argparse.Namespace
    rt: Runtime
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: object
    batches: ConversationBatches
    log: TrainLog
    ckpt_dir: Path
    max_len: int
    grad_accum: int
    num_iterations: int
    source: dict


def save(run: SFTRun, state: SFTState, step: int) -> None:
    save_stage_checkpoint(run.ckpt_dir, step, run.model, run.optimizer, run.rt, run.args,
                          num_iterations=run.num_iterations, metrics=state.val_loss.metrics(),
                          loop_state=state.saved(), loader=run.batches, rng=rng_state(), source=run.source)


def train_step(run: SFTRun, step: int) -> bool:
    """One optimizer step (lr decayed linearly to 0); False when the loss was not finite (nothing updated).

    Every assistant token of the step weighs the same, however it splits into micro-batches and ranks: the
    optimizer averages gradients over ranks, so each rank divides by its share of the step's targets."""
    device, world = run.rt.device, run.rt.world_size
    t0 = time.perf_counter()
    micro = [next(run.batches) for _ in range(run.grad_accum)]
    num_targets, = sum_over_ranks(torch.tensor(float(sum(int((y >= 0).sum()) for _, y in micro)), device=device))
    denom = num_targets.clamp(min=1) / world
    loss_sum = torch.zeros((), device=device)
    for x, y in micro:
        loss = run.model(x, y, loss_reduction="sum") / denom
        loss.backward()
        loss_sum += loss.detach()
    loss_value = float(sum_over_ranks(loss_sum)[0] / world)
    if loop.stopped_on_non_finite(loss_value, "loss", step, run.ckpt_dir, run.log):
        return False
    lrm = 1.0 - step / run.num_iterations
    loop.apply_update(run.optimizer, lrm)
    dt = time.perf_counter() - t0
    print0(f"step {step + 1:05d}/{run.num_iterations:05d} | loss {loss_value:.4f} | lrm {lrm:.3f} | "
           f"targets {int(num_targets)} | dt {dt * 1000:.0f}ms")
    run.log({"step": step, "loss": loss_value, "lr": lrm, "num_targets": int(num_targets), "dt": dt})
    return True


def arc_easy_accuracy(run: SFTRun, metrics: dict) -> None:
    """--eval-mc-problems ARC-Easy test questions at the end, into metrics (skipped without the data)."""
    try:
        report = run_chat_eval(run.model, run.tokenizer, run.rt.device, ["ARC-Easy"],
                               max_problems=run.args.eval_mc_problems, log=print0)
        metrics["arc_easy_accuracy"] = report["tasks"]["ARC-Easy"]["accuracy"]
    except FileNotFoundError as e:
        print0(f"skipping the ARC-Easy check: {e}")


def train(args: argparse.Namespace, rt: Runtime) -> int:
    model, tokenizer, source_meta = loop.load_source(args, rt)
    config = model.config
    max_len = args.max_seq_len or config.sequence_len
    model_tag = args.model_tag or f"d{config.n_layer}"
    ckpt_dir = checkpoint_dir("sft", model_tag)

    # data, batch and horizon
    train_task, val_task = stage_mixtures(args, sft_mixture)
    val_convs = [val_task[i] for i in range(rt.rank, min(args.eval_conversations, len(val_task)), rt.world_size)]
    per_micro = args.device_batch_size * rt.world_size
    if args.examples_per_step % per_micro:
        raise ValueError(f"--examples-per-step {args.examples_per_step} must be a multiple of device batch x ranks "
                         f"= {per_micro}")
    grad_accum = args.examples_per_step // per_micro
    num_iterations = flags.iterations_for(args, len(train_task), args.examples_per_step)
    print0(f"sft: {len(train_task):,} training conversations ({train_task.skipped or 'no sources skipped'}); "
           f"{num_iterations} steps of {args.examples_per_step} conversations ({grad_accum} accumulation step(s))")

    optimizer = flags.stage_optimizer(model, args)
    resumed = loop.resume_or_start(args, ckpt_dir, model, optimizer, rt, num_iterations)
    state = SFTState.restored(resumed.loop_state)
    batches = ConversationBatches(tokenizer, train_task, args.device_batch_size, max_len, rt.device, rt.rank,
                                  rt.world_size, resumed.data_state)
    run = SFTRun(args, rt, model, optimizer, tokenizer, batches, TrainLog(ckpt_dir, rt.is_master), ckpt_dir,
                 max_len, grad_accum, num_iterations, loop.source_record(args, source_meta))

    model.train()
    t_start = time.time()
    try:
        for step in range(resumed.step, num_iterations + 1):  # the last pass only looks at the final weights
            last = step == num_iterations
            if loop.eval_due(step, resumed.step, last, args.eval_every):
                val_loss = assistant_loss(model, tokenizer, val_convs, max_len, rt.device)
                state.val_loss.record(val_loss, step, run.log, "held-out assistant loss")
            if loop.save_due(step, resumed.step, last, args.save_every):
                save(run, state, step)
            if not last and not train_step(run, step):
                return 1
    finally:
        run.log.close()

    metrics = {"stage": "sft", "model_tag": model_tag, "steps": num_iterations, **state.val_loss.metrics(),
               "train_conversations": len(train_task), "skipped_sources": train_task.skipped}
    if args.eval_mc_problems > 0:
        arc_easy_accuracy(run, metrics)
    return finish_stage(ckpt_dir, metrics, rt.is_master, t_start, state.val_loss)


def main(argv: list[str] | None = None) -> int:
    return flags.run_main(train, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
