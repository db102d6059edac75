"""The GPT: a decoder-only transformer whose one dial is its depth.

Notable choices:
- width = 64 x depth, head dim 128 (64 for odd depths, whose width is not a multiple of 128), GQA via n_kv_head
- rotary position embeddings (base 10,000 by default) precomputed for 10 x sequence_len positions; with a KV cache
  the cache gives the positions of the new tokens (row b's start at cache_lens[b]..), so rows of different lengths
  decode together, and the engine's packed steps mix decode rows with prefill chunks
- QK-norm and parameter-free RMSNorm everywhere (before attention, MLP and the head; after the embedding)
- ReLU² MLP of width 4x, no biases, untied embedding and lm_head, logits soft-capped at 15 by tanh (by default)
- output projections (attention and MLP c_proj) start at zero so each block starts as the identity;
  lm_head starts small (std 0.001) so the first loss is ~ln(vocab_size)
- attention only through `nanochat_kernels`: `attention` without a cache; with one, the cache's `attend` (see
  kv_cache.py) stores k/v and calls `decode_attention` over each row's prefix (or `attention` for the first chunk
  of a prompt). The cached forward never reads a device value on the host (the decode step compiles fullgraph)
- fp32 master weights; the forward asks nanochat.runtime for its precision: on CUDA bf16 autocast with a bf16
  residual stream, on CPU fp32 unless the caller runs it under a bf16 Runtime.autocast()
- architecture switches (GPTConfig fields, off by default) reproduce the checkpoints of Karpathy's nanochat exactly
  (importer.py): value embeddings mixed into v by per-head gates, resid/x0 lambdas, the smear gate (each position
  adds a gated share of the previous token's normed embedding; with a cache the previous id comes from the cache),
  backout, a q/k scale after QK-norm, the rotary base and bf16-rounded tables, per-layer S/L attention windows
  (nanochat's meaning: window w = keys i - w .. i; L layers have w = sequence_len, the last layer always L), the
  soft-cap and a padded vocabulary (the extra rows never become logits)
- with targets, the lm_head, soft-cap and cross-entropy run fused in row chunks (`linear_cross_entropy`), so
  training and the loss-only evals never hold the (B, T, V) fp32 logits (17 GB per copy at d20, 32 x 2048)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import nanochat_kernels
from nanochat.model.optim import MuonAdamW
from nanochat.runtime import autocast, default_dtype

LOGIT_SOFTCAP = 15.0
ROTARY_BASE = 10_000.0
ROTARY_LEN_FACTOR = 10  # rotary tables cover 10 x sequence_len positions, for generation past the training length
SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the normed embedding (nanochat's constant)

# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280
    # Architecture switches. The defaults are this project's own model; the other values describe the checkpoints of
    # Karpathy's nanochat (see importer.py for its three eras). Each one is exact as nanochat computes it.
    ve_layers: list[int] = field(default_factory=list)  # layers whose v gets a gated value embedding (token lookup)
    ve_gate_channels: int = 32  # the gate reads the first channels of the block's normed input: 32, later 12
    ve_gate_scale: float = 2.0  # gate = scale * sigmoid(W x[:channels]) per K/V head: 2, later 3
    lambdas: bool = False  # per layer x = resid_lambdas[i] * x + x0_lambdas[i] * x0 before block i (x0: embedding)
    smear: bool = False  # x[t] += smear_lambda * sigmoid(W x[t, :24]) * x[t-1] right after the embedding norm
    backout: bool = False  # subtract backout_lambda x (the stream after block n_layer // 2) before the final norm
    qk_scale: float = 1.0  # q and k are each multiplied by this after QK-norm (nanochat: 1.15, then 1.2)
    rotary_base: float = ROTARY_BASE  # nanochat: 10,000, then 100,000
    rotary_dtype: str = "float32"  # "bfloat16": the rotary tables rounded to bf16 (nanochat until March 2026)
    window_pattern: str = ""  # "": full causal attention; else S/L per layer, tiled, the last layer always L
    short_window: int = 0  # the window of S layers; L layers have window sequence_len (a key j is visible to the
    #                        query i iff 0 <= i - j <= window: window + 1 keys, the query's own included)
    logit_softcap: float = LOGIT_SOFTCAP
    pad_vocab_to: int = 1  # wte and lm_head have vocab_size rounded up to this multiple (the extra logits dropped)

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "pad_vocab_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head dim n_embd / n_head must be even for rotary embeddings, got {self.head_dim}")
        self.ve_layers = sorted(set(self.ve_layers))
        if any(not isinstance(i, int) or not 0 <= i < self.n_layer for i in self.ve_layers):
            raise ValueError(f"ve_layers must be layer indices in [0, {self.n_layer}), got {list(self.ve_layers)}")
        if self.ve_layers and not 1 <= self.ve_gate_channels <= self.n_embd:
            raise ValueError(f"ve_gate_channels must be in [1, n_embd={self.n_embd}], got {self.ve_gate_channels}")
        if self.smear and self.n_embd < SMEAR_CHANNELS:
            raise ValueError(f"the smear gate reads {SMEAR_CHANNELS} channels; n_embd is {self.n_embd}")
        if self.rotary_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"rotary_dtype must be 'float32' or 'bfloat16', got {self.rotary_dtype!r}")
        if self.window_pattern and set(self.window_pattern.upper()) - {"S", "L"}:
            raise ValueError(f"window_pattern must be letters S and L, got {self.window_pattern!r}")
        if "S" in self.window_pattern.upper()[:self.n_layer] and self.short_window < 0:
            raise ValueError(f"short_window must be >= 0, got {self.short_window}")
        if not self.logit_softcap > 0:
            raise ValueError(f"logit_softcap must be > 0, got {self.logit_softcap}")

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    def layer_windows(self) -> list[int | None]:
        """Per layer: None (full causal) or the window w (query i sees keys i - w .. i), nanochat's meaning."""
        if not self.window_pattern:
            return [None] * self.n_layer
        pattern = self.window_pattern.upper()
        windows = [self.short_window if pattern[i % len(pattern)] == "S" else self.sequence_len
                   for i in range(self.n_layer)]
        windows[-1] = self.sequence_len
        return windows

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int = 65536, sequence_len: int = 2048,
                   n_kv_head: int | None = None) -> "GPTConfig":
        """The one dial: width 64 x depth, heads of dim 128 (d20 -> 1280 wide, 10 heads).

        A width that is not a multiple of 128 (odd depth) uses heads of dim 64 instead, so heads always divide it.
        n_kv_head defaults to n_head (no GQA).
        """
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        n_embd = 64 * depth
        head_dim = 128 if n_embd % 128 == 0 else 64
        n_head = max(1, n_embd // head_dim)
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_kv_head < 1 or n_head % n_kv_head:
            raise ValueError(f"n_kv_head must divide n_head={n_head} (depth {depth}), got {n_kv_head}")
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                   n_kv_head=n_kv_head, n_embd=n_embd)


