"""Helpers shared by the kernel modules (no kernels here)."""

from __future__ import annotations

import contextlib
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def on_device(tensor: torch.Tensor):
    """`with on_device(x):` around a Triton launch makes x's GPU the current device for it.

    Triton launches on the thread's current CUDA device (its stream and context), not on the device of the
    arguments: without this guard a call on cuda:1 tensors from a thread whose current device is cuda:0 (every new
    thread, e.g. a server replica's worker) runs the kernel on the wrong GPU. CPU tensors (the interpreter) need
    nothing."""
    if tensor.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)
