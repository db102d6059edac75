"""The plumbing the training stages share (base_train, mid_train, chat_sft, chat_rl); the stages keep their data,
objectives and loop.

- `run_main`: the `main(argv)` of every stage: drops the leading "--" that `torchrun ... -m nanochat.X -- ...`
  passes, parses, starts the runtime and always shuts it down; a FloatingPointError (non-finite weights at a save)
  becomes a message and exit status 1
- flags (`add_source_args`, `add_optimizer_args`, `add_checkpoint_args`, `add_runtime_args`) and what follows
  from them (`stage_optimizer`, `iterations_for`)
- the loop's recurring pieces: when to evaluate and save (`eval_due`, `save_due`), the update at the scheduled lr
  (`apply_update`), the stop on a NaN/inf loss before the update (`stopped_on_non_finite`)
- rows and losses: `right_padded` (B, T) batches of unequal rows, `masked_mean_loss` over target tokens, all ranks
- `accumulate_gradients`: the backward passes of one optimizer step of base_train and mid_train (packed rows,
  every token learned), returning the step's loss averaged over micro-batches and ranks
- `TrainLog`: train_log.jsonl beside the checkpoints, one JSON object per line, appended and flushed by the master
  rank only (other ranks hold a no-op log); optionally mirrored to a wandb run
- `save_stage_checkpoint`: refuses non-finite weights (the last good checkpoint stays the newest), gathers every
  rank's data-loader state, and writes weights, each rank's optimizer shard (plus the RNG state the stage asks for)
  and a meta.json (config, step, data state, metrics, loop state, provenance)
- `resume_stage`: the inverse: newest checkpoint into model and optimizer (this run's lr flags win over the saved
  initial lrs) and RNG; checks config and process count; truncates train_log.jsonl to the resumed step so the log
  of a resumed run reads like an uninterrupted one; returns the step, data-loader state and loop state (`Resumed`)
- `write_stage_metrics`: metrics.json (final numbers for the report), atomically, by the master rank
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from nanochat.common import (
    UserError,
    at_least,
    atomic_write,
    float_in,
    git_commit,
    init_runtime,
    print0,
    shutdown_runtime,
    sum_over_ranks,
    system_info,
)
from nanochat.model.checkpoint import latest_step, load_checkpoint, load_model, save_checkpoint
from nanochat.tokenizer import Tokenizer, default_tokenizer_path

TRAIN_LOG = "train_log.jsonl"
METRICS = "metrics.json"

# ---------------------------------------------------------------------------------------------------------------
# Entry point


def run_main(train, parse_args, argv: list[str] | None) -> int:
    """`train(args, runtime) -> exit status` under an initialised runtime, with args from argv (sys.argv[1:])."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m nanochat.training.base_train -- --depth 4`
        argv = argv[1:]
    args = parse_args(argv)
    rt = init_runtime(args.device, getattr(args, "dtype", None))  # stages without --dtype keep the old default
    try:
        return train(args, rt)
    except FloatingPointError as e:
        print0(f"error: {e}")
        return 1
    finally:
        shutdown_runtime()


# ---------------------------------------------------------------------------------------------------------------
# Flags the stages share


