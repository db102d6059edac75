"""The packed, sharded, resumable pretraining loader on real text (paragraphs of the shared tiny corpus, or
generated prose when that folder is absent) with a real BPE tokenizer (vocab 512) trained once per session."""

from __future__ import annotations

import json
import logging
import random
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.data.loader import BestFitBuffer, DataLoader, Document, ReferenceBestFitBuffer

TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny" / "tiny.parquet"
B, T = 4, 256


def corpus_paragraphs() -> list[str]:
    """Documents of varied length (a few tokens to a few hundred): the paragraphs of the tiny corpus."""
    if TINY.exists():
        texts = pq.read_table(TINY).column("text").to_pylist()
    else:  # generated prose, so the tests still run without ../shared/data
        rng = random.Random(0)
        words = "the of and a to in is you that it he was for on are as with his they at be this have from".split()
        texts = ["\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 120))) + "."
                             for _ in range(rng.randint(3, 30))) for _ in range(80)]
    return [p.strip() for t in texts for p in t.split("\n\n") if p.strip()]


@pytest.fixture(scope="session")
def tokenizer():
    tokenizer_module = pytest.importorskip("nanochat.tokenizer", exc_type=ImportError)  # needs the built _rustbpe
    return tokenizer_module.Tokenizer.train_from_iterator(corpus_paragraphs(), vocab_size=512)


def write_shard(path: Path, texts: list[str], row_group_size: int) -> Path:
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """3 train shards (row groups of 40 paragraphs) and a validation shard of one row group."""
    folder = tmp_path_factory.mktemp("shards")
    docs = list(dict.fromkeys(corpus_paragraphs()))[:720]
    for i in range(3):
        write_shard(folder / f"shard_{i:05d}.parquet", docs[i * 220:(i + 1) * 220], row_group_size=40)
    write_shard(folder / "shard_00003.parquet", docs[660:], row_group_size=1024)
    return folder


def loader(tokenizer, data, **kwargs) -> DataLoader:
    kwargs = {"batch_size": B, "seq_len": T, "data_dir": data, "buffer_docs": 24, "threads": 0} | kwargs
    return DataLoader(tokenizer, **kwargs)


