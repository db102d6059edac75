"""Benchmark one pretraining step (forward, backward, MuonAdamW step): today's path against the new default.

Configurations (a fresh subprocess each, so peak memory and compiled code never leak from one into the next):
- today:      materialized (B, T, V) fp32 logits + F.cross_entropy (model.fused_loss=False), fp32, eager on CPU
              (on CUDA: bf16 autocast + torch.compile, today's GPU default)
- bf16:       today's loss under bf16 autocast (CPU only; what bf16 alone buys)
- fused+bf16: the fused chunked loss under bf16 autocast, eager (CPU only; what compilation adds on top)
- default:    what `base-train` picks for a long run here: fused loss, --dtype auto, --compile auto
Per configuration: median ms/step and tokens/s over --steps timed steps after --warmup (the first step, with any
compilation, is reported apart), the process's peak memory (ru_maxrss on CPU, max_memory_allocated on CUDA), the
peak memory of the loss alone (lm_head + soft-cap + cross-entropy forward and backward on (B*T, C) hidden states,
another fresh process; includes the two gradients), and MFU on known GPUs. Ratios are against `today`.

    python bench/train_step.py                        # CPU: depth 4, V = 32,768 and 65,536, T = 512, 32 rows
    python bench/train_step.py --device cuda          # depth 20, V = 65,536, T = 2048, 32 rows (nanochat's d20)
    python bench/train_step.py --vocab-sizes 32768 --configs today,default --steps 2

Timings on a shared machine are noisy: the load average is printed before every configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

CPU_CONFIGS = ["today", "bf16", "fused+bf16", "default"]
CUDA_CONFIGS = ["today", "default"]


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def resolve(config: str, device: torch.device, steps: int) -> dict:
    """The fused/dtype/compile settings of a named configuration (CPU dtypes as base_train would choose them)."""
    from nanochat.runtime import choose_compile, choose_dtype

    if config == "today":
        settings = {"fused": False, "dtype": "bf16" if device.type == "cuda" else "fp32",
                    "compile": device.type == "cuda"}
    elif config == "bf16":
        settings = {"fused": False, "dtype": "bf16", "compile": False}
    elif config == "fused+bf16":
        settings = {"fused": True, "dtype": "bf16", "compile": False}
    elif config == "default":
        dtype = choose_dtype("auto", device)[0]
        settings = {"fused": True, "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
                    "compile": choose_compile(None, device, 10**6)[0]}  # a long run's choice
    else:
        raise ValueError(f"unknown configuration {config!r}; known: {CPU_CONFIGS}")
    return settings


# ---------------------------------------------------------------------------------------------------------------
# Workers (one per subprocess)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_worker(job: dict) -> dict:
    """Time training steps of one configuration."""
    from nanochat.model.gpt import GPT, GPTConfig
    from nanochat.runtime import autocast as cpu_autocast
    from nanochat.runtime import configure_threads
    from nanochat.training.base_train import peak_flops

    device = torch.device(job["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    threads = configure_threads(None, device)
    dtype = torch.bfloat16 if job["dtype"] == "bf16" else torch.float32
    torch.manual_seed(0)
    config = GPTConfig.from_depth(job["depth"], vocab_size=job["vocab"], sequence_len=job["seq_len"])
    with torch.device(device):
        model = GPT(config)
    if not hasattr(model, "fused_loss"):
        raise SystemExit("this GPT has no fused_loss attribute (the fused loss is not merged yet)")
    model.fused_loss = job["fused"]
    optimizer = model.setup_optimizer()
    step_model = torch.compile(model, dynamic=False) if job["compile"] else model
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, job["vocab"], (job["batch"], job["seq_len"] + 1), device=device, generator=gen)
    inputs, targets = x[:, :-1], x[:, 1:]
    times = []
    for _ in range(job["warmup"] + job["steps"]):
        sync(device)
        t0 = time.perf_counter()
        with cpu_autocast(device, dtype):
            loss = step_model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[job["warmup"]:])
    tokens = job["batch"] * job["seq_len"]
    flops = model.estimate_flops() * tokens / dt
    peak = peak_flops(device)
    return {"ms": dt * 1e3, "tok_s": tokens / dt, "first_s": times[0], "peak": peak_bytes(device),
            "mfu": flops / peak if peak else None, "params": model.num_params(), "threads": threads,
            "loss": float(loss.item())}


def loss_worker(job: dict) -> dict:
    """Peak memory of the loss alone: forward + backward from (B*T, C) hidden states and the lm_head weight."""
    import torch.nn.functional as F

    import nanochat_kernels
    from nanochat.model.gpt import LOGIT_SOFTCAP
    from nanochat.runtime import autocast as cpu_autocast
    from nanochat.runtime import configure_threads

    device = torch.device(job["device"])
    configure_threads(None, device)
    dtype = torch.bfloat16 if job["dtype"] == "bf16" else torch.float32
    n, width = job["batch"] * job["seq_len"], 64 * job["depth"]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, width, device=device, generator=gen, requires_grad=True)
    weight = (0.02 * torch.randn(job["vocab"], width, device=device, generator=gen)).requires_grad_()
    targets = torch.randint(0, job["vocab"], (n,), device=device, generator=gen)

    def loss_fwd_bwd(rows: int) -> None:
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else cpu_autocast(device, dtype))
        with autocast:
            if job["fused"]:
                loss = nanochat_kernels.linear_cross_entropy(hidden[:rows], weight, targets[:rows], LOGIT_SOFTCAP)
            else:  # gpt.py's materialized path: lm_head, the fp32 soft-cap in place, F.cross_entropy
                logits = F.linear(hidden[:rows], weight)
                logits = logits.float().div_(LOGIT_SOFTCAP).tanh_().mul(LOGIT_SOFTCAP)
                loss = F.cross_entropy(logits, targets[:rows], ignore_index=-1)
        loss.backward()
        sync(device)

    loss_fwd_bwd(8)  # lazy initialisation (kernel libraries, op registration) stays out of the measurement
    hidden.grad, weight.grad = None, None
    before = current_bytes(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss_fwd_bwd(n)
    return {"loss_peak": peak_bytes(device) - before}


def run_worker(kind: str, job: dict) -> dict:
    """Run one worker in a fresh interpreter; its result is the last line of its stdout, as JSON."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Driver


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    p.add_argument("--depth", type=int, default=None, help="(cpu: 4; cuda: 20)")
    p.add_argument("--vocab-sizes", type=str, default=None, help="comma-separated (cpu: 32768,65536; cuda: 65536)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (cpu: 512; cuda: 2048)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per step (32: 16,384 tokens at T=512)")
    p.add_argument("--configs", type=str, default=None,
                   help=f"comma-separated (cpu: {','.join(CPU_CONFIGS)}; cuda: {','.join(CUDA_CONFIGS)})")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, allocator)")
    p.add_argument("--no-loss-memory", action="store_true", help="skip the loss-only memory measurement")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, job = args.worker[0], json.loads(args.worker[1])
        print(json.dumps((step_worker if kind == "step" else loss_worker)(job)))
        return

    from nanochat.common import git_commit, system_info
    from nanochat.runtime import cpu_flags, native_bf16_flags

    gpu = args.device == "cuda"
    device = torch.device(args.device)
    depth = args.depth or (20 if gpu else 4)
    seq_len = args.seq_len or (2048 if gpu else 512)
    vocabs = [int(v) for v in (args.vocab_sizes or ("65536" if gpu else "32768,65536")).split(",")]
    configs = (args.configs or ",".join(CUDA_CONFIGS if gpu else CPU_CONFIGS)).split(",")
    info = system_info()
    where = torch.cuda.get_device_name(device) if gpu else (
        f"cpu, {os.cpu_count()} cores, native bf16: {'/'.join(native_bf16_flags(cpu_flags())) or 'none'}")
    print(f"commit {git_commit(short=True)} | torch {info['torch']} | {where}")
    print(f"depth {depth}, T={seq_len}, {args.batch_size} rows = {args.batch_size * seq_len:,} tokens/step; median "
          f"of {args.steps} steps after {args.warmup} warm-up; each configuration in a fresh process", flush=True)
    rows = []
    for vocab in vocabs:
        results = {}
        for name in configs:
            settings = resolve(name, device, args.steps)
            job = dict(settings, device=args.device, depth=depth, vocab=vocab, seq_len=seq_len,
                       batch=args.batch_size, steps=args.steps, warmup=args.warmup)
            load = loadavg()
            r = run_worker("step", job)
            if "error" not in r and not args.no_loss_memory:
                r.update(run_worker("loss", job))
            r.update(settings, load=load)
            results[name] = r
            print(f"V={vocab} {name}: {json.dumps(r)}", flush=True)
        base = results.get("today", {})
        for name, r in results.items():
            label = (f"{'fused' if r['fused'] else 'materialized'}, {r['dtype']}, "
                     f"{'compiled' if r['compile'] else 'eager'}")
            if "error" in r:
                rows.append(f"| {vocab:,} | {name} | {label} | error: {r['error'][:80]} | | | | | | | |")
                continue
            speedup = f"{r['tok_s'] / base['tok_s']:.2f}x" if "tok_s" in base else ""
            loss_ratio = (f"{r['loss_peak'] / base['loss_peak']:.3f}" if "loss_peak" in r and base.get("loss_peak")
                          else "")
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            rows.append(f"| {vocab:,} | {name} | {label} | {r['ms']:,.0f} | {r['tok_s']:,.0f} | {speedup} | "
                        f"{r['first_s']:.1f} | {gib(r['peak'])} | {gib(r.get('loss_peak'))} | {loss_ratio} | {mfu} | "
                        f"{r['load']} |")
    print()
    print("| vocab | config | loss, dtype, mode | ms/step | tok/s | vs today | first step s | peak memory | "
          "loss peak | loss vs today | MFU | load avg |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
