"""Chat-model evaluations: categorical (ARC, MMLU) and generative (GSM8K, HumanEval, spelling, arithmetic) tasks,
and ChatCORE.

- categorical: render the conversation up to <|assistant_start|>, run one batched forward, and take the argmax of
  the logits restricted to the answer letters (each letter must be one token); no sampling, so no format failures.
- generative: `Engine.generate` samples many prompts at once (continuous batching), k samples per prompt, each
  sample's seed fixed by (seed, problem index) so results do not depend on batching;
  a problem passes when any of its k samples passes (pass@k), judged by the task (`task.evaluate`).
- distributed: each rank takes problems rank, rank + world, ...; counts are summed with all_reduce.
- ChatCORE: the mean over tasks of centered accuracy (acc - baseline) / (1 - baseline), with baseline 0.25 for the
  four-way multiple-choice tasks and 0 for the generative ones. The synthetic arithmetic evaluations (held-out
  problems in the trained phrasing families, and in held-out families with the calculator and without: a task's
  `tools` attribute) are reported but kept out of ChatCORE, so ChatCORE stays comparable with nanochat's.
"""

from __future__ import annotations

import time

import torch

from nanochat.common import rank_and_world, sum_counts_over_ranks
from nanochat.inference.engine import Engine
from nanochat.tasks import ARC, GSM8K, MMLU, Arithmetic, HumanEval, SpellingBee

BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}
NOT_IN_CHATCORE = {"Arithmetic", "Arithmetic-Unseen", "Arithmetic-Unseen-NoTool", "Arithmetic-NoTool"}

# ---------------------------------------------------------------------------------------------------------------
# Helpers


def letter_ids(tokenizer, letters: str) -> list[int]:
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"answer letter {letter!r} encodes to {len(encoded)} tokens {encoded}; categorical "
                             f"evaluation needs one token per letter")
        ids.append(encoded[0])
    return ids


def centered(accuracy: float, baseline: float) -> float:
    return (accuracy - baseline) / (1.0 - baseline)


# ---------------------------------------------------------------------------------------------------------------
# Categorical


@torch.no_grad()
def categorical_scores(model, tokenizer, conversations: list[dict], device, batch_size: int = 8) -> list[torch.Tensor]:
    """Per conversation, the logits of its answer letters at the first assistant position (one batched forward
    per `batch_size` conversations, right-padded; causal attention keeps padding out of the scored position)."""
    max_len = model.config.sequence_len
    scores: list[torch.Tensor] = []
    for lo in range(0, len(conversations), batch_size):
        chunk = conversations[lo:lo + batch_size]
        prompts = [tokenizer.render_for_completion(c)[-max_len:] for c in chunk]  # crop from the left if needed
        T = max(len(p) for p in prompts)
        idx = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, :len(p)] = torch.tensor(p)
        logits = model(idx.to(device))  # (B, T, V)
        for i, (conv, p) in enumerate(zip(chunk, prompts)):
            scores.append(logits[i, len(p) - 1, letter_ids(tokenizer, conv["letters"])].float().cpu())
    return scores


def categorical_predictions(model, tokenizer, conversations: list[dict], device, batch_size: int = 8) -> list[str]:
    """The predicted letter of each conversation (argmax over its `letters`)."""
    scores = categorical_scores(model, tokenizer, conversations, device, batch_size)
    return [conv["letters"][int(s.argmax())] for conv, s in zip(conversations, scores)]


def evaluate_categorical(model, tokenizer, task, device, batch_size: int = 8, max_problems: int | None = None):
    rank, world = rank_and_world()
    n = len(task) if max_problems is None else min(max_problems, len(task))
    mine = [task[i] for i in range(rank, n, world)]
    preds = categorical_predictions(model, tokenizer, mine, device, batch_size)
    correct = sum(p == c["answer"] for p, c in zip(preds, mine))
    return sum_counts_over_ranks(correct, len(mine), device=device)


# ---------------------------------------------------------------------------------------------------------------
# Generative


