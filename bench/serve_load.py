"""Serving throughput and latency under load, the batching server against an unbatched one in one run.

- Load: aggregate streamed tokens/s with 16 concurrent clients against 1 client (the anchor: what a server without
  batching would give at best), and time to first token (TTFT) p50/p95 under the 16-stream load against the
  single-stream TTFT. Targets: 16 streams >= 8x one stream; TTFT p95 under 16 streams <= 3x the single-stream one.
- Multi-turn: one client holds a 10-turn conversation (~50 tokens of user text and a 50-token reply per turn, so
  ~1,000 tokens of history at turn 10) and resends the whole history each turn, as OpenAI clients do; TTFT of the
  last turn with prefix reuse against without. Target >= 4x.
- Tool conversation (`--cases tools`): the same 10 turns, each reply opening with a calculator call (forced:
  <|python_start|>12*34<|python_end|>, the engine adds the output) and then free text; the content goes back as the
  client got it, fences and all. Servers: "exact" (history replies rendered as the tokens generated for them, the
  default), "fences only" (no reply memory: the fence format read back from the text, the path after a restart) and
  "plain text" (`exact_history=False`, the rendering before: a reply's tool call becomes backticks, so the prefix
  store stops matching at the first call). TTFT per turn and the prompt tokens the prefix store reused.

Servers (one child process each, started together, measured in turn so that load changes hit all alike): "new"
(chunked prefill batched with decode, prefix reuse), "unbatched" (the same server with one row: requests run one at
a time, no prefix reuse; the load anchor), and "new, no prefix reuse" (the multi-turn anchor). Each is
the real server (uvicorn on 127.0.0.1 in a thread, continuous batching in its worker thread) over a small random
model and a tokenizer trained on a little real text; clients are asyncio + httpx streaming SSE in this process.
The model's stop tokens are never sampled (their logits are -inf), so replies run to max_tokens and every run does
the same work.

Usage: python bench/serve_load.py [--depth 4 --max-tokens 64 --streams 16 --repeats 3 --cases load,multiturn,tools]
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
from nanochat.model.gpt import GPT, GPTConfig
from nanochat.model.tiny import tiny_tokenizer
from nanochat.serve.app import ServerConfig, create_app
from nanochat.serve.thread import ServerThread


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


def prefix_reuse(url: str) -> tuple[int, int, int, int]:
    """(prefix hits, lookups, prompt tokens reused, prompt tokens computed) from a server's /metrics."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = int(float(value))
    return (values["nanochat_prefix_cache_hits_total"], values["nanochat_prefix_cache_lookups_total"],
            values["nanochat_prefix_cache_reused_tokens_total"], values["nanochat_prefill_tokens_total"])


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


class ToolCallModel(torch.nn.Module):
    """The model made to open every reply with a calculator call: the token after <|assistant_start|> is forced to
    <|python_start|>, then the call's code tokens one after the other, then <|python_end|> (a bigram script on the
    last input token, so the real forward still runs). Elsewhere the special tokens and the code's tokens are never
    sampled, so no other call starts and every reply runs to max_tokens."""

    def __init__(self, inner, tok, code: str = "12*34"):
        super().__init__()
        self.inner, self.config = inner, inner.config
        S = tok.encode_special
        chain = [S("<|assistant_start|>"), S("<|python_start|>"), *tok.encode(code), S("<|python_end|>")]
        if len(set(chain)) != len(chain):
            raise ValueError(f"the call's tokens must be distinct for a bigram script, got {chain}")
        dev = next(inner.parameters()).device
        self.script = torch.full((inner.config.vocab_size,), -1, dtype=torch.long, device=dev)
        self.script[torch.tensor(chain[:-1])] = torch.tensor(chain[1:])
        self.silenced = torch.tensor(sorted(set(chain[1:]) | set(tok.special_tokens.values())), device=dev)

    def forward(self, idx, kv_cache=None):
        logits = self.inner(idx, kv_cache=kv_cache)
        logits[..., self.silenced] = float("-inf")
        forced = self.script[kv_cache.select(idx)]  # the next token where the last input token is in the script
        has = (forced >= 0).unsqueeze(-1)
        hot = torch.nn.functional.one_hot(forced.clamp(min=0), logits.size(-1)).bool() & has
        return logits.masked_fill(has, float("-inf")).masked_fill(hot, 0.0)


