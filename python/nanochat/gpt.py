"""The GPT: a decoder-only transformer whose one dial is its depth.

Notable choices:
- width = 64 x depth, head dim 128 (64 for odd depths, whose width is not a multiple of 128), GQA via n_kv_head
- rotary position embeddings (base 10,000) precomputed for 10 x sequence_len positions; with a KV cache the cache
  gives the positions of the new tokens (row b's start at cache_lens[b]..), so rows of different lengths decode
  together, and the engine's packed steps mix decode rows with prefill chunks
- QK-norm and parameter-free RMSNorm everywhere (before attention, MLP and the head; after the embedding)
- ReLU² MLP of width 4x, no biases, untied embedding and lm_head, logits soft-capped at 15 by tanh
- output projections (attention and MLP c_proj) start at zero so each block starts as the identity;
  lm_head starts small (std 0.001) so the first loss is ~ln(vocab_size)
- attention only through `nanochat_kernels`: `attention` without a cache; with one, the cache's `attend` (see
  kv_cache.py) stores k/v and calls `decode_attention` over each row's prefix (or `attention` for the first chunk
  of a prompt). The cached forward never reads a device value on the host (the decode step compiles fullgraph)
- fp32 master weights; on CUDA the forward runs under bf16 autocast with a bf16 residual stream, on CPU in fp32
- with targets, the lm_head, soft-cap and cross-entropy run fused in row chunks (`linear_cross_entropy`), so
  training and the loss-only evals never hold the (B, T, V) fp32 logits (17 GB per copy at d20, 32 x 2048)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import nanochat_kernels

LOGIT_SOFTCAP = 15.0
ROTARY_BASE = 10_000.0
ROTARY_LEN_FACTOR = 10  # rotary tables cover 10 x sequence_len positions, for generation past the training length

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

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head dim n_embd / n_head must be even for rotary embeddings, got {self.head_dim}")

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


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim / 2), fp32: position t rotates channel pair i by t * base^(-2i/D)."""
    inv_freq = ROTARY_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    return freqs.cos(), freqs.sin()


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
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, H_kv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, H_kv, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = rms_norm(q).to(v.dtype), rms_norm(k).to(v.dtype)  # QK-norm (autocast may run the norm in fp32)
        if kv_cache is None:
            y = nanochat_kernels.attention(q, k, v, causal=True)
        else:  # the cache stores k/v at each row's own offset, then attends over the row's prefix and the new tokens
            y = kv_cache.attend(self.layer_idx, q, k, v)
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

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(rms_norm(x), cos, sin, kv_cache)
        return x + self.mlp(rms_norm(x))


# ---------------------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.rotary_len = ROTARY_LEN_FACTOR * config.sequence_len
        cos, sin = rotary_tables(self.rotary_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)  # (T_rot, D/2)
        self.register_buffer("sin", sin, persistent=False)
        # The loss through nanochat_kernels.linear_cross_entropy (chunked; no (B, T, V) logits). False: the
        # materialized logits + F.cross_entropy, today's path before fusion, kept for benchmarks and comparison.
        self.fused_loss: bool = True
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Embedding N(0, 1); input projections U(±sqrt(3/C)) (std 1/sqrt(C)); output projections zero;
        lm_head N(0, 0.001). Also recomputes the rotary tables (they are not in the state dict)."""
        C = self.config.n_embd
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3.0 / C)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = rotary_tables(self.rotary_len, self.config.head_dim, device=self.wte.weight.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token (forward + backward): 6 x the matmul parameters (all but the embedding, which
        is a lookup) plus the attention scores and values, 12 x n_layer x n_head x head_dim x sequence_len."""
        cfg = self.config
        matmul_params = self.num_params() - self.wte.weight.numel()
        attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.sequence_len
        return float(6 * matmul_params + attention)

    def setup_optimizer(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                        weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.8, 0.95),
                        muon_momentum: float = 0.95, ns_steps: int = 5, ns_coeffs="quintic"):
        """MuonAdamW: Muon on the block matrices, AdamW (lr x (n_embd/768)^-0.5) on the embedding and lm_head.
        Shards its state over the ranks when torch.distributed is initialised with world_size > 1."""
        from nanochat.optim import MuonAdamW

        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        adamw_groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * dmodel_lr_scale, name="lm_head"),
            dict(params=[self.wte.weight], lr=embedding_lr * dmodel_lr_scale, name="wte"),
        ]
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
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=idx.is_cuda):
            x = self.wte(idx)  # (B, T, C)
            if idx.is_cuda:  # bf16 residual stream, as the matmuls produce it: half the activation memory
                x = x.to(torch.bfloat16)
            x = rms_norm(x)
            for block in self.blocks:
                x = block(x, cos, sin, kv_cache)
            if kv_cache is not None:
                x = kv_cache.select(x)  # the positions whose logits the caller samples from (all, or a few)
            x = rms_norm(x)
            if fused:  # lm_head + soft-cap + cross-entropy in chunks: the (B, T, V) logits never exist
                loss = nanochat_kernels.linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight,
                                                             targets.reshape(-1), LOGIT_SOFTCAP, ignore_index=-1,
                                                             reduction=loss_reduction)
            else:
                logits = self.lm_head(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        if fused:
            return loss
        # soft-cap in fp32: cap * tanh(logits / cap). In place where autograd allows (the division and the tanh),
        # so eager mode holds two (B, T, V) fp32 tensors here instead of four; torch.compile fuses it anyway
        logits = logits.float().div_(LOGIT_SOFTCAP).tanh_().mul(LOGIT_SOFTCAP)  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

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
