"""The pretraining data loader: parquet row groups -> BOS-prefixed token documents -> packed (B, T) batches.

- streams one parquet row group at a time (pyarrow); background threads read and tokenize whole row groups with
  the tokenizer's batch encoder (the Rust encoder releases the GIL); results are consumed strictly in order, so
  the batches do not depend on the number of threads (threads=0 does everything inline: the reference)
- sharding by rank: the row groups of the split are walked in order (shard by shard, epoch after epoch) and the
  k-th row group visited goes to rank k % world_size; the counter runs across epochs, so even a split with fewer
  row groups than ranks gives every rank data
- BOS before every document, and every row of T+1 tokens starts at a document boundary: best-fit packing keeps a
  buffer of >= buffer_docs documents and fills each row with the largest document that fits the space left
  (earliest first among equal lengths); when none fits, the shortest is cropped to fill the row exactly. A
  document longer than a row is cropped to a row when it enters the buffer. The cropped tokens are counted in
  `dropped_fraction`. `BestFitBuffer` is the fast path (sorted keys + bisect); `ReferenceBestFitBuffer` is the
  obvious O(n) scan it is tested against
- exact resume: `state_dict()` names the next row group to read and the documents left in the buffer (by row
  group and row, in buffer order); `DataLoader(..., state=sd)` re-reads and re-tokenizes those few row groups and
  continues with exactly the batches the uninterrupted loader would have produced. The state is per rank
- a corrupt or truncated shard raises an error naming the file (from the thread that hit it, never a hang);
  with skip_corrupt=True it is skipped with a warning (the same way again on resume, so resume stays exact)
- on CUDA the batch is pinned and copied with non_blocking=True
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanochat.common import CorruptInputError, get_logger
from nanochat.data.shards import split_shards

STATE_VERSION = 1

# ---------------------------------------------------------------------------------------------------------------
# Documents and best-fit packing


@dataclass
class Document:
    key: tuple[int, int, int, int]  # (epoch, shard index, row group, row): where it came from, for resume
    tokens: np.ndarray              # int32, BOS first, at most one row long
    length: int                     # tokens before cropping to a row (the extra is dropped)


class BestFitBuffer:
    """Documents waiting to be packed; `take(space)` returns (document, tokens used) by the best-fit rule.

    Documents are kept as sorted (length, arrival) keys, so the best fit is one bisect: the largest length
    <= space, then the earliest arrival of that length. Removal is a list pop (a memmove of ~2000 entries)."""

    def __init__(self):
        self._keys: list[tuple[int, int]] = []
        self._docs: dict[int, Document] = {}
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, doc: Document) -> None:
        bisect.insort(self._keys, (len(doc.tokens), self._arrivals))
        self._docs[self._arrivals] = doc
        self._arrivals += 1

    def take(self, space: int) -> tuple[Document, int]:
        i = bisect.bisect_right(self._keys, (space, float("inf"))) - 1
        if i >= 0:  # the longest that fits; the earliest of that length
            i = bisect.bisect_left(self._keys, (self._keys[i][0], -1))
            _, arrival = self._keys.pop(i)
            doc = self._docs.pop(arrival)
            return doc, len(doc.tokens)
        _, arrival = self._keys.pop(0)  # none fits: crop the shortest (the earliest of that length)
        return self._docs.pop(arrival), space

    def keys_in_order(self) -> list[list[int]]:
        return [list(self._docs[a].key) for a in sorted(self._docs)]


class ReferenceBestFitBuffer:
    """The obviously-correct version of BestFitBuffer: a list in arrival order, scanned in full."""

    def __init__(self):
        self._docs: list[Document] = []

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, doc: Document) -> None:
        self._docs.append(doc)

    def take(self, space: int) -> tuple[Document, int]:
        best = None
        for i, doc in enumerate(self._docs):
            if len(doc.tokens) <= space and (best is None or len(doc.tokens) > len(self._docs[best].tokens)):
                best = i
        if best is not None:
            doc = self._docs.pop(best)
            return doc, len(doc.tokens)
        shortest = min(range(len(self._docs)), key=lambda i: len(self._docs[i].tokens))
        return self._docs.pop(shortest), space

    def keys_in_order(self) -> list[list[int]]:
        return [list(d.key) for d in self._docs]


# ---------------------------------------------------------------------------------------------------------------
# Reading and tokenizing row groups


@dataclass
class Chunk:
    """One tokenized row group (possibly empty when skipped as corrupt)."""
    position: tuple[int, int, int]           # (epoch, shard index, row group)
    next_walk: tuple[int, int, int, int]     # the walk position right after it: (epoch, shard, row group, counter)
    docs: list[tuple[int, np.ndarray, int]]  # (row, BOS + ids cropped to a row as int32, length before cropping)


class CorruptShardError(CorruptInputError, RuntimeError):
    """A pretraining shard that cannot be read (the message names the file); a user error, not a bug."""


def _open_parquet(path: Path):
    import pyarrow.parquet as pq  # heavy; loaded by the reader thread, not at import

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid ("magic bytes not found"), OSError, ...
        raise CorruptShardError(f"corrupt or truncated parquet shard {path}: {e}") from e


def read_row_group_texts(path: Path, row_group: int) -> list[str | None]:
    pf = _open_parquet(path)
    try:
        return pf.read_row_group(row_group, columns=["text"]).column("text").to_pylist()
    except Exception as e:
        raise CorruptShardError(f"corrupt parquet shard {path} (row group {row_group}): {e}") from e
    finally:
        pf.close()


# ---------------------------------------------------------------------------------------------------------------
# The loader


class DataLoader:
    """Infinite iterator of (inputs, targets), each (B, T) int64 on `device`; see the module docstring."""

    def __init__(self, tokenizer, batch_size: int, seq_len: int, split: str = "train", *, device="cpu", rank=0,
                 world_size=1, data_dir=None, state: dict | None = None, threads: int = 2,
                 skip_corrupt: bool = False, buffer_docs: int = 1000, reference: bool = False):
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("world_size", world_size, 1),
                                 ("threads", threads, 0), ("buffer_docs", buffer_docs, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.batch_size, self.seq_len, self.split = batch_size, seq_len, split
        self.capacity = seq_len + 1  # a row holds T inputs plus the one extra target
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.threads, self.skip_corrupt, self.buffer_docs = threads, skip_corrupt, buffer_docs
        self.shards = split_shards(split, data_dir)
        self._num_row_groups: dict[int, int] = {}
        self.buffer = ReferenceBestFitBuffer() if reference else BestFitBuffer()
        self.tokens_used = 0     # tokens placed in rows
        self.tokens_dropped = 0  # tokens cropped away by packing
        self.batches = 0
        self.epoch = 0
        self._walk = (0, 0, 0, 0)           # next row group to visit: (epoch, shard, row group, counter)
        self._consumed_walk = self._walk     # the walk position after the last chunk the buffer took in
        self._pending: list[Future | tuple] = []  # futures (threads) or positions to load inline (threads=0)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nanochat-data") if threads else None
        self._prefetch = max(2, 2 * threads)
        if state is not None:
            self._restore(state)

    # --- the walk over row groups ---

    def _row_groups_in(self, shard: int) -> int:
        if shard not in self._num_row_groups:
            try:
                pf = _open_parquet(self.shards[shard])
                self._num_row_groups[shard] = pf.num_row_groups
                pf.close()
            except CorruptShardError as e:
                if not self.skip_corrupt:
                    raise
                get_logger().warning(f"skipping {e}")
                self._num_row_groups[shard] = 0
        return self._num_row_groups[shard]

    def _next_position(self) -> tuple[tuple[int, int, int], tuple[int, int, int, int]]:
        """The next row group of this rank and the walk position after it."""
        epoch, shard, rg, counter = self._walk
        empty_shards = 0
        while True:
            if shard >= len(self.shards):
                epoch, shard, rg = epoch + 1, 0, 0
            n = self._row_groups_in(shard)
            if rg >= n:
                empty_shards = empty_shards + 1 if n == 0 else 0
                if empty_shards > len(self.shards):
                    raise RuntimeError(f"no readable row groups in the {self.split} shards "
                                       f"{[str(s) for s in self.shards]}")
                shard, rg = shard + 1, 0
                continue
            empty_shards = 0
            position, counter = (epoch, shard, rg), counter + 1
            rg += 1
            self._walk = (epoch, shard, rg, counter)
            if (counter - 1) % self.world_size == self.rank:
                return position, self._walk

    # --- loading (background threads or inline) ---

    def _load(self, position: tuple[int, int, int], next_walk) -> Chunk:
        epoch, shard, rg = position
        try:
            texts = read_row_group_texts(self.shards[shard], rg)
        except CorruptShardError as e:
            if not self.skip_corrupt:
                raise
            get_logger().warning(f"skipping {e}")
            return Chunk(position, next_walk, [])
        rows = [i for i, t in enumerate(texts) if t is not None]
        ids = self.tokenizer.encode([texts[i] for i in rows], prepend=self.bos, num_threads=1) if rows else []
        cap = self.capacity
        docs = [(row, np.array(x[:cap] if len(x) > cap else x, dtype=np.int32), len(x)) for row, x in zip(rows, ids)]
        return Chunk(position, next_walk, docs)

    def _schedule(self) -> None:
        while len(self._pending) < self._prefetch:
            position, next_walk = self._next_position()
            if self._pool is None:  # inline: load when consumed
                self._pending.append((position, next_walk))
            else:
                self._pending.append(self._pool.submit(self._load, position, next_walk))

    def _next_chunk(self) -> Chunk:
        self._schedule()
        item = self._pending.pop(0)
        if isinstance(item, Future):
            return item.result()  # re-raises a worker's error (which names the file)
        return self._load(*item)

    def _add_chunk(self, chunk: Chunk) -> None:
        epoch, shard, rg = chunk.position
        for row, tokens, length in chunk.docs:
            self.buffer.add(Document((epoch, shard, rg, row), tokens, length))
        self.epoch = epoch
        self._consumed_walk = chunk.next_walk

    def _fill_buffer(self) -> None:
        while len(self.buffer) < self.buffer_docs:
            self._add_chunk(self._next_chunk())

    # --- packing ---

    def _pack_rows(self) -> np.ndarray:
        rows = np.empty((self.batch_size, self.capacity), dtype=np.int64)
        for b in range(self.batch_size):
            pos = 0
            while pos < self.capacity:
                self._fill_buffer()
                doc, used = self.buffer.take(self.capacity - pos)
                rows[b, pos:pos + used] = doc.tokens[:used]
                pos += used
                self.tokens_dropped += doc.length - used
            self.tokens_used += self.capacity
        return rows

    @property
    def dropped_fraction(self) -> float:
        total = self.tokens_used + self.tokens_dropped
        return self.tokens_dropped / total if total else 0.0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._pack_rows()  # (B, T+1) int64
        # the copies in numpy: torch's (multi-threaded) CPU copy of this small tensor took ~15 ms under load
        inputs, targets = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())  # (B, T)
        self.batches += 1
        if self.device.type == "cuda":
            inputs = inputs.pin_memory().to(self.device, non_blocking=True)
            targets = targets.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            inputs, targets = inputs.to(self.device), targets.to(self.device)
        return inputs, targets

    # --- state ---

    def state_dict(self) -> dict:
        """JSON-serialisable; valid between batches. The documents still in the buffer are listed by
        (epoch, shard, row group, row) in buffer order, and re-tokenized on restore."""
        epoch, shard, rg, counter = self._consumed_walk
        return {
            "version": STATE_VERSION, "split": self.split, "rank": self.rank, "world_size": self.world_size,
            "seq_len": self.seq_len, "batch_size": self.batch_size, "buffer_docs": self.buffer_docs,
            "shards": [p.name for p in self.shards],
            "epoch": self.epoch, "batches": self.batches,
            "next": {"epoch": epoch, "shard": shard, "row_group": rg, "counter": counter},
            "buffer": self.buffer.keys_in_order(),
            "tokens_used": self.tokens_used, "tokens_dropped": self.tokens_dropped,
        }

    def _restore(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state must be a dict with version {STATE_VERSION}, got "
                             f"{state.get('version') if isinstance(state, dict) else type(state).__name__!r}")
        expected = {"split": self.split, "rank": self.rank, "world_size": self.world_size, "seq_len": self.seq_len,
                    "buffer_docs": self.buffer_docs, "shards": [p.name for p in self.shards]}
        for name, value in expected.items():
            if state.get(name) != value:
                raise ValueError(f"data loader state was saved with {name}={state.get(name)!r} but this loader has "
                                 f"{name}={value!r}; exact resume needs the same value")
        nxt = state["next"]
        self._walk = self._consumed_walk = (nxt["epoch"], nxt["shard"], nxt["row_group"], nxt["counter"])
        self.epoch, self.batches = state["epoch"], state["batches"]
        self.tokens_used, self.tokens_dropped = state["tokens_used"], state["tokens_dropped"]
        # re-tokenize the row groups that the buffered documents came from, then re-add them in buffer order
        by_chunk: dict[tuple[int, int, int], dict] = {}
        for epoch, shard, rg, _ in state["buffer"]:
            if (epoch, shard, rg) not in by_chunk:
                docs = self._load((epoch, shard, rg), None).docs
                by_chunk[(epoch, shard, rg)] = {row: (tokens, length) for row, tokens, length in docs}
        for epoch, shard, rg, row in state["buffer"]:
            doc = by_chunk[(epoch, shard, rg)].get(row)
            if doc is None:
                raise ValueError(f"data loader state refers to row {row} of row group {rg} of "
                                 f"{self.shards[shard]}, which is not there: the shard has changed")
            self.buffer.add(Document((epoch, shard, rg, row), *doc))

    def close(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        getattr(self, "_pending", []).clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the executor's modules may already be torn down
            pass
