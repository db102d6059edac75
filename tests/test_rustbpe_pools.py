"""The binding's thread pools stay bounded: `encode_batch(num_threads=k)` for many distinct k must not leave a
pool (and its threads) behind per k. Counted with the process's thread count from /proc/self/status."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

tokenizer_mod = pytest.importorskip("nanochat.tokenizer", reason="the native tokenizer is not built",
                                    exc_type=ImportError)

STATUS = Path("/proc/self/status")
MAX_POOLS = 4  # rust/rustbpe/src/python.rs


def live_threads() -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line in /proc/self/status")


@pytest.mark.skipif(not STATUS.exists(), reason="needs Linux /proc")
def test_distinct_num_threads_do_not_pile_up_pools():
    tok = tokenizer_mod.Tokenizer.train_from_iterator(["hello world " * 50, "the quick brown fox"] * 20,
                                                      vocab_size=300)
    texts = ["hello world the quick brown fox"] * 64
    expected = tok.encode(texts)
    tok.encode(texts, num_threads=1)  # any lazily started helper threads exist from here on
    before = live_threads()
    for k in range(1, 49):  # 1 + 2 + ... + 48 = 1176 threads if every pool stayed
        assert tok.encode(texts, num_threads=k) == expected
    bound = MAX_POOLS * (os.cpu_count() or 1) + 4
    deadline = time.monotonic() + 5  # an evicted pool's threads exit asynchronously
    while live_threads() - before > bound and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_threads() - before <= bound, (before, live_threads(), bound)
