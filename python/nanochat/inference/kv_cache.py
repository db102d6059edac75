"""Preallocated KV cache with a valid length per batch row, the views through which the model reads and writes it,
and the store of reusable prefixes.

Layout: k and v are (n_layer, B, T_max, H_kv, D); cache_lens (B,) int32 counts the valid positions of each row.

The model (`GPT.forward(idx, kv_cache=...)`) talks to a cache through four calls, so that one forward can serve a
plain batch, the engine's decode step or a ragged step of decode rows and prefill chunks:
- `positions(B, T)` -> (B, T) rotary positions of the new tokens (on the device);
- `attend(layer, q, k, v)` stores the new k/v at their positions and returns attention over each row's prefix and
  the new tokens (causal among the new tokens);
- `select(x)` keeps the hidden states whose logits the caller wants (all of them, except in a `PackedBatch`);
- `advance(T)` after the last layer;
- `previous_tokens(idx)`, only for a model with the smear gate: stores the new ids in the cache's `tokens` (B, T_max)
  and returns the id before each new token, from the row's own past (chunked prefill, decode, a reused prefix).
`attend` takes the layer's attention window (query position p sees keys p - window .. p; None: all).

`KVCache` and `CacheView` (rows lo..hi and positions 0..length of a cache, sharing its storage) give every row T new
tokens at its own offset and never read a device value on the host: the engine's decode step compiles with
`torch.compile(fullgraph=True)` and is captured in CUDA graphs. Positions past the end of the storage fail in the
index_put (the engine never schedules them). `PackedBatch` is the engine's ragged step; it is built from host-side
lengths the engine tracks, so it needs no sync either.
"""

from __future__ import annotations

import collections

import numpy as np
import torch

import nanochat_kernels
from nanochat.model.gpt import windowed_attention


def decode_attention(q, k_cache, v_cache, cache_lens, window: int | None = None):
    """nanochat_kernels.decode_attention where query position p sees keys p - window .. p (all for None); a
    window that covers the whole cache is dropped."""
    if window is not None and window >= k_cache.size(1) - 1:
        window = None
    return nanochat_kernels.decode_attention(q, k_cache, v_cache, cache_lens, window=window)


