"""Serving throughput and latency under load, the new scheduling against the old in one run.

- Load: aggregate streamed tokens/s with 16 concurrent clients against 1 client (the anchor: what a server without
  batching would give at best), and time to first token (TTFT) p50/p95 under the 16-stream load against the
  single-stream TTFT. Targets: 16 streams >= 8x one stream; TTFT p95 under 16 streams <= 3x the single-stream one.
- Multi-turn: one client holds a 10-turn conversation (~50 tokens of user text and a 50-token reply per turn, so
  ~1,000 tokens of history at turn 10) and resends the whole history each turn, as OpenAI clients do; TTFT of the
  last turn with prefix reuse against without. Target >= 4x.

Servers (one child process each, started together, measured in turn so that load changes hit all alike): "new"
(chunked prefill batched with decode, prefix reuse), "old" (`--old-policy`, default serial: each new prompt
prefilled alone between decode steps, no prefix reuse), and "new, no prefix reuse" (the multi-turn anchor). Each is
the real server (uvicorn on 127.0.0.1 in a thread, continuous batching in its worker thread) over a small random
model and a tokenizer trained on a little real text; clients are asyncio + httpx streaming SSE in this process.
The model's stop tokens are never sampled (their logits are -inf), so replies run to max_tokens and every run does
the same work.

Usage: python bench/serve_load.py [--depth 4 --max-tokens 64 --streams 16 --repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import time

import httpx
import torch

from nanochat.common import system_info
from nanochat.gpt import GPT, GPTConfig
from nanochat.serve.app import ServerConfig, create_app
from nanochat.serve.thread import ServerThread
from nanochat.tiny import tiny_tokenizer


async def one_stream(http: httpx.AsyncClient, messages: list[dict], max_tokens: int,
                     seed: int) -> tuple[int, float, float, str]:
    """(completion tokens, time to first token s, total s, reply text) of one streamed request."""
    body = {"messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, text = None, 0, []
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {await resp.aread()!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg["choices"]:
                delta = msg["choices"][0]["delta"].get("content")
                if ttft is None and (delta or msg["choices"][0]["finish_reason"]):
                    ttft = time.perf_counter() - t0
                text.append(delta or "")
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
    return tokens, ttft or 0.0, time.perf_counter() - t0, "".join(text)


async def load(url: str, streams: int, requests_per_stream: int, max_tokens: int):
    """(aggregate completion tokens/s, TTFT of every request) with `streams` clients sending back to back."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=streams + 4)) as http:
        async def client(i):
            out = []
            for j in range(requests_per_stream):
                k = i * 1000 + j
                messages = [{"role": "user", "content": f"Client {k} asks: tell me about the weather today."}]
                out.append(await one_stream(http, messages, max_tokens, k))
            return out
        t0 = time.perf_counter()
        results = await asyncio.gather(*(client(i) for i in range(streams)))
        wall = time.perf_counter() - t0
    flat = [r for rs in results for r in rs]
    return sum(r[0] for r in flat) / wall, [r[1] for r in flat]


USER_TEXT = ("Here is what I would like to know next, and please keep the earlier turns in mind when you answer: "
             "what changes, and why?")


async def conversation(url: str, turns: int, reply_tokens: int, tag: int) -> list[float]:
    """TTFT of each turn of one conversation that resends its whole history every turn."""
    messages, ttfts = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for t in range(turns):
            messages.append({"role": "user", "content": f"Conversation {tag}, turn {t}. {USER_TEXT}"})
            _, ttft, _, reply = await one_stream(http, messages, reply_tokens, tag * 100 + t)
            messages.append({"role": "assistant", "content": reply})
            ttfts.append(ttft)
    return ttfts


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class NoStopModel(torch.nn.Module):
    """The model with some token ids never sampled (their logits set to -inf), so every reply runs to max_tokens."""

    def __init__(self, inner, silenced: list[int]):
        super().__init__()
        self.inner, self.config = inner, inner.config
        # a device tensor: indexing with a Python list would copy it to the GPU inside a CUDA-graph capture
        self.silenced = torch.tensor(silenced, device=next(inner.parameters()).device)

    def forward(self, idx, kv_cache=None):
        logits = self.inner(idx, kv_cache=kv_cache)
        logits[..., self.silenced] = float("-inf")
        return logits