def build_app(args, batch_size: int, prefix_cache_tokens: int, tools: bool = False, **config):
    """The server under test: a random depth-`args.depth` GPT (stop tokens silenced; `tools`: every reply opens
    with a calculator call) and a small real tokenizer; `config`: more ServerConfig fields."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = tiny_tokenizer(args.vocab_size)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=tok.vocab_size, sequence_len=args.context)).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.05)
    silenced = [tok.encode_special(name) for name in ("<|assistant_end|>", "<|bos|>", "<|python_start|>")]
    served = ToolCallModel(model, tok) if tools else NoStopModel(model, silenced)
    config = ServerConfig(batch_size=batch_size, max_waiting=256,
                          step_tokens=args.step_tokens, prefix_cache_tokens=prefix_cache_tokens, **config)
    return create_app(served, tok, config), model, tok


def serve(args, setup, ready, stop) -> None:
    """Child process: run one server until `stop` is set (clients live in the parent: no shared GIL)."""
    app, model, tok = build_app(args, *setup[:2], **setup[2])
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
    p.add_argument("--step-tokens", type=int, default=256, help="tokens per scheduler step")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the model (0 = torch's default)")
    p.add_argument("--cases", default="load,multiturn,tools",
                   help="comma-separated: load (throughput, TTFT), multiturn (prefix reuse), tools (tool conversation)")
    args = p.parse_args(argv)
    cases = set(args.cases.split(","))
    if not cases <= {"load", "multiturn", "tools"}:
        p.error(f"--cases takes load, multiturn, tools; got {args.cases!r}")
    if not args.turns:
        cases -= {"multiturn", "tools"}
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    prefix = 8 * args.context
    rows = max(16, args.streams)
    setups = {}  # name: (batch rows, prefix cache tokens, more build_app arguments)
    if cases & {"load", "multiturn"}:
        setups["new"] = (rows, prefix, {})
    if "load" in cases:
        setups["unbatched"] = (1, 0, {})
    if "multiturn" in cases:
        setups["new, no prefix reuse"] = (rows, 0, {})
    tool_setups = {"exact": {}, "fences only": {"reply_memory_tokens": 0}, "plain text": {"exact_history": False}}
    if "tools" in cases:
        setups.update({f"tools: {k}": (rows, prefix, {"tools": True, **v}) for k, v in tool_setups.items()})
    children, urls = [], {}
    try:
        for name, setup in setups.items():
            ready = ctx.Queue()
            child = ctx.Process(target=serve, args=(args, setup, ready, stop), daemon=True)
            child.start()
            children.append(child)
            urls[name], num_params, vocab = ready.get(timeout=300)
        info = system_info()
        print(f"# torch {info['torch']}, {info['cpu_count']} CPUs, server threads {args.threads}, depth {args.depth} "
              f"({num_params / 1e6:.1f}M params), vocab {vocab}, context {args.context}, {args.max_tokens} tokens "
              f"per reply, step budget {args.step_tokens} tokens; loadavg {os.getloadavg()[0]:.1f} at start")
        for url in urls.values():
            asyncio.run(load(url, 2, 1, 8))  # warm-up
        runs = {name: {"one": [], "many": [], "ttft1": [], "ttft": []} for name in ("new", "unbatched")}
        last_turn = {"new": [], "new, no prefix reuse": []}
        tool_turns = {name: [] for name in tool_setups}  # per repeat: the TTFT of every turn
        before = {name: prefix_reuse(urls[f"tools: {name}"]) for name in tool_turns} if "tools" in cases else {}
        for rep in range(args.repeats):
            for name in ("unbatched", "new") if "load" in cases else ():
                r = runs[name]
                tps, ttft1 = asyncio.run(load(urls[name], 1, args.requests, args.max_tokens))
                r["one"].append(tps)
                r["ttft1"] += ttft1
                tps, ttft = asyncio.run(load(urls[name], args.streams, args.requests, args.max_tokens))
                r["many"].append(tps)
                r["ttft"] += ttft
            for name in last_turn if "multiturn" in cases else ():
                last_turn[name].append(asyncio.run(conversation(urls[name], args.turns, args.turn_reply_tokens,
                                                                tag=rep))[-1])
            for name in tool_turns if "tools" in cases else ():
                tool_turns[name].append(asyncio.run(conversation(urls[f"tools: {name}"], args.turns,
                                                                 args.turn_reply_tokens, tag=rep)))
        if "tools" in cases:  # this case's requests only: less the warm-up's
            reuse = {name: [a - b for a, b in zip(prefix_reuse(urls[f"tools: {name}"]), before[name])]
                     for name in tool_turns}
        load_after = os.getloadavg()[0]
    finally:
        stop.set()
        for child in children:
            child.join(timeout=30)
    if "load" in cases:
        print(f"| server | {args.streams} streams tokens/s | 1 stream tokens/s | ratio (>= 8x) | TTFT 1 stream p50 | "
              f"TTFT {args.streams} streams p50 / p95 | p95 / 1-stream (<= 3x) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ("unbatched", "new") if "load" in cases else ():
        r = runs[name]
        one, many, single = statistics.median(r["one"]), statistics.median(r["many"]), statistics.median(r["ttft1"])
        print(f"| {name} | {many:.1f} | {one:.1f} | {many / one:.2f}x | {single * 1000:.0f} ms | "
              f"{percentile(r['ttft'], 0.5) * 1000:.0f} / {percentile(r['ttft'], 0.95) * 1000:.0f} ms | "
              f"{percentile(r['ttft'], 0.95) / single:.2f}x |")
    if "multiturn" in cases:
        warm, cold = statistics.median(last_turn["new"]), statistics.median(last_turn["new, no prefix reuse"])
        print(f"# multi-turn: TTFT of turn {args.turns} (~{args.turns * 100} tokens of history), median of "
              f"{args.repeats}: with prefix reuse {warm * 1000:.0f} ms, without {cold * 1000:.0f} ms, "
              f"{cold / warm:.2f}x (target >= 4x)")
    if "tools" in cases:
        print(f"# tool conversation: {args.turns} turns, each reply a calculator call then free text "
              f"({args.turn_reply_tokens} tokens); TTFT median of {args.repeats} runs")
        print("| history rendering | TTFT turn 1 | TTFT turns 2-" f"{args.turns} mean | TTFT turn {args.turns} | "
              "prefix hits / lookups | prompt tokens reused / prefilled |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, runs_ in tool_turns.items():
            per_turn = [statistics.median(r[t] for r in runs_) for t in range(args.turns)]
            hits, lookups, reused, prefilled = reuse[name]
            print(f"| {name} | {per_turn[0] * 1000:.0f} ms | {statistics.mean(per_turn[1:]) * 1000:.0f} ms | "
                  f"{per_turn[-1] * 1000:.0f} ms | {hits} / {lookups} | {reused} / {prefilled} |")
    print(f"# loadavg {load_after:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
