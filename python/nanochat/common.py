"""The bottom layer: what every part of nanochat may need and nothing of nanochat's own (it imports no other
nanochat module).

- paths: everything a run writes lives under one base directory ($NANOCHAT_BASE_DIR, default ~/.cache/nanochat),
  so a fresh directory is a fresh project
- atomic writes (temporary name in the same folder, fsync, rename): a crash leaves the old file or the new one,
  never half of one
- user mistakes are `UserError`s, which `nanochat` reports as one line and exit status 2; anything else is a bug
  and keeps its traceback
- rank 0 prints; reductions over the process group are no-ops in a single process, so the same code runs under
  torchrun and without it
- provenance (commit, versions, hardware) goes with every checkpoint and report
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------------------------
# Paths


def base_dir() -> Path:
    """Where data, tokenizers, checkpoints and reports live."""
    path = Path(os.environ.get("NANOCHAT_BASE_DIR", Path.home() / ".cache" / "nanochat")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file next to `path`; on clean exit fsync and rename it over `path`.

    A crash (or an exception in the body) leaves `path` untouched and removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------------------
# User mistakes


def at_least(low: int):
    """argparse type: an int >= low. A value out of range is a usage error (one line, exit status 2), found before
    anything is loaded, rather than a traceback deep in a stage."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def float_in(low: float, high: float = math.inf):
    """argparse type: a finite float in [low, high]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low <= value <= high) or math.isnan(value):
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value
    return parse


class UserError(Exception):
    """A mistake the user can fix: no checkpoint, tokenizer or data yet, a corrupt file, a flag value out of range.

    Raised where the condition is detected; `nanochat` (cli.main) prints the message as one line on stderr and exits
    with status 2. Every other exception is a bug and keeps its traceback."""


class MissingInputError(UserError, FileNotFoundError):
    """A checkpoint, tokenizer or data file that is not there yet (still a FileNotFoundError to callers that skip
    over missing things)."""


class CorruptInputError(UserError, ValueError):
    """A file that is there but cannot be read: a truncated checkpoint, shard or tokenizer."""


# ---------------------------------------------------------------------------------------------------------------
# Logging

_LOGGER_NAME = "nanochat"


def get_logger() -> logging.Logger:
    logger = logging.getLogger(_LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("NANOCHAT_LOG_LEVEL", "INFO"))
    return logger


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The process group and reductions over it (the runtime that starts the group is nanochat.runtime)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group, (0, 1) in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True inside a process group of more than one process (then reductions must all-reduce)."""
    return rank_and_world()[1] > 1


def sum_over_ranks(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All-reduce (sum) each tensor in place over the process group; a no-op in a single process."""
    if is_distributed():
        for t in tensors:
            dist.all_reduce(t)
    return tensors


def sum_counts_over_ranks(*counts: int, device) -> tuple[int, ...]:
    """Integer counts summed over the process group (one all-reduce); returned as they are in a single process."""
    if not is_distributed():
        return counts
    total, = sum_over_ranks(torch.tensor(counts, dtype=torch.long, device=device))
    return tuple(int(c) for c in total)


def init_process_group(backend: str, **kwargs) -> None:
    """dist.init_process_group, with torch._dynamo imported first.

    Importing torch._dynamo (which the first custom-op call or torch.compile does) after the default group exists
    leaves C-level references to that group behind, so destroy_process_group no longer joins gloo's worker threads;
    one of them may then free a finished collective's tensors while the interpreter finalizes and abort the process
    ("terminate called without an active exception") after a run that succeeded. Imported first, no reference leaks."""
    import torch._dynamo  # noqa: F401  (deliberately here: must precede init_process_group, see above)

    dist.init_process_group(backend=backend, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Provenance: what a run needs to be reproduced


def git_commit(short: bool = False) -> str:
    """The commit of the source tree this package was imported from, or 'unknown'."""
    root = Path(__file__).resolve().parents[2]
    try:
        args = ["git", "-C", str(root), "rev-parse"] + (["--short"] if short else []) + ["HEAD"]
        out = subprocess.run(args, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip()
        if out.returncode == 0 and commit:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def system_info() -> dict:
    """Hardware and versions, for checkpoints and the report."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    with contextlib.suppress(ImportError):
        import triton  # optional: a CPU-only install may lack it

        info["triton"] = triton.__version__
    return info
