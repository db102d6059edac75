"""The row table without a model: a small CPU KV cache whose rows carry a marker value per request, so that after
every admit, promote, retire and drop the test can read back which request's KV sits in which cache row. Checked
against the contract in rows.py: decoding rows compacted at the front, a prefill's KV follows it when it is moved
out of the way, free rows have length 0, and reservations guarantee room for every sample."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from nanochat.inference.kv_cache import KVCache
from nanochat.inference.rows import Prefill, RowFailed, RowTable, describe, row_stage

MAX_LEN = 12


@dataclass
class Request:
    prompt: list[int]
    n: int = 1


@dataclass(eq=False)
class Row:
    marker: float  # the value its KV holds
    cache_len: int


def table(batch_size: int) -> RowTable:
    return RowTable(KVCache(batch_size, MAX_LEN, n_layer=1, n_kv_head=1, head_dim=1))


def write(cache: KVCache, row: int, marker: float, length: int) -> None:
    """Fill `row`'s first `length` positions with `marker` (as a prefill would write its KV)."""
    cache.k[:, row, :length] = marker
    cache.v[:, row, :length] = -marker
    cache.cache_lens[row] = length


def holds(cache: KVCache, row: int, marker: float, length: int) -> bool:
    return (int(cache.cache_lens[row]) == length and bool((cache.k[:, row, :length] == marker).all())
            and bool((cache.v[:, row, :length] == -marker).all()))


def prefill(t: RowTable, marker: float, prompt_len: int, n: int = 1, done: int | None = None) -> Prefill:
    """Admit a request and write `done` (default: all) prompt positions of KV into its row."""
    p = t.admit(Request(list(range(prompt_len)), n))
    p.done = prompt_len if done is None else done
    write(t.cache, p.row, marker, p.done)
    return p


def test_admit_takes_the_lowest_free_row_above_the_decoding_rows_and_reserves_every_sample():
    t = table(6)
    a = prefill(t, 1.0, 4, n=2)
    b = prefill(t, 2.0, 3)
    assert (a.row, b.row) == (0, 1) and t.reserved == 3
    t.promote(a, [Row(1.0, 4), Row(1.0, 4)])  # decoding rows 0 and 1: b moved out of row 1
    assert t.reserved == 3 and b.row >= 2 and holds(t.cache, b.row, 2.0, 3)
    c = prefill(t, 3.0, 2, n=3)
    assert c.row == next(r for r in range(2, 6) if r != b.row)
    assert t.reserved == 6 and not t.can_admit(1)
    with pytest.raises(ValueError, match="1 samples do not fit: 6 of 6 rows reserved"):
        t.admit(Request([1]))


def test_promote_in_place_copies_the_prompt_to_the_other_samples():
    t = table(4)
    p = prefill(t, 5.0, 6, n=3)
    rows = [Row(5.0, 6) for _ in range(3)]
    t.promote(p, rows)
    assert t.decoding == rows and not t.prefilling and p.row == 0
    assert all(holds(t.cache, r, 5.0, 6) for r in range(3)) and int(t.cache.cache_lens[3]) == 0


def test_promote_swaps_with_the_prefill_that_holds_its_target_row():
    t = table(4)
    first = prefill(t, 1.0, 5, done=2)  # row 0, prefill not complete
    second = prefill(t, 2.0, 3)  # row 1, complete
    t.promote(second, [Row(2.0, 3)])
    assert second.row == 0 and first.row == 1
    assert holds(t.cache, 0, 2.0, 3) and holds(t.cache, 1, 1.0, 2)
    assert t.prefilling == [first] and t.held_rows() == {0, 1}


def test_promote_moves_a_prefill_out_of_the_way_of_the_copies():
    t = table(5)
    t.decoding.append(Row(9.0, 2))
    write(t.cache, 0, 9.0, 2)
    p = prefill(t, 1.0, 4, n=2)  # row 1
    q = prefill(t, 2.0, 6, done=3)  # row 2: where p's second sample goes
    t.promote(p, [Row(1.0, 4), Row(1.0, 4)])
    assert q.row == 3 and holds(t.cache, 3, 2.0, 3)
    assert holds(t.cache, 0, 9.0, 2) and holds(t.cache, 1, 1.0, 4) and holds(t.cache, 2, 1.0, 4)
    assert int(t.cache.cache_lens[4]) == 0