def nanochat_ve_layers(n_layer: int) -> list[int]:
    """nanochat's value-embedding layers: every other one, the last always included."""
    return [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]


def state_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in GPT(config).state_dict(), without building the model (a converter
    checks a large checkpoint against it before loading anything)."""
    C, V, L = config.n_embd, config.padded_vocab_size, config.n_layer
    kv = config.n_kv_head * config.head_dim
    shapes = {"wte.weight": (V, C)}
    for i in range(L):
        p = f"blocks.{i}."
        shapes |= {p + "attn.c_q.weight": (config.n_head * config.head_dim, C), p + "attn.c_k.weight": (kv, C),
                   p + "attn.c_v.weight": (kv, C), p + "attn.c_proj.weight": (C, config.n_head * config.head_dim)}
        if i in config.ve_layers:
            shapes[p + "attn.ve_gate.weight"] = (config.n_kv_head, config.ve_gate_channels)
        shapes |= {p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_proj.weight": (C, 4 * C)}
    shapes["lm_head.weight"] = (V, C)
    shapes |= {f"value_embeds.{i}.weight": (V, kv) for i in config.ve_layers}
    if config.lambdas:
        shapes |= {"resid_lambdas": (L,), "x0_lambdas": (L,)}
    if config.smear:
        shapes |= {"smear_gate.weight": (1, SMEAR_CHANNELS), "smear_lambda": (1,)}
    if config.backout:
        shapes["backout_lambda"] = (1,)
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, device=None, base: float = ROTARY_BASE,
                  dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim / 2), fp32: position t rotates channel pair i by t * base^(-2i/D).
    dtype "bfloat16" rounds the tables to bf16 values (kept as fp32), as nanochat's models computed them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    if dtype == "bfloat16":
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    return cos, sin


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal attention (B, T, H, D) in which query i sees keys i - window .. i (all of 0..i for None); a window
    that covers the whole sequence is dropped, so the kernel runs its plain causal path."""
    if window is not None and window >= q.size(1) - 1:
        window = None
    return nanochat_kernels.attention(q, k, v, causal=True, window=window)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by cos/sin broadcastable to (B, T, 1, D/2); the halves of D form the pairs."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Modules


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qk_scale = config.qk_scale
        self.window = config.layer_windows()[layer_idx]
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        if layer_idx in config.ve_layers:  # the gate of this layer's value embedding: one per K/V head
            self.ve_gate_channels, self.ve_gate_scale = config.ve_gate_channels, config.ve_gate_scale
            self.ve_gate = nn.Linear(config.ve_gate_channels, self.n_kv_head, bias=False)

    def forward(self, x, cos, sin, kv_cache=None, ve=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, H_kv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, H_kv, D)
        if ve is not None:  # value embedding (B, T, H_kv * D), mixed in per K/V head by an input-dependent gate
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, H_kv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = rms_norm(q).to(v.dtype), rms_norm(k).to(v.dtype)  # QK-norm (autocast may run the norm in fp32)
        if self.qk_scale != 1.0:  # sharper attention: scores grow by qk_scale²
            q, k = q * self.qk_scale, k * self.qk_scale
        if kv_cache is None:
            y = windowed_attention(q, k, v, self.window)
        else:  # the cache stores k/v at each row's own offset, then attends over the row's prefix and the new tokens
            y = kv_cache.attend(self.layer_idx, q, k, v, window=self.window)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU²


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None, ve=None):
        x = x + self.attn(rms_norm(x), cos, sin, kv_cache, ve)
        return x + self.mlp(rms_norm(x))


