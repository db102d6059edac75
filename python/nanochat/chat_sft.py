"""Supervised finetuning: `nanochat chat-sft`, `python -m nanochat.chat_sft`, or `torchrun ... -m nanochat.chat_sft`.

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
import math
import sys
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint import checkpoint_dir, load_model
from nanochat.common import at_least, float_in, is_distributed, print0
from nanochat.stage_plumbing import (TrainLog, add_checkpoint_args, add_optimizer_args, add_source_args, resume_stage,
                                     rng_state, run_main, save_stage_checkpoint, write_stage_metrics)
from nanochat.tasks.custom_chat import add_data_args, with_custom_data

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
    p.add_argument("--num-epochs", type=float_in(0.0), default=1.0, help="passes over the mixture (sets the horizon)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (overrides --num-epochs)")
    g = p.add_argument_group("optimization")
    add_optimizer_args(g, init_lr_frac=0.02)
    g.add_argument("--seed", type=int, default=42, help="seed of the mixture shuffle")
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
    g = p.add_argument_group("runtime")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Rows: one conversation each, loss only where the render mask is 1


def conversation_rows(tokenizer, conversations: list[dict], max_len: int, device="cpu"):
    """-> inputs (B, T) and targets (B, T): targets are the next token where the mask is 1, else -1; right-padded."""
    pad = tokenizer.get_bos_token_id()
    xs, ys = [], []
    for conv in conversations:
        ids, mask = tokenizer.render_conversation(conv, max_tokens=max_len + 1)
        xs.append(ids[:-1])
        ys.append([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    T = max(len(x) for x in xs)
    inputs = torch.full((len(xs), T), pad, dtype=torch.long)
    targets = torch.full((len(xs), T), -1, dtype=torch.long)
    for i, (x, y) in enumerate(zip(xs, ys)):
        inputs[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        targets[i, :len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs.to(device), targets.to(device)


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


@torch.no_grad()
def assistant_loss(model, tokenizer, conversations: list[dict], max_len: int, device, batch_size: int = 8) -> float:
    """Mean negative log-probability (nats) of the assistant tokens of `conversations` (summed over ranks' shares)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for lo in range(0, len(conversations), batch_size):
        x, y = conversation_rows(tokenizer, conversations[lo:lo + batch_size], max_len, device)
        total += model(x, y, loss_reduction="sum").double()
        count += (y >= 0).sum()
    if is_distributed():
        dist.all_reduce(total)
        dist.all_reduce(count)
    model.train(was_training)
    return float(total / count.clamp(min=1))


# ---------------------------------------------------------------------------------------------------------------
# Training


def train(args: argparse.Namespace, rt) -> int:
    from nanochat.tasks.mixtures import MixtureSizes, sft_mixture

    device, rank, world, master = rt.device, rt.rank, rt.world_size, rt.is_master
    torch.manual_seed(args.seed)
    model, tokenizer, source_meta = load_model(args.source, device=device, model_tag=args.source_tag,
                                               step=args.source_step)
    config = model.config
    max_len = args.max_seq_len or config.sequence_len
    model_tag = args.model_tag or f"d{config.n_layer}"
    ckpt_dir = checkpoint_dir("sft", model_tag)

    sizes = MixtureSizes(smoltalk=args.smoltalk_limit, arc=args.arc_limit, gsm8k=args.gsm8k_limit,
                         spelling=args.spelling_size, arithmetic=args.arithmetic_size)
    train_task, val_task = with_custom_data(  # the built-in mixture, plus or replaced by the --data files
        lambda split: sft_mixture(split, sizes, strict=args.strict_data, seed=args.seed), args.data, args.data_only,
        args.seed)
    val_convs = [val_task[i] for i in range(rank, min(args.eval_conversations, len(val_task)), world)]
    per_micro = args.device_batch_size * world
    if args.examples_per_step % per_micro:
        raise ValueError(f"--examples-per-step {args.examples_per_step} must be a multiple of device batch x ranks "
                         f"= {per_micro}")
    grad_accum = args.examples_per_step // per_micro
    num_iterations = args.num_iterations if args.num_iterations > 0 else \
        max(1, int(args.num_epochs * len(train_task) // args.examples_per_step))
    print0(f"sft: {len(train_task):,} training conversations ({train_task.skipped or 'no sources skipped'}); "
           f"{num_iterations} steps of {args.examples_per_step} conversations ({grad_accum} accumulation step(s))")

    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * args.init_lr_frac,
                                      embedding_lr=args.embedding_lr * args.init_lr_frac,
                                      matrix_lr=args.matrix_lr * args.init_lr_frac, weight_decay=args.weight_decay)
    start_step, data_state, saved_loop = (resume_stage(ckpt_dir, model, optimizer, rt, num_iterations)
                                          if args.resume else (0, None, {}))
    loop = {"val_loss": None, "initial_val_loss": None, **saved_loop}
    model.train()
    batches = ConversationBatches(tokenizer, train_task, args.device_batch_size, max_len, device, rank, world,
                                  data_state)
    log = TrainLog(ckpt_dir, master)

    def save(step: int) -> None:
        save_stage_checkpoint(ckpt_dir, step, model, optimizer, rt, args, num_iterations=num_iterations,
                              metrics={"val_loss": loop["val_loss"], "initial_val_loss": loop["initial_val_loss"]},
                              loop_state=loop, loader=batches, rng=rng_state(), source_meta=source_meta)

    step, t_start = start_step, time.time()
    try:
        while True:
            last = step == num_iterations
            if last or step == start_step == 0 or (args.eval_every > 0 and step % args.eval_every == 0):
                loop["val_loss"] = assistant_loss(model, tokenizer, val_convs, max_len, device)
                if loop["initial_val_loss"] is None:
                    loop["initial_val_loss"] = loop["val_loss"]
                print0(f"step {step:05d} | held-out assistant loss {loop['val_loss']:.4f}")
                log({"step": step, "val_loss": loop["val_loss"]})
            if last or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
                save(step)
            if last:
                break
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(grad_accum)]
            num_targets = torch.tensor(float(sum(int((y >= 0).sum()) for _, y in micro)), device=device)
            if world > 1:
                dist.all_reduce(num_targets)
            # the optimizer averages gradients over ranks, so each rank divides by the per-rank share of targets
            denom = num_targets.clamp(min=1) / world
            loss_sum = torch.zeros((), device=device)
            for x, y in micro:
                loss = model(x, y, loss_reduction="sum") / denom
                loss.backward()
                loss_sum += loss.detach()
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            loss_value = float(loss_sum)
            if not math.isfinite(loss_value):
                print0(f"error: loss is {loss_value} at step {step}; stopping")
                return 1
            lrm = 1.0 - step / num_iterations
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
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
        from nanochat.evals.chat import run_chat_eval

        try:
            report = run_chat_eval(model, tokenizer, device, ["ARC-Easy"], max_problems=args.eval_mc_problems,
                                   log=print0)
            metrics["arc_easy_accuracy"] = report["tasks"]["ARC-Easy"]["accuracy"]
        except FileNotFoundError as e:
            print0(f"skipping the ARC-Easy check: {e}")
    write_stage_metrics(ckpt_dir, metrics, master, t_start)
    print0(f"done: held-out assistant loss {loop['initial_val_loss']:.4f} -> {loop['val_loss']:.4f}; "
           f"checkpoints in {ckpt_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(train, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