class CacheView:
    """Rows of a cache (k/v (n_layer, B, T, H_kv, D), lengths (B,)), every row taking T new tokens per forward.
    tokens (B, T) holds the id at each position for models that read a row's previous token (the smear gate)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, cache_lens: torch.Tensor, tokens: torch.Tensor | None = None):
        self.k, self.v, self.cache_lens, self.tokens = k, v, cache_lens, tokens
        self._index = None  # (rows, positions) of the new tokens, set by positions()

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def positions(self, B: int, T: int) -> torch.Tensor:
        if B != self.batch_size:
            raise ValueError(f"KV batch {B} does not match the cache's {self.batch_size}")
        dev = self.cache_lens.device
        pos = self.cache_lens.to(torch.long).view(B, 1) + torch.arange(T, device=dev).view(1, T)  # (B, T)
        self._index = (torch.arange(B, device=dev).view(B, 1).expand(B, T), pos)
        return pos

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v (B, T, H_kv, D) of `layer` after each row's current length (does not advance)."""
        B, T = k.shape[:2]
        if self._index is None or self._index[1].shape != (B, T):
            self.positions(B, T)
        rows, pos = self._index
        self.k[layer, rows, pos] = k.to(self.k.dtype)
        self.v[layer, rows, pos] = v.to(self.v.dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor:
        self.write(layer, k, v)
        T = q.size(1)
        return decode_attention(q, self.k[layer].to(q.dtype), self.v[layer].to(q.dtype), self.cache_lens + T, window)

    def previous_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """Store the new ids idx (B, T) at their positions and return the id before each (0 at position 0)."""
        if self.tokens is None:
            raise ValueError("this model reads each row's previous token (smear gate): build the cache with tokens")
        B, T = idx.shape
        if self._index is None or self._index[1].shape != (B, T):
            self.positions(B, T)
        rows, pos = self._index
        self.tokens[rows, pos] = idx
        return self.tokens[rows, (pos - 1).clamp(min=0)]

    def select(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def advance(self, T: int) -> None:
        self.cache_lens += T
        self._index = None


class KVCache(CacheView):
    def __init__(self, batch_size: int, max_len: int, n_layer: int, n_kv_head: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
        shape = (n_layer, batch_size, max_len, n_kv_head, head_dim)
        super().__init__(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                         torch.zeros(batch_size, device=device, dtype=torch.int32),
                         torch.zeros(batch_size, max_len, device=device, dtype=torch.long))

    def view(self, lo: int, hi: int, length: int) -> CacheView:
        """Rows lo..hi-1 and positions 0..length-1, sharing storage and lengths (advancing the view advances them)."""
        return CacheView(self.k[:, lo:hi, :length], self.v[:, lo:hi, :length], self.cache_lens[lo:hi],
                         self.tokens[lo:hi, :length])

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget rows (all by default). Stale K/V beyond a row's length are never read."""
        if rows is None:
            self.cache_lens.zero_()
        elif rows:
            self.cache_lens[rows] = 0

    def copy_row(self, src: "KVCache", src_row: int, dst_row: int, length: int | None = None) -> None:
        """Copy one row's valid prefix from `src` (possibly another cache of equal geometry) into `dst_row`.
        `length` is the row's length when the caller knows it (the engine does: no device read)."""
        n = int(src.cache_lens[src_row]) if length is None else length
        if n > self.max_len:
            raise ValueError(f"row of length {n} does not fit a cache of {self.max_len}")
        self.k[:, dst_row, :n] = src.k[:, src_row, :n]
        self.v[:, dst_row, :n] = src.v[:, src_row, :n]
        self.tokens[dst_row, :n] = src.tokens[src_row, :n]
        self.cache_lens[dst_row] = n

    def swap_rows(self, a: int, b: int, length: int) -> None:
        """Exchange rows a and b (their first `length` positions, the longer of the two rows, and lengths)."""
        pair, flipped = [a, b], [b, a]
        self.k[:, pair, :length] = self.k[:, flipped, :length]  # the right side is a copy (advanced indexing)
        self.v[:, pair, :length] = self.v[:, flipped, :length]
        self.tokens[pair, :length] = self.tokens[flipped, :length]
        self.cache_lens[pair] = self.cache_lens[flipped]


# ---------------------------------------------------------------------------------------------------------------
# The engine's ragged step


class PackedBatch:
    """One forward over a packed sequence idx (1, N) that holds one token for each of the decode rows 0..n_decode-1
    of `cache` (tokens 0..n_decode-1), then prefill chunks: chunk (row, start, count) continues that row's prompt
    at positions start..start+count-1. Logits come out only for the token indices in `outputs`.

    Attention runs per group: the decode rows in one `decode_attention` over the first `decode_len` positions of
    their rows (the rows are contiguous), each chunk on its own (plain causal attention when start == 0, so an
    unchunked prompt is computed exactly as a prefill alone; otherwise decode attention over its row's prefix).
    Every length comes from the engine's host-side bookkeeping."""

    def __init__(self, cache: KVCache, n_decode: int, decode_lens: list[int], decode_len: int,
                 chunks: list[tuple[int, int, int]], outputs: list[int]):
        self.cache, self.n_decode, self.decode_len = cache, n_decode, decode_len
        self.chunks = []  # (row, start, count, index of its first token)
        rows, pos, at = list(range(n_decode)), list(decode_lens), n_decode
        for row, start, count in chunks:
            self.chunks.append((row, start, count, at))
            rows += [row] * count
            pos += range(start, start + count)
            at += count
        self.num_tokens = at
        touched = list(range(n_decode)) + [row for row, _, _ in chunks]
        new_lens = [n + 1 for n in decode_lens] + [start + count for _, start, count in chunks]
        sizes = [at, at, len(touched), len(touched), len(outputs)]
        flat = torch.tensor(rows + pos + touched + new_lens + list(outputs), dtype=torch.long)
        parts = flat.to(cache.cache_lens.device, non_blocking=True).split(sizes)  # one host-to-device copy
        self.rows, self.pos, self.touched, self.outputs = parts[0], parts[1], parts[2], parts[4]
        self.new_lens = parts[3].to(torch.int32)
        self.chunk_lens = self.new_lens[n_decode:]  # chunk i's row holds start + count positions after the step

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def positions(self, B: int, T: int) -> torch.Tensor:
        if (B, T) != (1, self.num_tokens):
            raise ValueError(f"a PackedBatch of {self.num_tokens} tokens takes idx (1, {self.num_tokens}), "
                             f"got ({B}, {T})")
        return self.pos.view(1, T)

    def previous_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """Store the packed ids (1, N) in their rows and return the id before each (0 at position 0)."""
        self.cache.tokens[self.rows, self.pos] = idx[0]
        return self.cache.tokens[self.rows, (self.pos - 1).clamp(min=0)].view(1, -1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor:
        K, V = self.cache.k[layer], self.cache.v[layer]  # (B, T_max, H_kv, D)
        K[self.rows, self.pos] = k[0].to(K.dtype)
        V[self.rows, self.pos] = v[0].to(V.dtype)
        out = []
        n = self.n_decode
        if n:
            L = self.decode_len
            qd = q[0, :n].unsqueeze(1)  # (n, 1, H, D)
            out.append(decode_attention(qd, K[:n, :L].to(q.dtype), V[:n, :L].to(q.dtype),
                                        self.cache.cache_lens[:n] + 1, window).view(1, n, *q.shape[2:]))
        for i, (row, start, count, at) in enumerate(self.chunks):
            qc = q[:, at:at + count]
            if start == 0:  # the first chunk of a prompt sees only itself
                out.append(windowed_attention(qc, k[:, at:at + count], v[:, at:at + count], window))
            else:
                L = min(self.cache.max_len, round_up(start + count))
                out.append(decode_attention(qc, K[row:row + 1, :L].to(q.dtype), V[row:row + 1, :L].to(q.dtype),
                                            self.chunk_lens[i:i + 1], window))
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    def select(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.outputs]

    def advance(self, T: int) -> None:
        self.cache.cache_lens[self.touched] = self.new_lens


VIEW_ALIGN = 64  # attention views over the cache cover a row's length rounded up to this many positions


def round_up(n: int, align: int = VIEW_ALIGN) -> int:
    """n rounded up to a multiple of align (attention views: few distinct shapes, little wasted length)."""
    return -(-n // align) * align


# ---------------------------------------------------------------------------------------------------------------
# Prefix reuse


class PrefixStore:
    """KV entries of recent sequences (the tokens a finished row fed to the model: its prompt and reply), reused by
    prompts that start with the same tokens: the next turn of a conversation, a shared system prompt.

    Entries are copies (k/v (n_layer, n, H_kv, D) each), so a row can be overwritten the moment it is freed, and an
    entry is complete when inserted: the engine inserts only rows that finished normally, never a cancelled or
    failed one. Bounded by `max_tokens` in all; the least recently used entries go first. A match shorter than
    `min_tokens` is not reused (every chat prompt starts with the same few structure tokens; copying them saves
    nothing)."""

    def __init__(self, max_tokens: int, min_tokens: int = 16):
        if max_tokens < 0 or min_tokens < 1:
            raise ValueError(f"PrefixStore needs max_tokens >= 0 and min_tokens >= 1, got {max_tokens}, {min_tokens}")
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self.entries: collections.OrderedDict[int, tuple[np.ndarray, torch.Tensor, torch.Tensor]] = \
            collections.OrderedDict()  # least recently used first
        self.tokens_held = 0
        self.next_id = 0
        # counters (the server's /metrics)
        self.lookups = 0
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, prompt: list[int]) -> tuple[int | None, int]:
        """(entry id, tokens to reuse) for the longest held prefix of prompt[:-1] (the last prompt token is always
        computed: its logits give the first sampled token); (None, 0) when nothing of min_tokens or more matches."""
        self.lookups += 1
        if not self.entries:
            return None, 0
        p = np.asarray(prompt[:-1], dtype=np.int64)
        best, best_len = None, 0
        for key, (tokens, _, _) in self.entries.items():
            n = min(len(tokens), len(p))
            if n <= best_len:
                continue
            differ = np.flatnonzero(tokens[:n] != p[:n])
            m = int(differ[0]) if differ.size else n
            if m > best_len:
                best, best_len = key, m
        if best is None or best_len < self.min_tokens:
            return None, 0
        self.entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += best_len
        return best, best_len

    def load(self, key: int, length: int, cache: KVCache, row: int) -> None:
        """Copy the first `length` positions of an entry into a cache row and set its length."""
        tokens, k, v = self.entries[key]
        cache.k[:, row, :length] = k[:, :length]
        cache.v[:, row, :length] = v[:, :length]
        cache.tokens[row, :length] = torch.as_tensor(tokens[:length], device=cache.tokens.device)
        cache.cache_lens[row] = length

    def insert(self, tokens: list[int], cache: KVCache, row: int) -> None:
        """Keep a copy of cache row `row`, whose first len(tokens) positions hold `tokens`."""
        n = len(tokens)
        if n < self.min_tokens or n > self.max_tokens:
            return
        arr = np.asarray(tokens, dtype=np.int64)
        for key, (held, _, _) in list(self.entries.items()):
            m = min(len(held), n)
            if np.array_equal(held[:m], arr[:m]):
                if len(held) >= n:  # already covered by a longer entry
                    self.entries.move_to_end(key)
                    return
                self._drop(key)  # the new entry extends it
        k = cache.k[:, row, :n].clone()
        v = cache.v[:, row, :n].clone()
        self.entries[self.next_id] = (arr, k, v)
        self.next_id += 1
        self.tokens_held += n
        while self.tokens_held > self.max_tokens:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: int) -> None:
        tokens, _, _ = self.entries.pop(key)
        self.tokens_held -= len(tokens)

    def clear(self) -> None:
        self.entries.clear()
        self.tokens_held = 0
