"""The report card: one markdown file (report.md) that says what a run did and how good the result is.

- header: commit, hardware, versions, wall time and an estimated cost
- one section per stage (tokenizer, base, mid, sft, rl) from the files each stage leaves in its folder:
  tokenizer/tok_train.json; checkpoints/<stage>/<tag>/{train_log.jsonl, meta of the newest step, *eval*.json}
- the summary table of metrics by stage (CORE, ARC-E, ARC-C, MMLU, GSM8K, HumanEval, ChatCORE, and held-out
  synthetic arithmetic with and without the calculator tool, for base/mid/sft/rl)
- plots (train loss, validation bpb, learning rate, tokens/s per stage) as PNG files linked from the markdown

`nanochat report --start` marks the start of a run (for the wall time); `nanochat report` writes the report.
The reader is forgiving: a stage that did not run is listed as "not run", never an error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.common import atomic_write, base_dir, git_commit, system_info

STAGES = ["base", "mid", "sft", "rl"]
STAGE_TITLES = {"base": "Base model (pretraining)", "mid": "Midtraining", "sft": "Supervised finetuning",
                "rl": "Reinforcement learning"}
# Columns of the summary table: (label, metric keys to look for in a stage's eval results, in order of preference).
SUMMARY_METRICS = [
    ("CORE", ("CORE",)),
    ("ARC-E", ("ARC-Easy", "ARC-E", "arc_easy")),
    ("ARC-C", ("ARC-Challenge", "ARC-C", "arc_challenge")),
    ("MMLU", ("MMLU", "mmlu")),
    ("GSM8K", ("GSM8K", "gsm8k")),
    ("HumanEval", ("HumanEval", "humaneval")),
    ("ChatCORE", ("ChatCORE", "chatcore")),
    ("Arithmetic (tool)", ("Arithmetic",)),
    ("Arithmetic, unseen phrasings (tool)", ("Arithmetic-Unseen",)),
    ("Arithmetic, unseen phrasings (no tool)", ("Arithmetic-Unseen-NoTool",)),
]
# Rough rental prices in USD per hour, for the cost line; override with --price-per-hour.
PRICE_PER_GPU_HOUR = 3.0  # one H100 on a typical cloud, 2026
PRICE_PER_CPU_HOUR = 0.05  # a 2-core VM


# ---------------------------------------------------------------------------------------------------------------
# Reading what the stages left behind


@dataclass
class StageRun:
    stage: str
    folder: Path | None = None
    log: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    evals: dict = field(default_factory=dict)  # metric name -> value (flattened over every eval file)
    eval_files: list[Path] = field(default_factory=list)

    @property
    def ran(self) -> bool:
        return self.folder is not None and (bool(self.log) or bool(self.meta) or bool(self.evals))


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a kill
    return rows


def _newest_dir(parent: Path) -> Path | None:
    dirs = [d for d in parent.iterdir() if d.is_dir()] if parent.is_dir() else []
    return max(dirs, key=lambda d: d.stat().st_mtime) if dirs else None


def _eval_metrics(data: dict) -> dict:
    """The headline numbers of one eval/metrics file, by the names the stages write:
    chat-eval's flat "summary"; base-eval's "bpb" per split and "core" (named CORE, CORE-partial or CORE-offline);
    otherwise (a stage's metrics.json) its top-level numbers."""
    out: dict = {}
    if isinstance(data.get("summary"), dict):
        out.update({k: float(v) for k, v in data["summary"].items() if _is_number(v)})
    if isinstance(data.get("bpb"), dict):
        out.update({f"{split} bpb": float(v) for split, v in data["bpb"].items() if _is_number(v)})
    core = data.get("core")
    if isinstance(core, dict) and _is_number(core.get("core")):
        out["CORE"] = float(core["core"])
        out["CORE name"] = core.get("name", "CORE")
    if not out:
        out.update({k: float(v) for k, v in data.items() if _is_number(v)})
    if isinstance(data.get("sandbox"), dict):  # chat-eval with HumanEval: how the model-written code was confined
        sandbox = data["sandbox"]
        out["HumanEval sandbox"] = f"{sandbox.get('mode')} ({', '.join(sandbox.get('protections', []))})"
        if sandbox.get("mode") != "kernel":
            out["HumanEval sandbox"] += ": UNSANDBOXED (no seccomp + Landlock; ran with --allow-unsandboxed)"
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_stage(root: Path, stage: str) -> StageRun:
    run = StageRun(stage)
    folder = _newest_dir(root / "checkpoints" / stage)
    if folder is None:
        return run
    run.folder = folder
    for name in ("train_log.jsonl", f"{stage}_log.jsonl", "log.jsonl"):
        if (folder / name).exists():
            run.log = _read_jsonl(folder / name)
            break
    metas = sorted(folder.glob("step_*/meta.json")) or sorted(folder.glob("meta_*.json"))
    if metas:
        run.meta = json.loads(metas[-1].read_text())
    for path in sorted(folder.glob("*.json")):
        if "eval" in path.name or "metrics" in path.name:
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                run.eval_files.append(path)
                run.evals.update(_eval_metrics(data))
    return run


def _metric(run: StageRun, keys: tuple[str, ...]) -> float | None:
    for k in keys:
        if k in run.evals:
            return run.evals[k]
    return None


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _plot_stage(run: StageRun, out_dir: Path) -> list[Path]:
    """Train loss, val bpb, lr and tokens/s of one stage, one PNG with up to four panels."""
    import matplotlib  # heavy; only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display on a server

    series = {
        "train loss": [(r["step"], r["loss"]) for r in run.log if isinstance(r.get("loss"), (int, float))],
        "validation bpb": [(r["step"], r["val_bpb"]) for r in run.log if isinstance(r.get("val_bpb"), (int, float))],
        "learning-rate multiplier": [(r["step"], r["lr"]) for r in run.log if isinstance(r.get("lr"), (int, float))],
        "tokens/s": [(r["step"], r["tok_per_s"]) for r in run.log if isinstance(r.get("tok_per_s"), (int, float))],
    }
    series = {k: v for k, v in series.items() if v}
    if not series:
        return []
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(STAGE_TITLES[run.stage])
    fig.tight_layout()
    path = out_dir / f"{run.stage}_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _header(root: Path, price_per_hour: float | None) -> list[str]:
    info = system_info()
    start_file = root / "report" / "run_start.json"
    start = json.loads(start_file.read_text())["time"] if start_file.exists() else None
    wall = time.time() - start if start else None
    n_gpus = len(info["gpus"])
    price = price_per_hour if price_per_hour is not None else (
        PRICE_PER_GPU_HOUR * n_gpus if n_gpus else PRICE_PER_CPU_HOUR)
    hardware = f"{n_gpus} x {info['gpus'][0]}" if n_gpus else f"CPU only, {info['cpu_count']} cores"
    lines = [
        "# nanochat report card",
        "",
        f"- generated: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- commit: `{git_commit()}`",
        f"- hardware: {hardware} ({info['platform']})",
        f"- versions: python {info['python']}, torch {info['torch']}"
        + (f", triton {info['triton']}" if info.get("triton") else "")
        + (f", CUDA {info['cuda']}" if info.get("cuda") else ""),
        f"- wall time: {_duration(wall) if wall else 'unknown (no `nanochat report --start` marker)'}",
        "- estimated cost: " + (f"${wall / 3600 * price:.2f} at ${price:.2f}/hour" if wall else "unknown"),
    ]
    return lines


def _tokenizer_section(root: Path) -> list[str]:
    lines = ["## Tokenizer", ""]
    summary = root / "tokenizer" / "tok_train.json"
    if not summary.exists():
        return lines + ["not run", ""]
    data = json.loads(summary.read_text())
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in data.items() if isinstance(v, (int, float, str))]
    return lines + [""]


