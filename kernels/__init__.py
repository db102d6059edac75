"""nanochat_kernels: attention, KV-cache decode attention and Newton-Schulz, each dispatching to Triton on CUDA
and to the plain-torch references in `nanochat_kernels.reference` elsewhere.

Set NANOCHAT_KERNELS=reference to force the references everywhere (for debugging and parity checks).
"""

from __future__ import annotations

import os

import torch

from . import reference

__all__ = ["attention", "decode_attention", "newton_schulz", "reference", "use_triton"]


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on CUDA, Triton imports, and the references are not forced."""
    if os.environ.get("NANOCHAT_KERNELS", "").lower() in ("reference", "torch"):
        return False
    return False  # the Triton kernels land with the kernels issue; until then everything uses the references


def attention(q, k, v, causal: bool = True, scale: float | None = None):
    """q (B, T, H, D), k/v (B, T, H_kv, D) -> (B, T, H, D). See reference.attention."""
    return reference.attention(q, k, v, causal=causal, scale=scale)


def decode_attention(q, k_cache, v_cache, cache_lens, scale: float | None = None):
    """q (B, T_q, H, D) over caches (B, T_max, H_kv, D) with valid lengths cache_lens (B,). See reference."""
    return reference.decode_attention(q, k_cache, v_cache, cache_lens, scale=scale)


def newton_schulz(G, steps: int = 5, coeffs="quintic"):
    """Orthogonalize G (..., M, N) batched over leading dims. See reference.newton_schulz."""
    return reference.newton_schulz(G, steps=steps, coeffs=coeffs)
