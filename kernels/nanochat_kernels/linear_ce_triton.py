"""Soft-capped cross-entropy over a chunk of logits in one Triton kernel: the CUDA step of the fused linear +
soft-cap + cross-entropy loss (`linear_ce_chunked` owns the chunk loop, the matmuls and autograd).

The loss of row i is lse(s_i) - s_i[y_i] with s = cap * tanh(z / cap), and its gradient with respect to the raw
logits is w_i * (softmax(s_i) - onehot(y_i)) * (1 - tanh²(z / cap)). The structure follows the row-wise kernels
of Liger-Kernel's fused linear cross-entropy and the online softmax of Milakov & Gimelshein (2018):

- One program per row streams the row's logits in BLOCK_V slices twice: pass 1 keeps a running max and a running
  sum of exponentials (the online log-sum-exp) and picks up the target logit; pass 2 (only when gradients are
  wanted) recomputes s slice by slice and overwrites the logits in place with the gradient, in the logits' dtype,
  so the cuBLAS matmuls dh = dz W and dW += dzᵀ h read it directly. No (R, V) fp32 buffer exists.
- All arithmetic in fp32 whatever the storage dtype (bf16 on GPU; fp32/fp16 in the interpreter tests).
- tanh as 1 - 2 / (exp(2x) + 1): exact at both saturations, absolute error ~1e-7 near 0 (so ~2e-6 on s at cap
  15), and it runs in the interpreter, where libdevice's tanh does not.
- Assumptions: logits (R, V) with a unit last stride (any row stride); targets int64 (R,); ignored rows
  (target == ignore_index) get loss 0 and gradient 0; target ids in [0, V) are checked by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, on_device

# 4096-wide slices with 8 warps keep 16 fp32 values per thread per slice and a long contiguous load (8 KB of bf16)
# per step; the kernel is memory-bound (2 reads + 1 write of the chunk). Compiles for sm_90 without spills
# (tests/test_fused_loss.py); how these sizes were chosen and their GPU status: bench/RESULTS.md, "Kernel
# configurations". Tune with bench/fused_loss.py.
_BLOCK_V = 4096
_NUM_WARPS = 8
_INTERP_BLOCK_V = 64  # small slices in the interpreter, so test vocabularies span several of them


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _capped(x, softcap, HAS_CAP: tl.constexpr):
    """(s, t): the capped logit s = cap * t and t = tanh(x / cap) (t unused without a cap)."""
    if HAS_CAP:
        t = _tanh(x / softcap)
        s = softcap * t
    else:
        t = x
        s = x
    return s, t


@triton.jit
def _softcap_ce_kernel(Z, TARGETS, ROW_WEIGHT, LOSS, V, stride_z, softcap, ignore_index,
                       HAS_CAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    y = tl.load(TARGETS + row)
    valid = y != ignore_index
    offs = tl.arange(0, BLOCK_V)

    # Pass 1: online log-sum-exp and the target's capped logit.
    m = tl.zeros([], dtype=tl.float32) - float("inf")
    acc = tl.zeros([], dtype=tl.float32)
    target = tl.zeros([], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        s, _ = _capped(x, softcap, HAS_CAP)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        m = m_new
        target += tl.sum(tl.where(cols == y, s, 0.0), axis=0)
    lse = m + tl.log(acc)
    tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))

    # Pass 2: dz = w * (softmax - onehot) * (1 - t²), written over the logits.
    if COMPUTE_GRAD:
        w = tl.where(valid, tl.load(ROW_WEIGHT + row), 0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            mask = cols < V
            x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            s, t = _capped(x, softcap, HAS_CAP)
            g = w * (tl.exp(s - lse) - tl.where(cols == y, 1.0, 0.0))
            if HAS_CAP:
                g = g * (1.0 - t * t)
            tl.store(z_row + cols, g.to(Z.dtype.element_ty), mask=mask)


def triton_step(z: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor | None, softcap: float,
                ignore_index: int, scratch: dict | None = None) -> torch.Tensor:
    """Losses (R,) fp32 of the logits chunk z (R, V); with row_weight (R,) fp32, also overwrite z with
    row_weight * dL/dz. Same contract as linear_ce_chunked.torch_step (no scratch needed)."""
    if z.ndim != 2 or z.stride(1) != 1:
        raise ValueError(f"logits chunk must be (R, V) with a unit last stride, got shape {tuple(z.shape)} "
                         f"strides {z.stride()}")
    if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be fp32, fp16 or bf16, got {z.dtype}")
    R, V = z.shape
    if targets.shape != (R,) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 of shape {(R,)}, got {targets.dtype} {tuple(targets.shape)}")
    if row_weight is not None and (row_weight.shape != (R,) or row_weight.dtype != torch.float32):
        raise ValueError(f"row_weight must be fp32 of shape {(R,)}, got {row_weight.dtype} "
                         f"{tuple(row_weight.shape)}")
    loss = torch.empty(R, dtype=torch.float32, device=z.device)
    if R == 0:
        return loss
    block_v = _INTERP_BLOCK_V if interpreting() else _BLOCK_V
    launch = {} if interpreting() else dict(num_warps=_NUM_WARPS)
    weights = loss if row_weight is None else row_weight.contiguous()
    with on_device(z):
        _softcap_ce_kernel[(R,)](
            z, targets.contiguous(), weights, loss, V, z.stride(0), float(softcap or 1.0), int(ignore_index),
            HAS_CAP=bool(softcap), COMPUTE_GRAD=row_weight is not None, BLOCK_V=block_v, **launch)
    return loss
