"""Process-wide plumbing shared by every stage; imports nothing else from nanochat.

- base directory: $NANOCHAT_BASE_DIR, default ~/.cache/nanochat
- device and dtype: CUDA (bf16) when present, else CPU (fp32); `--device` may force either
- CPU training speed: bf16 autocast where the instruction set has bf16 dot products (read from /proc/cpuinfo),
  torch.compile when a run is long enough to pay for the compilation, intra-op threads per process; each choice
  comes back with the reason, for the start-up log
- distributed: initialised from torchrun's environment (NCCL on CUDA, gloo on CPU); one process otherwise
- logging: rank 0 prints, every rank may warn
- atomic file writes: write to a temporary name in the same folder, fsync, rename
- user mistakes: `UserError` (and its kinds below) is what `nanochat` reports as one line and exit status 2
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import shutil
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
# Device, dtype and distributed set-up


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # compute dtype of the matmuls (bf16 on CUDA; on CPU see choose_dtype)
    rank: int
    local_rank: int
    world_size: int
    dtype_reason: str = ""  # why that dtype, for the start-up log

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """The context a training forward runs in: bf16 autocast on a bf16 CPU runtime (weights, gradients and
        optimizer state stay fp32); nothing on CUDA, where the model enters bf16 autocast itself."""
        return cpu_autocast(self.device, self.dtype)


def autodetect_device(requested: str | None = None) -> torch.device:
    """'cuda' when available, else 'cpu'; `requested` ("cpu", "cuda") overrides."""
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {requested} requested but CUDA is not available")
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_runtime(device: str | None = None, dtype: str | None = None) -> Runtime:
    """Set up device, dtype and (under torchrun) the process group. Safe to call once per process.

    dtype None keeps the historical default (bf16 on CUDA, fp32 on CPU: stages without a --dtype flag never
    autocast on CPU); "auto", "bf16" or "fp32" go through choose_dtype."""
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
        init_process_group(backend, **kwargs)
    if dtype is None:
        compute_dtype, reason = (torch.bfloat16, "CUDA") if dev.type == "cuda" else (torch.float32, "CPU default")
    else:
        compute_dtype, reason = choose_dtype(dtype, dev)
    return Runtime(dev, compute_dtype, rank, local_rank, world_size, reason)


# ---------------------------------------------------------------------------------------------------------------
# CPU training speed: dtype, compilation, threads

# /proc/cpuinfo flags of a native bf16 dot product: AVX512-BF16 (vdpbf16ps; Cooper Lake, Zen 4 and later), AMX-BF16
# (Sapphire Rapids tiles), and aarch64's "bf16" feature (BFDOT/BFMMLA; Neoverse V1/N2). Without one, oneDNN emulates
# bf16 through fp32 and autocast only adds conversions. Measured on a 2-core avx512_bf16 box: a matmul of the
# lm_head's shape runs 294 GFLOP/s in bf16 against 127 in fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

# torch.compile on CPU: at depth 4, T=512, 4,096 tokens/step on the 2-core box at load ~13, a compiled bf16 step took
# 11.3 s against 24.9 s eager and compiling cost ~85 s (bench/RESULTS.md), so it pays back after some tens of steps;
# automatic compilation starts at this many optimizer steps, with margin (short runs and the tests stay eager).
CPU_COMPILE_MIN_STEPS = 200


def cpu_flags() -> set[str]:
    """The CPU's feature flags ("flags" on x86, "Features" on aarch64 in /proc/cpuinfo); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_bf16_flags(flags: set[str] | None = None) -> list[str]:
    """Which of NATIVE_BF16_FLAGS this CPU has (empty: no native bf16 dot product)."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in NATIVE_BF16_FLAGS if f in flags]


def choose_dtype(requested: str, device: torch.device, flags: set[str] | None = None) -> tuple[torch.dtype, str]:
    """--dtype auto|bf16|fp32 -> (compute dtype, reason). auto on CPU: bf16 where the CPU has a native bf16 dot
    product, fp32 otherwise. On CUDA only bf16 exists (the model autocasts itself)."""
    if requested not in ("auto", "bf16", "fp32"):
        raise ValueError(f"dtype must be auto, bf16 or fp32, got {requested!r}")
    if device.type == "cuda":
        if requested == "fp32":
            raise ValueError("--dtype fp32 is for CPUs: on CUDA the model always runs under bf16 autocast")
        return torch.bfloat16, "CUDA: the model's bf16 autocast"
    native = native_bf16_flags(flags)
    if requested == "fp32":
        return torch.float32, "--dtype fp32"
    if requested == "bf16":
        return torch.bfloat16, "--dtype bf16" + ("" if native else " (no native bf16 on this CPU: emulated, slower)")
    if native:
        return torch.bfloat16, f"auto: the CPU has {'/'.join(native)} (native bf16 dot products)"
    return torch.float32, f"auto: no native bf16 dot product on this CPU (none of {', '.join(NATIVE_BF16_FLAGS)})"


def cpu_autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on CPU when dtype is bf16: matmuls and attention in bf16, norms, soft-cap and loss in fp32;
    a no-op otherwise."""
    enabled = device.type == "cpu" and dtype == torch.bfloat16
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def choose_compile(requested: bool | None, device: torch.device, steps: int) -> tuple[bool, str]:
    """--compile / --no-compile / automatic -> (compile?, reason). Automatic: always on CUDA; on CPU when the run
    has at least CPU_COMPILE_MIN_STEPS steps and a C++ compiler for inductor is on the PATH."""
    if requested is not None:
        return requested, "--compile" if requested else "--no-compile"
    if device.type == "cuda":
        return True, "auto: CUDA"
    compiler = os.environ.get("CXX") or next((c for c in ("g++", "clang++", "c++") if shutil.which(c)), None)
    if compiler is None or not shutil.which(compiler):
        return False, "auto: no C++ compiler on the PATH for inductor's CPU code"
    if steps < CPU_COMPILE_MIN_STEPS:
        return False, f"auto: {steps} steps on CPU, too few to pay back compilation (< {CPU_COMPILE_MIN_STEPS})"
    return True, f"auto: {steps} steps on CPU (>= {CPU_COMPILE_MIN_STEPS}) pay back compilation"


def configure_threads(requested: int | None, device: torch.device) -> str:
    """Set torch's intra-op threads -> a description for the log. Automatic: $OMP_NUM_THREADS when set, else the
    cores this process may use divided among the processes torchrun started on this node (two gloo ranks on two
    cores get one thread each instead of fighting over four). GPU processes are left alone."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        torch.set_num_threads(requested)
        return f"{requested} (--threads)"
    if device.type != "cpu":
        return f"{torch.get_num_threads()} (torch default)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} ($OMP_NUM_THREADS)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, cores // local)
    torch.set_num_threads(threads)
    return f"{threads} (auto: {cores} cores / {local} process(es) on this node)"


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
        import triton  # optional: a CPU-only install may lack it

        info["triton"] = triton.__version__
    return info
