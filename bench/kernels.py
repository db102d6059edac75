"""Kernel benchmarks: nanochat_kernels' Triton kernels beside their anchors, in one run, as ratios.

- attention forward+backward, causal bf16, B=8 H=10 T=2048 D=128 (MHA and GQA H_kv=H/2): TFLOP/s of ours and of
  torch SDPA restricted to its flash backend (given its native (B, H, T, D) layout). FLOPs use the FlashAttention
  convention: forward 4 B H T² D / 2 for causal, backward 2.5x forward.
- decode attention, one new token over a full 2048-token cache at batch 1 and 32: achieved HBM GB/s (K/V bytes
  read + q and out) and % of the card's peak, ours vs the plain-torch reference. One rep is a model's decode step:
  20 layers, each with its own cache (so a batch-1 cache, 10.5 MB, is not served from the 50 MB L2), replayed from
  a CUDA graph so Python launch overhead (tens of us, more than the kernel at batch 1) is not counted; the eager
  per-call time is printed beside it.
- sliding-window attention (nanochat's short-window layers), B=8 H=10 T=2048 D=128 bf16, window 512: forward+
  backward TFLOP/s counted on the visible (query, key) pairs only, ours vs torch SDPA with the explicit window mask
  (the reference's path; SDPA has no window in its flash backend), with our full-causal time beside it (the gain
  from skipping blocks left of the window); and one decode step (as above) over a 2048-token cache under a
  256-token window at batch 1 and 32: GB/s of the K/V bytes inside the window, ours vs the reference.
- Newton-Schulz (5 quintic steps) on the stacks of a d20 and a d26 model (80 x 1280², 20 x 1280x5120, 104 x
  1664²): time of ours vs torch.compile(reference.newton_schulz); the issue's target is ratio <= 0.8. And one
  MuonAdamW step over a d20 model's matrices with our Newton-Schulz vs the same step on the eager reference.

Every figure is the median of --reps timed runs after --warmup runs (CUDA events). Without CUDA (or with --smoke)
it runs a smoke mode: tiny shapes on CPU with the kernels in Triton's interpreter, which checks the script and the
kernels' outputs end to end; its timings are not performance figures.

    python bench/kernels.py                # GPU: full shapes; CPU: smoke
    python bench/kernels.py --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

# ---------------------------------------------------------------------------------------------------------------
# Config


BENCHES = ("attention", "decode", "window", "ns")


@dataclass
class BenchConfig:
    smoke: bool = False
    device: str = "cuda"  # "cpu" in smoke mode
    reps: int = 20
    warmup: int = 5
    only: list[str] = field(default_factory=lambda: list(BENCHES))
    peak_gbps: float | None = None  # None: from the device name
    json_path: str | None = None
    sweep: bool = False


# HBM peaks (GB/s) from the vendors' data sheets, for "% of peak".
_PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0,
              "A100": 1555.0}


def peak_gbps(device_name: str) -> float | None:
    for key, value in _PEAK_GBPS.items():
        if key in device_name:
            return value
    return None


# ---------------------------------------------------------------------------------------------------------------
# Timing


def time_fn(fn: Callable[[], object], cfg: BenchConfig, flush: bool = False) -> float:
    """Median seconds of fn() over cfg.reps runs; on CUDA timed with events, optionally after an L2 flush."""
    for _ in range(cfg.warmup):
        fn()
    if cfg.device == "cuda":
        torch.cuda.synchronize()
    times = []
    reps = cfg.reps
    if cfg.device == "cuda":
        scratch = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda") if flush else None
        for _ in range(reps):
            if scratch is not None:
                scratch.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks


def bench_attention(cfg: BenchConfig, device: str) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nanochat_kernels import reference
    from nanochat_kernels.flash_attention import flash_attention

    if cfg.smoke:
        B, H, T, D, dtype = 1, 4, 64, 64, torch.float32
    else:
        B, H, T, D, dtype = 8, 10, 2048, 128, torch.bfloat16
    rows = []
    for H_kv in (H, H // 2):
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g).requires_grad_()
        k = torch.randn(B, T, H_kv, D, device=device, dtype=dtype, generator=g).requires_grad_()
        v = torch.randn(B, T, H_kv, D, device=device, dtype=dtype, generator=g).requires_grad_()
        do = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
        # The anchor gets its native layout (B, H, T, D), contiguous.
        qa, ka, va = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        doa = do.transpose(1, 2).contiguous()

        def ours_fwd_bwd():
            out = flash_attention(q, k, v, causal=True)
            torch.autograd.grad(out, (q, k, v), do)

        anchor_name = "SDPA flash" if device == "cuda" else "SDPA (CPU)"
        backend = [SDPBackend.FLASH_ATTENTION] if device == "cuda" else [SDPBackend.MATH]

        def sdpa(qx, kx, vx, repeat: bool):
            if repeat and H_kv != H:
                kx, vx = kx.repeat_interleave(H // H_kv, 1), vx.repeat_interleave(H // H_kv, 1)
                return F.scaled_dot_product_attention(qx, kx, vx, is_causal=True)
            return F.scaled_dot_product_attention(qx, kx, vx, is_causal=True, enable_gqa=H_kv != H)

        repeat = False
        try:
            with sdpa_kernel(backend):
                sdpa(qa, ka, va, repeat)
        except RuntimeError:  # the flash backend may reject enable_gqa: repeat K/V, as users of it must
            repeat = True
            anchor_name += " (K/V repeated)"

        def anchor_fwd_bwd():
            with sdpa_kernel(backend):
                out = sdpa(qa, ka, va, repeat)
            torch.autograd.grad(out, (qa, ka, va), doa)

        with torch.no_grad():
            err = max_err(flash_attention(q, k, v), reference.attention(q.float(), k.float(), v.float()))
        t_ours = time_fn(ours_fwd_bwd, cfg)
        t_anchor = time_fn(anchor_fwd_bwd, cfg)
        flops = 4 * B * H * T * T * D / 2 * 3.5  # causal forward x (1 + 2.5 for the backward)
        rows.append(dict(bench="attention fwd+bwd", shape=f"B={B} H={H} H_kv={H_kv} T={T} D={D} {_dt(dtype)}",
                         anchor=anchor_name, unit="TFLOP/s", ours=flops / t_ours / 1e12,
                         anchor_value=flops / t_anchor / 1e12, ratio=t_anchor / t_ours, max_err=err,
                         ours_ms=t_ours * 1e3, anchor_ms=t_anchor * 1e3))
    return rows


def graph_time(fn: Callable[[], object], cfg: BenchConfig) -> float:
    """Median seconds of fn() replayed from a CUDA graph: the kernels' own time, without Python launch overhead
    (what an engine that captures its decode step sees). Falls back to eager timing off CUDA."""
    if cfg.device != "cuda":
        return time_fn(fn, cfg)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles) outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_fn(graph.replay, cfg)


def bench_decode(cfg: BenchConfig, device: str, peak: float | None) -> list[dict]:
    """One decode step of a model: T_q=1 over `layers` distinct caches (20 on GPU, like d20), so a batch-1 cache
    (10.5 MB per layer) cannot sit in L2 between calls; bytes = K and V of every layer + q + out."""
    from nanochat_kernels import reference
    from nanochat_kernels.flash_decoding import flash_decode

    if cfg.smoke:
        H, H_kv, D, T_max, dtype, batches, layers = 4, 4, 64, 128, torch.float32, (1, 4), 2
    else:
        H, H_kv, D, T_max, dtype, batches, layers = 10, 10, 128, 2048, torch.bfloat16, (1, 32), 20
    rows = []
    for B in batches:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, 1, H, D, device=device, dtype=dtype, generator=g)
        caches = [(torch.randn(B, T_max, H_kv, D, device=device, dtype=dtype, generator=g),
                   torch.randn(B, T_max, H_kv, D, device=device, dtype=dtype, generator=g)) for _ in range(layers)]
        lens = torch.full((B,), T_max, device=device, dtype=torch.int32)

        def step(attend):
            return lambda: [attend(q, k_cache, v_cache, lens) for k_cache, v_cache in caches]

        with torch.no_grad():
            k0, v0 = caches[0]
            err = max_err(flash_decode(q, k0, v0, lens),
                          reference.decode_attention(q.float(), k0.float(), v0.float(), lens))
            t_ours = graph_time(step(flash_decode), cfg)
            t_ref = graph_time(step(reference.decode_attention), cfg)
            t_eager = time_fn(step(flash_decode), cfg) / layers
        nbytes = layers * (2 * B * T_max * H_kv * D + 2 * B * H * D) * caches[0][0].element_size()
        ours_gbps, ref_gbps = nbytes / t_ours / 1e9, nbytes / t_ref / 1e9
        pct = f"{100 * ours_gbps / peak:.0f}% of peak {peak:.0f} GB/s" if peak else "peak unknown"
        mode = "CUDA graph" if device == "cuda" else "eager"
        rows.append(dict(bench="decode attention", shape=f"B={B} T_q=1 H={H} H_kv={H_kv} cache={T_max} D={D} "
                         f"{_dt(dtype)} x{layers} layers", anchor=f"reference (torch, {mode})", unit="GB/s",
                         ours=ours_gbps, anchor_value=ref_gbps, ratio=t_ref / t_ours, max_err=err,
                         note=f"{pct}; {mode}; eager call {t_eager * 1e6:.0f} us/layer",
                         ours_ms=t_ours * 1e3, anchor_ms=t_ref * 1e3))
    return rows


def visible_pairs(T: int, window: int) -> int:
    """(query, key) pairs a causal sliding window of `window` keys back lets attend: query i sees min(i, window) + 1."""
    full = min(T, window + 1)  # queries 0..window see every earlier key
    return full * (full + 1) // 2 + (T - full) * (window + 1)


def bench_window_attention(cfg: BenchConfig, device: str) -> list[dict]:
    """Forward+backward of a short-window layer: ours vs SDPA with the window as a boolean mask (what the reference
    runs), and ours at full causal for the gain of skipping key blocks."""
    import torch.nn.functional as F

    from nanochat_kernels import reference
    from nanochat_kernels.flash_attention import flash_attention

    if cfg.smoke:
        B, H, H_kv, T, D, W, dtype = 1, 2, 1, 64, 32, 12, torch.float32
    else:
        B, H, H_kv, T, D, W, dtype = 8, 10, 10, 2048, 128, 512, torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(B, T, H_kv, D, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(B, T, H_kv, D, device=device, dtype=dtype, generator=g).requires_grad_()
    do = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
    qa, ka, va = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    doa = do.transpose(1, 2).contiguous()
    pos = torch.arange(T, device=device)
    back = pos.view(T, 1) - pos.view(1, T)
    mask = (back >= 0) & (back <= W)

    def fwd_bwd(window):
        return lambda: torch.autograd.grad(flash_attention(q, k, v, window=window), (q, k, v), do)

    def anchor():
        out = F.scaled_dot_product_attention(qa, ka, va, attn_mask=mask, enable_gqa=H_kv != H)
        torch.autograd.grad(out, (qa, ka, va), doa)

    with torch.no_grad():
        err = max_err(flash_attention(q, k, v, window=W),
                      reference.attention(q.float(), k.float(), v.float(), window=W))
    t_ours = time_fn(fwd_bwd(W), cfg)
    t_full = time_fn(fwd_bwd(None), cfg)
    t_anchor = time_fn(anchor, cfg)
    flops = 4 * B * H * D * visible_pairs(T, W) * 3.5  # forward x (1 + 2.5 for the backward)
    return [dict(bench="attention window fwd+bwd", shape=f"B={B} H={H} H_kv={H_kv} T={T} D={D} window={W} "
                 f"{_dt(dtype)}", anchor="SDPA + window mask", unit="TFLOP/s", ours=flops / t_ours / 1e12,
                 anchor_value=flops / t_anchor / 1e12, ratio=t_anchor / t_ours, max_err=err,
                 note=f"ours at full causal {t_full * 1e3:.3g} ms vs windowed {t_ours * 1e3:.3g} ms "
                      f"({t_full / t_ours:.2f}x)", ours_ms=t_ours * 1e3, anchor_ms=t_anchor * 1e3,
                 full_causal_ms=t_full * 1e3)]


def bench_window_decode(cfg: BenchConfig, device: str, peak: float | None) -> list[dict]:
    """One decode step (T_q=1, `layers` caches) under a window: only the keys inside it count as bytes moved."""
    from nanochat_kernels import reference
    from nanochat_kernels.flash_decoding import flash_decode

    if cfg.smoke:
        H, H_kv, D, T_max, W, dtype, batches, layers = 4, 2, 32, 128, 20, torch.float32, (1, 4), 2
    else:
        H, H_kv, D, T_max, W, dtype, batches, layers = 10, 10, 128, 2048, 256, torch.bfloat16, (1, 32), 20
    rows = []
    for B in batches:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, 1, H, D, device=device, dtype=dtype, generator=g)
        caches = [(torch.randn(B, T_max, H_kv, D, device=device, dtype=dtype, generator=g),
                   torch.randn(B, T_max, H_kv, D, device=device, dtype=dtype, generator=g)) for _ in range(layers)]
        lens = torch.full((B,), T_max, device=device, dtype=torch.int32)

        def step(attend, window):
            return lambda: [attend(q, k_cache, v_cache, lens, window=window) for k_cache, v_cache in caches]

        with torch.no_grad():
            k0, v0 = caches[0]
            err = max_err(flash_decode(q, k0, v0, lens, window=W),
                          reference.decode_attention(q.float(), k0.float(), v0.float(), lens, window=W))
            t_ours = graph_time(step(flash_decode, W), cfg)
            t_full = graph_time(step(flash_decode, None), cfg)
            t_ref = graph_time(step(reference.decode_attention, W), cfg)
        nbytes = layers * (2 * B * (W + 1) * H_kv * D + 2 * B * H * D) * caches[0][0].element_size()
        ours_gbps, ref_gbps = nbytes / t_ours / 1e9, nbytes / t_ref / 1e9
        pct = f"{100 * ours_gbps / peak:.0f}% of peak {peak:.0f} GB/s" if peak else "peak unknown"
        mode = "CUDA graph" if device == "cuda" else "eager"
        rows.append(dict(bench="decode attention window", shape=f"B={B} T_q=1 H={H} H_kv={H_kv} cache={T_max} "
                         f"window={W} D={D} {_dt(dtype)} x{layers} layers", anchor=f"reference (torch, {mode})",
                         unit="GB/s", ours=ours_gbps, anchor_value=ref_gbps, ratio=t_ref / t_ours, max_err=err,
                         note=f"{pct}; ours without the window {t_full / t_ours:.2f}x slower",
                         ours_ms=t_ours * 1e3, anchor_ms=t_ref * 1e3, full_cache_ms=t_full * 1e3))
    return rows


def bench_newton_schulz(cfg: BenchConfig, device: str) -> list[dict]:
    from nanochat_kernels import reference
    from nanochat_kernels.newton_schulz_triton import newton_schulz_triton

    if cfg.smoke:
        stacks = [(2, 32, 32), (2, 32, 64)]
    else:
        stacks = [(80, 1280, 1280), (20, 1280, 5120), (104, 1664, 1664)]
    anchor_name = "torch.compile(reference)"
    try:
        compiled = torch.compile(reference.newton_schulz) if device == "cuda" else reference.newton_schulz
        if device != "cuda":
            anchor_name = "reference (eager)"
    except Exception as exc:  # compile unavailable: say so in the table rather than fail the run
        compiled, anchor_name = reference.newton_schulz, f"reference (eager; compile failed: {type(exc).__name__})"
    rows = []
    for shape in stacks:
        G = torch.randn(*shape, device=device, generator=torch.Generator(device=device).manual_seed(0))
        err = max_err(newton_schulz_triton(G), reference.newton_schulz(G))
        t_ours = time_fn(lambda: newton_schulz_triton(G), cfg)
        t_anchor = time_fn(lambda: compiled(G), cfg)
        rows.append(dict(bench="Newton-Schulz 5 quintic", shape="x".join(map(str, shape)), anchor=anchor_name,
                         unit="ms", ours=t_ours * 1e3, anchor_value=t_anchor * 1e3, ratio=t_anchor / t_ours,
                         max_err=err, note=f"time ratio ours/anchor {t_ours / t_anchor:.2f} (target <= 0.8)",
                         ours_ms=t_ours * 1e3, anchor_ms=t_anchor * 1e3))
    return rows


def bench_optimizer_step(cfg: BenchConfig, device: str) -> list[dict]:
    """MuonAdamW.step() on a d20 model's matrices with our Newton-Schulz vs the eager reference (env switch)."""
    try:
        from nanochat.model.optim import MuonAdamW
    except ImportError as exc:  # the bench still runs where only the kernels package is importable
        print(f"(optimizer step skipped: nanochat.model.optim does not import: {exc})")
        return []
    if cfg.smoke:
        shapes = [(2, 32, 32)]
    else:  # d20: q, k, v, proj (80 x 1280²), MLP c_fc (20 x 5120x1280) and c_proj (20 x 1280x5120)
        shapes = [(80, 1280, 1280), (20, 5120, 1280), (20, 1280, 5120)]
    previous = os.environ.get("NANOCHAT_KERNELS")
    times, stepped = {}, {}
    try:
        for mode in ("triton", "reference"):
            os.environ["NANOCHAT_KERNELS"] = mode
            g = torch.Generator(device=device).manual_seed(0)  # the same parameters and gradients for both
            params = [torch.randn(r, c, device=device, generator=g) * 0.02 for n, r, c in shapes for _ in range(n)]
            for p in params:
                p.grad = torch.randn(p.shape, device=device, generator=g)
            opt = MuonAdamW(params, [], matrix_lr=0.02)
            opt.step()
            stepped[mode] = [p.detach().clone() for p in params[:4]]  # after one step from the same start
            times[mode] = time_fn(opt.step, cfg)
            del params, opt
    finally:
        if previous is None:
            os.environ.pop("NANOCHAT_KERNELS", None)
        else:
            os.environ["NANOCHAT_KERNELS"] = previous
    err = max(max_err(a, b) for a, b in zip(stepped["triton"], stepped["reference"]))
    label = " + ".join("x".join(map(str, s)) for s in shapes)
    return [dict(bench="MuonAdamW step", shape=label, anchor="same step, NANOCHAT_KERNELS=reference (eager)",
                 unit="ms", ours=times["triton"] * 1e3, anchor_value=times["reference"] * 1e3,
                 ratio=times["reference"] / times["triton"], max_err=err,
                 note="target: no slower; max err = parameters after one step", ours_ms=times["triton"] * 1e3,
                 anchor_ms=times["reference"] * 1e3)]


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------------------
# Sweep (--sweep): time candidate launch configurations, one kernel at a time, the others at their defaults