def _stage_section(run: StageRun, plots: list[Path], out_dir: Path) -> list[str]:
    lines = [f"## {STAGE_TITLES[run.stage]}", ""]
    if not run.ran:
        return lines + ["not run", ""]
    lines.append(f"- folder: `{run.folder}`")
    config = run.meta.get("config")
    if config:
        lines.append("- model: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    if "step" in run.meta:
        lines.append(f"- steps: {run.meta['step']}")
    task = (run.meta.get("args") or {}).get("task")
    if task:
        lines.append(f"- rewarded task: {task}")
    losses = [r["loss"] for r in run.log if isinstance(r.get("loss"), (int, float))]
    if losses:
        lines.append(f"- train loss: first {losses[0]:.4f}, last {losses[-1]:.4f} over {len(losses)} logged steps")
    bpbs = [r["val_bpb"] for r in run.log if isinstance(r.get("val_bpb"), (int, float))]
    if bpbs:
        lines.append(f"- validation bpb: first {bpbs[0]:.4f}, last {bpbs[-1]:.4f}, best {min(bpbs):.4f}")
    speeds = [r["tok_per_s"] for r in run.log if isinstance(r.get("tok_per_s"), (int, float))]
    if speeds:
        speeds = sorted(speeds)
        lines.append(f"- throughput: median {speeds[len(speeds) // 2]:,.0f} tokens/s")
    if run.evals:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in run.evals.items()]
    for p in plots:
        lines += ["", f"![{run.stage} curves]({p.relative_to(out_dir)})"]
    return lines + [""]


