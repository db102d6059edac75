"""Inference weight formats: fp32 (as trained), bf16 and weight-only int8, chosen when a model is loaded.

A batch-1 decode step reads every weight once, so on a CPU its speed is the memory bandwidth over the weight bytes:
d20 is 2.2 GB per token in fp32, 1.1 GB in bf16, 0.56 GB in int8 (d32: 7.6 / 3.8 / 1.9 GB). The formats change only
how the matrices of the linear layers (every block's q, k, v, proj, fc, and the lm_head) are stored and multiplied;
the residual stream, norms, attention and the KV cache stay in the compute dtype (fp32 on CPU, bf16 under CUDA's
autocast), so a format is a property of the loaded model and the engine needs no change.

- int8: per output channel, symmetric: w[n, :] ~ scale[n] * q[n, :], q in [-127, 127], scale = max|w[n, :]| / 127.
  On an x86 CPU with AVX2 or AVX-512 the matmul is nanochat's own kernel (rust/int8mm through `int8_cpu`): the
  matrix is stored packed in cache-line tiles so that each thread streams it sequentially at close to the DRAM
  bandwidth, each int8 is widened to fp32 in registers, and the activations stay fp32 (no rounding to bf16).
  Elsewhere (CUDA, other CPUs) it is torch's weight-only int8 kernel `aten._weight_int8pack_mm(x, q (N, K), scales
  (N,))` on a row-major matrix, with the activations entering as bf16 (torch's fp32-activation CPU path is not
  vectorized), as autocast does for every matmul on CUDA. From DEQUANT_MIN_ROWS rows on (prefill chunks, big
  batches) the layer instead converts the matrix to bf16 and runs the bf16 GEMM, whose throughput grows with the
  rows where the int8 kernels' does not. `int8_linear_reference` is the plain-torch definition (dequantize, then an
  fp32 matmul) that the parity tests hold every path to.
- bf16: the matrix stored in bf16; activations enter the matmul as bf16 (fp32 accumulation in oneDNN), output in
  the compute dtype. Reference: `bf16_linear_reference`.
- the token embedding stays in the compute dtype in every format: a decode step reads only B of its rows, so
  quantizing it saves no time, and the scheduler takes the KV cache's dtype from the model's first parameter.
- `weight` of the converted layers is the dequantized fp32 matrix, made on demand: the fused loss
  (`linear_cross_entropy`, used by the bits-per-byte evals) takes the lm_head's matrix rather than calling it.

Loading (`load_converted`) never holds the fp32 model: the model is built on the meta device, converted, then
allocated in its final formats, and the safetensors file is read tensor by tensor in row chunks of <= 16 MB
(plain reads, no mmap, so the file's pages never count in the process's memory), each chunk quantized into place.
Peak memory is the converted model plus one chunk.

`auto` (the default of every command that generates) picks, on CPU, the fastest format (a timed one-token forward)
among those whose quality guard passed for this model: bits per byte on a fixed chat sample (the package's identity
conversations) relative to fp32, within 1% for int8 and 0.2% for bf16 (`GUARD_BOUNDS`). The guard runs the first time a model is loaded with auto
(three forwards over 1k tokens) and its result is cached as `weights_guard.json` beside the weights. On CUDA, auto
is fp32 (the master weights under bf16 autocast, as before): the int8 path there is unmeasured.
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import CorruptInputError, atomic_write
from nanochat.model import int8_cpu
from nanochat.model.bpb import evaluate_bpb
from nanochat.model.gpt import GPT, rotary_tables

FORMATS = ("fp32", "bf16", "int8")
WEIGHT_CHOICES = ("auto",) + FORMATS
GUARD_BOUNDS = {"bf16": 0.002, "int8": 0.01}  # largest relative increase of bits per byte over fp32
GUARD_FILE = "weights_guard.json"
# tokens of the guard sample (the identity conversations, repeated as needed): three forwards over it, once per
# model; the comparison is paired (same tokens), so 1k tokens resolve 0.1% of bpb
GUARD_TOKENS = 1024
# From this many rows on (prefill chunks, large batches) Int8Linear converts its matrix to bf16 and runs the bf16
# GEMM: the int8 kernel's throughput does not grow with the rows, the bf16 GEMM's does, and the conversion's cost is
# paid back from about 48 rows on (d20's 5120 x 1280 matrix; the timings are in bench/RESULTS.md, "Weight formats").
DEQUANT_MIN_ROWS = 64
_CHUNK_BYTES = 16 << 20  # rows read and converted at a time while loading

# ---------------------------------------------------------------------------------------------------------------
# Quantization and the reference matmuls


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale fp32 (N,)) with w[n] ~ scale[n] * q[n]: symmetric, per output channel (row).
    An all-zero row gets scale 1 (its q is 0), so dequantization never divides by zero."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The definition of the int8 layer: x (..., K) times the dequantized matrix, in fp32, returned in x's dtype."""
    return F.linear(x.float(), dequantize_rows(q, scale)).to(x.dtype)


