"""Benchmark of the fused linear + soft-cap + cross-entropy loss against the materialized logits (today's path).

One row per (path, vocab, dtype): the time of forward + backward (loss "mean", soft-cap 15, gradients of hidden and
weight) and the peak memory above the inputs during it:
- CUDA: median of CUDA-event timings; torch.cuda.max_memory_allocated above what was allocated before the call.
  Default shape: a d20 model's loss at device batch 32 x 2048 (N=65,536 rows, D=1280, V=65,536), bf16 autocast.
- CPU: median of wall-clock timings; the process's peak RSS (VmHWM, reset through /proc/self/clear_refs before
  each run) above its RSS before the call. Default shape: N=16,384, D=256, V=32,768 and 65,536, fp32 and bf16
  autocast. Timings on a shared box are noisy: the load average is printed with them.

    python bench/fused_loss.py                       # CUDA shapes when CUDA is present, else the CPU shapes
    python bench/fused_loss.py --device cpu --rows 2048 --reps 1   # quick smoke run
    python bench/fused_loss.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import nanochat_kernels
except ImportError:  # run from a checkout without an install: the package lives in kernels/
    sys.path.insert(0, str(REPO / "kernels"))
    import nanochat_kernels

SOFTCAP = 15.0


def _return_freed_memory() -> None:
    """Make glibc serve every allocation of 1 MiB or more by mmap and unmap it when freed (M_MMAP_THRESHOLD = -3
    fixes the threshold, which is otherwise raised up to 32 MB as blocks are freed). Otherwise a path that runs
    second reuses heap memory kept from the first, and its RSS peak reads low."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    except (OSError, AttributeError):
        print("note: could not set malloc's mmap threshold; RSS peaks may read low for the second path")


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak(device: str) -> int:
    """Reset the peak-memory counter; returns the current level to subtract."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")
    return _rss_bytes("VmRSS")


def _peak(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_bytes("VmHWM")


def _loss_fn(path: str):
    if path == "materialized":
        return nanochat_kernels.reference.linear_cross_entropy
    return nanochat_kernels.linear_cross_entropy


def bench_one(path: str, rows: int, dim: int, vocab: int, dtype: str, device: str, reps: int, warmup: int) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(rows, dim, generator=gen).to(device)
    weight = (torch.randn(vocab, dim, generator=gen) * dim ** -0.5).to(device)
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    targets[::97] = -1
    if dtype == "bf16" and device == "cuda":
        hidden = hidden.bfloat16()  # the model's bf16 residual stream
    hidden.requires_grad_()
    weight.requires_grad_()
    loss_fn = _loss_fn(path)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        hidden.grad = weight.grad = None
        with autocast:
            loss = loss_fn(hidden, weight, targets, SOFTCAP)
        loss.backward()
        return loss

    times, peaks = [], []
    for i in range(warmup + reps):
        hidden.grad = weight.grad = None
        base = _reset_peak(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            loss = step()
            elapsed = time.perf_counter() - t0
        peak = _peak(device) - base
        if i >= warmup:
            times.append(elapsed)
            peaks.append(peak)
    flops = 3 * 2 * rows * dim * vocab  # three matmuls: logits, dh, dW
    sec = statistics.median(times)
    return dict(path=path, rows=rows, dim=dim, vocab=vocab, dtype=dtype, device=device, seconds=sec,
                tflops=flops / sec / 1e12, peak_bytes=max(peaks), loss=float(loss.detach()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=None, help="rows N = batch x sequence (default by device)")
    parser.add_argument("--dim", type=int, default=None, help="model width D (default: 1280 CUDA, 256 CPU)")
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="vocab sizes V")
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=None,
                        help="fp32, or bf16 autocast (default: bf16 on CUDA, both on CPU)")
    parser.add_argument("--paths", nargs="+", choices=["fused", "materialized"], default=["fused", "materialized"])
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if not cuda:
        _return_freed_memory()
    rows = args.rows or (32 * 2048 if cuda else 16384)
    dim = args.dim or (1280 if cuda else 256)
    vocabs = args.vocab or ([65536] if cuda else [32768, 65536])
    dtypes = args.dtype or (["bf16"] if cuda else ["fp32", "bf16"])
    reps = args.reps or (10 if cuda else 3)

    load = os.getloadavg()
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"fused loss bench  torch {torch.__version__}  {device_name}  threads {torch.get_num_threads()}  "
          f"loadavg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}  kernels={os.environ.get('NANOCHAT_KERNELS', 'auto')}")
    print(f"{'path':<13}{'N':>7}{'D':>6}{'V':>7} {'dtype':<6}{'fwd+bwd ms':>11}{'TFLOP/s':>9}{'peak MiB':>10}"
          f"{'loss':>9}")
    results = []
    for vocab in vocabs:
        for dtype in dtypes:
            for path in args.paths:
                try:
                    r = bench_one(path, rows, dim, vocab, dtype, args.device, reps, args.warmup)
                except torch.cuda.OutOfMemoryError:  # the materialized d20 logits may not fit: that is a result
                    torch.cuda.empty_cache()
                    print(f"{path:<13}{rows:>7}{dim:>6}{vocab:>7} {dtype:<6}  out of memory", flush=True)
                    continue
                results.append(r)
                print(f"{path:<13}{rows:>7}{dim:>6}{vocab:>7} {dtype:<6}{r['seconds'] * 1e3:>11.1f}"
                      f"{r['tflops']:>9.3f}{r['peak_bytes'] / 2**20:>10.0f}{r['loss']:>9.4f}", flush=True)
    by_key = {(r["vocab"], r["dtype"], r["path"]): r for r in results}
    for vocab in vocabs:
        for dtype in dtypes:
            f, m = by_key.get((vocab, dtype, "fused")), by_key.get((vocab, dtype, "materialized"))
            if f and m:
                print(f"fused vs materialized  V={vocab} {dtype}: time x{f['seconds'] / m['seconds']:.2f}, "
                      f"peak memory x{f['peak_bytes'] / max(m['peak_bytes'], 1):.3f}")
    load = os.getloadavg()
    print(f"loadavg after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(loadavg=load, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