def build_app(args, policy: str, prefix_cache_tokens: int):
    """The server under test: a random depth-`args.depth` GPT (stop tokens silenced) and a small real tokenizer."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = tiny_tokenizer(args.vocab_size)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=tok.vocab_size, sequence_len=args.context)).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.05)
    silenced = [tok.encode_special(name) for name in ("<|assistant_end|>", "<|bos|>", "<|python_start|>")]
    config = ServerConfig(batch_size=max(16, args.streams), max_waiting=256, policy=policy,
                          step_tokens=args.step_tokens, prefix_cache_tokens=prefix_cache_tokens)
    return create_app(NoStopModel(model, silenced), tok, config), model, tok


def serve(args, policy, prefix_cache_tokens, ready, stop) -> None:
    """Child process: run one server until `stop` is set (clients live in the parent: no shared GIL)."""
    app, model, tok = build_app(args, policy, prefix_cache_tokens)
    with ServerThread(app) as server:
        ready.put((server.url, model.num_params(), tok.vocab_size))
        stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4, help="model depth (width 64 x depth)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer and model vocabulary (ids)")
    p.add_argument("--context", type=int, default=2048, help="model context (tokens); the multi-turn needs ~1,100")
    p.add_argument("--streams", type=int, default=16, help="concurrent streaming clients under load")
    p.add_argument("--requests", type=int, default=2, help="requests per client, back to back")
    p.add_argument("--max-tokens", type=int, default=64, help="reply length under load (tokens)")
    p.add_argument("--turns", type=int, default=10, help="turns of the multi-turn conversation (0: skip it)")
    p.add_argument("--turn-reply-tokens", type=int, default=50, help="reply length per turn (tokens)")
    p.add_argument("--step-tokens", type=int, default=256, help="new policy: tokens per scheduler step")
    p.add_argument("--old-policy", default="serial", choices=["serial", "chunked"],
                   help="scheduling of the 'old' server (serial: each prompt prefilled alone, the old scheduler)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the model (0 = torch's default)")
    args = p.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    setups = {"new": ("chunked", 8 * args.context), "old": (args.old_policy, 0), "new, no prefix reuse": ("chunked", 0)}
    children, urls = [], {}
    try:
        for name, (policy, prefix) in setups.items():
            ready = ctx.Queue()
            child = ctx.Process(target=serve, args=(args, policy, prefix, ready, stop), daemon=True)
            child.start()
            children.append(child)
            urls[name], num_params, vocab = ready.get(timeout=300)
        info = system_info()
        print(f"# torch {info['torch']}, {info['cpu_count']} CPUs, server threads {args.threads}, depth {args.depth} "
              f"({num_params / 1e6:.1f}M params), vocab {vocab}, context {args.context}, {args.max_tokens} tokens "
              f"per reply, step budget {args.step_tokens} tokens; loadavg {os.getloadavg()[0]:.1f} at start")
        for url in urls.values():
            asyncio.run(load(url, 2, 1, 8))  # warm-up
        runs = {name: {"one": [], "many": [], "ttft1": [], "ttft": []} for name in ("new", "old")}
        last_turn = {"new": [], "new, no prefix reuse": []}
        for rep in range(args.repeats):
            for name in ("old", "new"):
                r = runs[name]
                tps, ttft1 = asyncio.run(load(urls[name], 1, args.requests, args.max_tokens))
                r["one"].append(tps)
                r["ttft1"] += ttft1
                tps, ttft = asyncio.run(load(urls[name], args.streams, args.requests, args.max_tokens))
                r["many"].append(tps)
                r["ttft"] += ttft
            if args.turns:
                for name in last_turn:
                    last_turn[name].append(asyncio.run(conversation(urls[name], args.turns, args.turn_reply_tokens,
                                                                    tag=rep))[-1])
        load_after = os.getloadavg()[0]
    finally:
        stop.set()
        for child in children:
            child.join(timeout=30)
    print(f"| server | {args.streams} streams tokens/s | 1 stream tokens/s | ratio (>= 8x) | TTFT 1 stream p50 | "
          f"TTFT {args.streams} streams p50 / p95 | p95 / 1-stream (<= 3x) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ("old", "new"):
        r = runs[name]
        one, many, single = statistics.median(r["one"]), statistics.median(r["many"]), statistics.median(r["ttft1"])
        print(f"| {name} | {many:.1f} | {one:.1f} | {many / one:.2f}x | {single * 1000:.0f} ms | "
              f"{percentile(r['ttft'], 0.5) * 1000:.0f} / {percentile(r['ttft'], 0.95) * 1000:.0f} ms | "
              f"{percentile(r['ttft'], 0.95) / single:.2f}x |")
    if args.turns:
        warm, cold = statistics.median(last_turn["new"]), statistics.median(last_turn["new, no prefix reuse"])
        print(f"# multi-turn: TTFT of turn {args.turns} (~{args.turns * 100} tokens of history), median of "
              f"{args.repeats}: with prefix reuse {warm * 1000:.0f} ms, without {cold * 1000:.0f} ms, "
              f"{cold / warm:.2f}x (target >= 4x)")
    print(f"# loadavg {load_after:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