def _summary_table(runs: list[StageRun]) -> list[str]:
    lines = ["## Summary", "", "| metric | " + " | ".join(r.stage.upper() for r in runs) + " |",
             "|---" * (len(runs) + 1) + "|"]
    for label, keys in SUMMARY_METRICS:
        lines.append(f"| {label} | " + " | ".join(_fmt(_metric(r, keys)) for r in runs) + " |")
    notes = sorted({r.evals["CORE name"] for r in runs if "CORE name" in r.evals})
    lines += ["", "`-` means the metric was not measured at that stage."]
    if notes and notes != ["CORE"]:
        lines.append(f"CORE here is {', '.join(notes)}: the subset of the DCLM tasks available offline, not "
                     "comparable to published CORE.")
    return lines + [""]


def write_report(root: Path | None = None, out_dir: Path | None = None,
                 price_per_hour: float | None = None) -> Path:
    """Write report.md (and the PNG plots) and return its path."""
    root = root or base_dir()
    out_dir = out_dir or root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [_read_stage(root, s) for s in STAGES]
    lines = _header(root, price_per_hour) + [""]
    lines += _summary_table(runs)
    lines += _tokenizer_section(root)
    for run in runs:
        lines += _stage_section(run, _plot_stage(run, out_dir) if run.ran else [], out_dir)
    path = out_dir / "report.md"
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines))
    return path


def mark_start(root: Path | None = None) -> Path:
    root = root or base_dir()
    path = root / "report" / "run_start.json"
    with atomic_write(path, "w") as f:
        json.dump({"time": time.time(), "commit": git_commit()}, f)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanochat report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", action="store_true", help="mark the start of a run (for wall time and cost)")
    parser.add_argument("--output", type=Path, default=None, help="folder for report.md and plots "
                        "(default $NANOCHAT_BASE_DIR/report)")
    parser.add_argument("--price-per-hour", type=float, default=None,
                        help="USD per hour of the whole machine for the cost line (default: $3 per GPU, "
                             "$0.05 for a CPU-only machine)")
    args = parser.parse_args(argv)
    if args.start:
        print(f"run start marked in {mark_start()}")
        return 0
    path = write_report(out_dir=args.output, price_per_hour=args.price_per_hour)
    print(f"report written to {path}")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
