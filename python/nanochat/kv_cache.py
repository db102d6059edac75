"""Preallocated KV cache with a valid length per batch row, shared by the model (which reads and writes it) and
the engine (which allocates, copies and resets rows).

Layout: k and v are (n_layer, B, T_max, H_kv, D); cache_lens (B,) int32 counts the valid positions of each row.
A forward pass of T new tokens per row writes them at positions cache_lens[b] .. cache_lens[b] + T - 1 of every
layer and then calls `advance(T)` once; rotary positions of the new tokens start at cache_lens[b].
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, batch_size: int, max_len: int, n_layer: int, n_kv_head: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
        shape = (n_layer, batch_size, max_len, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_lens = torch.zeros(batch_size, device=device, dtype=torch.int32)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v (B, T, H_kv, D) of `layer` after each row's current length (does not advance)."""
        B, T = k.shape[:2]
        if B != self.batch_size:
            raise ValueError(f"KV batch {B} does not match the cache's {self.batch_size}")
        end = int(self.cache_lens.max()) + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, cache holds {self.max_len}")
        lens = self.cache_lens.to(torch.long)
        if bool((lens == lens[0]).all()):  # common case: all rows aligned, one slice copy
            start = int(lens[0])
            self.k[layer, :, start:start + T] = k
            self.v[layer, :, start:start + T] = v
        else:  # ragged rows: scatter each row's T tokens at its own offset
            pos = lens.view(B, 1) + torch.arange(T, device=lens.device).view(1, T)  # (B, T)
            rows = torch.arange(B, device=lens.device).view(B, 1).expand(B, T)
            self.k[layer, rows, pos] = k
            self.v[layer, rows, pos] = v

    def advance(self, T: int) -> None:
        self.cache_lens += T

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget rows (all by default). Stale K/V beyond a row's length are never read."""
        if rows is None:
            self.cache_lens.zero_()
        else:
            self.cache_lens[rows] = 0

    def copy_row(self, src: "KVCache", src_row: int, dst_row: int) -> None:
        """Copy one row (its valid prefix) from `src` (possibly another cache of equal geometry) into `dst_row`."""
        n = int(src.cache_lens[src_row])
        if n > self.max_len:
            raise ValueError(f"row of length {n} does not fit a cache of {self.max_len}")
        self.k[:, dst_row, :n] = src.k[:, src_row, :n]
        self.v[:, dst_row, :n] = src.v[:, src_row, :n]
        self.cache_lens[dst_row] = n
