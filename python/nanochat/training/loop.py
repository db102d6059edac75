"""The pieces of a stage's loop that the stages share: how a finetuning stage starts (its source checkpoint, or
where a resumed run left off), the loop state a checkpoint carries, when to evaluate and save, the update at the
scheduled lr, the stop on a non-finite loss, and the losses over rows of unequal length.

Every stage's loop has the same shape: each pass first looks at the weights of `step` (evaluate, save), then trains
on one batch; the last pass (step == num_iterations) only looks, so the final weights are evaluated and saved, and
a checkpoint of step s is the state before step s trains.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import fields
from pathlib import Path

import torch

from nanochat.common import UserError, print0, sum_over_ranks
from nanochat.model.checkpoint import latest_step, load_model
from nanochat.model.resume import FRESH_START, Resumed, resume_stage
from nanochat.runtime import Runtime
from nanochat.tokenizer import Tokenizer, default_tokenizer_path
from nanochat.training.log import TRAIN_LOG, Evaluated, truncate_log

# ---------------------------------------------------------------------------------------------------------------
# The start of a run


def load_source(args, rt: Runtime):
    """Seed torch with --seed, then load the checkpoint a finetuning stage starts from: (model, tokenizer, meta)."""
    torch.manual_seed(args.seed)
    model, tokenizer, meta = load_model(args.source, device=rt.device, model_tag=args.source_tag,
                                        step=args.source_step, model_dir=args.model)
    if args.model is not None:
        adopt_tokenizer(tokenizer, args.model, write=rt.is_master)
    return model, tokenizer, meta


def adopt_tokenizer(tokenizer, model_dir, write: bool = True) -> None:
    """A stage started from a model folder writes checkpoints that later load with the base dir's tokenizer: the
    base dir gets the folder's tokenizer when it has none, and must not hold another one."""
    path = default_tokenizer_path()
    if not path.is_file():
        if write:
            tokenizer.save(path)
        print0(f"{path}: the tokenizer of {model_dir}")
        return
    held = Tokenizer.load(path)
    if held.pattern != tokenizer.pattern or held.mergeable_ranks() != tokenizer.mergeable_ranks():
        raise UserError(f"{path} is another tokenizer than {model_dir}'s, and this stage's checkpoints would be "
                        f"read with it; use a fresh NANOCHAT_BASE_DIR for this model")


def source_record(args, source_meta: dict) -> dict:
    """The checkpoint a finetuning stage started from, as its checkpoints record it."""
    return {"stage": args.source, "tag": args.source_tag, "step": source_meta.get("step")}


def resume_or_start(args, ckpt_dir: Path, model, optimizer, rt: Runtime, num_iterations: int) -> Resumed:
    """With --resume, the newest checkpoint of ckpt_dir into model, optimizer and RNG, and train_log.jsonl cut back
    to its step (model/resume.py); else (or with no checkpoint yet) a fresh start."""
    if not args.resume:
        return FRESH_START
    resumed = resume_stage(ckpt_dir, model, optimizer, rt, num_iterations)
    if resumed is not FRESH_START and rt.is_master:
        truncate_log(ckpt_dir / TRAIN_LOG, resumed.step)
    return resumed


class LoopState:
    """Base of each stage's loop state, a dataclass of what its loop carries from step to step. Checkpoints save it
    as one flat JSON object (an `Evaluated` field as its metrics(): `initial_<name>` and `<name>`), so a resumed run
    continues its numbers; unknown saved keys are ignored, missing ones keep their defaults."""

    def saved(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out.update(value.metrics() if isinstance(value, Evaluated) else {f.name: value})
        return out

    @classmethod
    def restored(cls, saved: dict):
        state = cls()
        for f in fields(state):
            value = getattr(state, f.name)
            if isinstance(value, Evaluated):
                setattr(state, f.name, Evaluated.from_metrics(value.name, saved))
            elif f.name in saved:
                setattr(state, f.name, saved[f.name])
        return state


# ---------------------------------------------------------------------------------------------------------------
# The loop's recurring pieces


def eval_due(step: int, start_step: int, last: bool, every: int) -> bool:
    """Evaluate at the end, at the untrained start of a fresh run, and every `every` steps (<= 0: never between)."""
    return last or step == start_step == 0 or (every > 0 and step % every == 0)


def save_due(step: int, start_step: int, last: bool, every: int) -> bool:
    """Save at the end and every `every` steps, but not at the step the run started from (already on disk)."""
    return last or (every > 0 and step > start_step and step % every == 0)


def apply_update(optimizer, lrm: float, momentum: float | None = None) -> None:
    """One optimizer step at every group's initial lr x lrm (and this momentum for the Muon groups when one is
    given), then the gradients cleared for the next step."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if momentum is not None and group["kind"] == "muon":
            group["momentum"] = momentum
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def stopped_on_non_finite(value: float, what: str, step: int, ckpt_dir: Path, log) -> bool:
    """True, after saying so, when `value` is NaN or inf. Stages check before the optimizer step: a non-finite
    value would poison the weights, and stopping first keeps the newest checkpoint the last good one."""
    if math.isfinite(value):
        return False
    print0(f"error: {what} is {value} at step {step}; stopping before the optimizer step. The newest checkpoint in "
           f"{ckpt_dir} (step {latest_step(ckpt_dir)}) is the last good one; resume from it with a lower learning "
           f"rate (--matrix-lr / --embedding-lr) or look for bad data.")
    log({"step": step, what: None, "error": f"non-finite {what} ({value})"})
    return True


# ---------------------------------------------------------------------------------------------------------------
# Rows and losses


def right_padded(inputs: list[list[int]], targets: list[list[int]], pad: int, device="cpu"):
    """Rows of unequal lengths as (B, T) tensors, T the longest row: inputs padded with `pad`, targets with -1, so
    padding carries no loss."""
    T = max(1, max(len(x) for x in inputs))
    x = torch.full((len(inputs), T), pad, dtype=torch.long)
    y = torch.full((len(inputs), T), -1, dtype=torch.long)
    for i, (row, target) in enumerate(zip(inputs, targets)):
        x[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        y[i, :len(target)] = torch.tensor(target, dtype=torch.long)
    return x.to(device), y.to(device)


@torch.no_grad()
def masked_mean_loss(model, batches, device) -> float:
    """Mean loss (nats) per target token over (inputs, targets) batches, -1 targets left out, over all ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in batches:
        total += model(x, y, loss_reduction="sum").double()
        count += (y >= 0).sum()
    sum_over_ranks(total, count)
    model.train(was_training)
    return float(total / count.clamp(min=1))


# ---------------------------------------------------------------------------------------------------------------
# One optimizer step's gradients


def accumulate_gradients(model, loader, grad_accum: int, device, world_size: int,
                         autocast=contextlib.nullcontext) -> float:
    """Backward through `grad_accum` micro-batches of `loader` (each loss / grad_accum) -> the step's mean loss over
    micro-batches and ranks (for logging; the optimizer averages the gradients over ranks itself). The forward runs
    in the context `autocast()` (Runtime.autocast: bf16 on a bf16 CPU runtime); the backward follows its dtypes."""
    loss_sum = torch.zeros((), device=device)
    for _ in range(grad_accum):
        x, y = next(loader)
        with autocast():
            loss = model(x, y)
        loss_sum += loss.detach()
        (loss / grad_accum).backward()
    loss_step, = sum_over_ranks(loss_sum / grad_accum)
    return float((loss_step / world_size).item())
