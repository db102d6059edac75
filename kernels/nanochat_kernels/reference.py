"""Plain-torch references for every kernel in nanochat_kernels: the ground truth in tests and the fallback on
devices without Triton/CUDA. Obviously correct first, fast second.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Newton-Schulz coefficient schedules. Quintic: one (a, b, c) for every step (Muon's original tuning).
QUINTIC = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al., 2025): one (a, b, c) per step, optimal for the given number of steps; steps past
# the end of the table reuse its last entry.
POLAR_EXPRESS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)


def coefficient_schedule(steps: int, coeffs="quintic") -> list[tuple[float, float, float]]:
    """Per-step (a, b, c) for `steps` iterations; `coeffs` is "quintic", "polar_express" or a sequence of triples."""
    if coeffs == "quintic":
        return [QUINTIC] * steps
    if coeffs == "polar_express":
        return [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)]
    table = [tuple(float(x) for x in c) for c in coeffs]
    if not table or any(len(c) != 3 for c in table):
        raise ValueError(f"coeffs must be 'quintic', 'polar_express' or a list of (a, b, c) triples, got {coeffs!r}")
    return [table[min(i, len(table) - 1)] for i in range(steps)]


def check_window(window, causal: bool = True) -> int | None:
    """Validate a sliding-window size: None (full causal) or an int >= 0, and only with causal attention."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be None or an int >= 0 (keys at most `window` positions back), got {window!r}")
    if not causal:
        raise ValueError(f"window={window} needs causal=True (a sliding window looks back only)")
    return window


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """q (B, T, H, D), k/v (B, T, H_kv, D) with H % H_kv == 0 -> (B, T, H, D).

    Causal attention where query t attends to keys 0..t; GQA by grouping query heads onto their K/V head.
    With `window` (an int >= 0, causal only), query t attends to keys t - window..t: key j is visible iff
    0 <= t - j <= window (flash-attn's window_size=(window, 0)); window 0 sees only itself, and window >= T - 1 is
    full causal attention (computed exactly as window=None).
    """
    B, T, H, D = q.shape
    H_kv = k.size(2)
    if H % H_kv:
        raise ValueError(f"number of query heads {H} must be a multiple of K/V heads {H_kv}")
    window = check_window(window, causal)
    mask = None
    if window is not None and window < T - 1:
        pos = torch.arange(T, device=q.device)
        back = pos.view(T, 1) - pos.view(1, T)  # (T_query, T_key): how far back each key is
        mask = (back >= 0) & (back <= window)
        causal = False  # the mask carries the causal part
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=causal, scale=scale, enable_gqa=H_kv != H)
    return out.transpose(1, 2)  # (B, T, H, D)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                     scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Attention of a few new queries over a preallocated KV cache with a valid length per row.

    q (B, T_q, H, D); k_cache/v_cache (B, T_max, H_kv, D); cache_lens (B,) integer: the number of valid cache
    positions of each row, *including* the T_q new tokens already written. Query t of row b sits at position
    p = cache_lens[b] - T_q + t and attends to keys 0..p, or with `window` (an int >= 0) to keys p - window..p
    (the same meaning as in `attention`). Returns (B, T_q, H, D).
    """
    B, T_q, H, D = q.shape
    T_max, H_kv = k_cache.size(1), k_cache.size(2)
    if H % H_kv:
        raise ValueError(f"number of query heads {H} must be a multiple of K/V heads {H_kv}")
    window = check_window(window)
    lens = cache_lens.to(device=q.device, dtype=torch.long).view(B, 1)
    qpos = lens - T_q + torch.arange(T_q, device=q.device).view(1, T_q)  # (B, T_q)
    kpos = torch.arange(T_max, device=q.device).view(1, 1, T_max)
    back = qpos.unsqueeze(-1) - kpos  # (B, T_q, T_max): how far back each key is
    allowed = back >= 0
    if window is not None:
        allowed = allowed & (back <= window)
    # fp32 softmax(q k^T * scale, masked) v through SDPA with the explicit mask: the same math as an einsum over
    # (B, H, T_q, T_max) scores, 3-7x faster on CPU at decode shapes (the einsum copies the cache into its layout)
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k_cache.float().transpose(1, 2),
                                         v_cache.float().transpose(1, 2), attn_mask=allowed.unsqueeze(1),
                                         scale=scale, enable_gqa=H_kv != H)  # (B, H, T_q, D)
    return out.transpose(1, 2).to(q.dtype)


def newton_schulz(G: torch.Tensor, steps: int = 5, coeffs="quintic", eps: float = 1e-7) -> torch.Tensor:
    """Approximate the orthogonal polar factor U Vᵀ of G = U S Vᵀ, batched over leading dims.

    Each step maps X -> a X + (b A + c A²) X with A = X Xᵀ, after normalizing X by its Frobenius norm so the
    singular values start in [0, 1]. Works on the wide orientation (rows <= cols). Computes in bf16 on CUDA and
    fp32 elsewhere; returns G's dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    compute_dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(compute_dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in coefficient_schedule(steps, coeffs):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None, ignore_index: int = -1, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of soft-capped logits hidden @ weightᵀ, with the (N, V) logits materialized (the model's loss
    before fusion; memory O(N V)).

    hidden (..., D), weight (V, D), targets (...) int. The matmul follows autocast (bf16 on CUDA during training),
    the soft-cap softcap * tanh(logits / softcap) (skipped when softcap is None or 0) and the log-softmax run in
    fp32. Targets equal to ignore_index count nothing. reduction "mean" (over the non-ignored targets; nan when
    there are none), "sum", or "none" (shape of targets, 0 at ignored positions).
    """
    logits = F.linear(hidden, weight).float()  # (..., V)
    if softcap:  # in place where autograd allows, as gpt.py did: two (N, V) fp32 copies live here instead of four
        logits = logits.div_(softcap).tanh_().mul(softcap)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss
