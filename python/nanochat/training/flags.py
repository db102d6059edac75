"""The command line the training stages share: their `main(argv)`, the flag groups more than one stage offers,
and what follows from those flags (the optimizer, the horizon).

One definition per flag keeps the stages' spellings, defaults and help texts from drifting apart; a stage adds its
own flags to the groups these return.
"""

from __future__ import annotations

import argparse
import sys

from nanochat.common import at_least, float_in, print0
from nanochat.runtime import init_runtime, shutdown_runtime


def run_main(train, parse_args, argv: list[str] | None) -> int:
    """`train(args, runtime) -> exit status` under an initialised runtime, with args from argv (sys.argv[1:]).

    The leading "--" that `torchrun ... -m nanochat.X -- ...` passes is dropped; the runtime is always shut down;
    a FloatingPointError (non-finite weights at a save) becomes a message and exit status 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m nanochat.training.base_train -- --depth 4`
        argv = argv[1:]
    args = parse_args(argv)
    rt = init_runtime(args.device, getattr(args, "dtype", None))  # a stage without --dtype: the device's default
    try:
        return train(args, rt)
    except FloatingPointError as e:
        print0(f"error: {e}")
        return 1
    finally:
        shutdown_runtime()


# ---------------------------------------------------------------------------------------------------------------
# Flag groups


def add_source_args(p, sources: list[str]) -> None:
    """--source/--source-tag/--source-step: the checkpoint a finetuning stage starts from (default: sources[0])."""
    p.add_argument("--source", default=sources[0], choices=sources, help="stage of the starting checkpoint")
    p.add_argument("--source-tag", default=None, help="model tag of the starting checkpoint (default: newest)")
    p.add_argument("--source-step", type=int, default=None, help="step of the starting checkpoint (default: last)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="start from a folder written by `nanochat export` or `nanochat import` instead")


def add_optimizer_args(p, seed_help: str, init_lr_frac: float | None = None):
    """The "optimization" group: the MuonAdamW learning rates (nanochat's base values), a finetuning stage's
    multiplier on all of them (--init-lr-frac, when init_lr_frac is given), weight decay and --seed. Returns the
    group for the stage's own schedule flags."""
    g = p.add_argument_group("optimization")
    g.add_argument("--embedding-lr", type=float, default=0.2,
                   help="AdamW lr of the embedding (before width scaling)")
    g.add_argument("--unembedding-lr", type=float, default=0.004,
                   help="AdamW lr of lm_head (before width scaling)")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the block matrices")
    if init_lr_frac is not None:
        g.add_argument("--init-lr-frac", type=float_in(0.0), default=init_lr_frac,
                       help="multiplier on all the lrs above")
    g.add_argument("--weight-decay", type=float_in(0.0), default=0.0, help="decoupled weight decay")
    g.add_argument("--seed", type=int, default=42, help=seed_help)
    return g


def add_checkpoint_args(g) -> None:
    g.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (<= 0: only at the end)")
    g.add_argument("--keep-last", type=at_least(1), default=None, help="keep only the newest K checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of --model-tag")


def add_runtime_args(p, compile_help: str | None = None, dtype: bool = False):
    """The "runtime" group: --device, and --dtype / --compile for the stages that offer them. Returns the group."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    if dtype:
        g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                       help="matmul dtype on CPU: auto = bf16 autocast when the CPU has native bf16 dot products "
                            "(avx512_bf16, amx_bf16), else fp32; CUDA always runs bf16 autocast")
    if compile_help is not None:
        g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help=compile_help)
    return g


def add_horizon_args(p, what: str) -> None:
    """--num-epochs and --num-iterations: how long a finetuning stage runs (see iterations_for)."""
    p.add_argument("--num-epochs", type=float_in(0.0), default=1.0, help=f"passes over the {what} (sets the horizon)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (overrides --num-epochs)")


# ---------------------------------------------------------------------------------------------------------------
# What follows from the flags


def stage_optimizer(model, args):
    """MuonAdamW at the --*-lr flags x --init-lr-frac (the finetuning stages)."""
    frac = args.init_lr_frac
    return model.setup_optimizer(unembedding_lr=args.unembedding_lr * frac, embedding_lr=args.embedding_lr * frac,
                                 matrix_lr=args.matrix_lr * frac, weight_decay=args.weight_decay)


def iterations_for(args, num_items: int, items_per_step: int) -> int:
    """--num-iterations when given (> 0), else the steps of --num-epochs passes over num_items (at least 1)."""
    if args.num_iterations > 0:
        return args.num_iterations
    return max(1, int(args.num_epochs * num_items // items_per_step))
