"""Do nanochat's architecture switches help our own small models at equal wall time?

Each configuration is a set of `base-train` flags (the GPTConfig switches of the three nanochat eras). Two phases,
each run a real `nanochat base-train` subprocess on the same data and tokenizer:
1. timing: every configuration trains --time-steps steps (configurations interleaved, --rounds times, so a change
   of machine load hits all of them alike); ms/step = the median per-step time after the first --skip steps
   (compilation, allocator warm-up).
2. training: the default configuration trains --steps steps; every other configuration gets the same wall time,
   i.e. round(steps x ms_default / ms_config) steps, with its own complete schedule (warmdown included). The final
   validation bits per byte (--eval-tokens tokens) are compared.
Phase 2's bpb does not depend on the machine's load (the step count is fixed by phase 1), so only phase 1 needs a
quiet machine; the load average is printed with every timing.

    NANOCHAT_BASE_DIR=~/.cache/nanochat python bench/arch_switches.py --depth 4 --steps 400
    python bench/arch_switches.py --base-dir DIR --configs default,jan --steps 200   # DIR holds tokenizer/ + base_data/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> base-train flags (on top of the default model); "jan" and "july" follow nanochat's January and July 2026
# architectures at our scale (window pattern SSSL with a quarter-context short window, as nanochat's default).
CONFIGS = {
    "default": [],
    "ve": ["--value-embeds", "alternating"],
    "lambdas": ["--lambdas"],
    "window": ["--window-pattern", "SSSL", "--short-window", "128"],
    "smear+backout": ["--smear", "--backout"],
    "jan": ["--value-embeds", "alternating", "--lambdas", "--window-pattern", "SSSL", "--short-window", "128"],
    "july": ["--value-embeds", "alternating", "--lambdas", "--window-pattern", "SSSL", "--short-window", "128",
             "--smear", "--backout", "--qk-scale", "1.2", "--rotary-base", "100000"],
}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_flags() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "none"


def train(base_dir: Path, tag: str, flags: list[str], steps: int, args, eval_tokens: int) -> list[dict]:
    """Run base-train; return its train log (per-step and per-eval records)."""
    cmd = [sys.executable, "-m", "nanochat.training.base_train", "--device", "cpu", "--depth", str(args.depth),
           "--max-seq-len", str(args.seq_len), "--device-batch-size", str(args.batch),
           "--num-iterations", str(steps), "--eval-every", "0", "--eval-tokens", str(eval_tokens),
           "--sample-every", "0", "--model-tag", tag, "--compile" if args.compile else "--no-compile",
           "--seed", str(args.seed), *flags]
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"base-train failed for {tag}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    folder = base_dir / "checkpoints" / "base" / tag
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line.strip()]
    shutil.rmtree(folder)  # the weights are not needed; keep the disk clean
    return log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-dir", default=os.environ.get("NANOCHAT_BASE_DIR"),
                   help="folder with tokenizer/ and base_data/ (default $NANOCHAT_BASE_DIR); not written to")
    p.add_argument("--configs", default="default,ve,lambdas,window,smear+backout,jan,july",
                   help="comma-separated, of " + ", ".join(CONFIGS))
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--steps", type=int, default=400, help="steps of the default configuration")
    p.add_argument("--time-steps", type=int, default=12, help="steps per timing run")
    p.add_argument("--skip", type=int, default=4, help="first steps left out of a timing")
    p.add_argument("--rounds", type=int, default=2, help="timing runs per configuration (interleaved)")
    p.add_argument("--eval-tokens", type=int, default=131072, help="validation tokens of the final bpb")
    p.add_argument("--seed", type=int, default=42, help="weight initialisation seed of every run (base-train's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile in both phases (what base-train picks for runs of >= 200 steps)")
    args = p.parse_args()
    if not args.base_dir:
        raise SystemExit("--base-dir (or $NANOCHAT_BASE_DIR) must name a folder with tokenizer/ and base_data/")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or "default" not in names:
        raise SystemExit(f"--configs must include default and name only {', '.join(CONFIGS)}; got {names}")

    source = Path(args.base_dir)
    with tempfile.TemporaryDirectory(prefix="arch-switches-") as tmp:
        work = Path(tmp)
        for sub in ("tokenizer", "base_data"):  # read-only inputs, linked; checkpoints and reports go to work/
            (work / sub).symlink_to((source / sub).resolve())
        print(f"cpu flags: {cpu_flags()}, threads {os.environ.get('OMP_NUM_THREADS', os.cpu_count())}, depth "
              f"{args.depth}, T={args.seq_len}, {args.batch} rows/step, compile {args.compile}", flush=True)

        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names:
                before = loadavg()
                log = train(work, f"time-{n}", CONFIGS[n], args.time_steps, args, eval_tokens=args.seq_len * 8)
                dts = [e["dt"] for e in log if "dt" in e and e["step"] >= args.skip]
                times[n].extend(dts)
                print(f"timing round {r + 1}: {n:<14} median {1000 * statistics.median(dts):7.0f} ms/step "
                      f"(load {before} -> {loadavg()})", flush=True)
        ms = {n: 1000 * statistics.median(v) for n, v in times.items()}

        results = {}
        for n in names:
            steps = max(1, round(args.steps * ms["default"] / ms[n]))
            t0 = time.perf_counter()
            log = train(work, f"run-{n}", CONFIGS[n], steps, args, eval_tokens=args.eval_tokens)
            bpb = [e["val_bpb"] for e in log if "val_bpb" in e][-1]
            results[n] = (steps, bpb)
            print(f"trained {n:<14} {steps:5d} steps in {time.perf_counter() - t0:6.0f} s: val bpb {bpb:.4f} "
                  f"(load {loadavg()})", flush=True)

    base_bpb = results["default"][1]
    print()
    print("| config | flags | ms/step | vs default | steps at equal wall time | val bpb | bpb vs default |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        steps, bpb = results[n]
        print(f"| {n} | {' '.join(CONFIGS[n]) or '(none)'} | {ms[n]:.0f} | {ms[n] / ms['default']:.2f}x | {steps} | "
              f"{bpb:.4f} | {bpb - base_bpb:+.4f} |")


if __name__ == "__main__":
    main()
