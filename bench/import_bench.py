"""`nanochat import` at real sizes: conversion time and peak memory for d20- and d32-shaped checkpoints in
nanochat's own format (random weights, written here), then CPU decode tokens/s of the imported folder at batch 1
and 8 through our engine and through transformers' `generate` on the same folder, side by side in one run.

- the checkpoints are laid out as nanochat writes them: model_<step>.pt (torch.save of the state dict; token and
  value embeddings in bf16 as on CUDA, the rest fp32, `_orig_mod.`-free), meta_<step>.json, tokenizer.pkl (a
  pickled tiktoken Encoding of 65,536 ids). d20 in the head era (value embeddings, smear, backout, lambdas), d32 in
  the launch era (the published karpathy/nanochat-d32 architecture).
- import: a `nanochat import` subprocess; wall time and its peak RSS (ru_maxrss from wait4), beside the size of one
  fp32 copy of the weights (the target: peak near one copy).
- decode: prompts of --prompt tokens, greedy, stop tokens never sampled; decode tokens/s = B x (N - 1) /
  (time for N tokens - time for 1 token), so prefill is excluded the same way for both.
The machine is shared: the load average is printed with the numbers.

Usage: python bench/import_bench.py [--shapes d20,d32] [--tokens 8] [--workdir /tmp/import_bench]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# bench/kernels.py would shadow the PyPI `kernels` package that transformers imports: drop this script's folder
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

SHAPES = {  # nanochat's dial: width 64 x depth, heads of 128, 65,536 ids, context 2048
    "d8": dict(depth=8, era="head"),  # a quick run
    "d20": dict(depth=20, era="head"),
    "d32": dict(depth=32, era="launch"),
}


def nanochat_checkpoint(folder: Path, depth: int, era: str, seed: int = 0) -> int:
    """Write a random-weight checkpoint in nanochat's format; returns the number of parameters."""
    import tiktoken

    from nanochat.model.gpt import nanochat_ve_layers
    from nanochat.tokenizer import SPECIAL_TOKENS, _rustbpe

    folder.mkdir(parents=True, exist_ok=True)
    V, C, L, seq = 65536, 64 * depth, depth, 2048
    H = C // 128
    n_ordinary = V - len(SPECIAL_TOKENS)
    ranks = {bytes([i]): i for i in range(256)}
    for a in range(256):  # two-byte tokens fill the rest: a valid rank table of the right size
        for b in range(256):
            if len(ranks) < n_ordinary:
                ranks[bytes([a, b])] = len(ranks)
    enc = tiktoken.Encoding(name="rustbpe", pat_str=_rustbpe.PATTERNS["nanochat"], mergeable_ranks=ranks,
                            special_tokens={name: n_ordinary + j for j, name in enumerate(SPECIAL_TOKENS)})
    import pickle

    (folder / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype=torch.float32, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    padded = -(-V // 64) * 64
    state = {"transformer.wte.weight": rand(padded, C, dtype=torch.bfloat16, std=1.0)}
    ve_layers = nanochat_ve_layers(L) if era != "launch" else []
    for i in range(L):
        p = f"transformer.h.{i}."
        state |= {p + "attn.c_q.weight": rand(C, C), p + "attn.c_k.weight": rand(C, C),
                  p + "attn.c_v.weight": rand(C, C), p + "attn.c_proj.weight": rand(C, C),
                  p + "mlp.c_fc.weight": rand(4 * C, C), p + "mlp.c_proj.weight": rand(C, 4 * C)}
        if i in ve_layers:
            state[p + "attn.ve_gate.weight"] = rand(H, 12 if era == "head" else 32)
    state["lm_head.weight"] = rand(padded, C, std=0.001)
    if era != "launch":
        state |= {f"value_embeds.{i}.weight": rand(padded, C, dtype=torch.bfloat16, std=0.03) for i in ve_layers}
        state |= {"resid_lambdas": torch.ones(L), "x0_lambdas": torch.full((L,), 0.1)}
    if era == "head":
        state |= {"smear_gate.weight": rand(1, 24), "smear_lambda": torch.zeros(1) + 0.1,
                  "backout_lambda": torch.zeros(1) + 0.2}
    step = 1000
    torch.save(state, folder / f"model_{step:06d}.pt")
    config = dict(sequence_len=seq, vocab_size=V, n_layer=L, n_head=H, n_kv_head=H, n_embd=C)
    if era != "launch":
        config["window_pattern"] = "SSSL"
    (folder / f"meta_{step:06d}.json").write_text(json.dumps({"step": step, "model_config": config}))
    return sum(t.numel() for t in state.values())


def _rss_parts(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a live process in KB; (0, 0) once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["RssAnon"].split()[0]), int(fields["RssFile"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


def timed_import(src: Path, out: Path) -> tuple[float, float, float, float]:
    """(wall s, peak RSS GB, peak anonymous RSS GB, file-backed RSS GB at that moment) of `nanochat import src --out
    out` in a child process. The total peak is ru_maxrss from wait4; its parts are sampled every 20 ms from
    /proc/PID/status: the memory-mapped source counts in RSS as file pages (clean page cache the kernel can drop),
    what the conversion itself holds is the anonymous part."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.cli", "import", str(src), "--out", str(out), "--force"],
                            stdout=subprocess.DEVNULL)
    anon_peak, file_then = 0, 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        anon, file = _rss_parts(proc.pid)
        if anon > anon_peak:
            anon_peak, file_then = anon, file
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"nanochat import failed for {src}")
    return wall, usage.ru_maxrss / 1e6, anon_peak / 1e6, file_then / 1e6  # KB -> GB


class NoStop(torch.nn.Module):
    """Our model with the stop tokens never sampled, so each run generates exactly the tokens asked for."""

    def __init__(self, inner, silenced: list[int]):
        super().__init__()
        self.inner, self.config, self.silenced = inner, inner.config, silenced

    def forward(self, idx, kv_cache=None):
        logits = self.inner(idx, kv_cache=kv_cache)
        logits[..., self.silenced] = float("-inf")
        return logits


def decode_rate(run, batch: int, n: int) -> float:
    """Decode tokens/s: B x (n - 1) / (time(n tokens) - time(1 token))."""
    t0 = time.perf_counter()
    run(batch, 1)
    t1 = time.perf_counter()
    run(batch, n)
    t2 = time.perf_counter()
    return batch * (n - 1) / max((t2 - t1) - (t1 - t0), 1e-9)


def decode_both(folder: Path, prompt_len: int, n: int) -> dict:
    from nanochat.inference.engine import Engine
    from nanochat.model.checkpoint import load_exported

    torch.manual_seed(0)
    prompts = [torch.randint(0, 60000, (prompt_len,)).tolist() for _ in range(8)]
    rates = {}
    model, tok, _ = load_exported(folder)
    stops = [tok.encode_special("<|assistant_end|>"), tok.encode_special("<|bos|>")]
    engine = Engine(NoStop(model, stops), tok, tools=False, prefix_cache_tokens=0)
    with torch.no_grad():
        for b in (1, 8):
            rates[("ours", b)] = decode_rate(lambda B, N: engine.generate(prompts[:B], max_tokens=N, batch_size=B),  # noqa: F821 (deleted after use)
                                             b, n)
            print(f"ours, batch {b}: {rates[('ours', b)]:.2f} tok/s", flush=True)
    del engine, model
    gc.collect()  # one model in memory at a time (d20 head era: 5.6 GB in fp32)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()

    def hf_run(B, N):
        hf.generate(torch.tensor(prompts[:B]), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                    suppress_tokens=stops)

    with torch.no_grad():
        for b in (1, 8):
            rates[("transformers", b)] = decode_rate(hf_run, b, n)
            print(f"transformers, batch {b}: {rates[('transformers', b)]:.2f} tok/s", flush=True)
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="d20,d32", help="comma-separated, of " + ", ".join(SHAPES))
    p.add_argument("--tokens", type=int, default=8, help="decode tokens per timed run")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--workdir", default="/tmp/import_bench")
    p.add_argument("--no-decode", action="store_true", help="only the import")
    args = p.parse_args()
    work = Path(args.workdir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"loadavg {open('/proc/loadavg').read().split()[:3]}")
    rows = []
    for name in args.shapes.split(","):
        spec = SHAPES[name]
        src, out = work / f"{name}-nanochat", work / f"{name}-imported"
        shutil.rmtree(src, ignore_errors=True)
        n_params = nanochat_checkpoint(src, spec["depth"], spec["era"])
        size = (src / "model_001000.pt").stat().st_size / 1e9
        wall, rss, anon, file = timed_import(src, out)
        fp32 = n_params * 4 / 1e9
        print(f"{name} ({spec['era']} era, {n_params / 1e6:,.0f}M parameters incl. padding; file {size:.2f} GB): "
              f"import {wall:.1f} s, peak RSS {rss:.2f} GB (one fp32 copy: {fp32:.2f} GB); peak anonymous RSS "
              f"{anon:.2f} GB (the mapped source's file pages then: {file:.2f} GB); "
              f"loadavg {open('/proc/loadavg').read().split()[:3]}")
        shutil.rmtree(src, ignore_errors=True)
        if not args.no_decode:
            rates = decode_both(out, args.prompt, args.tokens)
            for (system, b), r in rates.items():
                rows.append((name, system, b, r))
            print(f"loadavg after decode {open('/proc/loadavg').read().split()[:3]}")
        shutil.rmtree(out, ignore_errors=True)
    if rows:
        print("\n| model | system | batch | decode tok/s |\n|---|---|---|---|")
        for name, system, b, r in rows:
            print(f"| {name} | {system} | {b} | {r:.2f} |")


if __name__ == "__main__":
    main()