def evaluate_generative(model, tokenizer, task, device, num_samples: int = 1, max_tokens: int = 256,
                        temperature: float = 0.0, top_k: int | None = 50, batch_size: int = 16,
                        max_problems: int | None = None, seed: int = 42):
    """(problems passed at k = num_samples, problems) over this rank's share, summed over ranks."""
    rank, world = rank_and_world()
    n = len(task) if max_problems is None else min(max_problems, len(task))
    indices = list(range(rank, n, world))
    conversations = [task[i] for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    engine = Engine(model, tokenizer, tools=getattr(task, "tools", True), prefix_cache_tokens=0)
    samples = engine.generate(prompts, num_samples, max_tokens, temperature, top_k,
                              batch_size=batch_size, seeds=[seed + 1000 * i for i in indices])
    correct = 0
    for conv, outs in zip(conversations, samples):
        correct += any(task.evaluate(conv, tokenizer.decode(ids)) for ids, _ in outs)
    return sum_counts_over_ranks(correct, len(conversations), device=device)


# ---------------------------------------------------------------------------------------------------------------
# A whole report


def build_task(name: str, **kwargs):

    arithmetic = kwargs.get("arithmetic_size", 200)
    factories = {"ARC-Easy": lambda: ARC("ARC-Easy", "test"), "ARC-Challenge": lambda: ARC("ARC-Challenge", "test"),
                 "MMLU": lambda: MMLU("test"), "GSM8K": lambda: GSM8K("test"), "HumanEval": lambda: HumanEval(),
                 "SpellingBee": lambda: SpellingBee(size=kwargs.get("spelling_size", 256), split="test"),
                 "Arithmetic": lambda: Arithmetic(size=arithmetic, split="test"),
                 "Arithmetic-NoTool": lambda: Arithmetic(size=arithmetic, split="test", tools=False),
                 "Arithmetic-Unseen": lambda: Arithmetic(size=arithmetic, split="test", phrasing="unseen"),
                 "Arithmetic-Unseen-NoTool": lambda: Arithmetic(size=arithmetic, split="test", phrasing="unseen",
                                                                tools=False)}
    if name not in factories:
        raise ValueError(f"unknown chat-eval task {name!r}; expected one of {list(factories)}")
    return factories[name]()


def build_tasks(task_names: list[str], arithmetic_problems: int | None = None, tasks: dict | None = None) -> dict:
    """name -> task for every name (those in `tasks` as given): building a task reads its data, so a missing or
    corrupt eval file is reported before a model is loaded. `arithmetic_problems` sizes the arithmetic sets."""
    tasks = dict(tasks or {})
    for name in task_names:
        if name not in tasks:
            sized = name in NOT_IN_CHATCORE and arithmetic_problems
            tasks[name] = build_task(name, arithmetic_size=arithmetic_problems) if sized else build_task(name)
    return tasks


def run_chat_eval(model, tokenizer, device, task_names: list[str], max_problems: int | None = None,
                  num_samples: int = 1, max_tokens: int = 256, temperature: float = 0.0, top_k: int | None = 50,
                  batch_size: int = 8, tasks: dict | None = None, log=print,
                  arithmetic_problems: int | None = None) -> dict:
    """Evaluate each task; returns {"tasks": {name: {...}}, "chatcore": mean centered accuracy}.
    `arithmetic_problems`: the size of the held-out arithmetic set (not capped by `max_problems`)."""
    results = {}
    tasks = build_tasks(task_names, arithmetic_problems, tasks)
    for name in task_names:
        task = tasks[name]
        cap = None if name in NOT_IN_CHATCORE and arithmetic_problems else max_problems
        t0 = time.time()
        if task.eval_type == "categorical":
            correct, total = evaluate_categorical(model, tokenizer, task, device, batch_size, cap)
            kind, k = "categorical", None
        else:
            correct, total = evaluate_generative(model, tokenizer, task, device, num_samples, max_tokens,
                                                 temperature, top_k, batch_size, cap)
            kind, k = "generative", num_samples
        accuracy = correct / max(total, 1)
        baseline = BASELINES.get(name, 0.0)
        results[name] = {"accuracy": accuracy, "correct": correct, "n": total, "type": kind, "pass_at_k": k,
                         "baseline": baseline, "centered": centered(accuracy, baseline),
                         "seconds": round(time.time() - t0, 2)}
        log(f"{name}: {correct}/{total} = {100 * accuracy:.2f}%" + (f" (pass@{k})" if k else ""))
    core = [r["centered"] for name, r in results.items() if name not in NOT_IN_CHATCORE]
    chatcore = sum(core) / len(core) if core else None
    # "summary" first: flat name -> number, the keys the report's summary table looks for
    summary = {name: r["accuracy"] for name, r in results.items()}
    summary["ChatCORE"] = chatcore
    return {"summary": summary, "tasks": results, "chatcore": chatcore}
