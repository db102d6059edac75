"""Decode attention in Triton: a few new queries per row over a preallocated KV cache with a length per row.

Follows Flash-Decoding (Dao, Haziza, Massa, Sizov, 2023): when the batch is too small to fill the GPU, the cache
length is split into chunks processed by separate programs, each writing a partial output and its log-sum-exp, and
a second kernel merges the partials. Assumptions and choices:

- q (B, T_q, H, D), caches (B, T_max, H_kv, D), cache_lens (B,) = valid length of each row INCLUDING the T_q new
  tokens already written; query t of row b sits at position cache_lens[b] - T_q + t and sees keys 0..that position
  (causal within the chunk). Lengths are trusted (no device sync to validate them) but clamped to [0, T_max], so a
  bad length can never read outside the cache.
- One program per (row, K/V head, split) serves all G = H / H_kv query heads of the group and all T_q queries at
  once: they form the M side of the tile (G * T_q rows, padded to 16), so each K/V byte is read once per group.
  Chunks with G * T_q > 128 rows are processed in slices along T_q.
- The split count is chosen on the host from B * H_kv and T_max (the lengths live on the device): splits that start
  past a row's length exit at once and contribute lse = -inf.
- Sliding window (`window`, per call: the model has one per layer): query at position p sees keys p - window..p.
  The splits then tile only the span a row's queries can see, from the first query's window start (rounded down
  to a key block) on, so a 2048-token cache under a 256-token window reads ~256 keys per row, not 2048, and the
  split count follows that span. WINDOWED is a constexpr, so the unwindowed kernel is unchanged.
- fp32 accumulation; rows that see no key inside a split keep m = -inf without producing NaNs.
- Known cost at batch 1: the whole 2048-token cache of one layer is ~10 MB, about 3 us of HBM time on an H100, so
  the second (merge) launch is a visible share; folding the merge into the last-finishing split program (an atomic
  counter per row) is the next thing to try once this is measured.
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

# 64-key blocks and 4 warps: the usual H100 flash-decoding setting for D=128, compiling for sm_90 without spills
# (`python -m nanochat_kernels.resource_report`); provenance and GPU status: bench/RESULTS.md, "Kernel
# configurations". Tune with bench/kernels.py (batch 1 and 32 over a 2048-token cache).
_BLOCK_N = 64
_NUM_WARPS = 4
_NUM_STAGES = 3
_MAX_ROWS = 128  # G * T_q rows per program; larger chunks are sliced along T_q
_MIN_KEYS_PER_SPLIT = 128  # below this a split's fixed cost (reload of q, partial write, merge) dominates
_MAX_SPLITS = 64


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number exercises the split path


def choose_num_splits(batch_kv_heads: int, t_max: int, num_sms: int, block_n: int = _BLOCK_N) -> int:
    """Split the cache length until about four programs per SM exist, keeping >= _MIN_KEYS_PER_SPLIT keys each.

    Four, not one: with 2-3 resident programs per SM, B * H_kv = 320 (batch 32, 10 heads) programs on 132 SMs
    would leave a ragged last wave; splitting in two evens it out at the cost of one small merge kernel."""
    if batch_kv_heads >= 4 * num_sms:
        return 1
    want = triton.cdiv(4 * num_sms, batch_kv_heads)
    most = max(1, t_max // max(_MIN_KEYS_PER_SPLIT, block_n))
    return max(1, min(want, most, _MAX_SPLITS))


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _decode_kernel(Q, K, V, LENS, O, O_PART, LSE_PART,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                   T_Q, T_MAX, H, H_KV, GROUP, NUM_SPLITS, SPLIT_LEN, qk_scale, window,
                   HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                   WRITE_FINAL: tl.constexpr, WINDOWED: tl.constexpr):
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    b = (bhk // H_KV).to(tl.int64)
    hk = bhk % H_KV
    length = tl.minimum(tl.maximum(tl.load(LENS + b).to(tl.int32), 0), T_MAX)

    # Rows of the tile: r = t * GROUP + g  ->  query t of head hk * GROUP + g.
    offs_r = tl.arange(0, BLOCK_R)
    t = offs_r // GROUP
    h = hk * GROUP + offs_r % GROUP
    row_ok = t < T_Q
    qpos = length - T_Q + t  # position of each query in the cache
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    lo = split * SPLIT_LEN
    if WINDOWED:  # the splits tile [first query's window start, length), block-aligned
        lo += tl.maximum(length - T_Q - window, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(lo + SPLIT_LEN, length)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        key_ok = offs_k < hi
        k = tl.load(k_base + offs_k[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_k[:, None] * stride_vt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_R, BLOCK_N), log2 domain
        visible = key_ok[None, :] & (offs_k[None, :] <= qpos[:, None])
        if WINDOWED:
            visible = visible & (qpos[:, None] - offs_k[None, :] <= window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet stays all-zero
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if WRITE_FINAL:
        tl.store(O + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        # Partials laid out (B, H, T_Q, NUM_SPLITS, D) and (B, H, T_Q, NUM_SPLITS), fp32.
        part = ((b * H + h) * T_Q + t) * NUM_SPLITS + split
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit
def _merge_kernel(O_PART, LSE_PART, O, stride_ob, stride_ot, stride_oh, T_Q, H, NUM_SPLITS,
                  HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """Combine the per-split partial outputs of one (row, head, query) by their log-sum-exp weights."""
    pid = tl.program_id(0)  # = (b * H + h) * T_Q + t
    t = pid % T_Q
    bh = pid // T_Q
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(LSE_PART + pid * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)  # finite: some split holds the query's own position, visible to it
    w = tl.math.exp2(lse - m)
    parts = tl.load(O_PART + (pid * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(O + b * stride_ob + t * stride_ot + h * stride_oh + offs_d, out.to(O.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------------------
# Host side


def _check_inputs(q, k_cache, v_cache, cache_lens) -> None:
    if q.ndim != 4 or k_cache.ndim != 4 or v_cache.ndim != 4:
        raise ValueError(f"decode_attention expects q (B, T_q, H, D) and caches (B, T_max, H_kv, D), got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, T_q, H, D = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"caches must have shape (B={B}, T_max, H_kv, D={D}), got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    H_kv = k_cache.shape[2]
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"number of query heads {H} must be a multiple of K/V heads {H_kv}")
    if T_q < 1 or T_q > k_cache.shape[1]:
        raise ValueError(f"query length must be in 1..T_max={k_cache.shape[1]}, got {T_q}")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim must be a power of two in 16..256, got {D}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k_cache.dtype != q.dtype \
            or v_cache.dtype != q.dtype:
        raise TypeError(f"q and caches must share one dtype among fp16/bf16/fp32, got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    if cache_lens.shape != (B,) or cache_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_lens must be an int32/int64 tensor of shape ({B},), got "
                         f"{cache_lens.dtype} {tuple(cache_lens.shape)}")
    if not (q.device == k_cache.device == v_cache.device == cache_lens.device):
        raise ValueError(f"q, caches and cache_lens must be on one device, got {q.device}, {k_cache.device}, "
                         f"{v_cache.device}, {cache_lens.device}")


def _decode_chunk(q, k_cache, v_cache, cache_lens, out, scale, num_splits, window):
    B, T_q, H, D = q.shape
    T_max, H_kv = k_cache.shape[1], k_cache.shape[2]
    group = H // H_kv
    block_n = 16 if interpreting() else _BLOCK_N
    block_r = max(16, triton.next_power_of_2(group * T_q))
    # Keys a row's queries can see: the whole cache, or with a window at most T_q + window of them, starting
    # up to block_n - 1 keys after the block-aligned start the kernel uses.
    span = T_max if window is None else min(T_max, T_q + window + block_n - 1)
    if num_splits is None:
        num_splits = choose_num_splits(B * H_kv, span, _num_sms(q.device), block_n)
    split_len = triton.cdiv(triton.cdiv(span, num_splits), block_n) * block_n
    num_splits = triton.cdiv(span, split_len)
    launch = {} if interpreting() else dict(num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)
    if num_splits == 1:
        o_part = lse_part = out  # unused
    else:
        o_part = torch.empty((B, H, T_q, num_splits, D), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((B, H, T_q, num_splits), device=q.device, dtype=torch.float32)
    _decode_kernel[(B * H_kv, num_splits)](
        q, k_cache, v_cache, cache_lens, out, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        T_q, T_max, H, H_kv, group, num_splits, split_len, scale * 1.4426950408889634, window or 0,
        HEAD_DIM=D, BLOCK_R=block_r, BLOCK_N=block_n, WRITE_FINAL=num_splits == 1, WINDOWED=window is not None,
        **launch)
    if num_splits > 1:
        _merge_kernel[(B * H * T_q,)](o_part, lse_part, out, out.stride(0), out.stride(1), out.stride(2),
                                      T_q, H, num_splits, HEAD_DIM=D,
                                      BLOCK_S=max(2, triton.next_power_of_2(num_splits)))


def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                 scale: float | None = None, num_splits: int | None = None,
                 window: int | None = None) -> torch.Tensor:
    """q (B, T_q, H, D) over caches (B, T_max, H_kv, D) with valid lengths cache_lens (B,) -> (B, T_q, H, D).
    `window` None or an int >= 0: the query at position p sees keys p - window..p.

    `num_splits` forces the number of chunks along the cache (tests); None picks it from the batch and SM count.
    Inference only (no autograd).
    """
    _check_inputs(q, k_cache, v_cache, cache_lens)
    window = check_window(window)
    if window is not None and window >= k_cache.shape[1] - 1:
        window = None  # reaches key 0 from every position of the cache: no window
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV caches must have a unit stride along the head dim (copying them would defeat the cache)")
    B, T_q, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty_like(q)
    rows_per_query = H // k_cache.shape[2]
    chunk = max(1, _MAX_ROWS // rows_per_query)
    with on_device(q):
        if T_q <= chunk:
            _decode_chunk(q, k_cache, v_cache, cache_lens, out, scale, num_splits, window)
            return out
        # Slices along T_q: slice [t0, t1) behaves like a chunk of t1 - t0 queries over a cache of length
        # cache_lens - (T_q - t1); slice outputs are views of `out`, written in place.
        for t0 in range(0, T_q, chunk):
            t1 = min(T_q, t0 + chunk)
            _decode_chunk(q[:, t0:t1], k_cache, v_cache, cache_lens - (T_q - t1), out[:, t0:t1], scale, num_splits,
                          window)
    return out
