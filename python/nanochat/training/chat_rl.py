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

import torch

from nanochat.common import at_least, float_in, print0, rank_and_world, sum_over_ranks
from nanochat.inference.engine import Engine
from nanochat.model.checkpoint import checkpoint_dir
from nanochat.tasks import GSM8K, Arithmetic, SpellingBee
from nanochat.training.plumbing import (
    FRESH_START,
    TrainLog,
    add_checkpoint_args,
    add_horizon_args,
    add_optimizer_args,
    add_runtime_args,
    add_source_args,
    apply_update,
    eval_due,
    finish_stage,
    iterations_for,
    load_source,
    record_eval,
    resume_stage,
    right_padded,
    run_main,
    save_due,
    save_stage_checkpoint,
    stage_optimizer,
    stopped_on_non_finite,
)

# ---------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanochat chat-rl", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_source_args(p, ["sft", "mid", "rl"])
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
    add_horizon_args(p, "problems")
    add_optimizer_args(p, seed_help="seed of the problem order and the sampling", init_lr_frac=0.05)
    g = p.add_argument_group("evaluation, checkpoints")
    g.add_argument("--eval-every", type=int, default=60, help="steps between pass@k evaluations (<= 0: ends only)")
    g.add_argument("--eval-examples", type=int, default=400, help="held-out problems per evaluation")
    g.add_argument("--eval-samples", type=at_least(1), default=4, help="k of pass@k")
    add_checkpoint_args(g)
    add_runtime_args(p)
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
    return (*right_padded(seqs, tgts, pad), torch.tensor(advantages, dtype=torch.float32))


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


def train(args: argparse.Namespace, rt) -> int:
    device, rank, world, master = rt.device, rt.rank, rt.world_size, rt.is_master
    model, tokenizer, source_meta = load_source(args, rt)
    config = model.config
    model_tag = args.model_tag or f"d{config.n_layer}"
    ckpt_dir = checkpoint_dir("rl", model_tag)
    train_task, test_task = build_tasks(args.task, args.train_limit)
    if args.examples_per_step % world:
        raise ValueError(f"--examples-per-step {args.examples_per_step} must be a multiple of the {world} ranks")
    num_iterations = iterations_for(args, len(train_task), args.examples_per_step)
    order = list(range(len(train_task)))
    random.Random(args.seed).shuffle(order)
    eval_indices = list(range(min(args.eval_examples, len(test_task))))
    top_k = args.top_k or None
    pad = tokenizer.get_bos_token_id()
    print0(f"rl: {len(train_task):,} {args.task} problems; {num_iterations} steps of {args.examples_per_step} "
           f"problems x {args.num_samples} samples; pass@{args.eval_samples} on {len(eval_indices)} held-out problems")

    # -- optimizer, then (with --resume) the newest checkpoint into both -------------------------------------------
    optimizer = stage_optimizer(model, args)
    resumed = resume_stage(ckpt_dir, model, optimizer, rt, num_iterations) if args.resume else FRESH_START
    start_step = resumed.step  # no data state: the problems and the samples of a step are seeded by the step
    loop = {"eval": None, "initial_eval": None, **resumed.loop_state}
    log = TrainLog(ckpt_dir, master)

    # -- the loop: look at the weights of `step` (evaluate, save), then train on one batch; the last pass only looks
    step, t_start, rewards_seen = start_step, time.time(), []
    try:
        while True:
            last = step == num_iterations
            if eval_indices and eval_due(step, start_step, last, args.eval_every):
                scores = pass_at_k(model, tokenizer, test_task, eval_indices, args.eval_samples, args.max_new_tokens,
                                   args.temperature, top_k, args.seed + 1, device)
                record_eval(loop, "eval", scores, step, log)
            if save_due(step, start_step, last, args.save_every):
                save_stage_checkpoint(ckpt_dir, step, model, optimizer, rt, args, num_iterations=num_iterations,
                                      metrics={k: loop[k] for k in ("eval", "initial_eval")},
                                      loop_state=loop, source_meta=source_meta)
            if last:
                break

            t0 = time.perf_counter()
            # -- rollouts: this rank's problems of the step, all sampled in one batched engine run ---------------
            positions = range(step * args.examples_per_step + rank, (step + 1) * args.examples_per_step, world)
            problems = [order[p % len(order)] for p in positions]
            convs = [train_task[i] for i in problems]
            prompts = [tokenizer.render_for_completion(c) for c in convs]
            # a new engine per step: its KV cache is freed before the backward passes need the memory
            engine = Engine(model, tokenizer, prefix_cache_tokens=0)
            outs = engine.generate(prompts, args.num_samples, args.max_new_tokens, args.temperature, top_k,
                                   batch_size=2 * args.num_samples,
                                   seeds=[args.seed * 1_000_003 + step * 10_007 + p for p in positions])
            del engine
            groups, step_rewards = [], []
            for conv, prompt, samples in zip(convs, prompts, outs):
                rewards = [float(train_task.reward(conv, tokenizer.decode(ids))) for ids, _ in samples]
                step_rewards += rewards
                groups.append(policy_rows(prompt, samples, group_advantages(rewards), pad))
            # -- token-level normalised policy gradient over the sampled tokens --------------------------------
            num_tokens = torch.tensor(float(sum(int((t >= 0).sum()) for _, t, _ in groups)), device=device)
            stats = torch.tensor([sum(step_rewards), len(step_rewards)], dtype=torch.float64, device=device)
            sum_over_ranks(num_tokens, stats)
            denom = num_tokens.clamp(min=1) / world  # the optimizer averages gradients over ranks
            pg_objective = 0.0
            for inputs, targets, adv in groups:
                for lo in range(0, inputs.size(0), args.device_batch_size):
                    x = inputs[lo:lo + args.device_batch_size].to(device)
                    y = targets[lo:lo + args.device_batch_size].to(device)
                    a = adv[lo:lo + args.device_batch_size].to(device)
                    logp = -model(x, y, loss_reduction="none").view(x.size(0), -1)  # (b, T), 0 where y == -1
                    objective = (logp * a[:, None] * (y >= 0)).sum() / denom
                    (-objective).backward()
                    pg_objective += float(objective.detach())
            if stopped_on_non_finite(pg_objective, "pg_objective", step, ckpt_dir, log):
                return 1
            lrm = 1.0 - step / num_iterations
            apply_update(optimizer, lrm)
            dt = time.perf_counter() - t0
            mean_reward = float(stats[0] / stats[1].clamp(min=1))
            rewards_seen.append(mean_reward)
            print0(f"step {step + 1:05d}/{num_iterations:05d} | mean reward {mean_reward:.4f} | "
                   f"sampled tokens {int(num_tokens)} | lrm {lrm:.3f} | dt {dt:.1f}s")
            log({"step": step, "reward": mean_reward, "sampled_tokens": int(num_tokens), "lr": lrm,
                 "pg_objective": pg_objective, "dt": dt})
            step += 1
    finally:
        log.close()
    return finish_stage(ckpt_dir, {"stage": "rl", "model_tag": model_tag, "task": args.task, "steps": num_iterations,
                                   "initial_eval": loop["initial_eval"], "eval": loop["eval"],
                                   "mean_rewards": rewards_seen}, master, t_start, "eval")


def main(argv: list[str] | None = None) -> int:
    return run_main(train, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
