"""Muon's Newton-Schulz orthogonalization with a symmetric Triton matmul, batched over stacks of matrices.

Each step maps X -> a X + (b A + c A²) X with A = X Xᵀ (X wide: rows <= cols, else work on Xᵀ), exactly as in
`reference.newton_schulz`. Notable choices:

- A = X Xᵀ and B = b A + c A A are symmetric, so one kernel computes only the tiles on and above the diagonal
  (one program per tile pair (i, j), i <= j, from a small host table) and writes each off-diagonal result twice,
  as tile (i, j) and, transposed, as tile (j, i). That halves the FLOPs of two of the three matmuls per step.
  The same kernel serves both: out = alpha * Y Yᵀ + beta * Z with (Y, Z) = (X, none) then (A, A) (A Aᵀ = A² because
  A is symmetric, and the b A term is fused into the epilogue).
- The third product, a X + B X, has no symmetry to exploit, so it stays a cuBLAS `baddbmm` (a fused epilogue in a
  Triton GEMM would save one pass over X but was not measurable here; try it when tuning on a GPU).
- bf16 on CUDA (as the reference), fp32 accumulation in every dot; fp32 elsewhere (interpreter tests).
- The Frobenius normalization and the orientation flip are plain torch: they are O(M N), not O(M² N).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, on_device
from .reference import coefficient_schedule

# 128x128 output tiles with 64-deep K steps, 8 warps and 3 stages: the standard bf16 Triton GEMM setting on H100,
# compiling for sm_90 without spills (`python -m nanochat_kernels.resource_report`); provenance and GPU status:
# bench/RESULTS.md, "Kernel configurations". Tune with bench/kernels.py (1280², 1280x5120, 1664² stacks).
_BLOCK = 128
_BLOCK_K = 64
_NUM_WARPS = 8
_NUM_STAGES = 3

_PAIR_TABLES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _tile_pairs(n_tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column tile indices (i <= j) of the upper triangle, cached per size and device."""
    key = (n_tiles, str(device))
    if key not in _PAIR_TABLES:
        i, j = torch.triu_indices(n_tiles, n_tiles)
        _PAIR_TABLES[key] = (i.to(device=device, dtype=torch.int32), j.to(device=device, dtype=torch.int32))
    return _PAIR_TABLES[key]


@triton.jit
def _sym_gram_kernel(Y, Z, OUT, TILE_I, TILE_J, M, K,
                     stride_yb, stride_ym, stride_yk, stride_zb, stride_zm, stride_zn,
                     stride_ob, stride_om, stride_on, alpha, beta,
                     HAS_Z: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT = alpha * Y Yᵀ + beta * Z for symmetric Z, one upper tile pair per program, mirrored below."""
    pair = tl.program_id(0)
    bidx = tl.program_id(1).to(tl.int64)
    ti = tl.load(TILE_I + pair)
    tj = tl.load(TILE_J + pair)
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    i_ok = offs_i < M
    j_ok = offs_j < M
    y = Y + bidx * stride_yb
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(y + offs_i[:, None] * stride_ym + (k0 + offs_k)[None, :] * stride_yk,
                    mask=i_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(y + offs_j[:, None] * stride_ym + (k0 + offs_k)[None, :] * stride_yk,
                     mask=j_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(bt))
    acc = acc * alpha
    if HAS_Z:
        z = tl.load(Z + bidx * stride_zb + offs_i[:, None] * stride_zm + offs_j[None, :] * stride_zn,
                    mask=i_ok[:, None] & j_ok[None, :], other=0.0)
        acc += beta * z.to(tl.float32)
    if ti == tj:
        # a diagonal tile computes both (r, c) and (c, r); a GEMM need not sum them in the same order (numpy's
        # BLAS under the interpreter does not), so average with the transpose: exactly symmetric, like the mirror
        acc = (acc + tl.trans(acc)) * 0.5
    res = acc.to(OUT.dtype.element_ty)
    out = OUT + bidx * stride_ob
    tl.store(out + offs_i[:, None] * stride_om + offs_j[None, :] * stride_on, res,
             mask=i_ok[:, None] & j_ok[None, :])
    if ti != tj:
        tl.store(out + offs_j[:, None] * stride_om + offs_i[None, :] * stride_on, tl.trans(res),
                 mask=j_ok[:, None] & i_ok[None, :])


def sym_gram(Y: torch.Tensor, Z: torch.Tensor | None = None, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """alpha * Y Yᵀ + beta * Z for a stack Y (batch, M, K) and a symmetric stack Z (batch, M, M) -> (batch, M, M)."""
    if Y.ndim != 3:
        raise ValueError(f"sym_gram expects a stack (batch, M, K), got shape {tuple(Y.shape)}")
    batch, M, K = Y.shape
    if Z is not None and Z.shape != (batch, M, M):
        raise ValueError(f"Z must have shape {(batch, M, M)}, got {tuple(Z.shape)}")
    out = torch.empty((batch, M, M), device=Y.device, dtype=Y.dtype)
    block, block_k = (16, 16) if interpreting() else (_BLOCK, _BLOCK_K)
    launch = {} if interpreting() else dict(num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)
    tile_i, tile_j = _tile_pairs(triton.cdiv(M, block), Y.device)
    zz = out if Z is None else Z
    with on_device(Y):
        _sym_gram_kernel[(tile_i.numel(), batch)](
            Y, zz, out, tile_i, tile_j, M, K,
            Y.stride(0), Y.stride(1), Y.stride(2), zz.stride(0), zz.stride(1), zz.stride(2),
            out.stride(0), out.stride(1), out.stride(2), float(alpha), float(beta),
            HAS_Z=Z is not None, BLOCK=block, BLOCK_K=block_k, **launch)
    return out


def newton_schulz_triton(G: torch.Tensor, steps: int = 5, coeffs="quintic", eps: float = 1e-7) -> torch.Tensor:
    """Orthogonal polar factor of G (..., M, N) by `steps` Newton-Schulz iterations; returns G's dtype."""
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    schedule = coefficient_schedule(steps, coeffs)
    compute_dtype = torch.bfloat16 if G.is_cuda else torch.float32
    lead, (M, N) = G.shape[:-2], G.shape[-2:]
    X = G.reshape(-1, M, N).to(compute_dtype)
    transposed = M > N
    if transposed:
        X = X.mT  # a strided view; the normalization below materializes it in the wide layout
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) + eps)).contiguous()  # (batch, m, n), m <= n
    for a, b, c in schedule:
        A = sym_gram(X)                      # X Xᵀ, (batch, m, m)
        B = sym_gram(A, A, alpha=c, beta=b)  # c A² + b A
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)  # a X + B X
    if transposed:
        X = X.mT
    return X.reshape(*lead, M, N).to(G.dtype)