def _attention_candidates() -> list[tuple[str, str, dict]]:
    """(kernel, table name, config) for D=128; all compile for sm_90 without spills (resource_report)."""
    def c(bm, bn, warps, stages):
        return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return ([("fwd", "_FWD_CONFIG", x) for x in (c(128, 64, 8, 3), c(128, 128, 8, 2), c(64, 64, 4, 3),
                                                  c(64, 32, 4, 4))]
            + [("bwd dK/dV", "_BWD_DKDV_CONFIG", x) for x in (c(32, 128, 8, 3), c(32, 64, 4, 3), c(16, 128, 8, 3))]
            + [("bwd dQ", "_BWD_DQ_CONFIG", x) for x in (c(128, 32, 8, 3), c(128, 64, 8, 2), c(64, 64, 4, 3),
                                                         c(64, 32, 4, 3))])


def sweep(cfg: BenchConfig, device: str) -> list[dict]:
    """Each candidate replaces one kernel's configuration in its module for the timing, then is put back."""
    from nanochat_kernels import flash_attention as fa
    from nanochat_kernels import flash_decoding as fd
    from nanochat_kernels import newton_schulz_triton as ns

    B, H, T, D, dtype = (1, 2, 64, 128, torch.float32) if cfg.smoke else (8, 10, 2048, 128, torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    flops_fwd = 4 * B * H * T * T * D / 2
    rows = []
    for kernel, table_name, candidate in _attention_candidates():
        table = getattr(fa, table_name)
        default = table[128]
        table[128] = candidate
        try:
            if kernel == "fwd":
                with torch.no_grad():
                    seconds = time_fn(lambda: fa.flash_attention(q, k, v), cfg)
                flops = flops_fwd
            else:
                out = fa.flash_attention(q, k, v)
                seconds = time_fn(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), cfg)
                flops = 2.5 * flops_fwd
        finally:
            table[128] = default
        rows.append(dict(kernel=f"attention {kernel}", config=candidate, ms=seconds * 1e3,
                         value=flops / seconds / 1e12, unit="TFLOP/s (whole fwd or bwd)",
                         default=candidate == default))

    caches = [torch.randn(b, 2048 if not cfg.smoke else 128, 10, 128, device=device, dtype=dtype, generator=g)
              for b in (1, 32) for _ in range(2)]
    defaults = (fd._BLOCK_N, fd._NUM_WARPS, fd._NUM_STAGES)
    for block_n, warps, stages in ((64, 4, 3), (32, 4, 4), (128, 8, 2), (64, 8, 3)):
        fd._BLOCK_N, fd._NUM_WARPS, fd._NUM_STAGES = block_n, warps, stages
        try:
            for i, b in enumerate((1, 32)):
                kc, vc = caches[2 * i], caches[2 * i + 1]
                qd = torch.randn(b, 1, 10, 128, device=device, dtype=dtype, generator=g)
                lens = torch.full((b,), kc.shape[1], device=device, dtype=torch.int32)
                with torch.no_grad():
                    seconds = graph_time(lambda: fd.flash_decode(qd, kc, vc, lens), cfg)
                rows.append(dict(kernel=f"decode B={b}", config=dict(BLOCK_N=block_n, num_warps=warps,
                                                                     num_stages=stages),
                                 ms=seconds * 1e3, value=2 * kc.numel() * kc.element_size() / seconds / 1e9,
                                 unit="GB/s (L2-warm: one cache)", default=(block_n, warps, stages) == defaults))
        finally:
            fd._BLOCK_N, fd._NUM_WARPS, fd._NUM_STAGES = defaults

    G = torch.randn(*((20, 1280, 5120) if not cfg.smoke else (2, 32, 64)), device=device, generator=g)
    defaults = (ns._BLOCK, ns._BLOCK_K, ns._NUM_WARPS, ns._NUM_STAGES)
    for candidate in ((128, 64, 8, 3), (128, 32, 8, 4), (128, 64, 8, 4), (64, 64, 4, 3)):
        ns._BLOCK, ns._BLOCK_K, ns._NUM_WARPS, ns._NUM_STAGES = candidate
        try:
            seconds = time_fn(lambda: ns.newton_schulz_triton(G), cfg)
        finally:
            ns._BLOCK, ns._BLOCK_K, ns._NUM_WARPS, ns._NUM_STAGES = defaults
        rows.append(dict(kernel=f"newton-schulz {'x'.join(map(str, G.shape))}",
                         config=dict(zip(("BLOCK", "BLOCK_K", "num_warps", "num_stages"), candidate)),
                         ms=seconds * 1e3, value=seconds * 1e3, unit="ms", default=candidate == defaults))
    return rows


