"""Which request holds which row of a scheduler's batch and KV cache, the row moves that keep that true, and how a
failure is pinned on one row.

The row table's contract (the scheduler and its decode step rely on it):
- Decoding rows are compacted at the front: `decoding[i]` lives in cache row i. The decode step is then a view
  over rows 0..n-1 with no index tensor and no device read, which is what lets it compile and replay as a CUDA
  graph.
- A prompt being prefilled holds one cache row at or above len(decoding). When its prefill completes it is
  promoted: its KV moves down to row d = len(decoding) and its other samples get copies in rows d+1..; a prefill
  that sits in the way moves to a free row, KV and all. Admission reserves a row for every sample (`reserved`),
  so that free row always exists.
- A retired decoding row is filled by the last decoding row (its KV copied), so the rows stay compacted.
- A row nobody holds has length 0 in the cache, and its length is reset before its holder is dropped: another
  thread that sees no rows sees empty lengths.
The table moves KV between cache rows and nothing else; what a row feeds, samples and emits is the scheduler's.
A decoding row is any object with `cache_len` (the valid positions of its cache row, kept on the host).

Row failures: whatever belongs to one row (its sampling parameters, sampling, text, stop strings, tool call) runs
under `row_stage("what")`, which turns an exception into a `RowFailed` naming the stage and the exception, so the
scheduler can end that row alone with an error event that says what failed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from nanochat.inference.kv_cache import KVCache

# ---------------------------------------------------------------------------------------------------------------
# The row table


@dataclass(eq=False)
class Prefill:
    """An admitted request whose prompt is being written into cache row `row`, a chunk per step. `request` has
    `prompt` (token ids) and `n` (samples, each of which gets a decoding row when the prefill completes)."""
    request: Any
    row: int
    done: int = 0  # prompt tokens already in the row (reused from the prefix store, then prefilled)

    @property
    def remaining(self) -> int:
        return len(self.request.prompt) - self.done


class RowTable:
    """The decoding rows (compacted at the front of `cache`) and the prefilling requests above them."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.capacity = cache.batch_size
        self.decoding: list = []  # decoding[i] lives in cache row i
        self.prefilling: list[Prefill] = []  # FIFO: prefill chunks go to the oldest first

    @property
    def reserved(self) -> int:
        """Rows promised: one per decoding row, one per sample of every prefilling request."""
        return len(self.decoding) + sum(p.request.n for p in self.prefilling)

    def held_rows(self) -> set[int]:
        """Cache rows that hold a request now (decoding or prefilling)."""
        return set(range(len(self.decoding))) | {p.row for p in self.prefilling}

    def can_admit(self, samples: int) -> bool:
        return self.reserved + samples <= self.capacity

    def admit(self, request) -> Prefill:
        """Reserve rows for `request`'s samples and give its prompt the lowest free cache row above the decoding
        rows (length 0: the caller may load a cached prefix into it)."""
        if not self.can_admit(request.n):
            raise ValueError(f"{request.n} samples do not fit: {self.reserved} of {self.capacity} rows reserved")
        held = {p.row for p in self.prefilling}
        p = Prefill(request, next(r for r in range(len(self.decoding), self.capacity) if r not in held))
        self.prefilling.append(p)
        return p

    def drop(self, p: Prefill) -> None:
        """Free a prefilling request's row and reservation (cancelled, failed, or its rows could not start)."""
        self.cache.reset([p.row])
        self.prefilling.remove(p)

    def promote(self, p: Prefill, rows: list) -> None:
        """`p`'s prompt is in (its row holds `p.done` positions): `rows`, one per sample, become the decoding
        rows d..d+len(rows)-1 (d = len(decoding)), each starting from a copy of the prompt's KV."""
        if len(rows) != p.request.n:
            raise ValueError(f"promote needs one row per sample: {p.request.n}, got {len(rows)}")
        self.prefilling.remove(p)
        length, d, n = p.done, len(self.decoding), len(rows)
        holder = {q.row: q for q in self.prefilling}
        if p.row != d:
            q = holder.pop(d, None)
            if q is None:
                self.cache.copy_row(self.cache, p.row, d, length)
                self.cache.reset([p.row])
            else:  # the prefill in row d takes p's old row
                self.cache.swap_rows(p.row, d, max(length, q.done))
                q.row = p.row
                holder[q.row] = q
            p.row = d
        for s in range(1, n):
            q = holder.pop(d + s, None)
            if q is not None:  # reserved rows guarantee a free one past the new decoding rows
                free = next(r for r in range(d + n, self.capacity) if r not in holder)
                self.cache.copy_row(self.cache, q.row, free, q.done)
                q.row = free
                holder[free] = q
            self.cache.copy_row(self.cache, d, d + s, length)
        self.decoding.extend(rows)

    def retire(self, i: int) -> None:
        """Free decoding row i: the last decoding row moves into its place (KV copied), the last cache row is
        reset."""
        last = len(self.decoding) - 1
        if not 0 <= i <= last:
            raise IndexError(f"decoding row {i} does not exist ({last + 1} rows)")
        if i != last:
            self.cache.copy_row(self.cache, last, i, self.decoding[last].cache_len)
            self.decoding[i] = self.decoding[last]
        self.cache.reset([last])
        self.decoding.pop()

    def clear(self) -> None:
        """Forget every request and every row's length (after a failed batch step)."""
        self.decoding.clear()
        self.prefilling.clear()
        self.cache.reset()


# ---------------------------------------------------------------------------------------------------------------
# Row failures


class RowFailed(Exception):
    """One row's own part of a step failed: that row ends with an error event (this message), the batch goes on."""


def describe(e: BaseException) -> str:
    """An exception in words: its type, and its message when it has one ("RuntimeError: out of memory")."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


@contextlib.contextmanager
def row_stage(what: str):
    """Attribute a failure inside to one row's `what` (e.g. "the tool call"): it becomes a RowFailed naming both
    ("the tool call failed: RuntimeError: ...")."""
    try:
        yield
    except RowFailed:
        raise
    except Exception as e:
        raise RowFailed(f"{what} failed: {describe(e)}") from e
