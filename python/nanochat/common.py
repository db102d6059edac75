"""Process-wide plumbing shared by every stage; imports nothing else from nanochat.

- base directory: $NANOCHAT_BASE_DIR, default ~/.cache/nanochat
- device and dtype: CUDA (bf16) when present, else CPU (fp32); `--device` may force either
- distributed: initialised from torchrun's environment (NCCL on CUDA, gloo on CPU); one process otherwise
- logging: rank 0 prints, every rank may warn
- atomic file writes: write to a temporary name in the same folder, fsync, rename
- user mistakes: `UserError` (and its kinds below) is what `nanochat` reports as one line and exit status 2
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
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
# Device, dtype and distributed set-up


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # compute dtype for activations (bf16 on CUDA, fp32 on CPU)
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def autodetect_device(requested: str | None = None) -> torch.device:
    """'cuda' when available, else 'cpu'; `requested` ("cpu", "cuda") overrides."""
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {requested} requested but CUDA is not available")
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_runtime(device: str | None = None, dtype: str | None = None) -> Runtime:
    """Set up device, dtype and (under torchrun) the process group. Safe to call once per process."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev = autodetect_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    if dtype is None:
        compute_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        compute_dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                         "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    return Runtime(dev, compute_dtype, rank, local_rank, world_size)


def shutdown_runtime() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
        import triton

        info["triton"] = triton.__version__
    return info
