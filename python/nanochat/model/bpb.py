"""Bits per byte: the model's cross-entropy in bits, summed over target tokens and divided by the UTF-8 bytes those
tokens stand for. Unlike the per-token loss it does not depend on the vocabulary, so tokenizers of different sizes
compare fairly.

- bytes per token come from `Tokenizer.token_bytes()`; special tokens count 0 bytes and their loss is left out
  (they are not text), as are targets of -1 (padding / ignored positions)
- the per-token losses come from the model's fused loss (`GPT.forward` with targets, reduction "none"), so the
  (B, T, V) logits are never held
- under torch.distributed the sums are all-reduced, so every rank returns the same number
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from nanochat.common import sum_over_ranks


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int,
                 token_bytes: torch.Tensor) -> float:
    """Bits per byte of `model` over `steps` batches (inputs, targets) of `batches`; token_bytes (V,) integer."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    iterator = iter(batches)
    for _ in range(steps):
        try:
            x, y = next(iterator)
        except StopIteration:
            break
        loss = model(x, y, loss_reduction="none").view(-1)  # (B*T,) nats, 0 where y == -1
        y = y.reshape(-1).to(device)
        valid = y >= 0
        num_bytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0).to(torch.int64)
        counted = num_bytes > 0
        total_nats += (loss.to(device).double() * counted).sum()
        total_bytes += num_bytes.sum()
    sum_over_ranks(total_nats, total_bytes)
    n_bytes = int(total_bytes.item())
    if n_bytes == 0:
        raise ValueError("no target bytes to evaluate (empty batches, or only special / ignored targets)")
    return float(total_nats.item()) / (math.log(2) * n_bytes)
