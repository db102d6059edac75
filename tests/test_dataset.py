"""Shard listing/reading, the downloader against a real local HTTP server that fails on purpose, and the offline
corpus builder (reST cleaning units; a real `apt-get download` build marked slow)."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import threading
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.data import cli as data_cli
from nanochat.data import debian_sources, offline_corpus, plaintext
from nanochat.data import shards as dataset
from nanochat.data.shards import DownloadConfig, download, iter_texts, list_shards, split_shards


def write_shard(path: Path, texts: list[str], row_group_size: int = 1024) -> Path:
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# ---------------------------------------------------------------------------------------------------------------
# A real HTTP server with scripted failures


class FlakyServer:
    """Serves files from a folder on 127.0.0.1. `plan[name]` is a list of behaviours used one per request (the last
    one repeats): "ok", "500", "404", "drop" (close without answering), "truncate" (full Content-Length, half the
    body), "truncate-nolen" (no Content-Length, half the body)."""

    def __init__(self, root: Path):
        self.root = root
        self.plan: dict[str, list[str]] = {}
        self.requests: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with server.lock:
                    k = server.requests.get(name, 0)
                    server.requests[name] = k + 1
                    steps = server.plan.get(name, ["ok"])
                    action = steps[min(k, len(steps) - 1)]
                path = server.root / name
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action in ("500", "404") or not path.exists():
                    code = 404 if action == "404" or not path.exists() else 500
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = path.read_bytes()
                self.send_response(200)
                if action != "truncate-nolen":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action.startswith("truncate"):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/datasets/shards"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def remote(tmp_path):
    """A served folder holding 4 train shards and the validation shard (index 1822) of real parquet data."""
    root = tmp_path / "remote"
    root.mkdir()
    for i in list(range(4)) + [dataset.VAL_SHARD_INDEX]:
        texts = [f"document {j} of shard {i}: " + "lorem ipsum dolor sit amet " * (20 + j % 7) for j in range(300)]
        write_shard(root / dataset.shard_name(i), texts, row_group_size=128)
    with FlakyServer(root) as server:
        yield server


def fast_config(url: str, attempts: int = 4) -> DownloadConfig:
    return DownloadConfig(base_url=url, workers=3, attempts=attempts, backoff_s=0.01, timeout_s=10)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------------
# Download


def test_download_retries_through_failures_and_truncations(remote, tmp_path):
    remote.plan = {
        "shard_00000.parquet": ["500", "ok"],
        "shard_00001.parquet": ["drop", "truncate", "ok"],
        "shard_00002.parquet": ["truncate-nolen", "500", "ok"],
        "shard_01822.parquet": ["truncate", "ok"],
    }
    out = tmp_path / "data"
    result = download(3, out, fast_config(remote.url))
    assert sorted(result["downloaded"]) == [0, 1, 2, dataset.VAL_SHARD_INDEX]
    assert [p.name for p in list_shards(out)] == ["shard_00000.parquet", "shard_00001.parquet",
                                                   "shard_00002.parquet", "shard_01822.parquet"]
    for path in list_shards(out):
        assert path.read_bytes() == (remote.root / path.name).read_bytes()
    assert remote.requests == {"shard_00000.parquet": 2, "shard_00001.parquet": 3, "shard_00002.parquet": 3,
                               "shard_01822.parquet": 2}
    assert "shard_00003.parquet" not in remote.requests  # only the first N train shards
    assert no_temp_files(out)


def test_truncated_file_never_lands_under_final_name(remote, tmp_path):
    remote.plan = {"shard_00000.parquet": ["truncate"], "shard_01822.parquet": ["truncate-nolen"]}
    out = tmp_path / "data"
    with pytest.raises(RuntimeError) as info:
        download(1, out, fast_config(remote.url, attempts=3))
    message = str(info.value)
    assert "shard_00000.parquet" in message and "shard_01822.parquet" in message and "after 3 tries" in message
    assert remote.requests["shard_00000.parquet"] == 3
    assert list_shards(out) == []
    assert no_temp_files(out)


def test_existing_shards_are_skipped_and_invalid_ones_replaced(remote, tmp_path):
    out = tmp_path / "data"
    download(2, out, fast_config(remote.url))
    remote.requests.clear()
    (out / "shard_00001.parquet").write_bytes(b"PAR1 not really parquet")  # e.g. copied by hand, broken
    result = download(3, out, fast_config(remote.url))
    assert sorted(result["skipped"]) == [0, dataset.VAL_SHARD_INDEX]
    assert sorted(result["downloaded"]) == [1, 2]
    assert remote.requests == {"shard_00001.parquet": 1, "shard_00002.parquet": 1}
    assert (out / "shard_00001.parquet").read_bytes() == (remote.root / "shard_00001.parquet").read_bytes()


def test_permanent_failure_is_clear_and_not_retried(remote, tmp_path):
    remote.plan = {"shard_00002.parquet": ["404"]}
    out = tmp_path / "data"
    with pytest.raises(RuntimeError, match=r"shard_00002\.parquet.*HTTP 404.*not retried"):
        download(3, out, fast_config(remote.url))
    assert remote.requests["shard_00002.parquet"] == 1
    assert not (out / "shard_00002.parquet").exists()
    assert (out / "shard_00000.parquet").exists()  # the others still completed


def test_persistent_server_error_gives_up(remote, tmp_path):
    remote.plan = {"shard_00000.parquet": ["500"]}
    with pytest.raises(RuntimeError, match=r"shard_00000\.parquet after 2 tries: HTTP 500"):
        download(1, tmp_path / "data", fast_config(remote.url, attempts=2))
    assert remote.requests["shard_00000.parquet"] == 2


def test_download_rejects_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="0..1822"):
        download(5000, tmp_path)
    with pytest.raises(ValueError, match="0..1822"):
        download(-2, tmp_path)


def test_cli_download_uses_env_url(remote, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_DATA_URL", remote.url)
    out = tmp_path / "data"
    assert data_cli.main(["download", "-n", "1", "--data-dir", str(out), "--backoff", "0.01"]) == 0
    assert [p.name for p in list_shards(out)] == ["shard_00000.parquet", "shard_01822.parquet"]
    assert "2 downloaded" in capsys.readouterr().out
    remote.plan = {"shard_00001.parquet": ["404"]}
    assert data_cli.main(["download", "-n", "2", "--data-dir", str(out), "--base-url", remote.url]) == 1
    assert "shard_00001.parquet" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Listing and reading


def test_list_split_and_iter_texts(base_dir, tmp_path):
    folder = dataset.data_dir()
    assert folder == base_dir / "base_data"
    with pytest.raises(FileNotFoundError, match="nanochat data offline"):
        split_shards("train")
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "shard_00000.parquet", ["alpha " * 10, "beta " * 10, "gamma"], row_group_size=2)
    write_shard(folder / "shard_00001.parquet", ["delta " * 10, "epsilon"])
    write_shard(folder / "shard_00002.parquet", ["validation text"])
    (folder / ".shard_00003.parquet.123.tmp").write_bytes(b"partial")
    assert [p.name for p in list_shards()] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert [p.name for p in split_shards("val")] == ["shard_00002.parquet"]
    assert len(split_shards("train", folder)) == 2
    with pytest.raises(ValueError, match="'test'"):
        split_shards("test")
    assert list(iter_texts("train")) == ["alpha " * 10, "beta " * 10, "gamma", "delta " * 10, "epsilon"]
    assert list(iter_texts("val", folder)) == ["validation text"]
    assert list(iter_texts("train", doc_cap=7)) == ["alpha a", "beta be", "gamma", "delta d", "epsilon"]
    assert list(iter_texts("train", max_chars=65)) == ["alpha " * 10, "beta " * 10]  # stops once 65 are reached
    with pytest.raises(ValueError, match="doc_cap"):
        next(iter_texts("train", doc_cap=0))


# ---------------------------------------------------------------------------------------------------------------
# Offline corpus: reST cleaning


def test_rst_to_text_rules():
    source = """\
