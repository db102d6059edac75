"""Causal FlashAttention-2 forward and backward in Triton, for training and prefill.

Follows FlashAttention-2 (Dao, 2023): each program owns a block of queries and streams K/V blocks through an
online softmax, so the T x T score matrix never exists in memory; the backward recomputes the probabilities from
the saved log-sum-exp. Assumptions and choices:

- Layout (B, T, H, D) as in the model (no transposes on the way in or out); any strides with a unit last dim.
- bf16 / fp16 inputs (fp32 accepted for tests: on a GPU its dots run in TF32), fp32 accumulation everywhere,
  softmax in base 2 with the scale folded into one multiply (`qk_scale = scale * log2(e)`).
- Head dims 64 and 128 (any power of two in 16..256 compiles); any T: loads are masked, no multiple-of-128 rule.
- Causal masking in two stages per program: key blocks entirely below the diagonal run without a mask, only the
  diagonal blocks pay for it.
- Sliding window (causal only): key j is visible to query i iff 0 <= i - j <= window (flash-attn's
  window_size=(window, 0)). Key blocks entirely left of a query block's window are never visited, so the work is
  O(T * window) instead of O(T^2); blocks the window edge cuts through take a third, masked stage. Rows that see no
  key of a block keep m = -inf without producing NaNs. `window` is a runtime argument (one compile serves every
  layer's window); WINDOWED is the constexpr that keeps the unwindowed kernels exactly as they were.
- GQA without repeating K/V: query head h reads K/V head h // (H / H_kv); the dK/dV program of a K/V head loops
  over the query heads of its group and accumulates in registers, so dK/dV are written once, with no atomics.
- Backward in three kernels: delta = rowsum(dO * O), then dK/dV (one program per key block), then dQ (one program
  per query block). Recomputing QKᵀ twice costs ~20% more backward FLOPs than one fused kernel with atomic dQ
  updates but is deterministic and keeps each kernel simple.
- Autograd through `torch.library.custom_op` + `register_autograd` (the custom-op form of an autograd.Function):
  base_train runs the model under torch.compile, which then sees two opaque ops with known output shapes instead
  of tracing into kernel launches. `flash_attention` checks shapes, dtypes, devices and strides before the op.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import interpreting, on_device
from .reference import check_window

# ---------------------------------------------------------------------------------------------------------------
# Configuration

# The known-good H100 settings of FlashAttention-2 and the Triton fused-attention tutorial for D in {64, 128},
# adjusted until the sm_90 compile shows no register spills and fitting shared memory
# (`python -m nanochat_kernels.resource_report`); provenance and GPU status: bench/RESULTS.md, "Kernel
# configurations". Tune with bench/kernels.py (B=8, H=10, T=2048, D=128).
_FWD_CONFIG = {64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
               128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)}
_BWD_DKDV_CONFIG = {64: dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=4),
                    128: dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3)}
_BWD_DQ_CONFIG = {64: dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4),
                  128: dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)}
# The interpreter (TRITON_INTERPRET=1, CPU tests) uses 16-wide blocks so small test shapes still cross several
# blocks and exercise both masking stages.
_INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)

_LOG2E = 1.4426950408889634


def _config(table: dict, head_dim: int) -> dict:
    if interpreting():
        return dict(_INTERPRET_CONFIG)
    return dict(table[64] if head_dim <= 64 else table[128])


# ---------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, offs_m, offs_n, offs_d, T,
               qk_scale, window, CAUSAL: tl.constexpr, MASK: tl.constexpr, WINDOWED: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Stream key blocks [lo, hi) through the online softmax; MASK applies the causal, window and sequence-end
    masks."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        k_ptrs = k_base + offs_k[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + offs_k[:, None] * stride_vt + offs_d[None, :]
        if MASK:
            k = tl.load(k_ptrs, mask=offs_k[:, None] < T, other=0.0)
            v = tl.load(v_ptrs, mask=offs_k[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        if MASK:
            valid = offs_k[None, :] < T
            if CAUSAL:
                valid = valid & (offs_k[None, :] <= offs_m[:, None])
            if WINDOWED:
                valid = valid & (offs_m[:, None] - offs_k[None, :] <= window)
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if WINDOWED and MASK:
            # A row may see no key of the first blocks it visits (they hold the window starts of later rows):
            # m stays -inf, and exp2 against a 0 stand-in keeps its p and alpha at 0 instead of NaN. Unmasked
            # blocks are visible to every row.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        else:
            # The first block every row sees holds key 0, which is always visible, so m_new is finite.
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                T, H, GROUP, qk_scale, window,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOWED: tl.constexpr):
    # Causal work grows with the query block, so launch the longest programs first (fewer idle SMs at the tail).
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 offsets: B*T*H*D may pass 2**31 at large batch
    h = bh % H
    hk = h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        # Keys below this query block are visible to all its rows (needs BLOCK_M % BLOCK_N == 0).
        below = start_m * BLOCK_M
        full_lo = 0
        if WINDOWED:
            # Key blocks before `lo` are left of every row's window: skipped. Blocks in [lo, full_lo) are cut by
            # the window edge of some row: masked. From full_lo (the first block whose first key is within the
            # last row's window) to `below`, every row sees every key.
            lo = tl.maximum(below - window, 0) // BLOCK_N * BLOCK_N
            full_lo = tl.minimum(tl.cdiv(tl.maximum(below + BLOCK_M - 1 - window, 0), BLOCK_N) * BLOCK_N, below)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, full_lo,
                                       offs_m, offs_n, offs_d, T, qk_scale, window, CAUSAL, True, WINDOWED, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, full_lo, below,
                                   offs_m, offs_n, offs_d, T, qk_scale, window, CAUSAL, False, WINDOWED, BLOCK_N)
        diag_end = tl.minimum(below + BLOCK_M, T)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, below, diag_end,
                                   offs_m, offs_n, offs_d, T, qk_scale, window, CAUSAL, True, WINDOWED, BLOCK_N)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, 0, T,
                                   offs_m, offs_n, offs_d, T, qk_scale, window, CAUSAL, True, WINDOWED, BLOCK_N)

    if WINDOWED:  # rows past T may see no key at all (l = 0); they are not stored, but must not divide by 0
        l_i = tl.where(row_ok, l_i, 1.0)
    acc = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)  # (B, H, T), log2 domain


# ---------------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh, T, H,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, t] = sum_d O * dO, the softmax-backward row correction."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, lo, hi,
                    offs_n, offs_mb, offs_d, T, qk_scale, window,
                    MASK: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate one query head's contribution to dK, dV of a key block over query blocks [lo, hi)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_mb
        row_ok = offs_m < T
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        # Rows past T get lse = +inf, hence p = 0: they contribute nothing.
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if MASK:
            visible = offs_m[None, :] >= offs_n[:, None]
            if WINDOWED:
                visible = visible & (offs_m[None, :] - offs_n[:, None] <= window)
            p_t = tl.where(visible, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                     stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                     T, H, H_KV, GROUP, sm_scale, qk_scale, window,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     WINDOWED: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // H_KV).to(tl.int64)
    hk = bhk % H_KV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # Query blocks past the diagonal: every one sees every key here without a window; with one, those from
    # full_hi on see only part of the block (masked), and those from q_hi on (past the window of the block's last
    # key) none: skipped.
    diag_end = tl.minimum(start_n + BLOCK_N, T)
    full_hi = T
    q_hi = T
    if WINDOWED:
        full_hi = tl.minimum(tl.maximum(diag_end + (start_n + window + 1 - diag_end) // BLOCK_M * BLOCK_M, diag_end),
                             T)
        q_hi = tl.minimum(start_n + BLOCK_N + window, T)
    for g in range(GROUP):  # the query heads sharing this K/V head
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * H + h) * T
        delta_base = DELTA + (b * H + h) * T
        if CAUSAL:
            # Diagonal query blocks need the mask (needs BLOCK_N % BLOCK_M == 0).
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                     start_n, diag_end, offs_n, offs_mb, offs_d, T, qk_scale, window, True,
                                     WINDOWED, BLOCK_M)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                     diag_end, full_hi, offs_n, offs_mb, offs_d, T, qk_scale, window, False,
                                     WINDOWED, BLOCK_M)
            if WINDOWED:
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                         stride_dot, full_hi, q_hi, offs_n, offs_mb, offs_d, T, qk_scale, window,
                                         True, WINDOWED, BLOCK_M)
        else:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                     0, T, offs_n, offs_mb, offs_d, T, qk_scale, window, False, WINDOWED, BLOCK_M)
    dk *= sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, hi, offs_m, offs_nb, offs_d, T,
                  qk_scale, window, CAUSAL: tl.constexpr, MASK: tl.constexpr, WINDOWED: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_nb
        col_ok = offs_n < T
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASK:
            valid = col_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            if WINDOWED:
                valid = valid & (offs_m[:, None] - offs_n[None, :] <= window)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                   stride_dqb, stride_dqt, stride_dqh,
                   T, H, GROUP, sm_scale, qk_scale, window,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   WINDOWED: tl.constexpr):
    # Causal work grows with the query block, so launch the longest programs first (fewer idle SMs at the tail).
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 offsets: B*T*H*D may pass 2**31 at large batch
    h = bh % H
    hk = h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        below = start_m * BLOCK_M  # needs BLOCK_M % BLOCK_N == 0
        full_lo = 0
        if WINDOWED:  # the forward's three stages: skipped, window edge (masked), fully visible
            lo = tl.maximum(below - window, 0) // BLOCK_N * BLOCK_N
            full_lo = tl.minimum(tl.cdiv(tl.maximum(below + BLOCK_M - 1 - window, 0), BLOCK_N) * BLOCK_N, below)
            dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, full_lo, offs_m,
                               offs_nb, offs_d, T, qk_scale, window, CAUSAL, True, WINDOWED, BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, full_lo, below, offs_m,
                           offs_nb, offs_d, T, qk_scale, window, CAUSAL, False, WINDOWED, BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, below,
                           tl.minimum(below + BLOCK_M, T), offs_m, offs_nb, offs_d, T, qk_scale, window, CAUSAL,
                           True, WINDOWED, BLOCK_N)
    else:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, 0, T, offs_m, offs_nb,
                           offs_d, T, qk_scale, window, CAUSAL, True, WINDOWED, BLOCK_N)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# Host side


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects q, k, v of shape (B, T, H, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k and v must have shape (B={B}, T={T}, H_kv, D={D}), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    H_kv = k.shape[2]
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"number of query heads {H} must be a multiple of K/V heads {H_kv}")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim must be a power of two in 16..256 (64 and 128 are tuned), got {D}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with stride 1; anything else gets one copy here, at the boundary."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _flash_forward(q, k, v, causal: bool, scale: float, window: int):
    B, T, H, D = q.shape
    group = H // k.shape[2]
    o = q.new_empty(q.shape)  # contiguous, as the fake implementation says
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    cfg = _config(_FWD_CONFIG, D)
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    grid = (triton.cdiv(T, block_m), B * H)
    with on_device(q):
        _fwd_kernel[grid](q, k, v, o, lse,
                          q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                          v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                          T, H, group, scale * _LOG2E, max(window, 0),
                          HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, WINDOWED=window >= 0, **cfg)
    return o, lse


def _flash_backward(do, q, k, v, o, lse, causal: bool, scale: float, window: int):
    with on_device(q):  # autograd may run the backward on a thread whose current device is another GPU
        return _flash_backward_launches(do, q, k, v, o, lse, causal, scale, window)


def _flash_backward_launches(do, q, k, v, o, lse, causal: bool, scale: float, window: int):
    B, T, H, D = q.shape
    H_kv = k.shape[2]
    group = H // H_kv
    delta = torch.empty_like(lse)
    block_delta = 16 if interpreting() else 64
    _bwd_delta_kernel[(triton.cdiv(T, block_delta), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), T, H,
        HEAD_DIM=D, BLOCK_M=block_delta)

    dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)
    cfg = _config(_BWD_DKDV_CONFIG, D)
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    _bwd_dkdv_kernel[(triton.cdiv(T, block_n), B * H_kv)](
        q, k, v, do, lse, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        T, H, H_kv, group, scale, scale * _LOG2E, max(window, 0),
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, WINDOWED=window >= 0, **cfg)

    dq = q.new_empty(q.shape)
    cfg = _config(_BWD_DQ_CONFIG, D)
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    _bwd_dq_kernel[(triton.cdiv(T, block_m), B * H)](
        q, k, v, do, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        T, H, group, scale, scale * _LOG2E, max(window, 0),
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, WINDOWED=window >= 0, **cfg)
    return dq, dk, dv


# The kernels enter autograd and torch.compile as two custom ops: compile sees opaque calls with known output
# shapes (no tracing into Triton launches, no graph breaks), and autograd pairs them through register_autograd.
# Their `window` is an int, -1 for none (a plain int keeps the op schema simple).


@torch.library.custom_op("nanochat_kernels::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    scale: float, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_forward(q, k, v, causal, scale, window)


@_flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(q, k, v, causal, scale, window):
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("nanochat_kernels::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, causal: bool, scale: float,
                    window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _flash_backward(do, q, k, v, o, lse, causal, scale, window)


@_flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(do, q, k, v, o, lse, causal, scale, window):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, window = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale, ctx.window = causal, scale, window


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    do = _unit_last(do.to(q.dtype))  # an upstream fp32 cast must not mix dtypes inside the dots
    dq, dk, dv = _flash_attn_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.window)
    return dq, dk, dv, None, None, None


_flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """q (B, T, H, D), k/v (B, T, H_kv, D) with H % H_kv == 0 -> (B, T, H, D); differentiable in q, k, v.
    `window` None or an int >= 0 (causal only): key j visible to query i iff 0 <= i - j <= window.

    Validates shapes, dtypes and devices here, at the boundary, and gives the kernels a unit stride along D."""
    _check_inputs(q, k, v)
    window = check_window(window, causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # A window reaching key 0 from the last query is full causal attention: the unwindowed kernels run it.
    window = -1 if window is None or window >= q.shape[1] - 1 else window
    out, _ = _flash_attn_fwd(_unit_last(q), _unit_last(k), _unit_last(v), bool(causal), scale, window)
    return out
