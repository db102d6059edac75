"""The nanochat GPT in plain torch for Hugging Face transformers (copied into the export folder).

Mirrors nanochat/model/gpt.py exactly, so greedy generation matches nanochat's engine token for token:
- token embedding, then parameter-free RMSNorm; per block x += attn(norm(x)); x += mlp(norm(x)); final norm
- attention: rotary embeddings (base config.rotary_base; the halves of the head dim form the pairs), then QK-norm
  (parameter-free RMSNorm of q and k), causal, GQA (n_kv_head K/V heads), no biases
- MLP: ReLU² of width 4 x n_embd; untied lm_head; logits soft-capped by cap * tanh(logits / cap) in fp32
- the architecture switches of GPTConfig (models imported from Karpathy's nanochat): value embeddings with gates,
  resid/x0 lambdas, the smear gate (the previous token's normed embedding, kept on the cache between calls),
  backout, q/k scale, bf16-rounded rotary tables, per-layer attention windows, a padded vocabulary
- KV cache: the transformers Cache passed by `generate` (DynamicCache by default); positions continue from the
  cache length, or come from position_ids (left padding); attention_mask masks padded keys
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanochat import NanochatConfig

# transformers 5 calls the cache `cache`; 4.x called it `past_key_values`
SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the normed embedding
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary(positions: torch.Tensor, head_dim: int, base: float, dtype: str = "float32"):
    """positions (B, T) -> cos, sin of shape (B, T, 1, D/2), fp32, as nanochat's precomputed tables."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    if dtype == "bfloat16":
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    return cos[:, :, None, :], sin[:, :, None, :]


def layer_windows(config) -> list:
    """Per layer None (full causal) or the window w: query i sees keys i - w .. i (GPTConfig.layer_windows)."""
    if not config.window_pattern:
        return [None] * config.n_layer
    pattern = config.window_pattern.upper()
    windows = [config.short_window if pattern[i % len(pattern)] == "S" else config.sequence_len
               for i in range(config.n_layer)]
    windows[-1] = config.sequence_len
    return windows


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).to(x.dtype)


class NanochatAttention(nn.Module):
    def __init__(self, config: NanochatConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        self.qk_scale = config.qk_scale
        self.window = layer_windows(config)[layer_idx]
        if layer_idx in config.ve_layers:
            self.ve_gate_channels, self.ve_gate_scale = config.ve_gate_channels, config.ve_gate_scale
            self.ve_gate = nn.Linear(config.ve_gate_channels, self.n_kv_head, bias=False)

    def forward(self, x, cos, sin, cache, key_mask, ve=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, H_kv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, H_kv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = rms_norm(q).to(v.dtype), rms_norm(k).to(v.dtype)
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        past = 0
        if cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)  # (B, H_kv, past + T, D)
        gqa = self.n_kv_head != self.n_head
        windowed = self.window is not None and self.window < past + T - 1
        if past == 0 and key_mask is None and not windowed:  # nanochat's training/prefill path: plain causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # query t sits at position past + t and sees keys 0..past + t (minus padded ones; within the window)
            S = k.size(2)
            distance = past + torch.arange(T, device=x.device)[:, None] - torch.arange(S, device=x.device)[None, :]
            allowed = distance >= 0
            if windowed:
                allowed = allowed & (distance <= self.window)
            if key_mask is not None:  # a query always sees itself, so a padded row never has an empty softmax
                itself = torch.arange(S, device=x.device)[None, :] == past + torch.arange(T, device=x.device)[:, None]
                allowed = (allowed[None, None] & key_mask[:, None, None, -S:].bool()) | itself[None, None]
            else:
                allowed = allowed[None, None]  # (1, 1, T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class NanochatMLP(nn.Module):
    def __init__(self, config: NanochatConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class NanochatBlock(nn.Module):
    def __init__(self, config: NanochatConfig, layer_idx: int):
        super().__init__()
        self.attn = NanochatAttention(config, layer_idx)
        self.mlp = NanochatMLP(config)

    def forward(self, x, cos, sin, cache, key_mask, ve=None):
        x = x + self.attn(rms_norm(x), cos, sin, cache, key_mask, ve)
        return x + self.mlp(rms_norm(x))


class NanochatPreTrainedModel(PreTrainedModel):
    config_class = NanochatConfig
    base_model_prefix = "model"
    _no_split_modules = ["NanochatBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # every weight comes from model.safetensors; this only gives fresh (from_config) models finite values
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)


class NanochatModel(NanochatPreTrainedModel):
    def __init__(self, config: NanochatConfig):
        super().__init__(config)
        V = config.padded_vocab_size
        self.wte = nn.Embedding(V, config.n_embd)
        self.blocks = nn.ModuleList([NanochatBlock(config, i) for i in range(config.n_layer)])
        if config.ve_layers:
            kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.ve_layers})
        if config.lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def forward(self, input_ids, positions, cache=None, key_mask=None):
        cfg = self.config
        cos, sin = rotary(positions, cfg.n_embd // cfg.n_head, cfg.rotary_base, cfg.rotary_dtype)
        x = rms_norm(self.wte(input_ids))
        if cfg.smear:  # the previous token's normed embedding: in this call, or kept on the cache from the last one
            before = getattr(cache, "nanochat_last_embedding", None) if cache is not None else None
            if before is None:
                before = torch.zeros_like(x[:, :1])
            x_prev = torch.cat([before, x[:, :-1]], dim=1)
            if cache is not None:
                cache.nanochat_last_embedding = x[:, -1:]
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
            x = x + torch.where((positions > 0).unsqueeze(-1), gate * x_prev, torch.zeros_like(x))
        x0 = x
        backout_at = cfg.n_layer // 2 if cfg.backout else -1
        x_backout = None
        for i, block in enumerate(self.blocks):
            if cfg.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if i in cfg.ve_layers else None
            x = block(x, cos, sin, cache, key_mask, ve)
            if i == backout_at:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda * x_backout
        return rms_norm(x)


class NanochatForCausalLM(NanochatPreTrainedModel, GenerationMixin):
    def __init__(self, config: NanochatConfig):
        super().__init__(config)
        self.model = NanochatModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                past_key_values: Cache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int = 0, **kwargs):
        """input_ids (B, T) -> logits (B, T, V) fp32 (the last `logits_to_keep` positions when > 0)."""
        cache = cache if cache is not None else past_key_values
        use_cache = cache is not None if use_cache is None else use_cache  # generate() passes use_cache=True
        if use_cache and cache is None:
            cache = DynamicCache()
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = past + torch.arange(T, device=input_ids.device)[None, :].expand(B, T)
        key_mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            key_mask = attention_mask
        limit = self.config.max_position_embeddings
        if int(position_ids.max()) >= limit:
            raise ValueError(f"position {int(position_ids.max())} is past the model's {limit} rotary positions")
        x = self.model(input_ids, position_ids, cache if use_cache else None, key_mask)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        cap = self.config.logit_softcap
        logits = F.linear(x, self.lm_head.weight[:self.config.vocab_size]).float().div_(cap).tanh_().mul(cap)
        loss = None
        if labels is not None:  # the usual shift: position t predicts token t + 1; -100 and -1 are ignored
            shifted = labels[:, 1:].reshape(-1).masked_fill(labels[:, 1:].reshape(-1) == -100, -1)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), shifted, ignore_index=-1)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
