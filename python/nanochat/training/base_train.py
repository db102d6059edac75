"""Pretraining: `nanochat base-train`, `python -m nanochat.training.base_train`, or
`torchrun --nproc_per_node=K -m nanochat.training.base_train -- --depth D ...` (NCCL + bf16 on GPUs, gloo + fp32 on CPU).

Contract: a run is a function of its flags and its data, so `--resume` continues the loss curve of an uninterrupted
run (on CPU bit for bit): a checkpoint taken before step s holds the weights, each rank's optimizer shard, RNG state
and data-loader position, and the loop's numbers (BaseState). A NaN or inf loss stops the run before the optimizer
step with a non-zero exit, so the newest checkpoint is always the last good one.

Why the flags look as they do:
- --depth is the one dial: width (64 x depth), heads (dim 128), the AdamW lr scaling ((width/768)^-0.5) and, with
  the default 20 tokens per parameter, the horizon follow from it; --num-iterations or --target-flops override
- gradient accumulation is derived (total batch / (device batch x sequence length x ranks), which must divide), so
  the total batch, an optimizer hyperparameter, does not change with the number of devices
- batch and eval sizes default to nanochat's on CUDA and to what fits a laptop on CPU (no accumulation)
- the CPU speed choices (--dtype, --compile, --threads) are automatic defaults decided in nanochat.runtime and logged
  with their reasons at start-up; wandb only with --wandb (never required)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.common import at_least, float_in, print0
from nanochat.data.loader import DataLoader
from nanochat.model.bpb import evaluate_bpb
from nanochat.model.checkpoint import checkpoint_dir
from nanochat.model.gpt import GPT, GPTConfig, nanochat_ve_layers
from nanochat.model.resume import rng_state, save_stage_checkpoint
from nanochat.model.schedules import lr_multiplier, muon_momentum
from nanochat.runtime import Runtime, choose_compile, configure_threads
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training.flags import add_checkpoint_args, add_optimizer_args, add_runtime_args, run_main
from nanochat.training.log import TrainLog
from nanochat.training.loop import (
    LoopState,
    accumulate_gradients,
    apply_update,
    resume_or_start,
    save_due,
    stopped_on_non_finite,
)

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then",
                  "The opposite of hot is", "The planets of the solar system are:"]

# Dense bf16 tensor-core peak FLOP/s by device-name substring; the first match wins, so specific names go first.
PEAK_BF16_FLOPS = [
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
    ("RTX 4090", 165e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when unknown (CPU, unlisted GPU): MFU is then reported as n/a."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


# ---------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanochat base-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depth", type=at_least(1), default=20, help="transformer layers; width = 64 x depth")
    p.add_argument("--n-kv-head", type=at_least(1), default=None,
                   help="K/V heads for GQA (default: as many as query heads)")
    p.add_argument("--max-seq-len", type=at_least(1), default=2048, help="context length in tokens")
    p.add_argument("--device-batch-size", type=at_least(1), default=None,
                   help="sequences per rank per forward/backward (default: 32 on CUDA, 4 on CPU)")
    p.add_argument("--total-batch-size", type=int, default=None,
                   help="tokens per optimizer step over all ranks; -1 = one micro-batch per rank, no accumulation "
                        "(default: 524288 on CUDA, -1 on CPU)")
    g = p.add_argument_group("architecture switches (GPTConfig). The defaults are nanochat's January 2026 switches "
                             "(value embeddings, lambdas, SSSL windows of a quarter of the context), adopted on a "
                             "measured gain at equal wall time (bench/RESULTS.md, issue 20); the model before them: "
                             "--value-embeds none --no-lambdas --window-pattern ''. nanochat's July 2026 model: "
                             "--ve-gate-channels 12 --ve-gate-scale 3 --smear --backout --qk-scale 1.2 "
                             "--rotary-base 100000 --short-window 512 --pad-vocab-to 64")
    g.add_argument("--value-embeds", choices=["none", "alternating"], default="alternating",
                   help="value embeddings on every other layer, the last included (nanochat's rule)")
    g.add_argument("--ve-gate-channels", type=at_least(1), default=32, help="input channels of the value gates")
    g.add_argument("--ve-gate-scale", type=float, default=2.0, help="value gate = scale x sigmoid(...)")
    g.add_argument("--lambdas", action=argparse.BooleanOptionalAction, default=True,
                   help="learned resid/x0 lambdas before every block")
    g.add_argument("--smear", action="store_true", help="smear gate: mix the previous token's embedding in")
    g.add_argument("--backout", action="store_true", help="subtract a learned share of the mid-depth stream")
    g.add_argument("--qk-scale", type=float, default=1.0, help="multiply q and k by this after QK-norm")
    g.add_argument("--rotary-base", type=float, default=10_000.0)
    g.add_argument("--window-pattern", default="SSSL", help="S/L per layer, tiled, last layer L ('' = all full)")
    g.add_argument("--short-window", type=at_least(0), default=None,
                   help="keys an S layer sees before the query (default: a quarter of --max-seq-len)")
    g.add_argument("--softcap", type=float, default=15.0, help="logit soft-cap")
    g.add_argument("--pad-vocab-to", type=at_least(1), default=1, help="pad wte/lm_head rows to this multiple")
    g = p.add_argument_group("horizon (first one set wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps")
    g.add_argument("--target-flops", type=float, default=-1.0, help="total training FLOPs")
    g.add_argument("--target-param-data-ratio", type=float, default=20.0, help="training tokens per parameter")
    g = add_optimizer_args(p, seed_help="seed of the weight initialisation")
    g.add_argument("--ns-coeffs", choices=["quintic", "polar_express"], default="quintic",
                   help="Newton-Schulz coefficients of Muon")
    g.add_argument("--warmup-ratio", type=float_in(0.0, 1.0), default=0.0, help="fraction of steps of linear lr warmup")
    g.add_argument("--warmdown-ratio", type=float_in(0.0, 1.0), default=0.2,
                   help="fraction of steps of linear lr warmdown")
    g.add_argument("--final-lr-frac", type=float_in(0.0, 1.0), default=0.0,
                   help="lr multiplier at the end of the warmdown")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=int, default=250, help="steps between validation bpb (<= 0: only at the end)")
    g.add_argument("--eval-tokens", type=int, default=None,
                   help="validation tokens per evaluation, 0: none (default: 20 x 524288 on CUDA, 65536 on CPU)")
    g.add_argument("--sample-every", type=int, default=2000, help="steps between sample generations (<= 0: never)")
    add_checkpoint_args(g)
    g.add_argument("--model-tag", type=str, default=None, help="checkpoint folder name (default: d<depth>)")
    g.add_argument("--wandb", type=str, default=None, metavar="PROJECT", help="log to this wandb project (off)")
    g = add_runtime_args(p, dtype=True,
                         compile_help="torch.compile the model (default: on for CUDA; on CPU for runs of >= 200 steps)")
    g.add_argument("--threads", type=at_least(1), default=None,
                   help="intra-op CPU threads (default: $OMP_NUM_THREADS, else cores / processes on this node)")
    g.add_argument("--data-dir", type=str, default=None, help="parquet shards (default: <base dir>/base_data)")
    g.add_argument("--loader-threads", type=at_least(1), default=2, help="tokenizer threads of the data loader")
    return p.parse_args(argv)


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """A copy of args with the device-dependent defaults (None above) filled in: on CUDA nanochat's d20 speedrun
    sizes, on CPU what fits a laptop's memory (and no gradient accumulation)."""
    args = argparse.Namespace(**vars(args))
    on_cuda = device.type == "cuda"
    if args.device_batch_size is None:
        args.device_batch_size = 32 if on_cuda else 4
    if args.total_batch_size is None:
        args.total_batch_size = 524288 if on_cuda else -1
    if args.eval_tokens is None:
        args.eval_tokens = 20 * 524288 if on_cuda else 65536
    return args


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def horizon(args, num_params: int, flops_per_token: float, total_batch: int) -> tuple[int, str]:
    """Optimizer steps of the run and where that number came from."""
    if args.num_iterations > 0:
        return args.num_iterations, "--num-iterations"
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (flops_per_token * total_batch))), "--target-flops"
    if args.target_param_data_ratio > 0:
        tokens = args.target_param_data_ratio * num_params
        return max(1, round(tokens / total_batch)), f"{args.target_param_data_ratio:g} tokens per parameter"
    raise ValueError("set one of --num-iterations, --target-flops or --target-param-data-ratio to a positive value")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def sample_texts(model: GPT, tokenizer, max_tokens: int = 16) -> list[str]:
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
        gen = list(model.generate(ids, max_tokens=max_tokens, temperature=0.0))
        out.append(prompt + tokenizer.decode(gen))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class BaseState(LoopState):
    """What the loop carries from step to step; checkpoints save it, so a resumed run continues its numbers."""
    smooth_loss: float = 0.0  # EMA of the training loss (beta 0.9, bias-corrected when printed)
    training_time: float = 0.0  # seconds of timed steps (see train_step)
    min_val_bpb: float | None = None
    val_bpb: float | None = None


