"""base_train end to end on a tiny model with the real tokenizer and data loader, as subprocesses:
- a run killed with SIGKILL after a checkpoint and resumed with --resume logs exactly the same per-step losses and
  validation bpb as an uninterrupted run, and its validation bpb falls well below the untrained model's
- a non-finite loss stops the run with a clear message and a non-zero exit, keeping the last good checkpoint
- base-eval reads the checkpoint and writes its results next to it
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS = 16
SAVE_EVERY = 4


@pytest.fixture
def env(base_dir, shared_data, tmp_path):
    """NANOCHAT_BASE_DIR with a small trained tokenizer, and two parquet shards (train, val) cut from tiny/."""
    tokenizer_module = pytest.importorskip("nanochat.tokenizer", reason="the native tokenizer module is not built",
                                           exc_type=ImportError)
    import pyarrow.parquet as pq

    table = pq.read_table(shared_data / "tiny" / "tiny.parquet")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    pq.write_table(table.slice(0, 60), data_dir / "shard_00000.parquet", row_group_size=8)
    pq.write_table(table.slice(60), data_dir / "shard_00001.parquet", row_group_size=8)
    texts = table.column("text").to_pylist()[:60]
    tokenizer = tokenizer_module.Tokenizer.train_from_iterator(texts, vocab_size=512)
    tokenizer.save(tokenizer_module.default_tokenizer_path())
    environ = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return {"environ": environ, "data_dir": data_dir, "base_dir": base_dir}


def train_cmd(env, tag, *extra, steps=STEPS):
    return [sys.executable, "-m", "nanochat.training.base_train", "--depth", "1", "--max-seq-len", "32",
            "--device-batch-size", "4", "--total-batch-size", "256", "--num-iterations", str(steps),
            "--eval-every", "8", "--eval-tokens", "1024", "--sample-every", "0", "--save-every", str(SAVE_EVERY),
            "--data-dir", str(env["data_dir"]), "--model-tag", tag, "--device", "cpu", "--loader-threads", "1",
            *extra]


def ckpt_dir(env, tag) -> Path:
    return env["base_dir"] / "checkpoints" / "base" / tag


def curves(env, tag) -> tuple[list, list]:
    entries = [json.loads(line) for line in (ckpt_dir(env, tag) / "train_log.jsonl").read_text().splitlines()]
    losses = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    bpbs = [(e["step"], e["val_bpb"]) for e in entries if "val_bpb" in e]
    return losses, bpbs


def run(cmd, env, timeout=300):
    proc = subprocess.run(cmd, env=env["environ"], capture_output=True, text=True, timeout=timeout)
    return proc


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_loss_curve(env, capsys):
    full = run(train_cmd(env, "full"), env)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    losses, bpbs = curves(env, "full")
    assert [s for s, _ in losses] == list(range(STEPS))
    assert [s for s, _ in bpbs] == [0, 8, 16]
    assert bpbs[-1][1] < 0.8 * bpbs[0][1], f"validation bpb did not fall: {bpbs}"

    # the same run, killed with SIGKILL as soon as its first checkpoint is on disk
    cmd = train_cmd(env, "killed")
    proc = subprocess.Popen(cmd, env=env["environ"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = ckpt_dir(env, "killed") / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, f"run ended before it could be killed:\n{out[-3000:]}"
    killed_at = int(latest.read_text())
    assert killed_at < STEPS and not (ckpt_dir(env, "killed") / f"step_{STEPS:06d}").exists()

    resumed = run(cmd + ["--resume"], env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {ckpt_dir(env, 'killed')} at step {killed_at}" in resumed.stdout
    assert curves(env, "killed") == (losses, bpbs)  # bit for bit: every loss and every bpb

    # --resume with nothing to resume starts from scratch (so restart loops can always pass it); in-process
    from nanochat.training.base_train import main

    assert main(train_cmd(env, "fresh", "--resume", steps=2)[3:]) == 0
    assert "starting from step 0" in capsys.readouterr().out
    assert curves(env, "fresh")[0] == losses[:2]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(env):
    first = run(train_cmd(env, "nan", steps=SAVE_EVERY), env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    good = (ckpt_dir(env, "nan") / f"step_{SAVE_EVERY:06d}" / "model.safetensors").read_bytes()
    # continue with a NaN learning rate: the weights turn NaN at the first step, the next loss is NaN
    bad = run(train_cmd(env, "nan", "--resume", "--matrix-lr", "nan", steps=3 * SAVE_EVERY), env)
    assert bad.returncode != 0
    assert f"loss is nan at step {SAVE_EVERY + 1}" in bad.stdout
    assert "last good one" in bad.stdout
    assert (ckpt_dir(env, "nan") / "latest").read_text().strip() == str(SAVE_EVERY)
    assert (ckpt_dir(env, "nan") / f"step_{SAVE_EVERY:06d}" / "model.safetensors").read_bytes() == good
    losses, _ = curves(env, "nan")
    assert [s for s, _ in losses] == list(range(SAVE_EVERY + 2))  # the resumed step, then the NaN one
    assert all(loss is not None for _, loss in losses[:-1]) and losses[-1][1] is None


@pytest.mark.slow
def test_bad_batch_geometry_is_rejected(env):
    from nanochat.training.base_train import main

    with pytest.raises(ValueError, match="--total-batch-size 100 must be a multiple of .* = 4 x 32 x 1 = 128"):
        main(train_cmd(env, "geom", "--total-batch-size", "100")[3:])


@pytest.mark.slow
def test_base_eval_writes_results(env):
    from nanochat.evals import base_eval
    from nanochat.training import base_train

    assert base_train.main(train_cmd(env, "ev", steps=2)[3:]) == 0
    assert base_eval.main(["--model-tag", "ev", "--eval", "bpb,samples", "--eval-tokens", "512",
                           "--device-batch-size", "4", "--data-dir", str(env["data_dir"]),
                           "--max-new-tokens", "4"]) == 0
    results = json.loads((ckpt_dir(env, "ev") / "base_eval_step_000002.json").read_text())
    assert results["step"] == 2 and set(results["bpb"]) == {"train", "val"}
    assert all(0 < v < 20 for v in results["bpb"].values())
    assert len(results["samples"]) >= 3 and all(isinstance(s, str) for s in results["samples"])


@pytest.mark.slow
def test_two_process_torchrun_run_resumes_exactly(env):
    """gloo on CPU: per-rank optimizer shards and loader states are saved, and a resume reproduces the curve."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "nanochat.training.base_train", "--"] + train_cmd(env, "ddp", steps=2 * SAVE_EVERY)[3:]
    first = run(cmd, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "2 rank(s)" in first.stdout
    folder = ckpt_dir(env, "ddp") / f"step_{SAVE_EVERY:06d}"
    assert {"optim_rank0.pt", "optim_rank1.pt"} <= set(os.listdir(folder))
    meta = json.loads((folder / "meta.json").read_text())
    assert [s["rank"] for s in meta["data_states"]] == [0, 1] and meta["world_size"] == 2
    curve = curves(env, "ddp")
    # lose the final checkpoint as a crash would, then resume from the middle one
    final = ckpt_dir(env, "ddp") / f"step_{2 * SAVE_EVERY:06d}"
    for child in final.iterdir():
        child.unlink()
    final.rmdir()
    resumed = run(cmd + ["--resume"], env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at step {SAVE_EVERY}" in resumed.stdout
    assert curves(env, "ddp") == curve


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers


def test_horizon_precedence():
    import argparse

    from nanochat.training.base_train import horizon

    args = argparse.Namespace(num_iterations=-1, target_flops=-1.0, target_param_data_ratio=20.0)
    assert horizon(args, num_params=1000, flops_per_token=6e3, total_batch=100) == (200, "20 tokens per parameter")
    args.target_flops = 6e3 * 100 * 50
    assert horizon(args, 1000, 6e3, 100) == (50, "--target-flops")
    args.num_iterations = 7
    assert horizon(args, 1000, 6e3, 100) == (7, "--num-iterations")
    with pytest.raises(ValueError, match="--num-iterations"):
        horizon(argparse.Namespace(num_iterations=0, target_flops=0, target_param_data_ratio=0), 1, 1.0, 1)


def test_peak_flops_table(monkeypatch):
    import torch

    from nanochat.training import base_train

    assert base_train.peak_flops(torch.device("cpu")) is None
    for name, expected in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                           ("NVIDIA A100-SXM4-80GB", 312e12), ("Some Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, _n=name: _n)
        assert base_train.peak_flops(torch.device("cuda", 0)) == expected


def test_truncate_log_keeps_earlier_steps_and_drops_torn_lines(tmp_path):
    from nanochat.training.log import read_log, truncate_log

    path = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / (s + 1)}) for s in range(6)] + ['{"step": 6, "lo']
    path.write_text("\n".join(lines))
    truncate_log(path, 4)
    assert [e["step"] for e in read_log(path)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_architecture_switches_train_save_and_generate(env, monkeypatch):
    """base-train with every switch of nanochat's newest architecture: it trains (finite, falling loss), the
    checkpoint records the switches, and it loads and generates through the engine."""
    from nanochat.inference.engine import Engine
    from nanochat.model.checkpoint import load_model
    from nanochat.training.base_train import main

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(env["base_dir"]))
    switches = ["--value-embeds", "alternating", "--ve-gate-channels", "12", "--ve-gate-scale", "3", "--lambdas",
                "--smear", "--backout", "--qk-scale", "1.2", "--rotary-base", "100000", "--window-pattern", "SL",
                "--short-window", "8", "--softcap", "20", "--pad-vocab-to", "64"]
    cmd = train_cmd(env, "switches", *switches, steps=6)
    cmd[cmd.index("--depth") + 1] = "2"
    assert main(cmd[3:]) == 0
    losses, _ = curves(env, "switches")
    assert all(math.isfinite(v) for _, v in losses) and losses[-1][1] < losses[0][1]
    model, tok, meta = load_model("base", model_tag="switches")
    cfg = model.config
    assert (cfg.ve_layers, cfg.smear, cfg.backout, cfg.lambdas, cfg.short_window) == ([1], True, True, True, 8)
    assert cfg.padded_vocab_size == 512 and cfg.layer_windows() == [8, 32]
    prompt = [tok.bos_token_id] + tok.encode("hello")
    [[(tokens, _)]] = Engine(model, tok, tools=False).generate([prompt], max_tokens=8, temperature=0.0)
    assert tokens == list(model.generate(prompt, len(tokens), temperature=0.0))


