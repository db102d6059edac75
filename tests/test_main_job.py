"""The README's main job on its CPU path, end to end: runs/cpu_default.sh at toy sizes in a fresh base dir.

It builds the offline corpus (apt-get download) and the eval data (pip download), trains every stage, evaluates,
writes the report and answers a chat prompt; then a rerun skips every finished stage. Slow (a few minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from conftest import REPO_ROOT, SHARED_DATA

TOY = {"DEPTH": "2", "VOCAB": "1024", "SEQ_LEN": "256", "BATCH": "4", "BASE_STEPS": "30", "MID_STEPS": "6",
       "SFT_STEPS": "6", "RL_STEPS": "2", "EVAL_PROBLEMS": "4", "ARITH_PROBLEMS": "8", "CORE_PER_TASK": "4"}
STAGE_COLUMNS = ["BASE", "MID", "SFT", "RL"]
# what the CPU default claims per stage in the summary table: CORE for the base model, the chat evals after
# (with the held-out arithmetic at every chat stage: in the trained phrasings, and in held-out phrasing families with
# the calculator allowed and not)
CHAT = ["ARC-E", "ARC-C", "MMLU", "GSM8K", "HumanEval", "ChatCORE", "Arithmetic (tool)",
        "Arithmetic, unseen phrasings (tool)", "Arithmetic, unseen phrasings (no tool)"]
CLAIMED = {"BASE": ["CORE"], "MID": CHAT, "SFT": CHAT, "RL": CHAT}


def _summary(report: str) -> dict[str, dict[str, str]]:
    block = report.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("|") and not line.startswith("|---")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == ["metric"] + STAGE_COLUMNS
    table = {}
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        table[cells[0]] = dict(zip(STAGE_COLUMNS, cells[1:]))
    return table


@pytest.mark.slow
def test_cpu_default_end_to_end(tmp_path):
    if not (REPO_ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip("needs the set-up command's .venv (bash runs/setup.sh)")
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("the offline corpus needs apt-get and dpkg-deb (Debian/Ubuntu)")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "base"), HF_HUB_OFFLINE="1", **TOY)
    gsm8k = SHARED_DATA / "gsm8k" / "train.jsonl"
    if gsm8k.exists():
        env["GSM8K_TRAIN"] = str(gsm8k)
    run = subprocess.run(["bash", "runs/cpu_default.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    out = run.stdout

    # it ends by answering two arithmetic questions and an open one, and telling the user how to go on
    assert "nanochat serve" in out and "nanochat chat" in out
    demo = out.split("== a chat prompt to the RL model: ")[1:]
    assert [d.split("\n", 1)[0] for d in demo] == [
        "Would you multiply 379 by 28, please?",
        "Zoe scored 144 points and then lost 48 points. How many points does she have now?",
        "Why is the sky blue?"]
    for d in demo:
        assert d.split("Done.", 1)[0].split("\n", 1)[1].strip(), "the model printed no answer"

    report = (tmp_path / "base" / "report" / "report.md").read_text()
    for section in ["# nanochat report card", "## Summary", "## Tokenizer", "## Base model (pretraining)",
                    "## Midtraining", "## Supervised finetuning", "## Reinforcement learning"]:
        assert section in report
    assert "not run" not in report
    assert re.search(r"- wall time: \d+h\d\dm\d\ds", report)
    assert re.search(r"\| vocab_size \| 1024 \|", report)
    table = _summary(report)
    number = re.compile(r"^-?\d+\.\d{4}$")
    for column, metrics in CLAIMED.items():
        for metric in metrics:
            assert number.match(table[metric][column]), f"{metric} at {column}: {table[metric][column]!r}"
    for metric, cells in table.items():  # every other cell is either a number or the explicit "-"
        for column, cell in cells.items():
            assert cell == "-" or number.match(cell), f"{metric} at {column}: {cell!r}"
    for stage in ["base", "mid", "sft", "rl"]:
        assert (tmp_path / "base" / "report" / f"{stage}_curves.png").stat().st_size > 1000

    # a rerun resumes: every finished stage is skipped, the report is written again
    rerun = subprocess.run(["bash", "runs/cpu_default.sh"], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    for stage in ["data", "evaldata", "tokenizer", "base", "base-eval", "mid", "sft", "rl", "chat-eval-rl"]:
        assert f"== {stage}: done in an earlier run, skipped" in rerun.stdout
