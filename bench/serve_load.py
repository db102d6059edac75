"""Serving throughput under load: aggregate streamed tokens/s with 16 concurrent clients against 1 client (the
anchor: what a server without batching would give at best), side by side in one run; time to first token p50/p95
under the 16-stream load.

The server is the real one (uvicorn on 127.0.0.1 in a thread, continuous batching in its worker thread) over a small
random model and a tokenizer trained on a little real text, in a child process; clients are asyncio + httpx
streaming SSE in this one. The model's stop tokens are never sampled (their logits are -inf), so replies run to
max_tokens and every run does the same work. Target: 16 streams >= 4x one stream.

Usage: python bench/serve_load.py [--depth 4 --max-tokens 64 --streams 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time

import httpx
import torch

from nanochat.common import system_info
from nanochat.gpt import GPT, GPTConfig
from nanochat.serve.app import ServerConfig, create_app
from nanochat.serve.testing import ServerThread, tiny_tokenizer


async def one_stream(http: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[int, float, float]:
    """(completion tokens, time to first token s, total s) of one streamed request."""
    body = {"messages": [{"role": "user", "content": f"Client {i} asks: tell me about the weather today."}],
            "stream": True, "max_tokens": max_tokens, "temperature": 1.0, "seed": i,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {await resp.aread()!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if ttft is None and msg["choices"] and (msg["choices"][0]["delta"].get("content")
                                                    or msg["choices"][0]["finish_reason"]):
                ttft = time.perf_counter() - t0
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
    return tokens, ttft or 0.0, time.perf_counter() - t0


async def load(url: str, streams: int, requests_per_stream: int, max_tokens: int):
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=streams + 4)) as http:
        async def client(i):
            return [await one_stream(http, i * 1000 + j, max_tokens) for j in range(requests_per_stream)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(client(i) for i in range(streams)))
        wall = time.perf_counter() - t0
    flat = [r for rs in results for r in rs]
    return sum(r[0] for r in flat) / wall, [r[1] for r in flat]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def build_app(args):
    """The server under test: a random depth-`args.depth` GPT (stop tokens silenced) and a small real tokenizer."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = tiny_tokenizer(args.vocab_size)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=tok.vocab_size, sequence_len=512)).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.05)
    silenced = [tok.encode_special(name) for name in ("<|assistant_end|>", "<|bos|>", "<|python_start|>")]
    app = create_app(NoStopModel(model, silenced), tok, ServerConfig(batch_size=max(16, args.streams),
                                                                      max_waiting=256))
    return app, model, tok


class NoStopModel(torch.nn.Module):
    """The model with some token ids never sampled (their logits set to -inf), so every reply runs to max_tokens."""

    def __init__(self, inner, silenced: list[int]):
        super().__init__()
        self.inner, self.config, self.silenced = inner, inner.config, silenced

    def forward(self, idx, kv_cache=None):
        logits = self.inner(idx, kv_cache=kv_cache)
        logits[..., self.silenced] = float("-inf")
        return logits


def serve(args, ready, stop) -> None:
    """Child process: run the server until `stop` is set (clients live in the parent, so they do not share the
    server's GIL)."""
    app, model, tok = build_app(args)
    with ServerThread(app) as server:
        ready.put((server.url, model.num_params(), tok.vocab_size))
        stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4, help="model depth (width 64 x depth)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer and model vocabulary (ids)")
    p.add_argument("--streams", type=int, default=16, help="concurrent streaming clients under load")
    p.add_argument("--requests", type=int, default=2, help="requests per client, back to back")
    p.add_argument("--max-tokens", type=int, default=64, help="reply length (tokens)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the model (0 = torch's default)")
    args = p.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=serve, args=(args, ready, stop), daemon=True)
    child.start()
    try:
        url, num_params, vocab = ready.get(timeout=300)
        info = system_info()
        print(f"# torch {info['torch']}, {info['cpu_count']} CPUs, server threads {args.threads}, depth {args.depth} "
              f"({num_params / 1e6:.1f}M params), vocab {vocab}, {args.max_tokens} tokens per reply; "
              f"server and clients in separate processes")
        asyncio.run(load(url, 1, 1, 8))  # warm-up
        single, loaded, ttfts = [], [], []
        for _ in range(args.repeats):
            single.append(asyncio.run(load(url, 1, args.requests, args.max_tokens))[0])
            tps, ttft = asyncio.run(load(url, args.streams, args.requests, args.max_tokens))
            loaded.append(tps)
            ttfts += ttft
    finally:
        stop.set()
        child.join(timeout=30)
    one, many = statistics.median(single), statistics.median(loaded)
    print(f"| {'ours':<32} | {'value':>8} | {'anchor':<22} | {'value':>8} | {'ratio':>6} | target |")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 24}|{'-' * 10}|{'-' * 8}|--------|")
    print(f"| {f'{args.streams} streams, aggregate tokens/s':<32} | {many:8.1f} | {'1 stream, tokens/s':<22} | "
          f"{one:8.1f} | {many / one:6.2f} | >= 4x  |")
    print(f"# time to first token under {args.streams} streams: p50 {percentile(ttfts, 0.5) * 1000:.0f} ms, "
          f"p95 {percentile(ttfts, 0.95) * 1000:.0f} ms ({len(ttfts)} requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
