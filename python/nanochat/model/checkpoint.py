"""Checkpoints: one directory per stage and model tag, one sub-directory per step.

    base_dir()/checkpoints/<stage>/<model_tag>/
        step_000500/model.safetensors    weights (rank 0)
        step_000500/meta.json            {"config", "step", "data_state", "metrics", "commit", "args", "system", ...}
        step_000500/optim_rank0.pt       this rank's optimizer shard (torch.save), one file per rank
        latest                           the newest complete step, written last
        train_log.jsonl                  (written by the training stage, not here)

- atomic: every rank writes into `.tmp_step_000500/` and fsyncs; rank 0 then renames it to `step_000500/`
  (a rename is atomic on POSIX), fsyncs the parent and rewrites `latest`. A crash at any point leaves either no
  step directory or a complete one; stale temporary directories are ignored and replaced.
- under torch.distributed with world_size > 1, save_checkpoint is collective (barriers around the rename), and the
  ranks must share the checkpoint filesystem
- keep_last K prunes older step directories after the new one is in place
- loading picks the newest complete step (the `latest` marker when it is valid, else a scan)
- `load_exported` reads a folder written by `nanochat export` (`--model DIR` of every command that loads a model)
- `load_chat_model` picks the model a chat command talks to: a named stage, the most finished chat stage, or an export
- `weights` (fp32, bf16, int8, auto) picks the inference weight format; anything but fp32 loads through
  quantize.load_converted, which never holds the fp32 model (see quantize.py)
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanochat.common import CorruptInputError, MissingInputError, atomic_write, base_dir, get_logger, is_distributed
from nanochat.model.gpt import GPT, GPTConfig
from nanochat.model.quantize import WEIGHT_CHOICES, add_weights_arg, check_format, load_converted, resolve_auto
from nanochat.tokenizer import Tokenizer, get_tokenizer

STAGES = ("base", "mid", "sft", "rl")
_STEP_DIR = re.compile(r"^step_(\d+)$")

# ---------------------------------------------------------------------------------------------------------------
# Paths


def checkpoint_dir(stage: str, model_tag: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if not model_tag or "/" in model_tag or model_tag.startswith("."):
        raise ValueError(f"model_tag must be a plain directory name like 'd20', got {model_tag!r}")
    return base_dir() / "checkpoints" / stage / model_tag


def _step_dir(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:06d}"


def list_steps(ckpt_dir) -> list[int]:
    """Steps with a complete checkpoint (renamed directories holding weights and meta), ascending."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for child in ckpt_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "meta.json").is_file() and (child / "model.safetensors").is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(ckpt_dir) -> int | None:
    """The newest complete step in `ckpt_dir`, or None when there is none."""
    marker = Path(ckpt_dir) / "latest"
    steps = list_steps(ckpt_dir)
    if not steps:
        return None
    try:
        step = int(marker.read_text().strip())
        if step == steps[-1]:
            return step
    except (OSError, ValueError):
        pass
    return steps[-1]  # marker missing, stale or torn: the scan is the truth


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Save and load


