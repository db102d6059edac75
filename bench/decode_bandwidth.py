"""Decode speed against this machine's own limits, per weight format (quantize.py), measured in one run.

- the machine: STREAM-style triad bandwidth (a = b + s * c over three 256 MiB arrays; 3 x 256 MiB moved) and a plain
  copy, then matmul FLOP/s of each format's kernel at a compute-bound shape (fp32 and bf16 GEMM, the int8
  weight-only kernel at M = 256)
- per shape (d20, d32: GPTConfig.from_depth, vocab 65,536; random weights, built straight into each format, so the
  fp32 model is never held beside another) and format (fp32, bf16, int8) and batch (1, 4, 16): the decode step
  (the model's cached forward of B new tokens at --context positions of KV, plus the engine's sampler at
  temperature 0.6, top-k 50), as tokens/s and
    MBU = (matmul weight bytes + KV bytes read) per step / step time / triad bandwidth
    compute = tokens/s x FLOPs per token / the format's matmul FLOP/s   (FLOPs/token = 2 x matmul params +
              4 x layers x heads x head_dim x context)
  and the batch where the step turns from bandwidth- to compute-bound (weight bytes / bandwidth = B x FLOPs per
  token / FLOP/s)
- Hugging Face transformers' `generate` (greedy, its DynamicCache) on the same weights through the exported model
  class (nanochat/hf), fp32 and bf16, batch 1: decode tokens/s = N / (time(N + 1) - time(1)), timed in alternation
  with our batch-1 step in each format, so that both see the same load
- the profile of a step (batch 1 and 16): the linear layers alone (the weight reads), attention over the cache,
  sampling, and the rest (norms, rotary, embedding, Python) = step - those; "dispatch" is the step of a model of
  the same depth but width 64 and vocabulary 512, i.e. the per-step Python and op-launch overhead
- --device cuda: the same on a GPU (autocast bf16 and CUDA graphs, as the engine runs it), MBU also against the
  card's peak bandwidth (`bash bench/gpu_check.sh --decode` runs it when a GPU is lent)

The machine is shared while this runs: loadavg and the CPU flags are printed with the numbers.
Usage: python bench/decode_bandwidth.py [--shapes d20,d32] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import zlib

# bench/kernels.py would shadow the PyPI package `kernels` that transformers imports: drop this folder from the path
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from nanochat.inference.kv_cache import KVCache  # noqa: E402
from nanochat.inference.sampling import sample_tokens  # noqa: E402
from nanochat.inference.scheduler import DecodeGraphs  # noqa: E402
from nanochat.model.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.model.quantize import LINEAR_CLASSES, empty_model, linear_names, matmul_weight_bytes  # noqa: E402

PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, by name part


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# The machine


def triad_bandwidth(device, mib: int = 256, repeats: int = 5) -> tuple[float, float]:
    """(triad bytes/s, copy bytes/s): a = b + 3 c counts 3 arrays moved, a.copy_(b) 2 (STREAM's convention)."""
    n = mib * 2**20 // 4
    a, b, c = (torch.ones(n, device=device) for _ in range(3))  # touched, so no page faults are timed
    triad = timed(lambda: torch.add(b, c, alpha=3.0, out=a), device, repeats)
    copy = timed(lambda: a.copy_(b), device, repeats)
    return 3 * n * 4 / triad, 2 * n * 4 / copy


def matmul_flops(device, fmt: str, repeats: int = 3) -> float:
    """FLOP/s of the format's matmul at M=256 rows (compute-bound), K=1280, N=5120 (d20's MLP input)."""
    M, K, N = 256, 1280, 5120
    w = torch.randn(N, K, device=device)
    layer = nn.Linear(K, N, bias=False, device=device)
    with torch.no_grad():
        layer.weight.copy_(w)
        if fmt != "fp32":
            new = LINEAR_CLASSES[fmt](K, N, device=device)
            new.set_rows(0, w)
            layer = new
    x = torch.randn(M, K, device=device)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        return 2 * M * K * N / timed(lambda: layer(x), device, repeats)


# ---------------------------------------------------------------------------------------------------------------
# Models with random weights, built in their format


def _random(name: str, shape, device) -> torch.Tensor:
    """N(0, 1/fan_in) values seeded by name: 2^20 drawn, tiled over the tensor (drawing all 1.9 G of d32 takes
    minutes on a loaded core; the speed of a step does not depend on the values)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    numel = math.prod(shape)
    block = torch.randn(min(numel, 1 << 20), generator=g) * (1.0 if name == "wte.weight" else shape[1] ** -0.5)
    return block.repeat(-(-numel // block.numel()))[:numel].view(shape).to(device)


@torch.no_grad()
def build(config: GPTConfig, fmt: str, device) -> GPT:
    """A GPT of `config` whose every weight is N(0, 1/fan_in) (seeded by name), converted to `fmt` as it is
    filled: at most one fp32 matrix exists beside the model."""
    model = empty_model(config, fmt, device)
    for name, m in model.named_modules():
        if isinstance(m, tuple(LINEAR_CLASSES.values())):
            m.set_rows(0, _random(f"{name}.weight", (m.out_features, m.in_features), "cpu"))
    for name, p in model.named_parameters():
        p.copy_(_random(name, p.shape, "cpu"))
    return model.eval()


def build_hf(config: GPTConfig, dtype: torch.dtype):
    """The exported model class (nanochat/hf) with the same weights as `build(config, "fp32")`, in `dtype`."""
    from nanochat.hf.configuration_nanochat import NanochatConfig
    from nanochat.hf.modeling_nanochat import NanochatForCausalLM

    hf_config = NanochatConfig(vocab_size=config.vocab_size, sequence_len=config.sequence_len,
                               n_layer=config.n_layer, n_head=config.n_head, n_kv_head=config.n_kv_head,
                               n_embd=config.n_embd, bos_token_id=0, eos_token_id=[1], pad_token_id=1)
    with torch.device("meta"):
        model = NanochatForCausalLM(hf_config)
    model = model.to_empty(device="cpu")
    names = {n for n, _ in model.named_parameters()}
    with torch.no_grad():
        for ours in [f"blocks.{i}.{m}.weight" for i in range(config.n_layer)
                     for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + \
                ["wte.weight", "lm_head.weight"]:
            theirs = ours if ours.startswith("lm_head.") else "model." + ours  # the exported names (hf/export.py)
            if theirs not in names:
                raise KeyError(f"exported model has no {theirs} (for our {ours})")
            shape = model.get_parameter(theirs).shape
            model.get_parameter(theirs).copy_(_random(ours, shape, "cpu"))
    for name, buf in model.named_buffers():  # rotary tables, if the class keeps any: recompute through its init
        raise RuntimeError(f"unexpected buffer {name} in the exported model class; rebuild it without meta")
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------------------------
# Decode


def flops_per_token(config: GPTConfig, context: int) -> float:
    C, L = config.n_embd, config.n_layer
    matmul = L * (2 * C * C + 2 * C * config.n_kv_head * config.head_dim + 8 * C * C) + C * config.vocab_size
    return 2.0 * matmul + 4.0 * L * config.n_head * config.head_dim * context


def kv_bytes(config: GPTConfig, batch: int, context: int, element: int) -> int:
    return 2 * config.n_layer * batch * context * config.n_kv_head * config.head_dim * element


class Decoder:
    """The decode step at a fixed context: a cache of random K/V whose rows all hold `context` positions (reset
    before each step, so every timed step reads the same bytes)."""

    def __init__(self, model: GPT, batch: int, context: int, device):
        cfg = model.config
        self.model, self.batch, self.context, self.device = model, batch, context, device
        dtype = torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype
        self.cache = KVCache(batch, context + 1, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, device, dtype)
        self.cache.k.normal_()
        self.cache.v.normal_()
        self.ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
        self.temperature = torch.full((batch,), 0.6, device=device)
        self.top_k = torch.full((batch,), 50, dtype=torch.long, device=device)
        self.top_p = torch.ones(batch, device=device)
        self.uniform = torch.rand(batch, device=device)
        # on CUDA the engine's decode step replays CUDA graphs (scheduler.DecodeGraphs); so does this one
        self.graphs = DecodeGraphs(model, self.cache) if device.type == "cuda" else None

    @torch.no_grad()
    def step(self):
        self.cache.cache_lens.fill_(self.context)
        if self.graphs is not None:
            logits = self.graphs(self.ids)
        else:
            logits = self.model(self.ids, kv_cache=self.cache)[:, -1]
        self.ids = sample_tokens(logits, self.temperature, self.top_k, self.top_p, self.uniform).view(-1, 1)

    @torch.no_grad()
    def profile(self, repeats: int) -> dict:
        """Seconds per step of: the linear layers alone, attention over the cache, the sampler."""
        cfg, B, dev = self.model.config, self.batch, self.device
        dtype = torch.float32
        ac = torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda")
        linears = [self.model.get_submodule(n) for n in linear_names(self.model)]
        inputs = [torch.randn(B, 1, lin.in_features, device=dev, dtype=dtype) for lin in linears]

        def matmuls():
            with ac:
                for lin, x in zip(linears, inputs):
                    lin(x)
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        adt = self.cache.k.dtype
        q = torch.randn(B, 1, H, D, device=dev, dtype=adt)
        kv = torch.randn(B, 1, Hkv, D, device=dev, dtype=adt)

        def attention():
            self.cache.cache_lens.fill_(self.context)
            self.cache.positions(B, 1)
            for layer in range(cfg.n_layer):
                self.cache.attend(layer, q, kv, kv)
        logits = torch.randn(B, cfg.vocab_size, device=dev)

        def sampling():
            sample_tokens(logits.div(15).tanh_().mul_(15), self.temperature, self.top_k, self.top_p, self.uniform)
        return {"matmuls": timed(matmuls, dev, repeats), "attention": timed(attention, dev, repeats),
                "sampling": timed(sampling, dev, repeats)}


def hf_vs_ours(model, decoders: dict, context: int, new_tokens: int, rounds: int) -> tuple[float, dict]:
    """Batch-1 decode tokens/s of transformers' generate (greedy) and of our decoders, timed in alternation so both
    see the same load: per round, generate's time for new_tokens + 1 tokens minus its time for 1 (the prefill), then
    new_tokens steps of each decoder. Medians over rounds."""
    ids = torch.randint(2, model.config.vocab_size, (1, context))
    mask = torch.ones_like(ids)

    def gen(n):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    gen(2)
    theirs, ours = [], {k: [] for k in decoders}
    for _ in range(rounds):
        t0 = time.perf_counter()
        gen(1)
        t1 = time.perf_counter()
        gen(new_tokens + 1)
        theirs.append((time.perf_counter() - t1 - (t1 - t0)) / new_tokens)
        for name, dec in decoders.items():
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                dec.step()
            ours[name].append((time.perf_counter() - t0) / new_tokens)
    return 1 / max(statistics.median(theirs), 1e-9), {k: 1 / statistics.median(v) for k, v in ours.items()}


# ---------------------------------------------------------------------------------------------------------------
# Peak memory of loading and serving in a format


def write_random_safetensors(path, config: GPTConfig) -> int:
    """A checkpoint-style model.safetensors of `config` with the random weights of `build`, written one tensor at
    a time (the header first, from the shapes), so the fp32 model never exists in memory. Returns its bytes."""
    import struct

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            f.write(_random(name, shape, "cpu").numpy().tobytes())
    return 8 + len(raw) + offset


def memory_child(path, depth: int, fmt: str, batch: int, context: int) -> dict:
    """In a fresh process: load `path` in `fmt` (quantize.load_converted), allocate the KV cache of `batch` rows x
    `context` positions, decode 2 steps; peak RSS against weight bytes + KV bytes."""
    from nanochat.model.quantize import load_converted, weight_bytes

    def status(field: str) -> int:  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)
        line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    config = GPTConfig.from_depth(depth)
    start = status("VmRSS")
    model = load_converted(config, path, fmt)
    loaded = status("VmHWM")
    dec = Decoder(model, batch, context - 1, torch.device("cpu"))
    dec.step()
    dec.step()
    peak = status("VmHWM")
    wb, kv = weight_bytes(model), kv_bytes(config, batch, context, dec.cache.k.element_size())
    return {"format": fmt, "shape": f"d{depth}", "batch": batch, "context": context, "weight_bytes": wb,
            "kv_bytes": kv, "rss_at_start": start, "peak_rss_after_load": loaded, "peak_rss": peak,
            "ratio": peak / (wb + kv)}


def measure_memory(depth: int, fmt: str, batch: int, context: int, folder) -> dict:
    import subprocess
    from pathlib import Path

    path = Path(folder) / f"d{depth}_random.safetensors"
    if not path.is_file():
        t0 = time.perf_counter()
        size = write_random_safetensors(path, GPTConfig.from_depth(depth))
        print(f"wrote {path} ({size / 1e9:.2f} GB fp32) in {time.perf_counter() - t0:.0f} s")
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory", f"d{depth}:{fmt}",
                            "--memory-batch", str(batch), "--memory-context", str(context), "--memory-child",
                            str(path)], capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"the measuring process failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    flags = []
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = sorted({f for f in line.split(":")[1].split()
                                if f.startswith(("avx", "amx", "fma", "f16c"))})
                break
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cpu_flags": flags, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "loadavg": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="d20,d32", help="comma-separated dN (GPTConfig.from_depth(N))")
    p.add_argument("--formats", default="fp32,bf16,int8")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--context", type=int, default=256, help="KV positions each row attends over (tokens)")
    p.add_argument("--repeats", type=int, default=5, help="timed decode steps per point (median)")
    p.add_argument("--hf", choices=["on", "off"], default="on", help="transformers' generate side by side (CPU)")
    p.add_argument("--hf-new-tokens", type=int, default=32,
                   help="tokens generated beyond the first (their time is the difference of two generate calls)")
    p.add_argument("--hf-rounds", type=int, default=2, help="alternating rounds of theirs and ours (median)")
    p.add_argument("--hf-shapes", default="d20", help="shapes to run transformers on (its prefill of --context "
                   "tokens is timed twice per point: minutes at d32 on 2 cores)")
    p.add_argument("--quick", action="store_true", help="d20 only, batches 1 and 16, 3 repeats")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is steadier on an oversubscribed machine)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--memory", default=None, metavar="dN:FMT",
                   help="instead: peak RSS of loading dN in FMT from a random fp32 file and decoding with a KV cache "
                        "of --memory-batch x --memory-context (e.g. d32:int8)")
    p.add_argument("--memory-batch", type=int, default=1)
    p.add_argument("--memory-context", type=int, default=2048)
    p.add_argument("--memory-dir", default=None, help="where the random fp32 file goes (kept for reuse)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # the fresh process that measures
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.batches, args.repeats = "d20", "1,16", 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory:
        import tempfile

        depth, fmt = args.memory.split(":")
        if args.memory_child:
            print(json.dumps(memory_child(args.memory_child, int(depth.removeprefix("d")), fmt, args.memory_batch,
                                          args.memory_context)))
            return 0
        folder = args.memory_dir or tempfile.mkdtemp(prefix="decode_bandwidth_")
        r = measure_memory(int(depth.removeprefix("d")), fmt, args.memory_batch, args.memory_context, folder)
        print(f"peak memory {r['shape']} {fmt}: peak RSS {r['peak_rss'] / 1e9:.2f} GB (after load "
              f"{r['peak_rss_after_load'] / 1e9:.2f} GB, at start {r['rss_at_start'] / 1e9:.2f} GB) vs weights "
              f"{r['weight_bytes'] / 1e9:.2f} GB + KV {r['kv_bytes'] / 1e9:.2f} GB: {r['ratio']:.2f}x (target <= 1.3x)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(r, f, indent=2)
        return 0
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [int(s.strip().removeprefix("d")) for s in args.shapes.split(",")]
    formats = [f.strip() for f in args.formats.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    info = machine_info()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    print(f"machine: {json.dumps(info)}")
    print("note: a shared machine (see loadavg); numbers move with the other jobs on it")
    triad, copy = triad_bandwidth(device)
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in info.get("gpu", "")), None)
    flops = {fmt: matmul_flops(device, fmt) for fmt in formats}
    print(f"bandwidth: triad {triad / 1e9:.1f} GB/s, copy {copy / 1e9:.1f} GB/s"
          + (f", card peak {peak / 1e9:.0f} GB/s" if peak else ""))
    print("matmul FLOP/s (M=256): " + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in flops.items()))
    results = {"machine": info, "triad_Bps": triad, "copy_Bps": copy, "peak_Bps": peak, "matmul_flops": flops,
               "context": args.context, "rows": [], "hf": [], "profiles": [], "agreement": []}
    header = (f"{'shape':5} {'fmt':5} {'B':>3} {'step ms':>8} {'tok/s':>8} {'GB/step':>8} {'MBU':>6} "
              f"{'compute':>8} {'B*':>5}" + ("  MBU(peak)" if peak else ""))
    for depth in shapes:
        config = GPTConfig.from_depth(depth)
        fpt = flops_per_token(config, args.context)
        reference_logits = None
        for fmt in formats:
            model = build(config, fmt, device)
            wbytes = matmul_weight_bytes(model)
            # numeric agreement at real shapes (random weights: no bits per byte; the trained-model guard is
            # quantize.run_guard): logits of one fixed 64-token sequence against the first format's (fp32)
            with torch.no_grad():
                g = torch.Generator().manual_seed(0)
                logits = model(torch.randint(0, config.vocab_size, (1, 64), generator=g).to(device))[0].float()
            if reference_logits is None:
                reference_logits = logits
            agreement = {"shape": f"d{depth}", "format": fmt, "vs": formats[0],
                         "argmax_agreement": float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean()),
                         "max_abs_logit_err": float((logits - reference_logits).abs().max())}
            results["agreement"].append(agreement)
            print(f"\n== d{depth} {fmt}: {wbytes / 1e9:.2f} GB of matmul weights, {fpt / 1e9:.2f} GFLOP/token; greedy "
                  f"agreement with {formats[0]} {agreement['argmax_agreement']:.1%} of 64 positions, max |logit "
                  f"error| {agreement['max_abs_logit_err']:.3f} "
                  f"(loadavg {open('/proc/loadavg').read().split()[0] if os.path.exists('/proc/loadavg') else '?'})")
            print(header)
            for batch in batches:
                dec = Decoder(model, batch, args.context, device)
                step = timed(dec.step, device, args.repeats)
                elem = dec.cache.k.element_size()
                moved = wbytes + kv_bytes(config, batch, args.context, elem)
                tps = batch / step
                row = {"shape": f"d{depth}", "format": fmt, "batch": batch, "step_s": step, "tokens_per_s": tps,
                       "bytes_per_step": moved, "mbu": moved / step / triad,
                       "compute_frac": tps * fpt / flops[fmt],
                       "crossover_batch": wbytes * flops[fmt] / (triad * fpt)}
                if peak:
                    row["mbu_peak"] = moved / step / peak
                results["rows"].append(row)
                print(f"d{depth:<4} {fmt:5} {batch:>3} {step * 1e3:>8.1f} {tps:>8.1f} {moved / 1e9:>8.2f} "
                      f"{row['mbu']:>6.1%} {row['compute_frac']:>8.1%} {row['crossover_batch']:>5.1f}"
                      + (f"  {row['mbu_peak']:.1%}" if peak else ""))
                if batch in (1, 16) or batch == batches[-1]:
                    prof = dec.profile(args.repeats)
                    prof["step"] = step
                    prof["rest"] = step - prof["matmuls"] - prof["attention"] - prof["sampling"]
                    results["profiles"].append({"shape": f"d{depth}", "format": fmt, "batch": batch, **prof})
                del dec
            del model
        # per-step dispatch overhead: the same depth at width 64, vocabulary 512
        small = GPTConfig(sequence_len=config.sequence_len, vocab_size=512, n_layer=depth, n_head=1, n_kv_head=1,
                          n_embd=64)
        tiny = build(small, "fp32", device)
        dispatch = timed(Decoder(tiny, 1, args.context, device).step, device, args.repeats * 4)
        results.setdefault("dispatch_s", {})[f"d{depth}"] = dispatch
        del tiny
        print(f"\nprofile of a step, d{depth} (ms): matmuls = the linear layers alone (weight reads), rest = norms, "
              f"rotary, embedding, Python; dispatch (Python + op launches, width-64 model of the same depth) = "
              f"{dispatch * 1e3:.1f} ms")
        for prof in results["profiles"]:
            if prof["shape"] == f"d{depth}":
                print(f"  {prof['format']:5} B={prof['batch']:<3} step {prof['step'] * 1e3:8.1f}  matmuls "
                      f"{prof['matmuls'] * 1e3:8.1f}  attention {prof['attention'] * 1e3:7.1f}  sampling "
                      f"{prof['sampling'] * 1e3:6.1f}  rest {prof['rest'] * 1e3:7.1f}")
        if args.hf == "on" and device.type == "cpu" and f"d{depth}" in args.hf_shapes.split(","):
            decoders = {fmt: Decoder(build(config, fmt, device), 1, args.context, device) for fmt in formats}
            for dtype in (torch.float32, torch.bfloat16):
                hf = build_hf(config, dtype)
                tps, ours = hf_vs_ours(hf, decoders, args.context, args.hf_new_tokens, args.hf_rounds)
                del hf
                results["hf"].append({"shape": f"d{depth}", "dtype": str(dtype).removeprefix("torch."), "batch": 1,
                                      "tokens_per_s": tps, "ours_alternating": ours})
                print(f"transformers generate d{depth} {str(dtype).removeprefix('torch.')}: {tps:.2f} tok/s at "
                      f"batch 1; ours in alternation: " + ", ".join(f"{k} {v:.2f} tok/s ({v / tps:.2f}x)"
                                                                   for k, v in ours.items()))
            del decoders
    print(f"\nloadavg at the end: {open('/proc/loadavg').read().strip() if os.path.exists('/proc/loadavg') else '?'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
