"""Reinforcement learning on GSM8K (or synthetic spelling or arithmetic: --task): `nanochat chat-rl`,
`python -m nanochat.training.chat_rl`, or under torchrun.

A simplified GRPO (on-policy, no KL term, no ratio clipping, as in nanochat), from an SFT checkpoint:

- each step takes --examples-per-step problems (split over ranks) in a seeded shuffled order and samples
  --num-samples answers per problem with the engine (KV cache, python tool; temperature, top-k)
- reward: 1 when the number after "####" (arithmetic: the last number of the reply's text) equals the reference
  numerically, else 0 (task.reward)
- advantage: reward minus the mean reward of the problem's group (no std division)
- loss: -sum(advantage x log p(token)) over the SAMPLED tokens only (not the prompt, not tool outputs the engine
  forced in), divided by the number of sampled tokens of the whole step over all ranks (token-level normalisation)
- lr: the base learning rates x --init-lr-frac (0.05), decayed linearly to 0
- evaluation: pass@1..k on held-out problems (GSM8K test) at step 0, every --eval-every steps and at the end,
  k samples per problem at the training temperature; train_log.jsonl records mean reward per step
- checkpoints under checkpoints/rl/<tag>; the problem order is a function of (seed, step), so `--resume` needs
  only the step; metrics.json holds the first and last pass@k for the report
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanochat.common import at_least, float_in, print0, rank_and_world, sum_over_ranks
from nanochat.inference.engine import Engine
from nanochat.model.checkpoint import checkpoint_dir
from nanochat.model.resume import save_stage_checkpoint
from nanochat.runtime import Runtime
from nanochat.tasks import GSM8K, Arithmetic, SpellingBee
from nanochat.training import flags, loop
from nanochat.training.log import Evaluated, TrainLog, finish_stage

# ---------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanochat chat-rl", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flags.add_source_args(p, ["sft", "mid", "rl"])
    p.add_argument("--model-tag", default=None, help="output tag under checkpoints/rl (default: d<depth>)")
    p.add_argument("--task", default="gsm8k", choices=["gsm8k", "spelling", "arithmetic"], help="rewarded task")
    p.add_argument("--train-limit", type=int, default=None, help="max training problems")
    p.add_argument("--examples-per-step", type=at_least(1), default=16,
                   help="problems per optimizer step over all ranks")
    p.add_argument("--num-samples", type=at_least(1), default=16, help="answers sampled per problem (the group)")
    p.add_argument("--device-batch-size", type=at_least(1), default=8, help="sequences per forward/backward")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256, help="tokens per sampled answer")
    p.add_argument("--temperature", type=float_in(0.0), default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=at_least(0), default=50, help="sampling top-k (0: off)")
    flags.add_horizon_args(p, "problems")
    flags.add_optimizer_args(p, seed_help="seed of the problem order and the sampling", init_lr_frac=0.05)
    g = p.add_argument_group("evaluation, checkpoints")
    g.add_argument("--eval-every", type=int, default=60, help="steps between pass@k evaluations (<= 0: ends only)")
    g.add_argument("--eval-examples", type=int, default=400, help="held-out problems per evaluation")
    g.add_argument("--eval-samples", type=at_least(1), default=4, help="k of pass@k")
    flags.add_checkpoint_args(g)
    flags.add_runtime_args(p)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Rollouts and the policy-gradient batch


def group_advantages(rewards: list[float]) -> list[float]:
    """Reward minus the group mean: zero for a group whose samples all score the same (no signal)."""
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def policy_rows(prompt: list[int], samples: list[tuple[list[int], list[int]]], advantages: list[float], pad: int):
    """-> inputs (N, T), targets (N, T) and advantages (N,) for one group.

    Targets are the next token only where that token was SAMPLED (mask 1); prompt positions, tool outputs the
    engine forced in (mask 0) and padding get -1, so they carry no gradient.
    """
    seqs, tgts = [], []
    for ids, mask in samples:
        full = prompt + ids
        learn = [0] * len(prompt) + list(mask)
        seqs.append(full[:-1])
        tgts.append([t if m else -1 for t, m in zip(full[1:], learn[1:])])
    return (*loop.right_padded(seqs, tgts, pad), torch.tensor(advantages, dtype=torch.float32))


def pass_at_k(model, tokenizer, task, indices: list[int], k: int, max_new_tokens: int, temperature: float,
              top_k: int | None, seed: int, device, batch_size: int = 16) -> dict[str, float]:
    """{"pass@1": ..., ..., "pass@k": ...}: fraction of problems solved by any of the first j samples."""
    rank, world = rank_and_world()
    mine = indices[rank::world]
    convs = [task[i] for i in mine]
    prompts = [tokenizer.render_for_completion(c) for c in convs]
    engine = Engine(model, tokenizer, prefix_cache_tokens=0)
    outs = engine.generate(prompts, k, max_new_tokens, temperature, top_k, batch_size=max(batch_size, k),
                           seeds=[seed + 7919 * i for i in mine])
    solved = torch.zeros(k, dtype=torch.float64, device=device)
    for conv, samples in zip(convs, outs):
        ok = [bool(task.reward(conv, tokenizer.decode(ids)) > 0) for ids, _ in samples]
        for j in range(k):
            solved[j] += any(ok[:j + 1])
    total = torch.tensor(float(len(convs)), dtype=torch.float64, device=device)
    sum_over_ranks(solved, total)
    return {f"pass@{j + 1}": float(solved[j] / total.clamp(min=1)) for j in range(k)}


# ---------------------------------------------------------------------------------------------------------------
# Training


def build_tasks(name: str, train_limit: int | None):

    if name == "gsm8k":
        train, test = GSM8K("train"), GSM8K("test")
    elif name == "arithmetic":
        train, test = Arithmetic(size=train_limit or 20000, split="train"), Arithmetic(size=1000, split="test")
    else:
        train, test = SpellingBee(size=train_limit or 4000, split="train"), SpellingBee(size=1000, split="test")
    if train_limit is not None:
        train = train[:train_limit]
    return train, test


@dataclass
class RLState(loop.LoopState):
    """What the loop carries from step to step; checkpoints save it, so a resumed run continues its numbers."""
    eval: Evaluated = field(default_factory=lambda: Evaluated("eval"))  # pass@1..k on held-out problems


@dataclass
class RLRun:
    """What the loop runs on, fixed for the run (rewards_seen grows: this process's mean reward per step)."""
    args: argparse.Namespace
    rt: Runtime
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: object
    train_task: object
    order: list[int]  # the shuffled problem order; step s takes positions s x examples_per_step onwards
    log: TrainLog
    ckpt_dir: Path
    num_iterations: int
    source: dict
    rewards_seen: list[float] = field(default_factory=list)


def rollouts(run: RLRun, step: int) -> tuple[list, list[float]]:
    """This rank's problems of the step, all sampled in one batched engine run -> (one policy_rows group per
    problem, every sample's reward)."""
    args, tokenizer, rank, world = run.args, run.tokenizer, run.rt.rank, run.rt.world_size
    positions = range(step * args.examples_per_step + rank, (step + 1) * args.examples_per_step, world)
    convs = [run.train_task[run.order[p % len(run.order)]] for p in positions]
    prompts = [tokenizer.render_for_completion(c) for c in convs]
    # a new engine per step: its KV cache is freed before the backward passes need the memory
    engine = Engine(run.model, tokenizer, prefix_cache_tokens=0)
    outs = engine.generate(prompts, args.num_samples, args.max_new_tokens, args.temperature, args.top_k or None,
                           batch_size=2 * args.num_samples,
                           seeds=[args.seed * 1_000_003 + step * 10_007 + p for p in positions])
    del engine
    groups, step_rewards = [], []
    for conv, prompt, samples in zip(convs, prompts, outs):
        rewards = [float(run.train_task.reward(conv, tokenizer.decode(ids))) for ids, _ in samples]
        step_rewards += rewards
        groups.append(policy_rows(prompt, samples, group_advantages(rewards), tokenizer.get_bos_token_id()))
    return groups, step_rewards


def policy_gradient(run: RLRun, groups: list, denom: torch.Tensor) -> float:
    """Backward through -sum(advantage x log p) over the sampled tokens / denom, in device batches -> the
    objective's value."""
    B, device = run.args.device_batch_size, run.rt.device
    pg_objective = 0.0
    for inputs, targets, adv in groups:
        for lo in range(0, inputs.size(0), B):
            x, y, a = inputs[lo:lo + B].to(device), targets[lo:lo + B].to(device), adv[lo:lo + B].to(device)
            logp = -run.model(x, y, loss_reduction="none").view(x.size(0), -1)  # (b, T), 0 where y == -1
            objective = (logp * a[:, None] * (y >= 0)).sum() / denom
            (-objective).backward()
            pg_objective += float(objective.detach())
    return pg_objective


def train_step(run: RLRun, step: int) -> bool:
    """Rollouts, then one token-level normalised policy-gradient step (lr decayed linearly to 0); False when the
    objective was not finite (nothing updated)."""
    device, world = run.rt.device, run.rt.world_size
    t0 = time.perf_counter()
    groups, step_rewards = rollouts(run, step)
    num_tokens = torch.tensor(float(sum(int((t >= 0).sum()) for _, t, _ in groups)), device=device)
    stats = torch.tensor([sum(step_rewards), len(step_rewards)], dtype=torch.float64, device=device)
    sum_over_ranks(num_tokens, stats)
    pg_objective = policy_gradient(run, groups, num_tokens.clamp(min=1) / world)  # the optimizer averages ranks
    if loop.stopped_on_non_finite(pg_objective, "pg_objective", step, run.ckpt_dir, run.log):
        return False
    lrm = 1.0 - step / run.num_iterations
    loop.apply_update(run.optimizer, lrm)
    dt = time.perf_counter() - t0
    mean_reward = float(stats[0] / stats[1].clamp(min=1))
    run.rewards_seen.append(mean_reward)
    print0(f"step {step + 1:05d}/{run.num_iterations:05d} | mean reward {mean_reward:.4f} | "
           f"sampled tokens {int(num_tokens)} | lrm {lrm:.3f} | dt {dt:.1f}s")
    run.log({"step": step, "reward": mean_reward, "sampled_tokens": int(num_tokens), "lr": lrm,
             "pg_objective": pg_objective, "dt": dt})
    return True


def train(args: argparse.Namespace, rt: Runtime) -> int:
    model, tokenizer, source_meta = loop.load_source(args, rt)
    model_tag = args.model_tag or f"d{model.config.n_layer}"
    ckpt_dir = checkpoint_dir("rl", model_tag)
    train_task, test_task = build_tasks(args.task, args.train_limit)
    if args.examples_per_step % rt.world_size:
        raise ValueError(f"--examples-per-step {args.examples_per_step} must be a multiple of the {rt.world_size} "
                         f"ranks")
    num_iterations = flags.iterations_for(args, len(train_task), args.examples_per_step)
    order = list(range(len(train_task)))
    random.Random(args.seed).shuffle(order)
    eval_indices = list(range(min(args.eval_examples, len(test_task))))
    print0(f"rl: {len(train_task):,} {args.task} problems; {num_iterations} steps of {args.examples_per_step} "
           f"problems x {args.num_samples} samples; pass@{args.eval_samples} on {len(eval_indices)} held-out problems")

    optimizer = flags.stage_optimizer(model, args)
    # no data state: the problems and the samples of a step are seeded by the step
    resumed = loop.resume_or_start(args, ckpt_dir, model, optimizer, rt, num_iterations)
    state = RLState.restored(resumed.loop_state)
    run = RLRun(args, rt, model, optimizer, tokenizer, train_task, order, TrainLog(ckpt_dir, rt.is_master), ckpt_dir,
                num_iterations, loop.source_record(args, source_meta))

    t_start = time.time()
    try:
        for step in range(resumed.step, num_iterations + 1):  # the last pass only looks at the final weights
            last = step == num_iterations
            if eval_indices and loop.eval_due(step, resumed.step, last, args.eval_every):
                scores = pass_at_k(model, tokenizer, test_task, eval_indices, args.eval_samples, args.max_new_tokens,
                                   args.temperature, args.top_k or None, args.seed + 1, rt.device)
                state.eval.record(scores, step, run.log)
            if loop.save_due(step, resumed.step, last, args.save_every):
                save_stage_checkpoint(ckpt_dir, step, model, optimizer, rt, args, num_iterations=num_iterations,
                                      metrics=state.eval.metrics(), loop_state=state.saved(), source=run.source)
            if not last and not train_step(run, step):
                return 1
    finally:
        run.log.close()
    return finish_stage(ckpt_dir, {"stage": "rl", "model_tag": model_tag, "task": args.task, "steps": num_iterations,
                                   **state.eval.metrics(), "mean_rewards": run.rewards_seen}, rt.is_master, t_start,
                        state.eval)


def main(argv: list[str] | None = None) -> int:
    return flags.run_main(train, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