@dataclass(frozen=True)
class BatchPlan:
    """How a step's tokens split, and how many steps the run has."""
    world_tokens: int  # one micro-batch of every rank
    total_batch: int  # tokens per optimizer step over all ranks
    grad_accum: int
    num_iterations: int
    horizon_source: str  # which flag set num_iterations
    flops_per_token: float


@dataclass
class BaseRun:
    """What the loop runs on, fixed for the run (timed_steps grows: this process's steps in training_time)."""
    args: argparse.Namespace
    rt: Runtime
    model: GPT
    train_model: torch.nn.Module  # the model, compiled when choose_compile says so
    optimizer: torch.optim.Optimizer
    tokenizer: object
    token_bytes: torch.Tensor  # UTF-8 bytes per token id: turns the loss into bits per byte
    loader: DataLoader
    log: TrainLog
    ckpt_dir: Path
    plan: BatchPlan
    start_step: int
    peak_flops: float | None  # of one device (None: MFU is n/a)
    timed_steps: int = 0


def build_model(args, vocab_size: int, rt: Runtime) -> GPT:
    """The model of --depth (width, heads) with the architecture switches, identical on every rank."""
    config = GPTConfig.from_depth(args.depth, vocab_size=vocab_size, sequence_len=args.max_seq_len,
                                  n_kv_head=args.n_kv_head)
    config = dataclasses.replace(
        config, ve_layers=nanochat_ve_layers(args.depth) if args.value_embeds == "alternating" else [],
        ve_gate_channels=args.ve_gate_channels, ve_gate_scale=args.ve_gate_scale, lambdas=args.lambdas,
        smear=args.smear, backout=args.backout, qk_scale=args.qk_scale, rotary_base=args.rotary_base,
        window_pattern=args.window_pattern, logit_softcap=args.softcap,
        short_window=args.short_window if args.short_window is not None
        else args.max_seq_len // 4 if "S" in args.window_pattern.upper() else 0,
        pad_vocab_to=args.pad_vocab_to)
    with torch.device(rt.device):
        model = GPT(config)
    if rt.world_size > 1:  # identical start on every rank (the seed already makes it so; this makes it certain)
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    return model