def save_checkpoint(ckpt_dir, step: int, model_state: dict, optimizer_state: dict | None, meta: dict,
                    rank: int = 0, keep_last: int | None = None) -> Path:
    """Write step `step` atomically; every rank calls this (rank 0 writes weights and meta, each rank its
    optimizer shard). Returns the step directory."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be None or >= 1, got {keep_last}")
    ckpt_dir = Path(ckpt_dir)
    final = _step_dir(ckpt_dir, step)
    tmp = ckpt_dir / f".tmp_{final.name}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left behind by a crash
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()

    if rank == 0:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        _fsync_file(tmp / "model.safetensors")
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
    if optimizer_state is not None:
        path = tmp / f"optim_rank{rank}.pt"
        torch.save(optimizer_state, path)
        _fsync_file(path)
    _barrier()

    if rank == 0:
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. a resumed run reaching it again): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        with atomic_write(ckpt_dir / "latest", "w") as f:
            f.write(f"{step}\n")
        if keep_last is not None:
            for old in list_steps(ckpt_dir)[:-keep_last]:
                shutil.rmtree(_step_dir(ckpt_dir, old), ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(ckpt_dir, step: int | None = None, device="cpu", load_optimizer: bool = False,
                    rank: int = 0) -> tuple[dict, dict | None, dict]:
    """(model_state, optimizer_state or None, meta) of `step` (the newest complete one by default)."""
    ckpt_dir = Path(ckpt_dir)
    if step is None:
        step = latest_step(ckpt_dir)
        if step is None:
            raise MissingInputError(f"no complete checkpoint in {ckpt_dir}")
    folder = _step_dir(ckpt_dir, step)
    if step not in list_steps(ckpt_dir):
        raise MissingInputError(f"no complete checkpoint for step {step} in {ckpt_dir} "
                                f"(available: {list_steps(ckpt_dir)})")
    try:
        model_state = load_file(str(folder / "model.safetensors"), device=str(device))
        meta = json.loads((folder / "meta.json").read_text())
    except (SafetensorError, OSError, ValueError) as e:  # truncated, overwritten, not UTF-8 / JSON
        raise CorruptInputError(f"checkpoint {folder} is unreadable ({type(e).__name__}: {e}); delete it or "
                                f"load another step with --step") from e
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}  # saved from a compiled model
    optimizer_state = None
    if load_optimizer:
        path = folder / f"optim_rank{rank}.pt"
        if not path.is_file():
            raise MissingInputError(f"checkpoint {folder} has no optimizer state for rank {rank} ({path.name}); "
                                    f"was it saved with fewer processes?")
        try:
            optimizer_state = torch.load(path, map_location=device, weights_only=True)
        except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            raise CorruptInputError(f"optimizer state {path} is unreadable ({type(e).__name__}: {e})") from e
        except RuntimeError as e:  # torch reports a truncated zip archive as a RuntimeError
            if isinstance(e, torch.OutOfMemoryError):
                raise
            raise CorruptInputError(f"optimizer state {path} is unreadable ({e})") from e
    return model_state, optimizer_state, meta


def _newest_tag(stage_dir: Path) -> str:
    """The model tag whose newest checkpoint was written last."""
    best, best_time = None, -1.0
    if stage_dir.is_dir():
        for tag_dir in stage_dir.iterdir():
            step = latest_step(tag_dir) if tag_dir.is_dir() else None
            if step is not None:
                mtime = (_step_dir(tag_dir, step) / "meta.json").stat().st_mtime
                if mtime > best_time:
                    best, best_time = tag_dir.name, mtime
    if best is None:
        raise MissingInputError(f"no checkpoints under {stage_dir}; train one first "
                                f"(e.g. `nanochat base-train` for stage 'base')")
    return best


def _weights_format(weights: str, folder: Path, device, load_fp32) -> str:
    """The concrete format of a --weights choice (auto: see quantize.resolve_auto)."""
    check_format(weights, WEIGHT_CHOICES)
    if weights != "auto":
        return weights
    fmt, _ = resolve_auto(folder, device, load_fp32, log=get_logger().info)
    get_logger().info("weights auto -> %s (%s)", fmt, folder / "weights_guard.json")
    return fmt


def load_model(stage: str, device="cpu", model_tag: str | None = None, step: int | None = None,
               model_dir: str | os.PathLike | None = None, weights: str = "fp32"):
    """(GPT in eval mode, Tokenizer, meta) from a checkpoint; the newest tag and step by default.
    meta["model_tag"] says which tag was loaded, meta["weights"] its format. With model_dir, from that exported
    folder instead."""

    if model_dir is not None:
        return load_exported(model_dir, device, weights)

    if model_tag is None:
        model_tag = _newest_tag(checkpoint_dir(stage, "x").parent)
    if weights != "fp32":
        ckpt_dir = checkpoint_dir(stage, model_tag)
        chosen = latest_step(ckpt_dir) if step is None else step
        if chosen in list_steps(ckpt_dir):  # else load_checkpoint below says what is missing
            folder = _step_dir(ckpt_dir, chosen)
            fmt = _weights_format(weights, folder, device, lambda: load_model(stage, device, model_tag, chosen)[:2])
            if fmt != "fp32":
                return _load_converted_checkpoint(folder, fmt, device, model_tag)
    model_state, _, meta = load_checkpoint(checkpoint_dir(stage, model_tag), step=step, device=device)
    meta["model_tag"] = model_tag
    try:
        config = GPTConfig(**meta["config"])
        with torch.device(device):
            model = GPT(config)
        model.load_state_dict(model_state, strict=True)
    except (KeyError, TypeError, RuntimeError) as e:  # meta.json and the weights disagree (missing keys, shapes)
        if isinstance(e, torch.OutOfMemoryError):
            raise
        raise CorruptInputError(f"checkpoint {checkpoint_dir(stage, model_tag)} (step {meta.get('step')}) does "
                                f"not match its own config: {type(e).__name__}: {str(e)[:300]}") from e
    model.eval()
    meta["weights"] = "fp32"
    tokenizer = get_tokenizer()
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}; "
                         f"the checkpoint was trained with a different tokenizer")
    return model, tokenizer, meta


def _load_converted_checkpoint(folder: Path, fmt: str, device, model_tag: str):
    """load_model's result for a non-fp32 format: the step folder's weights streamed into a converted model."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        config = GPTConfig(**meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptInputError(f"checkpoint {folder} has an unreadable meta.json ({type(e).__name__}: {e})") from e
    model = load_converted(config, folder / "model.safetensors", fmt, device,
                           rename=lambda k: k.removeprefix("_orig_mod."))
    meta["model_tag"], meta["weights"] = model_tag, fmt
    tokenizer = get_tokenizer()
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}; "
                         f"the checkpoint was trained with a different tokenizer")
    return model, tokenizer, meta