def print_sweep(rows: list[dict]) -> None:
    print(f"{'kernel':<28} {'ms':>9} {'value':>10}  unit / config (* = current default)")
    for r in rows:
        mark = "*" if r["default"] else " "
        print(f"{r['kernel']:<28} {r['ms']:>9.3f} {r['value']:>10.4g}  {r['unit']}  {mark} {r['config']}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Report


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # the report still prints without Triton
        triton_version = "missing"
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=commit,
                device=torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
                torch=torch.__version__, triton=triton_version, python=platform.python_version(),
                mode="smoke (CPU, Triton interpreter; timings are not performance figures)" if device != "cuda"
                else "gpu")


def print_header(env: dict) -> None:
    print(f"# nanochat kernels bench  {env['date']}  commit {env['commit']}  {env['device']}  torch {env['torch']}"
          f"  triton {env['triton']}  mode: {env['mode']}")
    print("# speedup = anchor time / our time (>1: ours faster); rows print as they finish")
    header = (f"{'bench':<24} {'shape':<60} {'unit':<8} {'ours':>9} {'anchor':>9} {'speedup':>8}  {'max err':>9}  "
              f"anchor / note")
    print(header)
    print("-" * len(header), flush=True)


def print_rows(rows: list[dict]) -> list[dict]:
    for r in rows:
        note = r["anchor"] + (f"; {r['note']}" if r.get("note") else "")
        print(f"{r['bench']:<24} {r['shape']:<60} {r['unit']:<8} {r['ours']:>9.4g} {r['anchor_value']:>9.4g} "
              f"{r['ratio']:>7.2f}x  {r['max_err']:>9.2e}  {note}", flush=True)
    return rows