def take(dl: DataLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(dl) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ---------------------------------------------------------------------------------------------------------------
# Best-fit packing: fast path against the reference


def test_best_fit_buffer_matches_reference():
    rng = np.random.default_rng(0)
    fast, slow = BestFitBuffer(), ReferenceBestFitBuffer()
    arrivals = 0
    for step in range(3000):
        while len(fast) < 50:
            n = int(rng.choice([rng.integers(1, 10), rng.integers(1, 80), 65]))  # many ties, some exact fits
            doc = Document((0, 0, 0, arrivals), np.arange(n, dtype=np.int32), n + int(rng.integers(0, 3)) * (n == 65))
            fast.add(doc)
            slow.add(doc)
            arrivals += 1
        space = int(rng.integers(1, 66))
        (d1, used1), (d2, used2) = fast.take(space), slow.take(space)
        assert d1 is d2 and used1 == used2 <= space
        if step % 500 == 0:
            assert fast.keys_in_order() == slow.keys_in_order()


def test_best_fit_rule():
    buf = BestFitBuffer()
    for k, n in enumerate([5, 9, 3, 9, 12]):
        buf.add(Document((0, 0, 0, k), np.zeros(n, np.int32), n))
    doc, used = buf.take(10)
    assert (doc.key[3], used) == (1, 9)          # the largest that fits, the earliest of equal length
    doc, used = buf.take(2)
    assert (doc.key[3], used) == (2, 2)          # none fits: crop the shortest to fill the space
    assert buf.keys_in_order() == [[0, 0, 0, 0], [0, 0, 0, 3], [0, 0, 0, 4]]


# ---------------------------------------------------------------------------------------------------------------
# The loader


def test_batches_are_packed_documents(tokenizer, data):
    docs = set()
    for path in sorted(data.glob("shard_*.parquet"))[:-1]:
        docs |= {tuple(ids) for ids in tokenizer.encode(pq.read_table(path).column("text").to_pylist(),
                                                         prepend=tokenizer.bos_token_id)}
    prefixes = {d[:k] for d in docs for k in range(1, min(len(d), T + 1) + 1)}
    dl = loader(tokenizer, data)
    bos = tokenizer.bos_token_id
    whole = 0
    for inputs, targets in take(dl, 40):
        assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row in torch.cat([inputs, targets[:, -1:]], dim=1).tolist():
            assert row[0] == bos  # every row starts at a document boundary
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            segments = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
            for segment in segments[:-1]:
                assert segment in docs  # whole documents ...
            assert segments[-1] in prefixes  # ... and only the last one of a row may be cropped
            whole += len(segments) - 1
    assert whole > 100 and dl.tokens_used == 40 * B * (T + 1)
    assert 0 < dl.dropped_fraction < 0.8


def test_dropped_fraction_counts_cropped_tokens(tokenizer, tmp_path):
    # every document is longer than a row: each row is the next document (arrival order) cropped to T+1 tokens
    long_docs = [" ".join(p for p in corpus_paragraphs()[i:i + 12]) for i in range(0, 600, 12)]
    lengths = [len(ids) for ids in tokenizer.encode(long_docs, prepend=tokenizer.bos_token_id)]
    assert min(lengths) > T + 1
    write_shard(tmp_path / "shard_00000.parquet", long_docs, row_group_size=10)
    write_shard(tmp_path / "shard_00001.parquet", long_docs[:3], row_group_size=10)
    dl = loader(tokenizer, tmp_path, buffer_docs=5)
    rows = [torch.cat([x, y[:, -1:]], dim=1) for x, y in take(dl, 5)]
    first = tokenizer.encode(long_docs[:B * 5], prepend=tokenizer.bos_token_id)
    assert torch.equal(torch.cat(rows), torch.tensor([ids[:T + 1] for ids in first]))
    dropped = sum(n - (T + 1) for n in lengths[:B * 5])
    assert dl.dropped_fraction == pytest.approx(dropped / (dropped + 5 * B * (T + 1)))


def test_threads_do_not_change_batches(tokenizer, data):
    reference = take(loader(tokenizer, data, threads=0), 30)
    for threads in (1, 3):
        dl = loader(tokenizer, data, threads=threads)
        assert_same(take(dl, 30), reference)
        dl.close()
    assert_same(take(loader(tokenizer, data, reference=True), 30), reference)  # the O(n) packer too


@pytest.mark.parametrize("threads", [0, 2])
def test_resume_is_exact_across_epochs(tokenizer, data, threads):
    dl = loader(tokenizer, data, threads=threads)
    take(dl, 23)
    state = json.loads(json.dumps(dl.state_dict()))  # must survive JSON (checkpoint meta)
    expected = take(dl, 150)  # ~1.3 epochs of this small split
    assert dl.state_dict()["epoch"] >= 1 and state["epoch"] == 0
    resumed = loader(tokenizer, data, threads=threads, state=state)
    assert_same(take(resumed, 150), expected)
    assert resumed.dropped_fraction == dl.dropped_fraction
    assert resumed.state_dict() == dl.state_dict()
    dl.close()
    resumed.close()


def test_ranks_split_row_groups_and_resume(tokenizer, data):
    row_groups, first = {}, {}
    for rank in (0, 1):
        dl = loader(tokenizer, data, rank=rank, world_size=2, threads=2)
        first[rank] = take(dl, 10)
        state = dl.state_dict()
        rest = take(dl, 20)
        assert_same(take(loader(tokenizer, data, rank=rank, world_size=2, threads=2, state=state), 20), rest)
        row_groups[rank] = {tuple(k[1:3]) for k in state["buffer"] + dl.state_dict()["buffer"]}
        dl.close()
    assert not torch.equal(first[0][0][0], first[1][0][0])
    # row group k of the walk goes to rank k % 2; shards 0..2 have 6 row groups each (220 rows / 40)
    assert row_groups[0] and all((shard * 6 + rg) % 2 == 0 for shard, rg in row_groups[0])
    assert row_groups[1] and all((shard * 6 + rg) % 2 == 1 for shard, rg in row_groups[1])


def test_single_row_group_split_feeds_every_rank(tokenizer, data):
    ranks = [loader(tokenizer, data, split="val", rank=r, world_size=3) for r in range(3)]
    batches = [next(dl) for dl in ranks]
    # one row group per pass: the walk's k-th visit (pass k) goes to rank k % 3, so rank r starts in epoch r
    assert [dl.state_dict()["epoch"] for dl in ranks] == [0, 1, 2]
    assert [dl.state_dict()["next"]["counter"] for dl in ranks] == [1, 2, 3]
    assert all(x.shape == (B, T) for x, _ in batches)


def test_bad_state_and_arguments(tokenizer, data):
    state = loader(tokenizer, data).state_dict()
    with pytest.raises(ValueError, match="seq_len=256 but this loader has seq_len=32"):
        loader(tokenizer, data, seq_len=32, state=state)
    with pytest.raises(ValueError, match="rank=0 but this loader has rank=1"):
        loader(tokenizer, data, rank=1, world_size=2, state=state | {"world_size": 2})
    with pytest.raises(ValueError, match="rank must be in"):
        loader(tokenizer, data, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        loader(tokenizer, data, batch_size=0)


# ---------------------------------------------------------------------------------------------------------------
# Corrupt shards: a clear error naming the file, or a warning and a skip; never a hang


def corrupt_copy(data: Path, folder: Path, how: str) -> Path:
    folder.mkdir()
    for path in data.glob("shard_*.parquet"):
        (folder / path.name).write_bytes(path.read_bytes())
    victim = folder / "shard_00001.parquet"
    raw = victim.read_bytes()
    if how == "truncated":
        victim.write_bytes(raw[: len(raw) // 2])
    else:  # footer intact, data pages overwritten
        victim.write_bytes(raw[:4] + bytes(random.Random(0).getrandbits(8) for _ in range(len(raw) - 400)) + raw[-396:])
    return victim


def run_with_deadline(fn, seconds: float = 30.0):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the loader hung on a corrupt shard"
    return out


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_shard_raises_naming_the_file(tokenizer, data, tmp_path, how):
    folder = tmp_path / "data"
    victim = corrupt_copy(data, folder, how)
    out = run_with_deadline(lambda: take(loader(tokenizer, folder, threads=2), 40))
    assert "error" in out and str(victim) in str(out["error"])


def test_corrupt_shard_skipped_with_warning(tokenizer, data, tmp_path, caplog):
    folder = tmp_path / "data"
    victim = corrupt_copy(data, folder, "truncated")
    caplog.set_level(logging.WARNING, logger="nanochat")
    dl = loader(tokenizer, folder, threads=2, skip_corrupt=True)
    out = run_with_deadline(lambda: take(dl, 100))
    assert "value" in out and len(out["value"]) == 100
    assert str(victim) in caplog.text
    assert all(key[1] != 1 for key in dl.state_dict()["buffer"])
    resumed = loader(tokenizer, folder, threads=2, skip_corrupt=True, state=dl.state_dict())
    assert_same(take(resumed, 5), take(dl, 5))


@pytest.mark.gpu
def test_cuda_batches_match_cpu(tokenizer, data):
    cpu = take(loader(tokenizer, data), 3)
    gpu = take(loader(tokenizer, data, device="cuda", threads=2), 3)
    for (x, y), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda and torch.equal(x, xg.cpu()) and torch.equal(y, yg.cpu())
