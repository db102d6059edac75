"""How the next token is chosen: the sampling parameters of a request and the batched sampler.

Every row of a batch has its own temperature (0 = greedy), top-k, then top-p on the top-k distribution, and its own
`torch.Generator` seeded from (seed, sample index): a request's output depends only on its own seed, never on which
other requests share the batch. Inverse-CDF sampling from one uniform per row keeps the batch vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None  # None or 0: off
    top_p: float | None = None  # None or 1.0: off; 0 keeps only the most likely token
    seed: int | None = None  # None: a random seed
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be None or an int >= 0, got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p must be None or a number in [0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be None or an int, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")



def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  uniform: torch.Tensor) -> torch.Tensor:
    """One id per row of logits (B, V). Per-row temperature (B,) (0 = argmax), top_k (B,) long (0 = off),
    top_p (B,) (1 = off) applied after top-k, and uniform (B,) in [0, 1) drawn by each row's generator.

    Inverse CDF at the row's uniform: a row without top-k and top-p over its tokens in vocabulary order (no sort:
    a full sort of a 65536-token vocabulary costs ~20 ms a row on a CPU core), a row with them over its tokens
    sorted by logit. Which order a row gets depends only on its own parameters, so its token depends only on its
    own logits, parameters and uniform, never on the other rows of the batch."""
    B, V = logits.shape
    greedy = logits.argmax(dim=-1)
    sampling = temperature > 0
    if not bool(sampling.any()):
        return greedy
    scaled = logits.float() / temperature.clamp_min(1e-5).unsqueeze(1)
    plain = (top_k == 0) & (top_p >= 1.0)
    filtered = sampling & ~plain
    sampled = greedy
    if bool((sampling & plain).any()):
        sampled = torch.where(plain, _inverse_cdf(F.softmax(scaled, dim=-1), uniform), sampled)
    if bool(filtered.any()):
        k_max = V if bool((filtered & (top_k == 0)).any()) else min(V, int(top_k.max()))
        values, indices = torch.topk(scaled, k_max, dim=-1)  # (B, K) sorted descending
        pos = torch.arange(k_max, device=logits.device).unsqueeze(0)
        values = values.masked_fill((top_k.unsqueeze(1) > 0) & (pos >= top_k.unsqueeze(1)), float("-inf"))
        probs = F.softmax(values, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays); rows at 1 are untouched
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill((mass_before >= top_p.unsqueeze(1)) & (top_p.unsqueeze(1) < 1.0) & (pos > 0), 0.0)
        choice = _inverse_cdf(probs, uniform)
        sampled = torch.where(filtered, indices.gather(1, choice.unsqueeze(1)).squeeze(1), sampled)
    return torch.where(sampling, sampled, greedy)


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """probs (B, K) -> (B,) the index where each row's cumulative mass passes uniform * its total."""
    cdf = probs.cumsum(dim=-1)
    target = uniform.to(cdf.dtype).unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.size(1) - 1).squeeze(1)


def row_generator(seed: int, sample: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + sample * 7919) % (2 ** 63))
    return g

