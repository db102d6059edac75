"""Benchmark one pretraining step (forward, backward, MuonAdamW step) per depth and device.

Prints a table of median step time, tokens/s, achieved TFLOP/s and MFU (known GPUs only), for our configuration
("ours": kernels dispatched by nanochat_kernels, torch.compile when --compile) beside the plain reference
configuration ("reference": NANOCHAT_KERNELS=reference, no compile), with the ratio ours/reference in tokens/s.

    python bench/train_step.py                        # CPU: depths 1,2,4 at T=256
    python bench/train_step.py --device cuda          # GPU: depth 20 at T=2048, B=32, compiled
    python bench/train_step.py --depths 2 --compile   # add torch.compile on CPU too

Each configuration runs --warmup untimed steps, then --steps timed steps, alternating with the other
configuration so that load changes on a shared machine hit both; the median is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from nanochat.base_train import peak_flops
from nanochat.common import git_commit, system_info
from nanochat.gpt import GPT, GPTConfig


@contextlib.contextmanager
def kernels_mode(mode: str | None):
    """Set NANOCHAT_KERNELS for the duration (None: leave the default dispatch)."""
    old = os.environ.get("NANOCHAT_KERNELS")
    if mode is None:
        os.environ.pop("NANOCHAT_KERNELS", None)
    else:
        os.environ["NANOCHAT_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_KERNELS", None)
        else:
            os.environ["NANOCHAT_KERNELS"] = old


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One model + optimizer + batch in one configuration; `step()` times one training step."""

    def __init__(self, depth, args, device, kernels: str | None, compile_: bool):
        torch.manual_seed(0)
        self.device, self.kernels = device, kernels
        config = GPTConfig.from_depth(depth, vocab_size=args.vocab_size, sequence_len=args.seq_len)
        with torch.device(device):
            self.model = GPT(config)
        self.optimizer = self.model.setup_optimizer()
        self.step_model = torch.compile(self.model, dynamic=False) if compile_ else self.model
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), device=device, generator=gen)
        self.inputs, self.targets = x[:, :-1], x[:, 1:]
        self.tokens = args.batch_size * args.seq_len
        self.times: list[float] = []

    def step(self, timed: bool) -> None:
        with kernels_mode(self.kernels):
            sync(self.device)
            t0 = time.perf_counter()
            loss = self.step_model(self.inputs, self.targets)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            sync(self.device)
        if timed:
            self.times.append(time.perf_counter() - t0)

    def result(self) -> dict:
        dt = statistics.median(self.times)
        flops = self.model.estimate_flops() * self.tokens / dt
        peak = peak_flops(self.device)
        return {"params": self.model.num_params(), "ms": dt * 1e3, "tok_s": self.tokens / dt,
                "tflops": flops / 1e12, "mfu": flops / peak if peak else None}


def bench_depth(depth, args, device, use_compile: bool, reference: bool) -> tuple[dict, dict | None]:
    """Steps of ours and the reference alternate, so a change in machine load hits both alike."""
    runners = [Runner(depth, args, device, None, use_compile)]
    if reference:
        runners.append(Runner(depth, args, device, "reference", False))
    for i in range(args.warmup + args.steps):
        for r in (runners if i % 2 == 0 else runners[::-1]):
            r.step(timed=i >= args.warmup)
    results = [r.result() for r in runners]
    return results[0], (results[1] if reference else None)


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    p.add_argument("--depths", type=str, default=None, help="comma-separated depths (cpu: 1,2,4; cuda: 20)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (cpu: 256; cuda: 2048)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (cpu: 4; cuda: 32)")
    p.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile 'ours' (default: on for cuda, off for cpu)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference configuration")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.depths = [int(d) for d in (args.depths or ("20" if gpu else "1,2,4")).split(",")]
    args.seq_len = args.seq_len or (2048 if gpu else 256)
    args.batch_size = args.batch_size or (32 if gpu else 4)
    use_compile = gpu if args.compile is None else args.compile
    device = torch.device(args.device)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True

    info = system_info()
    print(f"commit {git_commit(short=True)} | torch {info['torch']} | triton {info.get('triton')} | "
          f"device {torch.cuda.get_device_name(device) if gpu else f'cpu x{torch.get_num_threads()} threads'}")
    print(f"B={args.batch_size} T={args.seq_len} V={args.vocab_size}; median of {args.steps} steps after "
          f"{args.warmup} warm-up; ours = default kernels{' + torch.compile' if use_compile else ''}, "
          f"reference = NANOCHAT_KERNELS=reference, eager")
    header = (f"| depth | params | config | ms/step | tok/s | TFLOP/s | MFU | ours/ref |\n"
              f"|---:|---:|---|---:|---:|---:|---:|---:|")
    rows = []
    for depth in args.depths:
        ours, ref = bench_depth(depth, args, device, use_compile, not args.no_reference)
        for name, r in (("ours", ours), ("reference", ref)):
            if r is None:
                continue
            ratio = f"{ours['tok_s'] / ref['tok_s']:.2f}x" if ref and name == "ours" else ""
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            rows.append(f"| {depth} | {r['params'] / 1e6:.1f}M | {name} | {r['ms']:.1f} | {r['tok_s']:,.0f} | "
                        f"{r['tflops']:.3f} | {mfu} | {ratio} |")
        print(rows[-1] if ref is None else "\n".join(rows[-2:]), flush=True)
    print()
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
