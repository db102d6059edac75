"""The `nanochat` command on expected user mistakes: one line on stderr, exit status 2, never a traceback.

Every subcommand runs as a real subprocess against an empty NANOCHAT_BASE_DIR (no tokenizer, data or checkpoint),
then against corrupt files (checkpoint, tokenizer, shards), missing eval data and flag values out of range. A bug
(any other exception) must still show its traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest
import torch


def nanochat_command() -> list[str]:
    """The installed console script; `python -m nanochat.cli` where it is not on PATH."""
    exe = shutil.which("nanochat")
    return [exe] if exe else [sys.executable, "-m", "nanochat.cli"]


def run(args: list[str], base: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_EVAL_DATA=str(base / "eval_data"),
               HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run(nanochat_command() + args, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_user_error(proc: subprocess.CompletedProcess, command: str, *needles: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"nanochat {command}: error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


# subcommand args -> words the one line must contain (what is missing, and the fix)
EMPTY_BASE_DIR = {
    "tok-train": ("parquet shards", "nanochat data"),
    "tok-eval": ("no tokenizer", "nanochat tok-train"),
    "base-train --device cpu": ("no tokenizer", "nanochat tok-train"),
    "base-eval --device cpu": ("no checkpoints", "base"),
    "mid-train --device cpu": ("no checkpoints", "base"),
    "chat-sft --device cpu": ("no checkpoints", "mid"),
    "chat-rl --device cpu": ("no checkpoints", "sft"),
    "chat-eval --device cpu": ("no chat checkpoint", "chat-sft"),
    "chat --device cpu --prompt hi": ("no chat checkpoint", "chat-sft"),
    "serve --device cpu --port 0": ("no chat checkpoint", "chat-sft"),
    "import ./absent --out out": ("neither a folder nor a hub id", "karpathy/nanochat-d32"),
}


@pytest.mark.slow
def test_every_subcommand_on_an_empty_base_dir(tmp_path):
    """Each stage, started where nothing has been made yet, says what is missing in one line (run 4 at a time)."""
    with ThreadPoolExecutor(4) as pool:
        procs = dict(zip(EMPTY_BASE_DIR, pool.map(lambda a: run(a.split(), tmp_path / a.split()[0]),
                                                  EMPTY_BASE_DIR)))
    for args, needles in EMPTY_BASE_DIR.items():
        assert_user_error(procs[args], args.split()[0], *needles)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    """A base dir holding a tokenizer and a tiny sft + base checkpoint (no eval data)."""
    from nanochat.model.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.model.tiny import tiny_model
    from nanochat.tokenizer import Tokenizer

    base = tmp_path_factory.mktemp("tiny_chat")
    tok = Tokenizer.train_from_iterator(["hello world, the quick brown fox " * 20] * 20, vocab_size=300)
    tok.save(base / "tokenizer" / "tokenizer.bin")
    model = tiny_model(tok.vocab_size, n_layer=1, n_embd=32, sequence_len=64)
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    try:
        for stage in ("base", "sft"):
            save_checkpoint(checkpoint_dir(stage, "d1"), 1, model.state_dict(), None,
                            {"config": asdict(model.config), "step": 1})
    finally:
        if old is None:
            del os.environ["NANOCHAT_BASE_DIR"]
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old
    return base


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_corrupt_files_missing_eval_data_and_bad_flags(tiny_chat, tmp_path):
    cases = []  # (args, base dir, command, needles)
    # a checkpoint truncated in the middle of its weights
    truncated = _copy(tiny_chat, tmp_path / "truncated")
    weights = truncated / "checkpoints" / "sft" / "d1" / "step_000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    cases.append(("chat --device cpu --prompt hi", truncated, "chat", ("checkpoint", "unreadable")))
    # a meta.json that is not JSON
    bad_meta = _copy(tiny_chat, tmp_path / "bad_meta")
    (bad_meta / "checkpoints" / "sft" / "d1" / "step_000001" / "meta.json").write_text("{not json")
    cases.append(("chat --device cpu --prompt hi", bad_meta, "chat", ("checkpoint", "unreadable")))
    # weights and config that disagree
    wrong = _copy(tiny_chat, tmp_path / "wrong_config")
    meta = wrong / "checkpoints" / "sft" / "d1" / "step_000001" / "meta.json"
    meta.write_text(meta.read_text().replace('"n_layer": 1', '"n_layer": 3'))
    cases.append(("serve --device cpu --port 0", wrong, "serve", ("does not match its own config",)))
    # a damaged tokenizer
    bad_tok = _copy(tiny_chat, tmp_path / "bad_tok")
    (bad_tok / "tokenizer" / "tokenizer.bin").write_bytes(b"\x00garbage" * 10)
    cases.append(("tok-eval", bad_tok, "tok-eval", ("tokenizer", "unreadable")))
    # pretraining shards that are not parquet
    bad_shards = tmp_path / "bad_shards"
    (bad_shards / "base_data").mkdir(parents=True)
    for i in range(2):
        (bad_shards / "base_data" / f"shard_{i:05d}.parquet").write_bytes(b"PAR1 truncated")
    cases.append(("tok-train", bad_shards, "tok-train", ("corrupt", "shard_00000.parquet")))
    # a chat model but no eval data: the fix is named
    cases.append(("chat-eval --device cpu --tasks GSM8K --max-problems 2", tiny_chat, "chat-eval",
                  ("nanochat data evals",)))
    # --model pointing at a folder that is not an export, and at an export whose weights were damaged in transit
    not_export = tmp_path / "not_export"
    not_export.mkdir()
    cases.append((f"chat --device cpu --prompt hi --model {not_export}", tiny_chat, "chat",
                  ("not a model folder", "nanochat export")))
    damaged = tmp_path / "damaged_export"
    (damaged / "config.json").parent.mkdir()
    (damaged / "config.json").write_text('{"nanochat": {}}')
    (damaged / "model.safetensors").write_bytes(b"\x00" * 64)
    (damaged / "tokenizer.bin").write_bytes(b"")
    cases.append((f"serve --device cpu --port 0 --model {damaged}", tiny_chat, "serve",
                  ("not a nanochat export config",)))
    # flag values out of range, checked before anything is loaded
    cases.append(("chat --device cpu --prompt hi --temperature 5", tiny_chat, "chat", ("--temperature",)))
    if not torch.cuda.is_available():
        cases.append(("base-eval --device cuda", tiny_chat, "base-eval", ("CUDA is not available",)))
    with ThreadPoolExecutor(4) as pool:
        procs = list(pool.map(lambda c: run(c[0].split(), c[1]), cases))
    for (args, _, command, needles), proc in zip(cases, procs):
        assert_user_error(proc, command, *needles)


@pytest.mark.parametrize("args", ["serve --batch-size 0", "serve --port 70000", "serve --max-waiting -1",
                                  "base-train --depth 0", "base-train --warmdown-ratio 1.5",
                                  "mid-train --device-batch-size 0",
                                  "chat-sft --init-lr-frac -1", "chat-rl --num-samples 0", "chat-rl --temperature nan"])
def test_flag_out_of_range_is_a_usage_error(tmp_path, args):
    command, flag = args.split()[:2]
    proc = run(args.split(), tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"nanochat {command}: error: argument {flag}"), proc.stderr


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch, capsys):
    """Only UserError is turned into one line: a bug in a stage propagates (and Python prints its traceback)."""
    from nanochat import cli
    from nanochat.evals import report

    def broken(argv):
        raise KeyError("a bug")

    monkeypatch.setattr(report, "main", broken)
    with pytest.raises(KeyError):
        cli.main(["report"])


def test_user_error_is_one_line_and_status_2(monkeypatch, capsys):
    from nanochat import cli
    from nanochat.common import UserError
    from nanochat.evals import report

    def mistaken(argv):
        raise UserError("no such thing\nat all")

    monkeypatch.setattr(report, "main", mistaken)
    assert cli.main(["report"]) == 2
    assert capsys.readouterr().err == "nanochat report: error: no such thing at all\n"