def plan_batches(args, model: GPT, world_size: int) -> BatchPlan:
    """Accumulation fills the total batch; the horizon follows from the model's size. Printed."""
    tokens_per_micro = args.device_batch_size * args.max_seq_len
    world_tokens = tokens_per_micro * world_size
    total_batch = args.total_batch_size if args.total_batch_size > 0 else world_tokens
    if total_batch % world_tokens:
        raise ValueError(f"--total-batch-size {total_batch} must be a multiple of device batch x sequence length x "
                         f"ranks = {args.device_batch_size} x {args.max_seq_len} x {world_size} = {world_tokens}")
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    num_iterations, horizon_source = horizon(args, num_params, flops_per_token, total_batch)
    plan = BatchPlan(world_tokens, total_batch, total_batch // world_tokens, num_iterations,
                     horizon_source, flops_per_token)
    config = model.config
    print0(f"model: depth {config.n_layer}, width {config.n_embd}, {config.n_head} heads ({config.n_kv_head} kv) "
           f"of dim {config.head_dim}, vocab {config.vocab_size:,}, {num_params:,} parameters, "
           f"{flops_per_token:.3g} FLOPs/token")
    print0(f"batch: {total_batch:,} tokens/step = {args.device_batch_size} x {args.max_seq_len} x {world_size} "
           f"rank(s) x {plan.grad_accum} accumulation step(s); {num_iterations:,} steps ({horizon_source}) = "
           f"{num_iterations * total_batch:,} tokens, {num_iterations * total_batch * flops_per_token:.3g} FLOPs")
    return plan


