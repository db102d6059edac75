"""`nanochat tok-train` and `nanochat tok-eval` end to end on the tiny fixture corpus, split into train + val shards."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat import cli
from nanochat.tokenizer import default_tokenizer_path, get_tokenizer
from nanochat.tokenizer.reference import ReferenceBPE

TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny" / "tiny.parquet"
SAMPLES = Path(__file__).resolve().parents[1] / "python" / "nanochat" / "evals" / "tok_samples"


@pytest.fixture
def shards(tmp_path) -> Path:
    """tiny.parquet as two shards: the first 68 rows train, the last 8 validation."""
    pq = pytest.importorskip("pyarrow.parquet")
    if not TINY.is_file():
        pytest.skip(f"tiny corpus not found at {TINY}")
    table = pq.read_table(TINY)
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(table.slice(0, 68), folder / "shard_00000.parquet")
    pq.write_table(table.slice(68), folder / "shard_00001.parquet")
    return folder


def test_tok_train_end_to_end(shards, base_dir, capsys):
    from nanochat.data.shards import iter_texts

    argv = ["tok-train", "--vocab-size", "512", "--max-chars", "6e4", "--doc-cap", "5000",
            "--data-dir", str(shards), "--no-progress", "--hf-json"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    tok = get_tokenizer()
    assert default_tokenizer_path().is_file() and str(base_dir) in str(default_tokenizer_path())
    assert tok.vocab_size == 512

    # the CLI fed the trainer exactly the capped train documents
    docs = list(iter_texts("train", data_dir=shards, max_chars=60_000, doc_cap=5000))
    assert tok.mergeable_ranks() == ReferenceBPE.train(docs, 512 - 9).mergeable_ranks()

    summary = json.loads((default_tokenizer_path().parent / "tok_train.json").read_text())
    assert summary["vocab_size"] == 512
    assert summary["train_chars"] == sum(len(d) for d in docs)
    assert summary["seconds"] > 0
    val = list(iter_texts("val", data_dir=shards))
    n_bytes = sum(len(t.encode()) for t in val)
    n_tokens = sum(len(ids) for ids in tok.encode(val))
    assert summary["val_bytes_per_token"] == pytest.approx(n_bytes / n_tokens, rel=1e-3)
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(default_tokenizer_path().parent / "tokenizer.json"))
    assert [e.ids for e in hf.encode_batch(val)] == tok.encode(val)
    assert "vocab size:" in out and "val bytes/token:" in out and f"{summary['train_chars']:,}" in out


def test_tok_train_bad_flags(base_dir, shards, capsys):
    with pytest.raises(SystemExit):
        cli.main(["tok-train", "--max-chars", "lots"])
    assert "expected a number of characters" in capsys.readouterr().err
    with pytest.raises(ValueError, match="vocab_size must be an int >= 265"):
        cli.main(["tok-train", "--vocab-size", "100", "--data-dir", str(shards), "--no-progress"])
    capsys.readouterr()
    # a user mistake: one line on stderr and exit status 2 (cli.main turns the MissingInputError into that)
    assert cli.main(["tok-train", "--data-dir", str(base_dir), "--no-progress"]) == 2
    assert "need at least 2 parquet shards" in capsys.readouterr().err


def test_tok_eval_end_to_end(shards, base_dir, tmp_path, monkeypatch, capsys):
    assert cli.main(["tok-train", "--vocab-size", "400", "--max-chars", "3e4", "--data-dir", str(shards),
                     "--no-progress"]) == 0
    tok = get_tokenizer()
    capsys.readouterr()

    # offline with an empty tiktoken cache: the GPT-2 and GPT-4 columns are skipped with a message
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    assert cli.main(["tok-eval", "--data-dir", str(shards), "--val-chars", "5000"]) == 0
    out = capsys.readouterr().out
    assert "skipping gpt2: rank file not in the tiktoken cache" in out
    assert "skipping gpt4: rank file not in the tiktoken cache" in out
    results = json.loads((default_tokenizer_path().parent / "tok_eval.json").read_text())["results"]
    for kind in ("prose", "code", "non_english", "math"):
        text = (SAMPLES / f"{kind}.txt").read_text(encoding="utf-8")
        assert results[kind] == {"bytes": len(text.encode()), "ours": len(tok.encode(text))}
        assert f"{len(tok.encode(text)):,}" in out
    assert "val-shard" in results

    # a local rank file stands in for an anchor; with our own ranks its column must equal ours
    ranks_file = tmp_path / "ours.tiktoken"
    ranks_file.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tok.mergeable_ranks())))
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "shouting.txt").write_text("WHY IS EVERYTHING IN CAPITALS?! 1234567 " * 20)
    out_json = tmp_path / "eval.json"
    assert cli.main(["tok-eval", "--gpt4-ranks", str(ranks_file), "--texts-dir", str(extra), "--val-chars", "0",
                     "--output-json", str(out_json)]) == 0
    out = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["encoders"] == ["ours", "gpt4"]
    assert "shouting" in data["results"] and "val-shard" not in data["results"]
    for kind in ("prose", "non_english"):  # no multi-digit numbers, where GPT-4's pattern (3 digits) differs
        assert data["results"][kind]["gpt4"] == data["results"][kind]["ours"], kind
    assert "vs gpt4" in out


def test_tok_eval_without_tokenizer(base_dir, capsys):
    assert cli.main(["tok-eval"]) == 2  # a user mistake: one line, no traceback
    assert "nanochat tok-train" in capsys.readouterr().err


def test_help(capsys):
    for command, flag in (("tok-train", "--vocab-size"), ("tok-eval", "--gpt4-ranks")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert flag in capsys.readouterr().out


@pytest.mark.slow
def test_runnable_as_module():
    proc = subprocess.run([sys.executable, "-m", "nanochat.evals.tok_eval", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--gpt2-ranks" in proc.stdout
