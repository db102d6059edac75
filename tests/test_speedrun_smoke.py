"""runs/speedrun.sh in its smoke mode (SMOKE=1): every stage's real command and flags at toy sizes, on CPU under
torchrun with 2 gloo processes, from the shared test shards; then a rerun after losing the base stage's last
checkpoint resumes the base stage from its middle checkpoint and skips every other stage.

What it catches before a GPU run would: argument typos, wrong paths between stages, batch sizing that does not
divide, a stage that cannot resume. Slow (a few minutes on 2 cores); needs the shared data folder (tiny shards and
GSM8K train, which the RL stage trains on) and pip access for the eval data, like tests/test_main_job.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import REPO_ROOT

STAGES = ["data-tok", "evaldata", "tokenizer", "tok-eval", "base", "base-eval", "mid", "mid-eval", "sft", "sft-eval",
          "rl", "rl-eval"]


@pytest.mark.slow
def test_speedrun_smoke_runs_every_stage_and_resumes(shared_data, tmp_path):
    if not (os.environ.get("VIRTUAL_ENV") or (REPO_ROOT / ".venv" / "bin" / "activate").exists()):
        pytest.skip("needs a virtual environment (bash runs/setup.sh)")
    base = tmp_path / "base"
    env = dict(os.environ, SMOKE="1", SMOKE_DATA=str(shared_data / "tiny"), NANOCHAT_BASE_DIR=str(base),
               GSM8K_TRAIN=str(shared_data / "gsm8k" / "train.jsonl"), HF_HUB_OFFLINE="1")
    env.pop("NANOCHAT_REDO", None)
    run = subprocess.run(["bash", "runs/speedrun.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for stage in STAGES:
        assert f"== {stage}: finished in" in run.stdout, f"stage {stage} did not run:\n{run.stdout[-3000:]}"
    # the real commands ran, with the sizing's batch and the toy sizes appended
    assert "--nproc_per_node=2 -m nanochat.training.base_train -- --depth 2 --device-batch-size 32" in run.stdout
    assert "2 rank(s) x 2 accumulation step(s)" in run.stdout
    for stage in ["base", "mid", "sft", "rl"]:
        assert (base / "checkpoints" / stage / "d2" / "latest").is_file(), f"no {stage} checkpoint"
    assert "## Reinforcement learning" in (base / "report" / "report.md").read_text()

    # lose the base stage's final checkpoint and its completion marker: the rerun resumes it, skips the rest
    ckpt = base / "checkpoints" / "base" / "d2"
    shutil.rmtree(ckpt / "step_000004")
    (ckpt / "latest").write_text("2")
    (base / "report" / "stages" / "base.done").unlink()
    rerun = subprocess.run(["bash", "runs/speedrun.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    assert "resumed from" in rerun.stdout and "at step 2" in rerun.stdout
    assert (ckpt / "step_000004").is_dir()
    for stage in STAGES:
        if stage != "base":
            assert f"== {stage}: done in an earlier run, skipped" in rerun.stdout