def test_promote_needs_one_row_per_sample():
    t = table(3)
    p = prefill(t, 1.0, 2, n=2)
    with pytest.raises(ValueError, match="one row per sample: 2, got 1"):
        t.promote(p, [Row(1.0, 2)])


def test_retire_moves_the_last_row_into_the_hole():
    t = table(4)
    rows = [Row(float(i + 1), i + 2) for i in range(3)]
    for i, r in enumerate(rows):
        write(t.cache, i, r.marker, r.cache_len)
    t.decoding.extend(rows)
    t.retire(0)
    assert t.decoding == [rows[2], rows[1]]
    assert holds(t.cache, 0, 3.0, 4) and holds(t.cache, 1, 2.0, 3) and int(t.cache.cache_lens[2]) == 0
    t.retire(1)  # the last row: nothing moves
    assert t.decoding == [rows[2]] and holds(t.cache, 0, 3.0, 4) and int(t.cache.cache_lens[1]) == 0
    with pytest.raises(IndexError, match="decoding row 1 does not exist"):
        t.retire(1)


def test_drop_and_clear_leave_empty_lengths():
    t = table(3)
    p = prefill(t, 1.0, 4, done=2)
    q = prefill(t, 2.0, 2)
    t.drop(p)
    assert t.prefilling == [q] and int(t.cache.cache_lens[p.row]) == 0 and t.reserved == 1
    t.promote(q, [Row(2.0, 2)])
    t.clear()
    assert not t.decoding and not t.prefilling and int(t.cache.cache_lens.abs().sum()) == 0


def test_random_operations_keep_every_request_in_its_own_rows():
    """Random admits (with partial prefills), promotions, retirements and drops: after each, every decoding row i
    and every prefill's row hold their own request's KV and length, rows never overlap, free rows are empty."""
    rng = random.Random(0)
    t = table(7)
    marker_of: dict[int, float] = {}  # id(prefill) -> marker
    next_marker = 1.0
    for _ in range(400):
        op = rng.random()
        if op < 0.35:
            n = rng.choice([1, 1, 2, 3])
            if t.can_admit(n):
                prompt = rng.randint(1, MAX_LEN - 1)
                p = prefill(t, next_marker, prompt, n=n, done=rng.randint(0, prompt))
                marker_of[id(p)] = next_marker
                next_marker += 1.0
        elif op < 0.6 and t.prefilling:
            p = rng.choice(t.prefilling)
            write(t.cache, p.row, marker_of[id(p)], len(p.request.prompt))  # the rest of its prefill
            p.done = len(p.request.prompt)
            t.promote(p, [Row(marker_of[id(p)], p.done) for _ in range(p.request.n)])
        elif op < 0.85 and t.decoding:
            t.retire(rng.randrange(len(t.decoding)))
        elif t.prefilling:
            t.drop(rng.choice(t.prefilling))
        for i, r in enumerate(t.decoding):
            assert holds(t.cache, i, r.marker, r.cache_len)
        for p in t.prefilling:
            assert p.row >= len(t.decoding) and holds(t.cache, p.row, marker_of[id(p)], p.done)
        held = t.held_rows()
        assert len(held) == len(t.decoding) + len(t.prefilling)
        assert all(int(t.cache.cache_lens[r]) == 0 for r in range(7) if r not in held)
        assert t.reserved <= t.capacity


def test_row_stage_names_the_stage_and_the_exception():
    with pytest.raises(RowFailed, match=r"^the tool call failed: RuntimeError: boom$"):
        with row_stage("the tool call"):
            raise RuntimeError("boom")
    with pytest.raises(RowFailed, match=r"^sampling failed$"):  # an inner stage's message is kept as it is
        with row_stage("the outer stage"):
            with row_stage("sampling"):
                raise RowFailed("sampling failed")
    assert describe(KeyError()) == "KeyError" and describe(ValueError("bad")) == "ValueError: bad"
