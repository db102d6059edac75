"""nanochat_kernels: attention, KV-cache decode attention and Newton-Schulz, each dispatching to Triton on CUDA
and to the plain-torch references in `nanochat_kernels.reference` elsewhere; and the fused linear + soft-cap +
cross-entropy loss, whose non-Triton path is the chunked torch one (linear_ce_chunked), not the materialized
reference, so it never holds the (N, V) logits unless NANOCHAT_KERNELS=reference asks for them.

`attention` and `decode_attention` take `window` (None: full causal; an int: sliding-window attention, key j
visible to query i iff 0 <= i - j <= window, as nanochat's short-window layers use it), on both paths.

Dispatch, by the environment variable NANOCHAT_KERNELS (read at every call):
- unset or "auto": Triton when every tensor is on CUDA, Triton is installed and the shape is one the kernels support
  (head dim a power of two in 16..256); the reference otherwise.
- "reference" (or "torch"): the references everywhere (debugging, parity checks).
- "triton": Triton always, or a clear error. CPU tensors need TRITON_INTERPRET=1 (Triton's CPU interpreter, which
  must be set before the kernel modules are imported; it mishandles bf16, so test fp32/fp16 there).

Kernel modules (flash_attention, flash_decoding, newton_schulz_triton) are named apart from the public functions:
importing a submodule binds its name on the package, so a module `decode_attention` would replace the function.
The Triton modules are imported lazily, on the first call that uses them, so importing this package never needs a
GPU or a working Triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import reference
from ._common import interpreting
from .linear_ce_chunked import fused_linear_cross_entropy

__all__ = ["attention", "decode_attention", "newton_schulz", "linear_cross_entropy", "reference", "use_triton",
           "kernel_mode"]

_MODES = {"": "auto", "auto": "auto", "reference": "reference", "torch": "reference", "triton": "triton"}
_HEAD_DIMS = (16, 32, 64, 128, 256)


def kernel_mode() -> str:
    """"auto", "reference" or "triton", from NANOCHAT_KERNELS."""
    raw = os.environ.get("NANOCHAT_KERNELS", "").strip().lower()
    if raw not in _MODES:
        raise ValueError(f"NANOCHAT_KERNELS must be one of auto, reference, torch, triton; got {raw!r}")
    return _MODES[raw]


# Whether Triton is installed, found without importing it (importing it is slow, and torch.compile traces the
# dispatch below, which must stay free of imports). A broken install surfaces when a kernel module imports it.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(*tensors: torch.Tensor, supported: bool = True) -> bool:
    """Whether a call on `tensors` runs the Triton kernel; `supported` says whether the kernel handles the shape."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "triton":
        if not _HAS_TRITON:
            raise RuntimeError("NANOCHAT_KERNELS=triton but triton is not installed")
        if not all(t.is_cuda for t in tensors) and not interpreting():
            devices = sorted({str(t.device) for t in tensors})
            raise RuntimeError(f"NANOCHAT_KERNELS=triton on {devices} tensors needs CUDA, or TRITON_INTERPRET=1 "
                               f"for Triton's CPU interpreter")
        if not supported:
            raise ValueError("NANOCHAT_KERNELS=triton but the Triton kernel does not support this shape: "
                             f"{[tuple(t.shape) for t in tensors]} (head dim must be one of {_HEAD_DIMS})")
        return True
    return supported and all(t.is_cuda for t in tensors) and _HAS_TRITON


def attention(q, k, v, causal: bool = True, scale: float | None = None, window: int | None = None):
    """q (B, T, H, D), k/v (B, T, H_kv, D) -> (B, T, H, D); `window` None (full causal) or an int >= 0: key j
    visible to query i iff 0 <= i - j <= window. See reference.attention."""
    window = reference.check_window(window, causal)
    if use_triton(q, k, v, supported=q.shape[-1] in _HEAD_DIMS):
        from .flash_attention import flash_attention  # imports Triton: only when a Triton path runs
        return flash_attention(q, k, v, causal=causal, scale=scale, window=window)
    return reference.attention(q, k, v, causal=causal, scale=scale, window=window)


def decode_attention(q, k_cache, v_cache, cache_lens, scale: float | None = None, window: int | None = None):
    """q (B, T_q, H, D) over caches (B, T_max, H_kv, D) with valid lengths cache_lens (B,), which count the T_q
    new tokens; `window` as in `attention`, relative to each query's position. See reference.decode_attention.

    The Triton path is inference only: with autograd recording a q that requires grad, auto mode uses the
    (differentiable) reference.
    """
    window = reference.check_window(window)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    supported = q.shape[-1] in _HEAD_DIMS and not needs_grad
    if use_triton(q, k_cache, v_cache, cache_lens, supported=supported):
        from .flash_decoding import flash_decode  # imports Triton: only when a Triton path runs
        return flash_decode(q, k_cache, v_cache, cache_lens, scale=scale, window=window)
    return reference.decode_attention(q, k_cache, v_cache, cache_lens, scale=scale, window=window)


def newton_schulz(G, steps: int = 5, coeffs="quintic"):
    """Orthogonalize G (..., M, N) batched over leading dims. See reference.newton_schulz."""
    if use_triton(G):
        from .newton_schulz_triton import newton_schulz_triton  # imports Triton: only when a Triton path runs
        return newton_schulz_triton(G, steps=steps, coeffs=coeffs)
    return reference.newton_schulz(G, steps=steps, coeffs=coeffs)


def linear_cross_entropy(hidden, weight, targets, softcap: float | None, ignore_index: int = -1,
                         reduction: str = "mean"):
    """Cross-entropy of softcap * tanh(hidden @ weightᵀ / softcap) against targets, never holding the (N, V) logits.

    hidden (..., D), weight (V, D), targets (...) int; ignore_index targets count nothing; reduction "mean" (over
    the non-ignored targets), "sum" or "none" (shape of targets, 0 where ignored); softcap None or 0 for none.
    Triton on CUDA, chunked torch elsewhere (auto), the materialized reference with NANOCHAT_KERNELS=reference.
    """
    if kernel_mode() == "reference":
        return reference.linear_cross_entropy(hidden, weight, targets, softcap, ignore_index, reduction)
    impl = "triton" if use_triton(hidden, weight, targets) else "torch"
    return fused_linear_cross_entropy(hidden, weight, targets, softcap, ignore_index, reduction, impl=impl)