def open_wandb(args, ckpt_dir: Path, master: bool):
    """The wandb run of --wandb PROJECT (master rank only), else None."""
    if not (args.wandb and master):
        return None
    try:
        import wandb  # optional: only with --wandb
    except ImportError as e:
        raise SystemExit("--wandb needs the wandb package: pip install wandb") from e
    return wandb.init(project=args.wandb, name=ckpt_dir.name, config=vars(args), resume="allow")


def evaluate(run: BaseRun, state: BaseState, step: int) -> None:
    """Validation bpb through the forward that trains (compiled when training is), on a fresh val loader."""
    args, rt = run.args, run.rt
    val_loader = DataLoader(run.tokenizer, args.device_batch_size, args.max_seq_len, "val", device=rt.device,
                            rank=rt.rank, world_size=rt.world_size, data_dir=args.data_dir,
                            threads=args.loader_threads)
    run.model.eval()
    try:
        with rt.autocast():
            bpb = evaluate_bpb(run.train_model, val_loader, max(1, args.eval_tokens // run.plan.world_tokens),
                               run.token_bytes)
    finally:
        val_loader.close()
        run.model.train()
    state.val_bpb = bpb
    state.min_val_bpb = bpb if state.min_val_bpb is None else min(state.min_val_bpb, bpb)
    print0(f"step {step:05d} | validation bpb {bpb:.4f}")
    run.log({"step": step, "val_bpb": bpb})


def print_samples(run: BaseRun) -> None:
    """Greedy completions of fixed prompts: a quick human check that the model learns."""
    run.model.eval()
    for text in sample_texts(run.model, run.tokenizer):
        print0(f"  sample: {text!r}")
    run.model.train()


def look_at_weights(run: BaseRun, state: BaseState, step: int) -> None:
    """What a pass does before it trains: evaluate, sample (master only) and save, each when due."""
    args, last = run.args, step == run.plan.num_iterations
    if args.eval_tokens > 0 and (last or (args.eval_every > 0 and step % args.eval_every == 0)):
        evaluate(run, state, step)
    if run.rt.is_master and args.sample_every > 0 and (last or (step > 0 and step % args.sample_every == 0)):
        print_samples(run)
    if save_due(step, run.start_step, last, args.save_every):  # collective; not the untrained or loaded start
        save_stage_checkpoint(run.ckpt_dir, step, run.model, run.optimizer, run.rt, args,
                              num_iterations=run.plan.num_iterations,
                              metrics={"val_bpb": state.val_bpb, "min_val_bpb": state.min_val_bpb,
                                       "smooth_loss": state.smooth_loss},
                              loop_state=state.saved(), loader=run.loader, rng=rng_state(run.rt.device))


def train_step(run: BaseRun, state: BaseState, step: int) -> bool:
    """One optimizer step at this step's lr (warmup / constant / warmdown) and Muon momentum (0.85 -> 0.95), timed
    (synchronised on CUDA: dt is GPU time) and logged; False when the loss was not finite (nothing updated)."""
    args, rt, plan = run.args, run.rt, run.plan
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    t0 = time.perf_counter()
    loss_value = accumulate_gradients(run.train_model, run.loader, plan.grad_accum, rt.device, rt.world_size,
                                      rt.autocast)
    if stopped_on_non_finite(loss_value, "loss", step, run.ckpt_dir, run.log):
        return False
    lrm = lr_multiplier(step, plan.num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    apply_update(run.optimizer, lrm, muon_momentum(step))
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    dt = time.perf_counter() - t0
    report_step(run, state, step, loss_value, lrm, dt)
    return True


def report_step(run: BaseRun, state: BaseState, step: int, loss_value: float, lrm: float, dt: float) -> None:
    """Smoothed loss, throughput, MFU and ETA, printed and logged. The first 10 steps of a process (compilation,
    warm-up) are left out of the timing."""
    plan = run.plan
    beta = 0.9
    state.smooth_loss = beta * state.smooth_loss + (1 - beta) * loss_value
    smooth = state.smooth_loss / (1 - beta ** (step + 1))
    if step - run.start_step >= 10:
        state.training_time += dt
        run.timed_steps += 1
    tok_per_s = plan.total_batch / dt
    peak = run.peak_flops
    mfu = plan.flops_per_token * tok_per_s / (peak * run.rt.world_size) if peak else None
    per_step = state.training_time / run.timed_steps if run.timed_steps else dt
    eta = per_step * (plan.num_iterations - step - 1)
    done = step + 1
    print0(f"step {done:05d}/{plan.num_iterations:05d} ({100 * done / plan.num_iterations:5.1f}%) | loss "
           f"{loss_value:.4f} (smooth {smooth:.4f}) | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f} | "
           f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | eta {format_duration(eta)}")
    run.log({"step": step, "loss": loss_value, "lr": lrm, "tok_per_s": tok_per_s, "mfu": mfu, "dt": dt})


def train(args: argparse.Namespace, rt: Runtime) -> int:
    args = resolve_defaults(args, rt.device)
    threads = configure_threads(args.threads, rt.device)
    torch.manual_seed(args.seed)
    tokenizer = get_tokenizer()
    model = build_model(args, tokenizer.vocab_size, rt)
    plan = plan_batches(args, model, rt.world_size)

    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                      matrix_lr=args.matrix_lr, weight_decay=args.weight_decay,
                                      ns_coeffs=args.ns_coeffs)
    ckpt_dir = checkpoint_dir("base", args.model_tag or f"d{args.depth}")
    resumed = resume_or_start(args, ckpt_dir, model, optimizer, rt, plan.num_iterations)
    state = BaseState.restored(resumed.loop_state)
    loader = DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, "train", device=rt.device, rank=rt.rank,
                        world_size=rt.world_size, data_dir=args.data_dir, state=resumed.data_state,
                        threads=args.loader_threads)
    # by the whole run's length, so a resumed run makes the same choice (and continues the same loss curve)
    use_compile, compile_reason = choose_compile(args.compile, rt.device, plan.num_iterations)
    print0(f"runtime: {rt.device.type}, dtype {str(rt.dtype).removeprefix('torch.')} ({rt.dtype_reason}); "
           f"compile {'on' if use_compile else 'off'} ({compile_reason}); threads {threads}")
    log = TrainLog(ckpt_dir, rt.is_master, open_wandb(args, ckpt_dir, rt.is_master))
    run = BaseRun(args, rt, model, torch.compile(model, dynamic=False) if use_compile else model, optimizer,
                  tokenizer, get_token_bytes(rt.device), loader, log, ckpt_dir, plan, resumed.step,
                  peak_flops(rt.device))

    model.train()
    try:
        for step in range(resumed.step, plan.num_iterations + 1):  # the last pass only looks at the final weights
            look_at_weights(run, state, step)
            if step < plan.num_iterations and not train_step(run, state, step):
                return 1
    finally:
        loader.close()
        log.close()
    print0(f"done: {plan.num_iterations} steps, validation bpb {state.val_bpb}, min {state.min_val_bpb}; "
           f"checkpoints in {ckpt_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(train, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
