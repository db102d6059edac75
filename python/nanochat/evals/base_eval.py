"""Evaluate a base checkpoint: `nanochat base-eval [--eval bpb,samples,core]` (also under torchrun).

- bpb: bits per byte on the train and val splits (vocabulary-invariant; evals/bpb.py), --eval-tokens each
- samples: greedy continuations of a few fixed prompts by the reference sampler (GPT.generate)
- core: the CORE benchmark via nanochat.evals.core.evaluate_core (imported only when asked for)
- results go to base_eval_step_<step>.json in the checkpoint's folder (for the report), written atomically
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanochat.common import atomic_write, print0
from nanochat.data.loader import DataLoader
from nanochat.evals.core import evaluate_core
from nanochat.model.bpb import evaluate_bpb
from nanochat.model.checkpoint import checkpoint_dir, load_model
from nanochat.model.quantize import add_weights_arg
from nanochat.runtime import init_runtime, shutdown_runtime
from nanochat.tokenizer import get_token_bytes

EVALS = ("bpb", "samples", "core")
PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow "
           "will be", "The opposite of hot is", "The planets of the solar system are:", "My favorite color is",
           "If 5*x + 3 = 13, then x is"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="nanochat base-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--eval", type=str, default="bpb,samples", help=f"comma-separated subset of {','.join(EVALS)}")
    p.add_argument("--stage", choices=["base", "mid", "sft", "rl"], default="base", help="checkpoint stage")
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint folder (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a folder written by `nanochat export` (not a checkpoint)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")

    add_weights_arg(p, default="fp32")  # the training result as trained, unless asked
    p.add_argument("--device-batch-size", type=int, default=None,
                   help="sequences per rank per bpb batch (default: 32 on CUDA, 8 on CPU)")
    p.add_argument("--max-seq-len", type=int, default=None, help="bpb sequence length in tokens (default: model's)")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="tokens per split for bpb (default: 20 x 524,288 on CUDA, 65,536 on CPU)")
    p.add_argument("--data-dir", type=str, default=None, help="parquet shards (default: <base dir>/base_data)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per sample prompt")
    p.add_argument("--max-per-task", type=int, default=None, help="CORE: examples per task (default: all)")
    args = p.parse_args(argv)
    args.evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    unknown = [e for e in args.evals if e not in EVALS]
    if unknown or not args.evals:
        p.error(f"--eval takes a comma-separated subset of {', '.join(EVALS)}, got {args.eval!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = parse_args(argv)
    rt = init_runtime(args.device)
    try:
        return evaluate(args, rt)
    finally:
        shutdown_runtime()


def evaluate(args, rt) -> int:
    model, tokenizer, meta = load_model(args.stage, device=rt.device, model_tag=args.model_tag, step=args.step,
                                        model_dir=args.model, weights=args.weights)
    step, tag = meta["step"], meta["model_tag"]
    results: dict = {"stage": args.stage, "model_tag": tag, "step": step, "config": meta["config"],
                     "weights": meta["weights"]}
    status = 0
    print0(f"evaluating {args.stage}/{tag} step {step}: {', '.join(args.evals)}")

    if "bpb" in args.evals:

        on_cuda = rt.device.type == "cuda"  # nanochat's sizes on GPUs; laptop sizes on CPU (like base_train)
        if args.device_batch_size is None:
            args.device_batch_size = 32 if on_cuda else 8
        if args.eval_tokens is None:
            args.eval_tokens = 20 * 524288 if on_cuda else 65536

        seq_len = args.max_seq_len or model.config.sequence_len
        # the tokenizer load_model used: an exported folder's own, else the project's
        token_bytes = get_token_bytes(rt.device, Path(args.model) / "tokenizer.bin" if args.model else None)
        tokens_per_batch = args.device_batch_size * seq_len * rt.world_size
        steps = max(1, args.eval_tokens // tokens_per_batch)
        results["bpb"] = {}
        for split in ("train", "val"):
            loader = DataLoader(tokenizer, args.device_batch_size, seq_len, split, device=rt.device, rank=rt.rank,
                                world_size=rt.world_size, data_dir=args.data_dir)
            try:
                bpb = evaluate_bpb(model, loader, steps, token_bytes)
            finally:
                loader.close()
            results["bpb"][split] = bpb
            print0(f"{split} bpb: {bpb:.4f} ({steps * tokens_per_batch:,} tokens)")

    if "samples" in args.evals and rt.is_master:
        results["samples"] = []
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
            out = tokenizer.decode(list(model.generate(ids, args.max_new_tokens, temperature=0.0)))
            results["samples"].append(prompt + out)
            print0(f"sample: {prompt + out!r}")

    if "core" in args.evals:
        try:
            results["core"] = evaluate_core(model, tokenizer, rt.device, max_per_task=args.max_per_task)
            print0(f"CORE: {json.dumps(results['core'], default=str)[:2000]}")
        except (RuntimeError, OSError) as e:  # e.g. no eval data offline; the other results still count
            message = f"CORE failed: {e}"
            print0(f"error: {message}")
            results["core"] = {"error": message}
            status = 1

    if rt.is_master:
        folder = Path(args.model) if args.model else checkpoint_dir(args.stage, tag)
        out_path = folder / f"base_eval_step_{step:06d}.json"
        with atomic_write(out_path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print0(f"wrote {out_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