def parse_args(argv: list[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU shapes in the Triton interpreter, even when CUDA is present")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed runs per figure, the median is reported (default 20 on GPU, 2 smoke)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5 on GPU, 1 smoke)")
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=None,
                        help="benchmarks to run (default: all)")
    parser.add_argument("--peak-gbps", type=float, default=None, help="HBM peak in GB/s for %% of peak "
                        "(default: from the device name)")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of the comparison, time candidate block sizes of each kernel (tuning aid)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write rows and environment to this file")
    args = parser.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    return BenchConfig(smoke=smoke, device="cpu" if smoke else "cuda", reps=args.reps or (2 if smoke else 20),
                       warmup=args.warmup or (1 if smoke else 5), only=args.only or list(BENCHES),
                       peak_gbps=args.peak_gbps, json_path=args.json_path, sweep=args.sweep)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    device = cfg.device
    if cfg.smoke:
        # The kernel modules read TRITON_INTERPRET when they are imported (below, lazily), so set it first.
        os.environ["TRITON_INTERPRET"] = "1"
    env = environment(device)
    peak = cfg.peak_gbps or (peak_gbps(env["device"]) if device == "cuda" else None)
    print_header(env)
    if cfg.sweep:
        rows = sweep(cfg, device)
        print_sweep(rows)
        if cfg.json_path:
            Path(cfg.json_path).write_text(json.dumps(dict(env=env, config=asdict(cfg), sweep=rows), indent=2))
        return 0
    rows: list[dict] = []
    if "attention" in cfg.only:
        rows += print_rows(bench_attention(cfg, device))
    if "decode" in cfg.only:
        rows += print_rows(bench_decode(cfg, device, peak))
    if "window" in cfg.only:
        rows += print_rows(bench_window_attention(cfg, device))
        rows += print_rows(bench_window_decode(cfg, device, peak))
    if "ns" in cfg.only:
        rows += print_rows(bench_newton_schulz(cfg, device))
        rows += print_rows(bench_optimizer_step(cfg, device))
    if cfg.json_path:
        Path(cfg.json_path).write_text(json.dumps(dict(env=env, config=asdict(cfg), rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