.. _tut-intro:

*******************
An Informal Intro
*******************

.. index:: single: comment

Call :func:`len` or :meth:`~collections.OrderedDict.popitem`, see :ref:`the guide <guide-label>`,
:pep:`8` and ``x = 1``; read `the docs <https://docs.python.org>`_.

.. note::

   Remember this.

.. versionadded:: 3.8

.. function:: spam(eggs, *, ham=None)

   Return spam.

For example::

   >>> spam(1)
   2

.. code-block:: python

   print("hi")

.. toctree::
   :maxdepth: 2

   tutorial
   library

=====  =====
a      b
=====  =====
"""
    text = plaintext.rst_to_text(source)
    assert text == """\
An Informal Intro

Call `len()` or `popitem()`, see the guide,
PEP 8 and `x = 1`; read the docs.

Note:

Remember this.

New in version 3.8.

spam(eggs, *, ham=None)

Return spam.

For example:

    >>> spam(1)
    2

    print("hi")

a      b
"""


def test_normalize_and_split_long():
    assert plaintext.normalize("a\tb \r\n\r\n\r\n\x07c  \n") == "a    b\n\nc\n"
    assert plaintext.normalize(" \n\t") == ""
    paragraphs = [f"paragraph {i} " + "word " * 40 for i in range(40)]
    text = plaintext.normalize("\n\n".join(paragraphs))
    pieces = plaintext.split_long(text, max_chars=2000)
    assert all(len(p) <= 2000 for p in pieces) and len(pieces) >= len(text) // 2000
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")  # nothing lost, cut at paragraph ends
    assert all(p.startswith("paragraph ") for p in pieces)


def test_austen_chapters_and_paragraphs():
    lines = ["PRIDE AND PREJUDICE", "", "By Jane Austen", "", "Chapter 1", "", "It is a truth universally",
             "acknowledged, that a _single_ man", "", "Second  paragraph.", "", "VOLUME II", "Chapter 2", "",
             "Next."]
    chapters = debian_sources._austen_chapters(lines)
    assert len(chapters) == 2 and chapters[0][0] == "PRIDE AND PREJUDICE" and chapters[1][:3] == ["VOLUME II", "", "Chapter 2"]
    assert "VOLUME II" not in chapters[0]
    assert debian_sources.austen_paragraphs(chapters[0][4:]) == (
        "Chapter 1\n\nIt is a truth universally acknowledged, that a single man\n\nSecond paragraph.\n")


def fake_python_doc(src: Path, n_docs: int) -> None:
    root = src / "python3.11-doc/usr/share/doc/python3.11/html/_sources/library"
    root.mkdir(parents=True)
    for i in range(n_docs):
        body = "\n\n".join(f"Paragraph {k} of page {i} explains :func:`f{k}` in detail. " * 3 for k in range(12))
        (root / f"page{i:03d}.rst.txt").write_text(f"Page {i}\n=======\n\n{body}\n", encoding="utf-8")
    (root / "index.rst.txt").write_text("Index\n=====\n\n.. toctree::\n\n   page000\n", encoding="utf-8")


def test_build_corpus_shape_and_determinism(tmp_path):
    src = tmp_path / "src"
    fake_python_doc(src, 60)
    config = offline_corpus.CorpusConfig(seed=7, train_shard_chars=40_000)
    logs = []
    stats = offline_corpus.build_corpus(src, tmp_path / "a", ["python3.11-doc"], config, log=logs.append)
    offline_corpus.build_corpus(src, tmp_path / "b", ["python3.11-doc"], config, log=logs.append)
    shards = list_shards(tmp_path / "a")
    assert len(shards) >= 3 and stats["sources"]["python3.11-doc"]["dropped_small"] == 1  # the toctree page
    for a in shards:
        assert a.read_bytes() == (tmp_path / "b" / a.name).read_bytes()
        pf = pq.ParquetFile(a)
        assert pf.schema_arrow == pa.schema([pa.field("text", pa.string(), nullable=False)])
    rows = [pq.read_table(p).column("text").to_pylist() for p in shards]
    assert sum(map(len, rows)) == 60 and len(rows[-1]) >= 1
    assert all(t.endswith("\n") and ":func:" not in t and "`f0()`" in t for r in rows for t in r)
    assert stats["shards"][shards[-1].name]["split"] == "val"
    assert "NOT FineWeb" in stats["notice"]
    with pytest.raises(ValueError, match="unknown offline corpus package 'nope'"):
        offline_corpus.build_corpus(src, tmp_path / "c", ["nope"], config)


def test_fortunes_documents(tmp_path):
    folder = tmp_path / "fortunes/usr/share/games/fortunes"
    folder.mkdir(parents=True)
    (folder / "wisdom").write_text("Be _\bb_\bo_\bl_\bd.\n%\nSecond\tfortune.\n%\n" + "x" * 50 + "\n%\n")
    (folder / "wisdom.dat").write_bytes(b"\x00\x01index")
    docs = list(debian_sources.docs_fortunes(tmp_path / "fortunes", chunk_chars=40))
    assert docs == [("fortunes/fortunes/wisdom/001", "Be bold.\n%\nSecond    fortune.\n"),
                    ("fortunes/fortunes/wisdom/002", "x" * 50 + "\n")]


def test_offline_needs_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(debian_sources.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="apt-get"):
        debian_sources.fetch_packages(["python3.11-doc"], tmp_path)


def test_cli_offline_refuses_to_mix_and_prints_notice(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    write_shard(out / "shard_00000.parquet", ["fineweb text"])
    assert data_cli.main(["offline", "--data-dir", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    src = tmp_path / "src"
    fake_python_doc(src, 12)
    assert data_cli.main(["offline", "--data-dir", str(out), "--src", str(src), "--force",
                         "--packages", "python3.11-doc"]) == 0
    printed = capsys.readouterr().out
    assert "PIPELINE DEMO" in printed and "NOT FineWeb" in printed
    assert len(split_shards("train", out)) >= 1 and "fineweb text" not in "".join(iter_texts("train", out))
    before = {p.name: p.stat().st_mtime_ns for p in list_shards(out)}
    args = ["offline", "--data-dir", str(out), "--src", str(src), "--packages", "python3.11-doc"]
    assert data_cli.main(args) == 0 and "already holds" in capsys.readouterr().out  # idempotent
    assert {p.name: p.stat().st_mtime_ns for p in list_shards(out)} == before
    assert data_cli.main(args + ["--seed", "5"]) == 1  # a different build is not silently mixed in


def test_cli_evals_delegates(monkeypatch):
    calls = []
    module = types.ModuleType("nanochat.tasks.offline_data")
    module.main = lambda argv=None: calls.append(argv) or 0
    monkeypatch.setattr(data_cli, "offline_data", module)
    assert data_cli.main(["evals", "--only", "gsm8k", "--help-me"]) == 0
    assert calls == [["--only", "gsm8k", "--help-me"]]


# ---------------------------------------------------------------------------------------------------------------
# Offline corpus: the real thing (apt-get download from Debian; ~15 MB, cached across runs)


def _apt_works() -> bool:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return False
    try:
        return subprocess.run(["apt-cache", "policy", "python3.11-doc"], capture_output=True, text=True,
                              timeout=60).stdout.count("Candidate:") == 1
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.slow
def test_offline_corpus_from_real_debian_packages(tmp_path):
    if not _apt_works():
        pytest.skip("apt-get/dpkg-deb unavailable or python3.11-doc unknown to apt")
    cache = Path(os.environ.get("NANOCHAT_TEST_DEB_CACHE", "/tmp/nanochat-test-debs"))
    try:
        src = debian_sources.fetch_packages(list(offline_corpus.DEFAULT_PACKAGES), cache, log=lambda *a: None)
    except RuntimeError as e:
        pytest.skip(f"apt-get download failed here: {e}")
    out = tmp_path / "corpus"
    stats = offline_corpus.build_corpus(src, out, list(offline_corpus.DEFAULT_PACKAGES), log=lambda *a: None)
    assert stats["sources"]["r-cran-janeaustenr"]["documents"] == 269  # the six novels' chapters
    assert stats["sources"]["python3.11-doc"]["documents"] > 400
    shards = list_shards(out)
    assert len(shards) == 4
    assert all(pq.ParquetFile(p).metadata.row_group(0).num_rows <= 1024 for p in shards)
    texts = list(iter_texts("train", out)) + list(iter_texts("val", out))
    joined = "".join(texts)
    assert "It is a truth universally acknowledged" in joined
    assert "Beautiful is better than ugly" in joined or "for loop" in joined
    assert joined.count(".. index::") == 0 and joined.count(":func:`") <= 3  # residues only inside code blocks
    assert 10_000_000 < len(joined) < 20_000_000