def load_exported(model_dir: str | os.PathLike, device="cpu", weights_format: str = "fp32"):
    """(GPT in eval mode, Tokenizer, meta) from a folder written by `nanochat export`. The weights must match the
    SHA-256 recorded at export, so a truncated or corrupted copy is refused with a message naming the file.
    `weights_format`: the inference format (see quantize.py)."""
    folder = Path(model_dir)
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.bin") if not (folder / name).is_file()]
    if missing:
        raise MissingInputError(f"{folder} is not a model folder written by `nanochat export` "
                                f"(missing {', '.join(missing)})")
    try:
        hf_config = json.loads((folder / "config.json").read_text())
        info = hf_config["nanochat"]
        missing = [f.name for f in fields(GPTConfig)[:6] if f.name not in hf_config]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        # the architecture switches: an export written before they existed has none (their defaults are its model)
        config = GPTConfig(**{f.name: hf_config[f.name] for f in fields(GPTConfig) if f.name in hf_config})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CorruptInputError(f"{folder / 'config.json'} is not a nanochat export config "
                                f"({type(e).__name__}: {e})") from e
    weights = folder / "model.safetensors"
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if info.get("sha256") and digest.hexdigest() != info["sha256"]:
        raise CorruptInputError(f"{weights} is corrupted: its SHA-256 {digest.hexdigest()[:12]}... differs from the "
                         f"{info['sha256'][:12]}... recorded at export; copy or export the model again")
    fmt = _weights_format(weights_format, folder, device, lambda: load_exported(folder, device)[:2])
    if fmt != "fp32":

        model = load_converted(config, weights, fmt, device, rename=lambda k: k.removeprefix("model."))
    else:
        try:
            state = load_file(str(weights), device=str(device))
        except Exception as e:  # safetensors raises SafetensorError (header, sizes) or OSError
            raise CorruptInputError(f"{weights} is not a readable safetensors file ({e}); "
                                    "copy or export the model again") from e
        state = {k.removeprefix("model."): v for k, v in state.items()}
        with torch.device(device):
            model = GPT(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CorruptInputError(f"{weights} does not fit the config in {folder / 'config.json'}: {e}") from e
    model.eval()
    tokenizer = Tokenizer.load(folder / "tokenizer.bin")
    if tokenizer.vocab_size > config.vocab_size:
        raise CorruptInputError(f"{folder / 'tokenizer.bin'} has {tokenizer.vocab_size} ids but the model only "
                         f"{config.vocab_size}")
    meta = {"config": asdict(config), "step": info.get("step"), "model_tag": info.get("model_tag"),
            "stage": info.get("stage"), "commit": info.get("commit"), "model_dir": str(folder), "weights": fmt}
    return model, tokenizer, meta


# ---------------------------------------------------------------------------------------------------------------
# Loading a chat model (`nanochat chat`, `nanochat serve`, `nanochat chat-eval`)

CHAT_STAGES = ("rl", "sft", "mid")  # preference order when no --source is given


def load_chat_model(source: str | None = None, device="cpu", model_tag: str | None = None, step: int | None = None,
                    model_dir=None, weights: str = "fp32"):
    """(model, tokenizer, meta, stage) from the checkpoint of `source`, or of the most finished chat stage that has
    one (rl, then sft, then mid); or from the folder model_dir written by `nanochat export`. `weights`: the
    inference format (fp32, bf16, int8, auto; see quantize.py)."""
    if model_dir is not None:
        model, tokenizer, meta = load_exported(model_dir, device, weights)
        return model, tokenizer, meta, meta.get("stage") or "exported"

    if source is not None:
        return (*load_model(source, device=device, model_tag=model_tag, step=step, weights=weights), source)
    for stage in CHAT_STAGES:
        if _has_tags(stage):
            try:
                return (*load_model(stage, device=device, model_tag=model_tag, step=step, weights=weights), stage)
            except FileNotFoundError:
                continue
    raise _no_chat_checkpoint()


def _has_tags(stage: str) -> bool:
    stage_dir = checkpoint_dir(stage, "x").parent
    return stage_dir.is_dir() and any(p.is_dir() for p in stage_dir.iterdir())


def require_chat_checkpoint(source: str | None = None, model_dir=None) -> None:
    """load_chat_model's "no chat checkpoint" error from directory checks alone: commands that have more to check
    (chat-eval's data) call it first, so that an empty base dir says what is missing before anything loads."""
    if source is None and model_dir is None and not any(_has_tags(s) for s in CHAT_STAGES):
        raise _no_chat_checkpoint()


def _no_chat_checkpoint() -> MissingInputError:
    return MissingInputError(f"no chat checkpoint (stages {', '.join(CHAT_STAGES)}) under "
                             f"{checkpoint_dir(CHAT_STAGES[0], 'x').parent.parent}; train one (`nanochat chat-sft`) "
                             f"or name one with --source base")


def add_chat_model_args(p) -> None:
    """The flags that pick the chat model a command talks to (chat, serve): a checkpoint or an exported folder."""
    p.add_argument("--source", choices=list(STAGES), default=None,
                   help="checkpoint stage (default: the first of rl, sft, mid that has a checkpoint)")
    p.add_argument("--model-tag", default=None, help="checkpoint model tag, e.g. d20 (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a folder written by `nanochat export` (not a checkpoint)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    add_weights_arg(p)
