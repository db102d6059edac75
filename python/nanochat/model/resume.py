"""A training run's checkpoint: what a stage saves so that `--resume` continues the loss curve of an uninterrupted
run, and the inverse. The file layout and its atomicity are checkpoint.py's; this module decides what goes in.

A checkpoint of step s holds the weights before step s, each rank's optimizer shard (with the RNG state the stage
asks for), every rank's data-loader position, and a meta.json with the config, the step, the run's length, the
stage's loop state and metrics, and provenance (commit, flags, hardware). Saving refuses non-finite weights, so the
newest checkpoint is always the last good one. Resuming checks that the config and the number of processes match,
and that the optimizer's groups are the ones it pairs by name; this invocation's lr flags win over the saved ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.common import git_commit, print0, system_info
from nanochat.model.checkpoint import latest_step, load_checkpoint, save_checkpoint
from nanochat.runtime import Runtime


@dataclass(frozen=True)
class Resumed:
    """Where a run picks up: the step to start from, this rank's data-loader state (None: from the start) and the
    stage's loop state as saved (empty: the stage's initial values)."""
    step: int
    data_state: dict | None = None
    loop_state: dict = field(default_factory=dict)


FRESH_START = Resumed(0)  # what a run without --resume (or without a checkpoint yet) starts from


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG state: the CPU generator, and the CUDA one of `device` when a device is given (None on
    CPU). mid_train and chat_sft record only the CPU generator; chat_rl none (its sampling is seeded by step)."""
    state = {"cpu": torch.get_rng_state()}
    if device is not None:
        state["cuda"] = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def all_gather_objects(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def save_stage_checkpoint(ckpt_dir: Path, step: int, model, optimizer, rt: Runtime, args, *, num_iterations: int,
                          metrics: dict, loop_state: dict, loader=None, rng: dict | None = None,
                          source: dict | None = None) -> None:
    """Checkpoint `step` (collective: every rank calls it).

    args: the stage's flags (recorded; args.keep_last prunes older steps). loader: the stage's data loader
    (state_dict()); without one (chat_rl) the data position is the step itself. source: the checkpoint the stage
    started from ({"stage", "tag", "step"}), recorded as it is.
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
    if source is not None:
        meta["source"] = source
    meta.update(commit=git_commit(), args=vars(args), system=system_info())
    optimizer_state = {"optimizer": optimizer.state_dict()}
    if rng is not None:
        optimizer_state["rng"] = rng
    save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer_state, meta, rank=rt.rank,
                    keep_last=args.keep_last)
    print0(f"saved checkpoint {ckpt_dir}/step_{step:06d}")


def initial_lrs(optimizer) -> dict[str, float]:
    """{group name: initial lr}: what a resumed run keeps of this invocation's lr flags. Every group must have a
    unique name and an initial lr (MuonAdamW's groups do)."""
    lrs = {}
    for i, group in enumerate(optimizer.param_groups):
        if "name" not in group or "initial_lr" not in group:
            raise ValueError(f"optimizer group {i} has keys {sorted(k for k in group if k != 'params')}; resuming "
                             f"needs 'name' and 'initial_lr' in every group")
        if group["name"] in lrs:
            raise ValueError(f"two optimizer groups are named {group['name']!r}; resuming pairs groups by name")
        lrs[group["name"]] = group["initial_lr"]
    return lrs


def resume_stage(ckpt_dir: Path, model, optimizer, rt: Runtime, num_iterations: int) -> Resumed:
    """Load the newest checkpoint of `ckpt_dir` into model, optimizer and RNG, and return where the run picks up.

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
    fresh_lrs = initial_lrs(optimizer)
    optimizer.load_state_dict(opt_state["optimizer"])  # checks that the saved groups are this model's, in order
    for group in optimizer.param_groups:  # the lr flags of this invocation win
        group["initial_lr"] = fresh_lrs[group["name"]]
    if opt_state.get("rng") is not None:
        restore_rng(opt_state["rng"], rt.device)
    print0(f"resumed from {ckpt_dir} at step {step}")
    data_states = meta.get("data_states")
    return Resumed(step, None if data_states is None else data_states[rt.rank], dict(meta.get("loop_state", {})))
