"""What a training stage writes beside its checkpoints for people and for the report: train_log.jsonl (one JSON
object per line, as the run goes) and metrics.json (the final numbers, at the end).

- only the master rank writes (other ranks hold a no-op log), so a torchrun job writes each line once
- every line is flushed: a killed run's log ends at its last finished step (a torn last line is skipped on reading)
- a resumed run cuts the log back to the step it resumes from, so its log reads like an uninterrupted run's
- a stage's evaluation metric is an `Evaluated` (first and latest value); metrics.json reports both as
  `initial_<name>` and `<name>`, the report's "before -> after"
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import atomic_write, git_commit, print0

TRAIN_LOG = "train_log.jsonl"
METRICS = "metrics.json"


# ---------------------------------------------------------------------------------------------------------------
# train_log.jsonl


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill
            continue
    return entries


def truncate_log(path: Path, before_step: int) -> None:
    """Keep the entries of steps < before_step (a resumed run rewrites the rest)."""
    kept = [e for e in read_log(path) if e.get("step", 0) < before_step]
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in kept)


class TrainLog:
    """`log = TrainLog(ckpt_dir, rt.is_master)`; `log({"step": 3, "loss": 2.5})`; `log.close()` at the end.
    Optionally mirrored to a wandb run."""

    def __init__(self, ckpt_dir: Path, master: bool, wandb_run=None):
        self.file, self.wandb_run = None, wandb_run
        if master:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(ckpt_dir / TRAIN_LOG, "a")

    def __call__(self, entry: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
            if self.wandb_run is not None:
                self.wandb_run.log(entry, step=entry["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


# ---------------------------------------------------------------------------------------------------------------
# A stage's evaluation metric


@dataclass
class Evaluated:
    """The first and the latest value of one evaluation metric of a run: a number, or a dict of numbers (chat_rl's
    pass@1..k). `initial` is the first evaluation's (the untrained start of a fresh run; a resumed run keeps the
    saved one)."""
    name: str  # the key in train_log.jsonl and metrics.json
    initial: float | dict | None = None
    latest: float | dict | None = None

    def record(self, value: float | dict, step: int, log: TrainLog, label: str = "") -> None:
        """Keep `value` (and as the initial one the first time); print it and log it (a dict key by key)."""
        self.latest = value
        if self.initial is None:
            self.initial = value
        if isinstance(value, dict):
            print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in value.items()))
            log({"step": step, **value})
        else:
            print0(f"step {step:05d} | {label} {value:.4f}")
            log({"step": step, self.name: value})

    def metrics(self) -> dict:
        """As metrics.json and checkpoints hold it: {"initial_<name>": first, "<name>": latest}."""
        return {f"initial_{self.name}": self.initial, self.name: self.latest}

    @classmethod
    def from_metrics(cls, name: str, saved: dict) -> Evaluated:
        """The inverse of metrics() (missing keys: not evaluated yet)."""
        return cls(name, saved.get(f"initial_{name}"), saved.get(name))


# ---------------------------------------------------------------------------------------------------------------
# metrics.json


def write_stage_metrics(ckpt_dir: Path, metrics: dict, master: bool, t_start: float) -> None:
    """metrics.json with the run's wall time and commit added last (master rank only)."""
    if master:
        metrics.update(seconds=round(time.time() - t_start, 1), commit=git_commit())
        with atomic_write(ckpt_dir / METRICS, "w") as f:
            json.dump(metrics, f, indent=2)


def finish_stage(ckpt_dir: Path, metrics: dict, master: bool, t_start: float, evaluated: Evaluated) -> int:
    """The end of a finetuning stage: metrics.json, then one line from the first to the last evaluation. Returns
    the exit status (0)."""
    write_stage_metrics(ckpt_dir, metrics, master, t_start)
    first, final = evaluated.initial, evaluated.latest
    if isinstance(final, float):
        first, final = f"{first:.4f}", f"{final:.4f}"
    print0(f"done: {evaluated.name} {first} -> {final}; checkpoints in {ckpt_dir}")
    return 0
