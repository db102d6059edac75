"""The process's runtime: which device it computes on, in which precision, compiled or not, on how many threads,
and its place in a torchrun job.

Precision is decided here and nowhere else: `choose_dtype` picks a run's compute dtype for any device (the stages'
--dtype flag, or the device's default for every path without one) and `autocast` turns a dtype into the context a
forward runs in. GPT.forward asks `autocast(device)` for the device's default, a training stage asks
`Runtime.autocast()` for its run's choice; both answer from the same rule, so a CUDA forward is bf16 whoever calls
it and a CPU forward is bf16 only when a run chose it.

CPU choices (dtype, compilation, threads) are automatic defaults that a flag overrides; each comes back with its
reason, for the start-up log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.common import UserError, init_process_group

# /proc/cpuinfo flags of a native bf16 dot product: AVX512-BF16 (vdpbf16ps; Cooper Lake, Zen 4 and later), AMX-BF16
# (Sapphire Rapids tiles), and aarch64's "bf16" feature (BFDOT/BFMMLA; Neoverse V1/N2). Without one, oneDNN emulates
# bf16 through fp32 and autocast only adds conversions; with one, a matmul of the lm_head's shape runs about 2.3x
# the fp32 rate (bench/RESULTS.md, "Machine notes moved out of code comments").
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

# torch.compile on CPU made a depth-4 training step about 2.2x faster but costs about 85 s of compilation
# (bench/RESULTS.md, "Training step"), so it pays back after some tens of steps; automatic compilation starts at
# this many optimizer steps, with margin (short runs and the tests stay eager).
CPU_COMPILE_MIN_STEPS = 200


@dataclass(frozen=True)
class Runtime:
    """This process's device, compute dtype and place in the job (`init_runtime`); every stage's `train(args, rt)`
    gets one."""
    device: torch.device
    dtype: torch.dtype  # compute dtype of the matmuls (choose_dtype)
    rank: int
    local_rank: int
    world_size: int
    dtype_reason: str = ""  # why that dtype, for the start-up log

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """The context a training forward runs in: `autocast(device, dtype)` for this run's dtype."""
        return autocast(self.device, self.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Device and process group


def autodetect_device(requested: str | None = None) -> torch.device:
    """'cuda' when available, else 'cpu'; `requested` ("cpu", "cuda") overrides."""
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {requested} requested but CUDA is not available")
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_runtime(device: str | None = None, dtype: str | None = None) -> Runtime:
    """Set up device, dtype (choose_dtype; None: the device's default) and, under torchrun, the process group.
    Safe to call once per process."""
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
    compute_dtype, reason = choose_dtype(dtype, dev)
    return Runtime(dev, compute_dtype, rank, local_rank, world_size, reason)


def shutdown_runtime() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Precision


def default_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype of a path that chose none: bf16 on CUDA (tensor cores; fp32 master weights either way),
    fp32 elsewhere (a CPU without native bf16 dot products only pays for conversions)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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


def choose_dtype(requested: str | None, device: torch.device,
                 flags: set[str] | None = None) -> tuple[torch.dtype, str]:
    """--dtype auto|bf16|fp32, or None for a path without the flag -> (compute dtype, reason).

    CUDA: bf16 only (fp32 is refused). CPU: None is fp32 (default_dtype); auto is bf16 where the CPU has a native
    bf16 dot product, fp32 otherwise; bf16 and fp32 as asked."""
    if requested not in (None, "auto", "bf16", "fp32"):
        raise ValueError(f"dtype must be auto, bf16 or fp32, got {requested!r}")
    if device.type == "cuda":
        if requested == "fp32":
            raise ValueError("--dtype fp32 is for CPUs: on CUDA the model always runs under bf16 autocast")
        return torch.bfloat16, "CUDA: bf16 autocast"
    if requested is None:
        return default_dtype(device), "CPU default"
    native = native_bf16_flags(flags)
    if requested == "fp32":
        return torch.float32, "--dtype fp32"
    if requested == "bf16":
        return torch.bfloat16, "--dtype bf16" + ("" if native else " (no native bf16 on this CPU: emulated, slower)")
    if native:
        return torch.bfloat16, f"auto: the CPU has {'/'.join(native)} (native bf16 dot products)"
    return torch.float32, f"auto: no native bf16 dot product on this CPU (none of {', '.join(NATIVE_BF16_FLAGS)})"


def autocast(device: torch.device, dtype: torch.dtype | None = None):
    """The context a forward on `device` runs in for compute dtype `dtype` (None: default_dtype(device)).

    bf16: autocast, so matmuls and attention run in bf16 while norms, soft-cap and loss stay fp32 (weights,
    gradients and optimizer state are fp32 either way). fp32: no context at all, so an enclosing caller's choice
    stays in effect (GPT.forward asks for the default; a bf16 CPU run's forward is inside Runtime.autocast)."""
    dtype = default_dtype(device) if dtype is None else dtype
    if dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Compilation and threads


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