def bf16_linear_reference(x: torch.Tensor, w_bf16: torch.Tensor) -> torch.Tensor:
    """The definition of the bf16 layer: x rounded to bf16 times the bf16 matrix, in fp32, returned in x's dtype."""
    return F.linear(x.to(torch.bfloat16).float(), w_bf16.float()).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Layers


class Int8Linear(nn.Module):
    """A bias-free Linear whose matrix is int8 with one fp32 scale per output channel (see the module docstring).

    On a CPU that runs nanochat's own kernel (`int8_cpu.available()`) the matrix is stored packed for it (buffer
    `qpacked`); elsewhere row-major (`qweight`) for torch's kernel. `packed=None` decides from `device` (the meta
    device, used while building a model, counts as the CPU: `empty_model` passes the final device). Either layout
    computes the same product on any device; only the speed differs."""

    def __init__(self, in_features: int, out_features: int, device=None, packed: bool | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packed = packed = int8_cpu.packs_for(device) if packed is None else packed
        if packed:
            self.register_buffer("qpacked", int8_cpu.empty_packed(out_features, in_features, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            # the scales in torch's kernel's activation dtype (bf16), kept so a step converts nothing: N x 2 bytes
            self.register_buffer("scale_bf16", torch.ones(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @torch.no_grad()
    def set_rows(self, start: int, w: torch.Tensor) -> None:
        """Quantize rows start..start+len(w)-1 of the float matrix into place."""
        q, scale = quantize_rows(w)
        end = start + w.size(0)
        if self.packed:
            int8_cpu.pack_rows_into(self.qpacked, start, q)
        else:
            self.qweight[start:end] = q.to(self.qweight.device)
            self.scale_bf16[start:end] = scale.to(device=self.scale.device, dtype=torch.bfloat16)
        self.scale[start:end] = scale.to(self.scale.device)

    def int8_matrix(self) -> torch.Tensor:
        """The row-major int8 matrix (out_features, in_features), whatever the stored layout."""
        if self.packed:
            return int8_cpu.unpack(self.qpacked, self.out_features, self.in_features)
        return self.qweight

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_rows(self.int8_matrix(), self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rows = x2.size(0)
        if self.packed and x2.is_cpu and rows < DEQUANT_MIN_ROWS:
            # decode: nanochat's kernel streams the packed matrix, activations stay fp32
            y = int8_cpu.matmul(x2.float().contiguous(), self.qpacked, self.scale, self.out_features,
                                self.in_features)
        elif rows >= DEQUANT_MIN_ROWS or self.packed:
            # prefill chunks, big batches (or a packed layer moved off the CPU): the bf16 GEMM on the converted matrix
            w = (int8_cpu.unpack(self.qpacked, self.out_features, self.in_features, torch.bfloat16) if self.packed
                 else self.qweight.to(torch.bfloat16))
            y = F.linear(x2.to(torch.bfloat16), w).float() * self.scale
        else:
            # torch's kernel; on CPU its fp32-activation path is not vectorized, so the activations enter as bf16
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight, self.scale_bf16)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        layout = "packed for nanochat's CPU kernel" if self.packed else "row-major"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, {layout}"


class Bf16Linear(nn.Module):
    """A bias-free Linear whose matrix is stored in bf16; activations enter the matmul as bf16."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("wbf16", torch.zeros(out_features, in_features, dtype=torch.bfloat16, device=device))

    @torch.no_grad()
    def set_rows(self, start: int, w: torch.Tensor) -> None:
        self.wbf16[start:start + w.size(0)] = w.to(device=self.wbf16.device, dtype=torch.bfloat16)

    @property
    def weight(self) -> torch.Tensor:
        return self.wbf16.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.wbf16).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16"


LINEAR_CLASSES = {"bf16": Bf16Linear, "int8": Int8Linear}


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear, Bf16Linear))]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def convert_model(model: nn.Module, fmt: str) -> nn.Module:
    """Convert every nn.Linear of `model` (bias-free) to `fmt` in place, one layer at a time, so the model never
    holds more than one fp32 matrix beyond its converted size. fp32 leaves the model as it is. Returns the model."""
    check_format(fmt)
    if fmt == "fp32":
        return model
    for name in linear_names(model):
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"layer {name} is already converted ({type(lin).__name__}); convert an fp32 model")
        if lin.bias is not None:
            raise ValueError(f"layer {name} has a bias; the weight formats cover bias-free layers only")
        new = LINEAR_CLASSES[fmt](lin.in_features, lin.out_features, device=lin.weight.device)
        new.set_rows(0, lin.weight)
        set_module(model, name, new)
        del lin
    return model


@torch.no_grad()
def converted_copy(model: nn.Module, fmt: str) -> nn.Module:
    """A `fmt` copy of the fp32 GPT `model` (which stays as it is), allocated in its final formats: memory grows by
    the converted size only, not by another fp32 model as deepcopy + convert_model would."""
    device = next(model.parameters()).device
    new = empty_model(model.config, fmt, device)
    for name, m in new.named_modules():
        if isinstance(m, tuple(LINEAR_CLASSES.values())):
            m.set_rows(0, model.get_submodule(name).weight)
    for name, p in new.named_parameters():
        p.copy_(model.get_parameter(name))
    return new.eval()


def model_format(model: nn.Module) -> str:
    """The format of the model's linear layers (fp32 for a plain model)."""
    kinds = {type(model.get_submodule(n)) for n in linear_names(model)}
    if kinds == {Int8Linear}:
        return "int8"
    if kinds == {Bf16Linear}:
        return "bf16"
    return "fp32"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (the int8 layers' bf16 scale copies included)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def matmul_weight_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads for the linear layers (matrices and scales): the bandwidth floor's numerator."""
    total = 0
    for name in linear_names(model):
        m = model.get_submodule(name)
        total += sum(t.numel() * t.element_size() for t in (list(m.parameters()) + list(m.buffers())))
    return total


def check_format(fmt: str, choices=FORMATS) -> str:
    if fmt not in choices:
        raise ValueError(f"weight format must be one of {', '.join(choices)}, got {fmt!r}")
    return fmt


# ---------------------------------------------------------------------------------------------------------------
# Streaming load

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _safetensors_header(f) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, offset of the data) of an open safetensors file."""
    head = f.read(8)
    if len(head) != 8:
        raise CorruptInputError(f"{f.name} is not a safetensors file (shorter than its 8-byte header size)")
    (n,) = struct.unpack("<Q", head)
    if n > 100_000_000:
        raise CorruptInputError(f"{f.name} is not a safetensors file (header of {n} bytes)")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptInputError(f"{f.name} has an unreadable safetensors header ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_rows(f, data_start: int, info: dict, start: int, rows: int) -> torch.Tensor:
    """Rows start..start+rows-1 of a tensor of a safetensors file (first dim = rows), read with plain reads."""
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
        raise CorruptInputError(f"{f.name}: tensor dtype {info['dtype']} is not one of {sorted(_ST_DTYPES)}")
    shape = list(info["shape"])
    row_numel = math.prod(shape[1:])
    itemsize = torch.empty((), dtype=dtype).element_size()
    out = torch.empty([rows] + shape[1:], dtype=dtype)
    f.seek(data_start + info["data_offsets"][0] + start * row_numel * itemsize)
    view = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
    got = f.readinto(view) if out.numel() else 0
    if got != rows * row_numel * itemsize:
        raise CorruptInputError(f"{f.name} is truncated: tensor data ends early")
    return out


@torch.no_grad()
def empty_model(config, fmt: str, device="cpu"):
    """A GPT of `config` in format `fmt` with uninitialized weights (the rotary tables computed), allocated once in
    its final formats: built on the meta device and converted there, so no fp32 matrix is ever allocated."""
    check_format(fmt)
    with torch.device("meta"):
        model = GPT(config)
    if fmt != "fp32":
        # the int8 layout follows the device the model is allocated on, not the meta device it is built on
        layout = {"packed": int8_cpu.packs_for(device)} if fmt == "int8" else {}
        for name in linear_names(model):
            lin = model.get_submodule(name)
            set_module(model, name, LINEAR_CLASSES[fmt](lin.in_features, lin.out_features, device="meta", **layout))
    model.to_empty(device=device)
    cos, sin = rotary_tables(model.rotary_len, config.head_dim, device=device)
    model.cos.copy_(cos)
    model.sin.copy_(sin)
    return model


@torch.no_grad()
def load_converted(config, path, fmt: str, device="cpu", rename=lambda k: k):
    """A GPT (eval mode) of `config` with the weights of the safetensors file `path` in format `fmt`, built without
    ever holding the fp32 model: `empty_model`, then filled from the file in row chunks (see the module
    docstring). `rename` maps the file's tensor names to the model's."""
    device = torch.device(device)
    model = empty_model(config, fmt, device)
    modules = dict(model.named_modules())
    expected = {}  # file-side name -> (module, shape)
    for name, m in modules.items():
        if isinstance(m, (Int8Linear, Bf16Linear)):
            expected[f"{name}.weight"] = (m, (m.out_features, m.in_features))
    for name, p in model.named_parameters():
        expected[name] = (p, tuple(p.shape))
    path = Path(path)
    with open(path, "rb") as f:
        header, data_start = _safetensors_header(f)
        names = {rename(k): k for k in header}
        missing, unexpected = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        if missing or unexpected:
            raise CorruptInputError(f"{path} does not fit the model config: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}")
        for name, (target, shape) in expected.items():
            info = header[names[name]]
            if tuple(info["shape"]) != shape:
                raise CorruptInputError(f"{path}: {name} has shape {tuple(info['shape'])}, the config says {shape}")
            row_bytes = max(1, math.prod(shape[1:]) * 4)
            step = max(1, _CHUNK_BYTES // row_bytes)
            for start in range(0, shape[0], step):
                rows = _read_rows(f, data_start, info, start, min(step, shape[0] - start))
                if isinstance(target, nn.Module):
                    target.set_rows(start, rows)
                else:
                    target[start:start + rows.size(0)] = rows.to(device=device, dtype=target.dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The quality guard and `auto`


def guard_sample(tokenizer, n_tokens: int = GUARD_TOKENS) -> list[int]:
    """A fixed chat sample: the package's identity conversations rendered as the chat stages see them, repeated to
    n_tokens + 1 tokens."""
    path = Path(__file__).resolve().parents[1] / "tasks" / "identity_conversations.jsonl"
    ids: list[int] = []
    convs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    while len(ids) < n_tokens + 1:
        for conv in convs:
            ids.extend(tokenizer.render_conversation(conv)[0])
    return ids[:n_tokens + 1]


@torch.no_grad()
def sample_bpb(model, tokens: list[int], token_bytes: torch.Tensor, seq_len: int = 512) -> float:
    """Bits per byte of `model` on `tokens` cut into rows of seq_len (the last partial row dropped)."""
    device = next(model.parameters()).device
    seq_len = min(seq_len, model.config.sequence_len, len(tokens) - 1)
    rows = (len(tokens) - 1) // seq_len
    t = torch.tensor(tokens[:rows * seq_len + 1], dtype=torch.long)
    x = t[:-1].view(rows, seq_len).to(device)
    y = t[1:].view(rows, seq_len).to(device)
    batches = [(x[i:i + 1], y[i:i + 1]) for i in range(rows)]
    return evaluate_bpb(model, batches, rows, token_bytes.to(device))


@torch.no_grad()
def greedy_agreement(reference_model, model, prompts: list[list[int]], max_tokens: int = 16) -> float:
    """Fraction of greedy tokens (teacher-forced on the reference's continuation) on which `model` picks the same
    token as `reference_model`: position by position, so one early flip does not count the rest as misses."""
    agree = total = 0
    for prompt in prompts:
        cont = list(reference_model.generate(prompt, max_tokens, temperature=0.0))
        seq = torch.tensor([prompt + cont], dtype=torch.long, device=next(reference_model.parameters()).device)
        ref_pick = reference_model(seq)[0, len(prompt) - 1:-1].argmax(-1)
        pick = model(seq.to(next(model.parameters()).device))[0, len(prompt) - 1:-1].argmax(-1).to(ref_pick.device)
        agree += int((pick == ref_pick).sum())
        total += ref_pick.numel()
    return agree / max(1, total)


def run_guard(model, tokenizer, tokens: list[int] | None = None) -> dict:
    """Bits per byte of the fp32 `model` and of its bf16 and int8 conversions on the guard sample, each format's
    relative increase and whether it passes GUARD_BOUNDS. The fp32 model is left as it is (each conversion is a
    `converted_copy`, one at a time)."""
    if model_format(model) != "fp32":
        raise ValueError(f"the guard compares against fp32; got a {model_format(model)} model")
    tokens = tokens if tokens is not None else guard_sample(tokenizer)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int32)
    base = sample_bpb(model, tokens, token_bytes)
    result = {"tokens": len(tokens) - 1, "bpb": {"fp32": base}, "rel": {"fp32": 0.0}, "pass": {"fp32": True},
              "ms_per_token": {"fp32": one_token_ms(model)}}
    for fmt in ("bf16", "int8"):
        converted = converted_copy(model, fmt)
        bpb = sample_bpb(converted, tokens, token_bytes)
        result["ms_per_token"][fmt] = one_token_ms(converted)
        del converted
        rel = (bpb - base) / base
        result["bpb"][fmt], result["rel"][fmt] = bpb, rel
        result["pass"][fmt] = rel <= GUARD_BOUNDS[fmt]
    return result


@torch.no_grad()
def one_token_ms(model, repeats: int = 7) -> float:
    """Median milliseconds of a one-token forward: what a batch-1 decode step costs in weight reads and overhead.
    Small models (the CPU default's 7 M parameters) can run faster in fp32 than through the int8 kernel's casts,
    so `auto` weighs speed, not only size."""
    x = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    model(x)  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def pick_format(guard: dict) -> str:
    """The fastest format (measured one-token forward) among those whose guard passed; a guard without timings
    (written before they were measured) gives the smallest passing one (int8, then bf16, then fp32)."""
    passing = [fmt for fmt in ("int8", "bf16", "fp32") if guard.get("pass", {}).get(fmt, fmt == "fp32")]
    ms = guard.get("ms_per_token") or {}
    if all(fmt in ms for fmt in passing):
        return min(passing, key=lambda fmt: ms[fmt])
    return passing[0]


def resolve_auto(folder, device, load_fp32, tokenizer_for_guard=None, log=None) -> tuple[str, dict | None]:
    """The format `auto` means for the model whose weights are in `folder` on `device`: fp32 on CUDA; on CPU the
    pick of the cached guard in folder/weights_guard.json, else of a guard run now on `load_fp32()` -> (model,
    tokenizer), cached when the folder is writable. Returns (format, guard result or None)."""
    if torch.device(device).type != "cpu":
        return "fp32", None
    cache = Path(folder) / GUARD_FILE
    if cache.is_file():
        try:
            guard = json.loads(cache.read_text())
            if set(guard.get("pass", {})) >= set(FORMATS):
                return pick_format(guard), guard
        except (OSError, json.JSONDecodeError):
            pass  # unreadable: run the guard again and rewrite it
    model, tokenizer = load_fp32()
    guard = run_guard(model, tokenizer)
    del model
    if log is not None:
        log(f"weights guard (bits per byte relative to fp32 on {guard['tokens']} tokens): "
            + ", ".join(f"{k} {v:+.3%}" for k, v in guard["rel"].items() if k != "fp32"))
    try:

        with atomic_write(cache, "w") as f:
            json.dump(guard, f, indent=2)
    except OSError:
        pass  # a read-only model folder: the guard runs again next time
    return pick_format(guard), guard


def add_weights_arg(p, default: str = "auto") -> None:
    p.add_argument("--weights", choices=list(WEIGHT_CHOICES), default=default,
                   help="inference weight format: fp32 (as trained), bf16, int8 (weight-only, per channel), or auto "
                        "(CPU: the fastest format that passes the quality guard for this model, cached in "
                        f"{GUARD_FILE} beside the weights; CUDA: fp32)")

