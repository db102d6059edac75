"""`nanochat data from-files`: a folder of mixed files (nested, gzip'd, JSONL, parquet, empty, binary, invalid
UTF-8, unknown extensions) becomes shards whose texts round-trip; --strict names file and line; the build is
atomic and deterministic; a 50 MB document is cut into pieces that concatenate back; a tiny model trains on it."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.data import shards as dataset
from nanochat.data.from_files import cut_document


def shard_texts(folder: Path) -> list[list[str]]:
    return [pq.read_table(p).column("text").to_pylist() for p in dataset.list_shards(folder)]


def build(*argv) -> int:
    from nanochat import cli

    return cli.main(["data", "from-files", *map(str, argv)])


@pytest.fixture
def mixed(tmp_path) -> tuple[Path, list[str]]:
    """A folder of mixed inputs and the documents it should give."""
    src = tmp_path / "in"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / ".git").mkdir()
    expected = []

    def text_file(rel, text):
        (src / rel).write_text(text, encoding="utf-8")
        expected.append(text)

    text_file("a.txt", "First document.\n\nWith two paragraphs, unicode: café, 日本語.\n")
    text_file("sub/b.md", "# Title\n\nsome *markdown*  with trailing spaces   \r\nand CRLF\r\n")
    text_file("sub/deeper/c.txt", "  leading spaces are kept\n")
    (src / "sub" / "z.txt.gz").write_bytes(gzip.compress("gzipped text\n".encode()))
    expected.append("gzipped text\n")
    rows = [{"text": "jsonl one"}, {"text": "jsonl two\nwith a newline"}, {"meta": 1, "text": "jsonl three"}]
    (src / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    expected += [r["text"] for r in rows]
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"], "id": [1, 2]}), src / "p.parquet")
    expected += ["parquet one", "parquet two"]
    (src / "empty.txt").write_bytes(b"")
    (src / "blank.md").write_text("\n   \n")
    (src / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (src / "bad.txt").write_bytes(b"good line\nbad \xff\xfe line\n")
    expected.append("good line\nbad \ufffd\ufffd line\n")
    (src / "notes.docx").write_bytes(b"PK\x03\x04")
    (src / ".git" / "config.txt").write_text("hidden, skipped")
    return src, expected


def test_mixed_folder_round_trips(mixed, tmp_path, capsys):
    src, expected = mixed
    out = tmp_path / "shards"
    assert build(src, "--out", out, "--doc-cap", "0", "--val-fraction", "0.1") == 0
    shards = shard_texts(out)
    assert len(shards) >= 2 and all(shards)
    assert sorted(t for rows in shards for t in rows) == sorted(expected)
    # the loader's view: the last shard is validation
    assert dataset.split_shards("val", out) == [dataset.list_shards(out)[-1]]
    assert sorted(dataset.iter_texts("train", out)) == sorted(t for rows in shards[:-1] for t in rows)
    report = capsys.readouterr().out
    for needle in ("skipped files (empty): 2", "binary): 1", "image.txt", "unknown extension .docx",
                   "invalid UTF-8 replaced by U+FFFD in 1 place(s):", "bad.txt:2"):
        assert needle in report, (needle, report)
    stats = json.loads((out / "from_files.json").read_text())
    assert stats["documents"] == len(expected) and stats["skipped_files"]["binary"] == [str(src / "image.txt")]
    assert not list(out.parent.glob(".*from-files-build"))  # the staging folder is gone


def test_strict_stops_naming_file_and_line(mixed, tmp_path, capsys):
    src, _ = mixed
    out = tmp_path / "shards"
    assert build(src, "--out", out, "--strict") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.txt:2: invalid UTF-8" in err
    assert not out.exists() or not dataset.list_shards(out)

    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "x.jsonl").write_text('{"text": "ok"}\n{"text": "ok2"}\n{"text": 3}\n')
    assert build(tmp_path / "j", "--out", out, "--strict") == 2
    assert "x.jsonl:3: 'text' is not a string" in capsys.readouterr().err
    assert build(tmp_path / "j", "--out", out) == 0  # without --strict the bad line is skipped and reported
    assert "skipped records ('text' is not a string): 1:" in capsys.readouterr().out


def test_existing_shards_are_kept_until_a_build_succeeds(mixed, tmp_path, capsys):
    src, _ = mixed
    out = tmp_path / "shards"
    assert build(src, "--out", out, "--doc-cap", "0") == 0
    before = shard_texts(out)
    assert build(src, "--out", out) == 2  # refuses to replace without --force
    assert "--force" in capsys.readouterr().err
    assert build(src, "--out", out, "--force", "--strict") == 2  # a failed build leaves the old shards
    assert shard_texts(out) == before
    assert build(tmp_path / "missing", "--out", out, "--force") == 2
    assert "no such file or folder" in capsys.readouterr().err
    # same inputs and seed: the same shards
    assert build(src, "--out", out, "--doc-cap", "0", "--force") == 0
    assert shard_texts(out) == before


def test_dedup_and_separator(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("alpha\n===\nbeta\n===\n\n===\ngamma")
    (src / "b.txt").write_text("alpha\n")
    (src / "c.jsonl").write_text('{"body": "beta\\n"}\n{"body": "delta"}\n')
    out = tmp_path / "o"
    assert build(src, "--out", out, "--separator", r"===\n", "--dedup", "--field", "body") == 0
    texts = sorted(t for rows in shard_texts(out) for t in rows)
    assert texts == ["alpha\n", "beta\n", "delta", "gamma"]
    assert json.loads((out / "from_files.json").read_text())["duplicates"] == 2


def test_cut_document_pieces_concatenate():
    rng = random.Random(0)
    words = ["a", "bb", "ccc", "\n", "\n\n", "dddddddddddddddddddddd", " "]
    for cap in (1, 7, 50, 400):
        text = "".join(rng.choice(words) + rng.choice(" \n") for _ in range(2000))
        pieces = cut_document(text, cap)
        assert "".join(pieces) == text and all(0 < len(p) <= cap for p in pieces)
    assert cut_document("x" * 10, 0) == ["x" * 10]
    para = "p" * 30 + "\n\n" + "q" * 30
    assert cut_document(para, 40) == ["p" * 30 + "\n\n", "q" * 30]  # cut after the blank line


@pytest.mark.slow  # ~3 s on 2 cores: writes, reads and cuts 50 MB twice
def test_fifty_megabyte_document(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    line = "The quick brown fox jumps over the lazy dog, again and again. " * 3 + "\n"
    big = line * (50_000_000 // len(line) + 1)
    (src / "big.txt").write_text(big)
    (src / "small.md").write_text("a small second document\n")
    del big
    out = tmp_path / "o"
    assert build(src, "--out", out) == 0
    rows = [t for shard in shard_texts(out) for t in shard]
    assert max(map(len, rows)) <= 4000
    assert sum(map(len, rows)) == (src / "big.txt").stat().st_size + len("a small second document\n")
    big = (src / "big.txt").read_text()
    assert sorted(rows) == sorted(cut_document(big, 4000) + ["a small second document\n"])
    # kept whole (--doc-cap 0), the 50 MB document is one row of one shard
    assert build(src, "--out", out, "--doc-cap", "0", "--force") == 0
    assert sorted(len(t) for shard in shard_texts(out) for t in shard) == [24, len(big)]


@pytest.mark.slow
def test_tok_train_and_base_train_run_on_the_shards(tmp_path, base_dir):
    """The shards feed tok-train and base-train unchanged (default data folder, no --data-dir)."""
    from nanochat.training import base_train, tok_train

    src = tmp_path / "in"
    src.mkdir()
    package = Path(dataset.__file__).parent
    for path in sorted(package.glob("*.py"))[:12]:  # real, varied text: the package's own sources
        (src / (path.stem + ".txt")).write_text(path.read_text(encoding="utf-8"))
    assert build(src, "--val-fraction", "0.2") == 0
    assert len(dataset.list_shards()) == 2
    assert tok_train.main(["--vocab-size", "300", "--max-chars", "200000", "--no-progress"]) == 0
    argv = ["--depth", "1", "--max-seq-len", "32", "--device-batch-size", "4", "--total-batch-size", "128",
            "--num-iterations", "3", "--eval-every", "3", "--eval-tokens", "256", "--sample-every", "0",
            "--model-tag", "mine", "--device", "cpu", "--loader-threads", "1"]
    assert base_train.main(argv) == 0
    log = [json.loads(x) for x in (base_dir / "checkpoints/base/mine/train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [0, 1, 2]


def test_unreadable_files_are_skipped_or_stop_with_strict(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("one document\n")
    (src / "b.txt").write_text("another document\n")
    (src / "broken.parquet").write_bytes(b"PAR1 not really")
    (src / "broken.txt.gz").write_bytes(b"not gzip at all")
    pq.write_table(pa.table({"body": ["no text column"]}), src / "other.parquet")
    out = tmp_path / "o"
    assert build(src, "--out", out) == 0
    report = capsys.readouterr().out
    assert "skipped files (unreadable): 2: " in report and "broken.parquet" in report and "broken.txt.gz" in report
    assert "skipped files (no 'text' column): 1: " in report
    assert build(src, "--out", out, "--force", "--strict") == 2
    assert "broken.parquet: unreadable (not a readable parquet file" in capsys.readouterr().err


def test_progress_on_a_terminal_and_for_large_inputs():
    import io

    from nanochat.data.from_files import PROGRESS_MIN_BYTES, Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    progress = Progress(1000, tty)
    progress.update(1000, 1, 5)
    progress.close()
    assert "\r[" in tty.getvalue() and "100.0%" in tty.getvalue()
    quiet = io.StringIO()  # a pipe and a small input: nothing
    Progress(1000, quiet).update(1000, 1, 5)
    assert quiet.getvalue() == ""
    pipe = io.StringIO()  # a pipe and a large input: a line per tenth
    step = PROGRESS_MIN_BYTES // 10
    progress = Progress(20 * step, pipe)
    for _ in range(20):
        progress.update(step, 1, 1)
    assert pipe.getvalue().count("\n") == 11 and "\r" not in pipe.getvalue()