def add_source_args(p, sources: list[str]) -> None:
    """--source/--source-tag/--source-step: the checkpoint a finetuning stage starts from (default: sources[0])."""
    p.add_argument("--source", default=sources[0], choices=sources, help="stage of the starting checkpoint")
    p.add_argument("--source-tag", default=None, help="model tag of the starting checkpoint (default: newest)")
    p.add_argument("--source-step", type=int, default=None, help="step of the starting checkpoint (default: last)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="start from a folder written by `nanochat export` or `nanochat import` instead")


def add_optimizer_args(p, seed_help: str, init_lr_frac: float | None = None):
    """The "optimization" group: the MuonAdamW learning rates (nanochat's base values), a finetuning stage's
    multiplier on all of them (--init-lr-frac, when init_lr_frac is given), weight decay and --seed. Returns the
    group for the stage's own schedule flags."""
    g = p.add_argument_group("optimization")
    g.add_argument("--embedding-lr", type=float, default=0.2,
                   help="AdamW lr of the embedding (before width scaling)")
    g.add_argument("--unembedding-lr", type=float, default=0.004,
                   help="AdamW lr of lm_head (before width scaling)")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the block matrices")
    if init_lr_frac is not None:
        g.add_argument("--init-lr-frac", type=float_in(0.0), default=init_lr_frac,
                       help="multiplier on all the lrs above")
    g.add_argument("--weight-decay", type=float_in(0.0), default=0.0, help="decoupled weight decay")
    g.add_argument("--seed", type=int, default=42, help=seed_help)
    return g


def add_checkpoint_args(g) -> None:
    g.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (<= 0: only at the end)")
    g.add_argument("--keep-last", type=at_least(1), default=None, help="keep only the newest K checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of --model-tag")


def add_runtime_args(p, compile_help: str | None = None, dtype: bool = False):
    """The "runtime" group: --device, and --dtype / --compile for the stages that offer them. Returns the group."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    if dtype:
        g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                       help="matmul dtype on CPU: auto = bf16 autocast when the CPU has native bf16 dot products "
                            "(avx512_bf16, amx_bf16), else fp32; CUDA always runs bf16 autocast")
    if compile_help is not None:
        g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help=compile_help)
    return g


def add_horizon_args(p, what: str) -> None:
    """--num-epochs and --num-iterations: how long a finetuning stage runs (see iterations_for)."""
    p.add_argument("--num-epochs", type=float_in(0.0), default=1.0, help=f"passes over the {what} (sets the horizon)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (overrides --num-epochs)")


def load_source(args, rt):
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


def stage_optimizer(model, args):
    """MuonAdamW at the --*-lr flags x --init-lr-frac (the finetuning stages)."""
    frac = args.init_lr_frac
    return model.setup_optimizer(unembedding_lr=args.unembedding_lr * frac, embedding_lr=args.embedding_lr * frac,
                                 matrix_lr=args.matrix_lr * frac, weight_decay=args.weight_decay)


def iterations_for(args, num_items: int, items_per_step: int) -> int:
    """--num-iterations when given (> 0), else the steps of --num-epochs passes over num_items (at least 1)."""
    if args.num_iterations > 0:
        return args.num_iterations
    return max(1, int(args.num_epochs * num_items // items_per_step))


# ---------------------------------------------------------------------------------------------------------------
# The loop's recurring pieces


def eval_due(step: int, start_step: int, last: bool, every: int) -> bool:
    """Evaluate at the end, at the untrained start of a fresh run, and every `every` steps (<= 0: never between)."""
    return last or step == start_step == 0 or (every > 0 and step % every == 0)


def save_due(step: int, start_step: int, last: bool, every: int) -> bool:
    """Save at the end and every `every` steps, but not at the step the run started from (already on disk)."""
    return last or (every > 0 and step > start_step and step % every == 0)


def record_eval(loop: dict, key: str, value, step: int, log, label: str = "") -> None:
    """loop[key] = value, and loop["initial_" + key] the first time; printed and logged. A dict value (several
    numbers) is printed and logged key by key."""
    loop[key] = value
    if loop.get("initial_" + key) is None:
        loop["initial_" + key] = value
    if isinstance(value, dict):
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in value.items()))
        log({"step": step, **value})
    else:
        print0(f"step {step:05d} | {label} {value:.4f}")
        log({"step": step, key: value})


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


# ---------------------------------------------------------------------------------------------------------------
# The JSON-lines training log


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill
            continue
    return entries


def truncate_log(path: Path, before_step: int) -> None:
    """Keep the entries of steps < before_step (a resumed run rewrites the rest)."""
    kept = [e for e in read_log(path) if e.get("step", 0) < before_step]
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in kept)


class TrainLog:
    """`log = TrainLog(ckpt_dir, rt.is_master)`; `log({"step": 3, "loss": 2.5})`; `log.close()` at the end."""

    def __init__(self, ckpt_dir: Path, master: bool, wandb_run=None):
        self.file, self.wandb_run = None, wandb_run
        if master:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(ckpt_dir / TRAIN_LOG, "a")

    def __call__(self, entry: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
            if self.wandb_run is not None:
                self.wandb_run.log(entry, step=entry["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def write_stage_metrics(ckpt_dir: Path, metrics: dict, master: bool, t_start: float) -> None:
    """metrics.json with the run's wall time and commit added last (master rank only)."""
    if master:
        metrics.update(seconds=round(time.time() - t_start, 1), commit=git_commit())
        with atomic_write(ckpt_dir / METRICS, "w") as f:
            json.dump(metrics, f, indent=2)


def finish_stage(ckpt_dir: Path, metrics: dict, master: bool, t_start: float, key: str) -> int:
    """The end of a finetuning stage: metrics.json, then one line from the first to the last evaluation. Returns
    the exit status (0)."""
    write_stage_metrics(ckpt_dir, metrics, master, t_start)
    first, final = metrics["initial_" + key], metrics[key]
    if isinstance(final, float):
        first, final = f"{first:.4f}", f"{final:.4f}"
    print0(f"done: {key} {first} -> {final}; checkpoints in {ckpt_dir}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints of a training run


def all_gather_objects(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG state: the CPU generator, and the CUDA one of `device` when a device is given (None on
    CPU). mid_train and chat_sft record only the CPU generator; chat_rl none (its sampling is seeded by step)."""
    state = {"cpu": torch.get_rng_state()}
    if device is not None:
        state["cuda"] = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return state


def save_stage_checkpoint(ckpt_dir: Path, step: int, model, optimizer, rt, args, *, num_iterations: int,
                          metrics: dict, loop_state: dict, loader=None, rng: dict | None = None,
                          source_meta: dict | None = None) -> None:
    """Checkpoint `step` (collective: every rank calls it).

    loader: the stage's data loader (state_dict()); without one (chat_rl) the data position is the step itself.
    source_meta: the meta of the checkpoint the stage started from; recorded with args.source and args.source_tag.
    """
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise FloatingPointError(f"non-finite weights before step {step}; not saving them over the last good "
                                 f"checkpoint (step {latest_step(ckpt_dir)}) in {ckpt_dir}")
    meta = {"config": asdict(model.config), "step": step}
    if loader is not None:
        data_states = all_gather_objects(loader.state_dict(), rt.world_size)
        meta.update(data_state=data_states[0], data_states=data_states)
    else:
        meta["data_state"] = {"step": step}
    meta.update(metrics=metrics, loop_state=loop_state, num_iterations=num_iterations, world_size=rt.world_size)
    if source_meta is not None:
        meta["source"] = {"stage": args.source, "tag": args.source_tag, "step": source_meta.get("step")}
    meta.update(commit=git_commit(), args=vars(args), system=system_info())
    optimizer_state = {"optimizer": optimizer.state_dict()}
    if rng is not None:
        optimizer_state["rng"] = rng
    save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer_state, meta, rank=rt.rank,
                    keep_last=args.keep_last)
    print0(f"saved checkpoint {ckpt_dir}/step_{step:06d}")


class Resumed(NamedTuple):
    """Where a resumed run picks up: the step to start from, this rank's data-loader state (None: from the start)
    and the stage's loop state as saved (empty: the stage's initial values)."""
    step: int
    data_state: dict | None
    loop_state: dict


FRESH_START = Resumed(0, None, {})  # what a run without --resume (or without a checkpoint yet) starts from


def resume_stage(ckpt_dir: Path, model, optimizer, rt, num_iterations: int) -> Resumed:
    """Load the newest checkpoint of `ckpt_dir` into model, optimizer and RNG, cut train_log.jsonl back to its step,
    and return where the run picks up.

    No checkpoint yet is not an error (restart loops can always pass --resume): the run starts from step 0.
    """
    step = latest_step(ckpt_dir)
    if step is None:
        print0(f"--resume: no checkpoint in {ckpt_dir} yet, starting from step 0")
        return FRESH_START
    model_state, opt_state, meta = load_checkpoint(ckpt_dir, step, device=rt.device, load_optimizer=True,
                                                   rank=rt.rank)
    config = asdict(model.config)
    if asdict(type(model.config)(**meta["config"])) != config:  # a meta from before a switch existed has its default
        raise ValueError(f"checkpoint {ckpt_dir} was trained with config {meta['config']}, this run asks for "
                         f"{config}; use another --model-tag or the same flags")
    if meta.get("world_size", 1) != rt.world_size:
        raise ValueError(f"checkpoint was written by {meta.get('world_size')} process(es), this run has "
                         f"{rt.world_size}; resume with the same number of processes")
    if meta.get("num_iterations") != num_iterations:
        print0(f"warning: the checkpoint's run had {meta.get('num_iterations')} steps, this one "
               f"{num_iterations}; the lr schedule changes")
    model.load_state_dict(model_state)
    fresh_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(opt_state["optimizer"])
    for group, lr in zip(optimizer.param_groups, fresh_lrs):  # the lr flags of this invocation win
        group["initial_lr"] = lr
    rng = opt_state.get("rng")
    if rng is not None:
        torch.set_rng_state(rng["cpu"].cpu())
        if rt.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), rt.device)
    if rt.is_master:
        truncate_log(ckpt_dir / TRAIN_LOG, step)
    print0(f"resumed from {ckpt_dir} at step {step}")
    data_states = meta.get("data_states")
    return Resumed(step, None if data_states is None else data_states[rt.rank], dict(meta.get("loop_state", {})))
