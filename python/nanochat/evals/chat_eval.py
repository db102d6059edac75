"""`nanochat chat-eval`: ARC-Easy, ARC-Challenge, MMLU (categorical), GSM8K, HumanEval (generative, pass@k) and
ChatCORE of a chat checkpoint, plus held-out synthetic arithmetic with and without the calculator tool (outside
ChatCORE); `torchrun ... -m nanochat.evals.chat_eval` spreads the problems over ranks.

- the model: --source rl|sft|mid|base (default: the most finished chat stage that has a checkpoint)
- data: the offline store of `nanochat data evals` when present, else the Hugging Face hub (tasks/)
- output: a results JSON (default: chat_eval.json in the checkpoint's folder) with per-task accuracy, n, k and
  centered accuracy, plus ChatCORE, the model, the settings and the commit, for the report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nanochat.common import atomic_write, git_commit, print0, system_info
from nanochat.evals.chat import build_tasks, run_chat_eval
from nanochat.model.checkpoint import checkpoint_dir, load_chat_model, require_chat_checkpoint
from nanochat.model.quantize import add_weights_arg
from nanochat.runtime import init_runtime, shutdown_runtime
from nanochat.tasks import HumanEval
from nanochat.tools import sandbox as sb

ALL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "Arithmetic", "Arithmetic-Unseen",
             "Arithmetic-Unseen-NoTool"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanochat chat-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", default=None, choices=["base", "mid", "sft", "rl"],
                   help="checkpoint stage (default: rl, else sft, else mid)")
    p.add_argument("--model-tag", default=None, help="checkpoint tag (default: newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
    p.add_argument("--model", type=Path, default=None, metavar="DIR",
                   help="a folder written by `nanochat export` (not a checkpoint)")
    p.add_argument("--tasks", default=",".join(ALL_TASKS),
                   help=f"comma-separated subset of {ALL_TASKS + ['SpellingBee']}")
    p.add_argument("--max-problems", type=int, default=None, help="problems per task (default: all)")
    p.add_argument("--arithmetic-problems", type=int, default=200,
                   help="held-out arithmetic problems (with and without the tool; not capped by --max-problems)")
    p.add_argument("--num-samples", type=int, default=1, help="k of pass@k for generative tasks")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens per generated answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (use > 0 with --num-samples > 1)")
    p.add_argument("--top-k", type=int, default=50, help="sampling top-k (0: off)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (categorical) / KV-cache rows")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: <checkpoint dir>/chat_eval.json)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")

    add_weights_arg(p)
    p.add_argument("--allow-unsandboxed", action="store_true",
                   help="run HumanEval's model-written code even where no kernel sandbox is available (see "
                        "nanochat/tools/sandbox.py); without it chat-eval refuses there")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = parse_args(argv)
    task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    sandbox = None
    if "HumanEval" in task_names:  # model-written code runs: which sandbox layers hold here (nanochat/tools/sandbox.py)

        protections = sb.available_protections()
        sandbox = {"mode": sb.sandbox_mode(protections), "protections": protections}
        if sandbox["mode"] != "kernel":  # "namespace" leaves files, exec and the disk open: not a sandbox
            if not args.allow_unsandboxed:
                print(f"chat-eval: no kernel sandbox for HumanEval here (layers: {', '.join(protections)}); pass "
                      "--allow-unsandboxed to run model-written code without one", file=sys.stderr)
                return 2
            sandbox["unsandboxed"] = True
    rt = init_runtime(args.device)
    try:

        require_chat_checkpoint(args.source, args.model)

        tasks = None
        if sandbox is not None:

            tasks = {"HumanEval": HumanEval(allow_unsandboxed=args.allow_unsandboxed)}
        # the eval data first: a missing file is one line before any model is loaded (or its weights guarded)
        tasks = build_tasks(task_names, args.arithmetic_problems, tasks)
        model, tokenizer, meta, stage = load_chat_model(args.source, device=rt.device, model_tag=args.model_tag,
                                                        step=args.step, model_dir=args.model, weights=args.weights)
        args.model_tag = args.model_tag or (meta.get("model_tag") if args.model else None)
        tag = args.model_tag or next((p.name for p in sorted(checkpoint_dir(stage, "x").parent.iterdir(),
                                                              key=lambda p: p.stat().st_mtime, reverse=True)
                                      if p.is_dir()), "?")
        print0(f"chat-eval: {stage}/{tag} step {meta.get('step')} ({meta['weights']} weights) on "
               f"{', '.join(task_names)}")
        t0 = time.time()
        report = run_chat_eval(model, tokenizer, rt.device, task_names, max_problems=args.max_problems,
                               num_samples=args.num_samples, max_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k or None, batch_size=args.batch_size,
                               tasks=tasks, log=print0, arithmetic_problems=args.arithmetic_problems)
        if sandbox is not None:
            report["sandbox"] = sandbox
        report.update({"model": {"stage": stage, "tag": tag, "step": meta.get("step")}, "weights": meta["weights"],
                       "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                       "seconds": round(time.time() - t0, 1), "commit": git_commit(), "system": system_info()})
        if report["chatcore"] is not None:
            print0(f"ChatCORE: {report['chatcore']:.4f}")
        if rt.is_master:
            out = args.out or (args.model or checkpoint_dir(stage, tag)) / "chat_eval.json"
            with atomic_write(out, "w") as f:
                json.dump(report, f, indent=2)
            print0(f"wrote {out}")
        return 0
    finally:
        shutdown_runtime()


if __name__ == "__main__":
    sys.exit(main())