def test_the_defaults_are_the_january_switches_and_the_old_model_is_one_set_of_flags():
    """base-train's architecture defaults were changed on a measured gain (bench/RESULTS.md, issue 20): value
    embeddings on alternating layers, lambdas, SSSL windows of a quarter of the context. The flags that give the
    model before them build exactly the plain GPTConfig."""
    import torch

    from nanochat.model.gpt import GPTConfig
    from nanochat.runtime import Runtime
    from nanochat.training.base_train import build_model, parse_args

    rt = Runtime(device=torch.device("cpu"), dtype=torch.float32, rank=0, local_rank=0, world_size=1)
    new = build_model(parse_args(["--depth", "4", "--max-seq-len", "64"]), 512, rt).config
    assert (new.ve_layers, new.lambdas, new.window_pattern, new.short_window) == ([1, 3], True, "SSSL", 16)
    assert new.layer_windows() == [16, 16, 16, 64]
    assert (new.smear, new.backout, new.qk_scale, new.rotary_base) == (False, False, 1.0, 10_000.0)
    old = build_model(parse_args(["--depth", "4", "--max-seq-len", "64", "--value-embeds", "none", "--no-lambdas",
                                  "--window-pattern", ""]), 512, rt).config
    assert old == GPTConfig.from_depth(4, vocab_size=512, sequence_len=64)
    explicit = build_model(parse_args(["--depth", "4", "--max-seq-len", "64", "--short-window", "5"]), 512, rt).config
    assert explicit.short_window == 5