# ---------------------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.wte = nn.Embedding(V, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        if config.ve_layers:  # one token -> (n_kv_head * head_dim) lookup per listed layer
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.ve_layers})
        if config.lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.rotary_len = ROTARY_LEN_FACTOR * config.sequence_len
        cos, sin = rotary_tables(self.rotary_len, config.head_dim, base=config.rotary_base, dtype=config.rotary_dtype)
        self.register_buffer("cos", cos, persistent=False)  # (T_rot, D/2)
        self.register_buffer("sin", sin, persistent=False)
        # The loss through nanochat_kernels.linear_cross_entropy (chunked; no (B, T, V) logits). False: the
        # materialized logits + F.cross_entropy, today's path before fusion, kept for benchmarks and comparison.
        self.fused_loss: bool = True
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Embedding N(0, 1); input projections U(±sqrt(3/C)) (std 1/sqrt(C)); output projections zero;
        lm_head N(0, 0.001). The switches' parameters start as nanochat's: value embeddings like c_v, gates at
        zero (value gates start at scale / 2), resid 1 and x0 0.1, smear 0, backout 0.2. Also recomputes the
        rotary tables (they are not in the state dict)."""
        cfg = self.config
        C = cfg.n_embd
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3.0 / C)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if hasattr(block.attn, "ve_gate"):
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in getattr(self, "value_embeds", {}).values():
            nn.init.uniform_(ve.weight, -bound, bound)
        if cfg.lambdas:
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.fill_(0.1)
        if cfg.smear:
            nn.init.zeros_(self.smear_gate.weight)
            self.smear_lambda.zero_()
        if cfg.backout:
            self.backout_lambda.fill_(0.2)
        cos, sin = rotary_tables(self.rotary_len, cfg.head_dim, device=self.wte.weight.device, base=cfg.rotary_base,
                                 dtype=cfg.rotary_dtype)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token (forward + backward): 6 x the matmul parameters (all but the embeddings, which
        are lookups, and the scalar lambdas) plus the attention scores and values, 12 x n_head x head_dim x the
        keys each layer attends to (its window, at most sequence_len)."""
        cfg = self.config
        lookups = self.wte.weight.numel() + sum(ve.weight.numel() for ve in getattr(self, "value_embeds", {}).values())
        scalars = sum(p.numel() for name, p in self.named_parameters() if name.endswith("_lambdas")
                      or name.endswith("_lambda"))
        matmul_params = self.num_params() - lookups - scalars
        keys = sum(cfg.sequence_len if w is None else min(w, cfg.sequence_len) for w in cfg.layer_windows())
        attention = 12 * cfg.n_head * cfg.head_dim * keys
        return float(6 * matmul_params + attention)

    def setup_optimizer(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                        weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.8, 0.95),
                        muon_momentum: float = 0.95, ns_steps: int = 5, ns_coeffs="quintic", scalar_lr: float = 0.5):
        """MuonAdamW: Muon on the block matrices, AdamW (lr x (n_embd/768)^-0.5) on the embeddings and lm_head,
        AdamW at scalar_lr on the lambdas and the smear gate (resid_lambdas at 1% of it, as nanochat).
        Shards its state over the ranks when torch.distributed is initialised with world_size > 1."""

        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        adamw_groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * dmodel_lr_scale, name="lm_head"),
            dict(params=[self.wte.weight], lr=embedding_lr * dmodel_lr_scale, name="wte"),
        ]
        # one group per parameter: MuonAdamW keeps AdamW state per (group, parameter)
        for i, ve in getattr(self, "value_embeds", {}).items():
            adamw_groups.append(dict(params=[ve.weight], lr=embedding_lr * dmodel_lr_scale, name=f"value_embeds.{i}"))
        if self.config.lambdas:
            adamw_groups.append(dict(params=[self.resid_lambdas], lr=scalar_lr * 0.01, name="resid_lambdas"))
            adamw_groups.append(dict(params=[self.x0_lambdas], lr=scalar_lr, name="x0_lambdas"))
        for name in ("smear_lambda", "backout_lambda"):
            if hasattr(self, name):
                adamw_groups.append(dict(params=[getattr(self, name)], lr=scalar_lr, name=name))
        if self.config.smear:
            adamw_groups.append(dict(params=[self.smear_gate.weight], lr=scalar_lr, name="smear_gate"))
        matrices = [p for block in self.blocks for p in block.parameters()]
        return MuonAdamW(matrices, adamw_groups, matrix_lr=matrix_lr, momentum=muon_momentum, ns_steps=ns_steps,
                         ns_coeffs=ns_coeffs, adam_betas=adam_betas, weight_decay=weight_decay)

    # -- forward ----------------------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                kv_cache=None):
        """idx (B, T) int64 -> logits (B, T, V) fp32, or the cross-entropy loss when targets (B, T) are given
        (targets == -1 are ignored; "mean" -> scalar, "none" -> (B*T,), "sum" -> scalar; fused unless
        self.fused_loss is False). With a kv_cache the logits are those of the positions the cache selects (see
        kv_cache.py), all of them for a KVCache."""
        if idx.ndim != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if kv_cache is None:
            if T > self.rotary_len:
                raise ValueError(f"sequence of {T} tokens exceeds the rotary table of {self.rotary_len} positions")
            cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]  # (1, T, 1, D/2)
        else:
            if kv_cache.max_len > self.rotary_len:  # every position is < max_len: checked without reading lengths
                raise ValueError(f"a KV cache of {kv_cache.max_len} positions exceeds the rotary table of "
                                 f"{self.rotary_len} positions")
            pos = kv_cache.positions(B, T)  # (B, T) on the device
            cos, sin = self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)  # (B, T, 1, D/2)

        if targets is not None and loss_reduction not in ("mean", "none", "sum"):
            raise ValueError(f"loss_reduction must be 'mean', 'none' or 'sum', got {loss_reduction!r}")
        fused = targets is not None and self.fused_loss
        cfg = self.config
        with autocast(idx.device):  # the device's default precision: bf16 on CUDA; on CPU the caller's
            x = self.embed(idx)  # (B, T, C)
            if cfg.smear:  # the previous token of each position: within idx, or from the cache for a row's first
                prev = idx.roll(1, dims=1) if kv_cache is None else kv_cache.previous_tokens(idx)
                x = self.smear_into(x, self.embed(prev), first_pos=None if kv_cache is None else pos)
            x0 = x
            backout_at = cfg.n_layer // 2 if cfg.backout else -1
            x_backout = None
            for i, block in enumerate(self.blocks):
                if cfg.lambdas:
                    x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
                ve = self.value_embeds[str(i)](idx) if i in cfg.ve_layers else None
                x = block(x, cos, sin, kv_cache, ve)
                if i == backout_at:
                    x_backout = x
            if x_backout is not None:
                x = x - self.backout_lambda.to(x.dtype) * x_backout
            if kv_cache is not None:
                x = kv_cache.select(x)  # the positions whose logits the caller samples from (all, or a few)
            x = rms_norm(x)
            if fused:  # lm_head + soft-cap + cross-entropy in chunks: the (B, T, V) logits never exist
                head = self.lm_head.weight[:cfg.vocab_size]  # padded rows never become logits
                loss = nanochat_kernels.linear_cross_entropy(x.reshape(B * T, -1), head, targets.reshape(-1),
                                                             cfg.logit_softcap, ignore_index=-1,
                                                             reduction=loss_reduction)
            else:
                # the layer itself, not its .weight: an int8 or bf16 lm_head (model/quantize.py) would otherwise
                # rebuild its fp32 matrix every decode step; the padded rows' logits are dropped
                logits = self.lm_head(x)[..., :cfg.vocab_size]
        if kv_cache is not None:
            kv_cache.advance(T)
        if fused:
            return loss
        # soft-cap in fp32: cap * tanh(logits / cap). In place where autograd allows (the division and the tanh),
        # so eager mode holds two (B, T, V) fp32 tensors here instead of four; torch.compile fuses it anyway
        cap = cfg.logit_softcap
        logits = logits.float().div_(cap).tanh_().mul(cap)  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The normed token embedding (B, T, C) (bf16 on CUDA, as the matmuls produce it: half the activation
        memory)."""
        x = self.wte(idx)
        if default_dtype(idx.device) == torch.bfloat16:
            x = x.to(torch.bfloat16)
        return rms_norm(x)

    def smear_into(self, x: torch.Tensor, x_prev: torch.Tensor, first_pos: torch.Tensor | None) -> torch.Tensor:
        """x[t] + smear_lambda * sigmoid(smear_gate(x[t, :24])) * x_prev[t], except at position 0 (no previous
        token). first_pos: the (B, T) positions with a cache; None: idx starts every row at position 0."""
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))  # (B, T, 1)
        if first_pos is None:
            has_prev = (torch.arange(x.size(1), device=x.device) > 0).view(1, -1, 1)
        else:
            has_prev = (first_pos > 0).unsqueeze(-1)
        return x + torch.where(has_prev, gate * x_prev, torch.zeros_like(x))

    # -- reference sampler ------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42):
        """Yield up to `max_tokens` sampled ids after the prompt `tokens`, recomputing the whole sequence each
        step (no KV cache): slow and obviously correct, the engine's reference. temperature 0 is greedy."""
        if not tokens:
            raise ValueError("generate needs a non-empty prompt (start it with <|bos|>)")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {top_k}")
        device = self.wte.weight.device
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)  # (1, T)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]  # (1, V)
            next_id = sample_next(logits, temperature, top_k, rng)  # (1, 1)
            ids = torch.cat([ids, next_id], dim=1)
            yield int(next_id.item())


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                rng: torch.Generator | None = None) -> torch.Tensor:
    """Sample one id per row from logits (B, V) -> (B, 1); temperature 0 is argmax."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        k = min(top_k, logits.size(-1))
        values, indices = torch.topk(logits, k, dim=-1)
        probs = F.softmax(values / temperature, dim=-1)
        return indices.gather(-1, torch.multinomial(probs, 1, generator=rng))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=rng)
