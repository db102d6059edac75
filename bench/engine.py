"""Decode speed of the inference engine on a small model, against its anchors, side by side in one run.

- cache vs recompute: one new token at `--context` tokens of context, with the KV cache (the engine's decode step)
  and by recomputing the whole sequence (GPT.generate's reference path); target >= 5x on CPU at 512 tokens.
- engine vs raw model: batch-1 decode tokens/s of the Engine (sampling, tool state machine, bookkeeping
  included) against the bare cached forward, timed alternately; target: engine overhead under 10%.
- on CUDA: the engine's decode step from CUDA graphs against the same engine without them (batch 1), and the HBM
  utilisation of both (the bandwidth-floor ratio).
- memory-bandwidth floor: a decode step must read every weight once plus the KV cache, so
  tokens/s <= bandwidth / (weight bytes + KV bytes); bandwidth measured here with a large torch copy.
- batched decode: aggregate tokens/s of the continuous-batching scheduler at batch 1, 8, 16.

Every figure is the median of --repeats runs. Usage: python bench/engine.py [--depth 4 --context 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nanochat.common import system_info
from nanochat.inference.engine import Engine
from nanochat.inference.kv_cache import KVCache
from nanochat.inference.sampling import SamplingParams
from nanochat.inference.scheduler import GenerationRequest, Scheduler
from nanochat.model.gpt import GPT, GPTConfig


class IdTokenizer:
    """Just enough tokenizer for the engine: ids only (the bench never decodes text meaningfully)."""
    SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def encode_special(self, name: str) -> int:
        return self.vocab_size - len(self.SPECIALS) + self.SPECIALS.index(name)

    def encode(self, text: str) -> list[int]:
        return [b % (self.vocab_size - 9) for b in text.encode()]

    def decode(self, ids) -> str:
        return "x" * len(ids)


class NoStopModel(torch.nn.Module):
    """The model with the stop tokens never sampled (logits -inf), so every run generates the same number of tokens."""

    def __init__(self, inner, silenced: list[int]):
        super().__init__()
        self.inner, self.config = inner, inner.config
        # a device tensor: indexing with a Python list would copy it to the GPU inside a CUDA-graph capture
        self.silenced = torch.tensor(silenced, device=next(inner.parameters()).device)

    def forward(self, idx, kv_cache=None):
        logits = self.inner(idx, kv_cache=kv_cache)
        logits[..., self.silenced] = float("-inf")
        return logits


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, mib: int = 1024, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write) on `device`."""
    n = mib * 2 ** 20 // 4
    src, dst = torch.ones(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)
    sync(device)

    def copy():
        dst.copy_(src)
        sync(device)
    t = median_time(copy, repeats)
    return 2 * n * 4 / t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4, help="model depth (width 64 x depth)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (ids)")
    p.add_argument("--context", type=int, default=512, help="tokens of context before the timed decode steps")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps per timed run (tokens)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (the median is reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine more threads mostly add noise; "
                        "0 = torch's default)")

    p.add_argument("--device", default="cpu", help="cpu or cuda (the H100 figure: --device cuda --depth 20 "
                   "--vocab-size 65536 --context 1024)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="weight and KV-cache dtype (default: fp32 on CPU, bf16 on CUDA)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size,
                                  sequence_len=args.context + args.new_tokens + 64)
    with torch.device(device):
        model = GPT(config).eval()
    with torch.no_grad():  # random weights everywhere (init_weights zeroes the output projections)
        for prm in model.parameters():
            prm.normal_(0, 0.05)
    model.to(dtype=dtype)
    tok = IdTokenizer(args.vocab_size)
    prompt = torch.randint(0, args.vocab_size - 9, (1, args.context), device=device)
    info = system_info()
    card = (", ".join(info["gpus"]) if device.type == "cuda"
            else f"{info['cpu_count']} CPUs, threads {torch.get_num_threads()}")
    print(f"# torch {info['torch']}, {card}, {str(dtype).removeprefix('torch.')}, "
          f"depth {args.depth} ({model.num_params() / 1e6:.1f}M params), vocab {args.vocab_size}, "
          f"context {args.context}")

    # -- cache vs recompute --------------------------------------------------------------------------------------
    cache = KVCache(1, config.sequence_len, config.n_layer, config.n_kv_head, config.head_dim, device, dtype)

    @torch.no_grad()
    def cached_decode():
        cache.reset()
        model(prompt, kv_cache=cache)
        sync(device)
        t0 = time.perf_counter()
        nxt = torch.zeros(1, 1, dtype=torch.long, device=device)
        for _ in range(args.new_tokens):
            nxt = model(nxt, kv_cache=cache)[:, -1:].argmax(-1)
        sync(device)
        return (time.perf_counter() - t0) / args.new_tokens

    @torch.no_grad()
    def recompute_decode():
        ids = prompt
        steps = max(4, args.new_tokens // 4)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = model(ids)[:, -1:].argmax(-1)
            ids = torch.cat([ids, nxt], dim=1)
        sync(device)
        return (time.perf_counter() - t0) / steps

    cached_decode(), recompute_decode()  # warm-up
    t_full = statistics.median(recompute_decode() for _ in range(args.repeats))

    # -- the engine end to end, alternating with the raw cached forward --------------------------------------------
    no_stop = NoStopModel(model, [tok.encode_special(n) for n in ("<|assistant_end|>", "<|bos|>", "<|python_start|>")])
    ids = prompt[0].tolist()
    engines = {False: Engine(no_stop, tok, tools=True, prefix_cache_tokens=0, cuda_graphs=False)}
    if device.type == "cuda":
        engines[True] = Engine(no_stop, tok, tools=True, prefix_cache_tokens=0, cuda_graphs=True)

    def engine_run(graphs: bool):  # decode only: from the first token (after the prefill) to the last
        stamps = [time.perf_counter()
                  for _ in engines[graphs].stream(ids, max_tokens=args.new_tokens, temperature=0.0)]
        return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)

    for graphs in engines:
        engine_run(graphs)  # warm-up (captures the graphs)
    times = {"raw": [], False: [], True: []}
    for _ in range(args.repeats):
        times["raw"].append(cached_decode())
        for graphs in engines:
            times[graphs].append(engine_run(graphs))
    t_cache = statistics.median(times["raw"])
    t_engine = statistics.median(times[False])

    # -- bandwidth floor -------------------------------------------------------------------------------------------
    bandwidth = measure_bandwidth(device)
    size = torch.finfo(dtype).bits // 8
    weight_bytes = (model.num_params() - model.wte.weight.numel() + config.n_embd) * size  # embedding: one row
    kv_bytes = 2 * config.n_layer * (args.context + args.new_tokens // 2) * config.n_kv_head * config.head_dim * size
    floor_tps = bandwidth / (weight_bytes + kv_bytes)

    # -- batched decode (continuous-batching scheduler) ----------------------------------------------------------
    batched = {}
    for batch in (1, 8, 16):
        def run(batch=batch):
            sched = Scheduler(no_stop, tok, batch_size=batch, max_len=128 + args.new_tokens, tools=False,
                              step_tokens=65 * batch)  # every prompt prefills in the first step
            reqs = [GenerationRequest(torch.randint(0, args.vocab_size - 9, (64,)).tolist(),
                                      SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=i, stop=()))
                    for i in range(batch)]
            for r in reqs:
                sched.submit(r)
            sched.step()  # admission (prefill) is not decode
            t0 = time.perf_counter()
            steps_tokens = 0
            while sched.has_work():
                steps_tokens += sched.step()
            return steps_tokens / (time.perf_counter() - t0)
        run()
        batched[batch] = statistics.median(run() for _ in range(args.repeats))

    rows = [
        ("decode, KV cache (tokens/s)", 1 / t_cache, "recompute full sequence", 1 / t_full, t_full / t_cache, ">= 5x"),
        ("engine decode, greedy (tokens/s)", 1 / t_engine, "raw cached forward", 1 / t_cache, t_cache / t_engine,
         ">= 0.9x"),
        ("decode, KV cache (tokens/s)", 1 / t_cache, "bandwidth floor", floor_tps, t_cache ** -1 / floor_tps, ""),
        ("engine decode (tokens/s)", 1 / t_engine, "bandwidth floor", floor_tps, t_engine ** -1 / floor_tps, ""),
        ("scheduler batch 8 (tokens/s)", batched[8], "batch 1", batched[1], batched[8] / batched[1], ""),
        ("scheduler batch 16 (tokens/s)", batched[16], "batch 1", batched[1], batched[16] / batched[1], ""),
    ]
    if True in engines:
        t_graph = statistics.median(times[True])
        rows[2:2] = [("engine decode, CUDA graphs", 1 / t_graph, "engine, no graphs", 1 / t_engine,
                      t_engine / t_graph, ""),
                     ("engine decode, CUDA graphs", 1 / t_graph, "bandwidth floor", floor_tps,
                      t_graph ** -1 / floor_tps, ">= 25%")]
    print(f"# loadavg {os.getloadavg()[0]:.1f} at the end")
    print(f"# memory bandwidth (copy) {bandwidth / 1e9:.1f} GB/s; bytes per decode token "
          f"{(weight_bytes + kv_bytes) / 1e6:.2f} MB (weights {weight_bytes / 1e6:.2f} + KV {kv_bytes / 1e6:.2f})")
    print(f"| {'ours':<34} | {'value':>9} | {'anchor':<24} | {'value':>9} | {'ratio':>6} | target |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 26}|{'-' * 11}|{'-' * 8}|--------|")
    for name, ours, anchor, base, ratio, target in rows:
        print(f"| {name:<34} | {ours:9.1f} | {anchor:<24} | {base:9.1f} | {ratio:6.2f} | {target:<6} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
