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

import torch

from nanochat.common import at_least, print0, sum_over_ranks
from nanochat.evals.chat import run_chat_eval
from nanochat.model.checkpoint import checkpoint_dir
from nanochat.tasks.custom_chat import add_data_args
from nanochat.tasks.mixtures import sft_mixture, stage_mixtures
from nanochat.training.plumbing import (
    FRESH_START,
    TrainLog,
    add_checkpoint_args,
    add_horizon_args,
    add_optimizer_args,
    add_runtime_args,
    add_source_args,
    apply_update,
    eval_due,
    finish_stage,
    iterations_for,
    load_source,
    masked_mean_loss,
    record_eval,
    resume_stage,
    right_padded,
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
    p = argparse.ArgumentParser(prog="nanochat chat-sft", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_source_args(p, ["mid", "base", "sft"])
    p.add_argument("--model-tag", default=None, help="output tag under checkpoints/sft (default: d<depth>)")
    p.add_argument("--max-seq-len", type=at_least(1), default=None,
                   help="tokens per conversation (default: model context)")
    p.add_argument("--device-batch-size", type=at_least(1), default=4,
                   help="conversations per rank per forward/backward")
    p.add_argument("--examples-per-step", type=at_least(1), default=32,
                   help="conversations per optimizer step, all ranks")
    add_horizon_args(p, "mixture")
    add_optimizer_args(p, seed_help="seed of the mixture shuffle", init_lr_frac=0.02)
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
    add_checkpoint_args(g)
    add_runtime_args(p)
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
    return right_padded(xs, ys, tokenizer.get_bos_token_id(), device)


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
    return masked_mean_loss(model, batches, device)


# ---------------------------------------------------------------------------------------------------------------
# Training


def train(args: argparse.Namespace, rt) -> int:

    device, rank, world, master = rt.device, rt.rank, rt.world_size, rt.is_master
    model, tokenizer, source_meta = load_source(args, rt)
    config = model.config
    max_len = args.max_seq_len or config.sequence_len
    model_tag = args.model_tag or f"d{config.n_layer}"
    ckpt_dir = checkpoint_dir("sft", model_tag)

    # -- data, batch and horizon ------------------------------------------------------------------------------------
    train_task, val_task = stage_mixtures(args, sft_mixture)
    val_convs = [val_task[i] for i in range(rank, min(args.eval_conversations, len(val_task)), world)]
    per_micro = args.device_batch_size * world
    if args.examples_per_step % per_micro:
        raise ValueError(f"--examples-per-step {args.examples_per_step} must be a multiple of device batch x ranks "
                         f"= {per_micro}")
    grad_accum = args.examples_per_step // per_micro
    num_iterations = iterations_for(args, len(train_task), args.examples_per_step)
    print0(f"sft: {len(train_task):,} training conversations ({train_task.skipped or 'no sources skipped'}); "
           f"{num_iterations} steps of {args.examples_per_step} conversations ({grad_accum} accumulation step(s))")

    # -- optimizer, then (with --resume) the newest checkpoint into both -------------------------------------------
    optimizer = stage_optimizer(model, args)
    resumed = resume_stage(ckpt_dir, model, optimizer, rt, num_iterations) if args.resume else FRESH_START
    start_step = resumed.step
    loop = {"val_loss": None, "initial_val_loss": None, **resumed.loop_state}
    batches = ConversationBatches(tokenizer, train_task, args.device_batch_size, max_len, device, rank, world,
                                  resumed.data_state)
    log = TrainLog(ckpt_dir, master)

    # -- the loop: look at the weights of `step` (evaluate, save), then train on one batch; the last pass only looks
    model.train()
    step, t_start = start_step, time.time()
    try:
        while True:
            last = step == num_iterations
            if eval_due(step, start_step, last, args.eval_every):
                val_loss = assistant_loss(model, tokenizer, val_convs, max_len, device)
                record_eval(loop, "val_loss", val_loss, step, log, "held-out assistant loss")
            if save_due(step, start_step, last, args.save_every):
                save_stage_checkpoint(ckpt_dir, step, model, optimizer, rt, args, num_iterations=num_iterations,
                                      metrics={k: loop[k] for k in ("val_loss", "initial_val_loss")},
                                      loop_state=loop, loader=batches, rng=rng_state(), source_meta=source_meta)
            if last:
                break

            # every assistant token of the step weighs the same, however it splits into micro-batches and ranks;
            # the optimizer averages gradients over ranks, so each rank divides by its share of the targets
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(grad_accum)]
            num_targets, = sum_over_ranks(torch.tensor(float(sum(int((y >= 0).sum()) for _, y in micro)),
                                                       device=device))
            denom = num_targets.clamp(min=1) / world
            loss_sum = torch.zeros((), device=device)
            for x, y in micro:
                loss = model(x, y, loss_reduction="sum") / denom
                loss.backward()
                loss_sum += loss.detach()
            loss_value = float(sum_over_ranks(loss_sum)[0] / world)
            if stopped_on_non_finite(loss_value, "loss", step, ckpt_dir, log):
                return 1
            lrm = 1.0 - step / num_iterations
            apply_update(optimizer, lrm)
            dt = time.perf_counter() - t0
            print0(f"step {step + 1:05d}/{num_iterations:05d} | loss {loss_value:.4f} | lrm {lrm:.3f} | "
                   f"targets {int(num_targets)} | dt {dt * 1000:.0f}ms")
            log({"step": step, "loss": loss_value, "lr": lrm, "num_targets": int(num_targets), "dt": dt})
            step += 1
    finally:
        log.close()

    metrics = {"stage": "sft", "model_tag": model_tag, "steps": num_iterations,
               "initial_val_loss": loop["initial_val_loss"], "val_loss": loop["val_loss"],
               "train_conversations": len(train_task), "skipped_sources": train_task.skipped}
    if args.eval_mc_problems > 0:

        try:
            report = run_chat_eval(model, tokenizer, device, ["ARC-Easy"], max_problems=args.eval_mc_problems,
                                   log=print0)
            metrics["arc_easy_accuracy"] = report["tasks"]["ARC-Easy"]["accuracy"]
        except FileNotFoundError as e:
            print0(f"skipping the ARC-Easy check: {e}")
    return finish_stage(ckpt_dir, metrics, master, t_start, "val_loss")


def main(argv: list[str] | None = None) -> int:
    return run_main(train, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
