"""The training and validation mixtures of each chat stage, in one place so the test-leak check can see them all.

- Midtraining: SmolTalk + MMLU (auxiliary_train) + GSM8K train + identity (x2) + spelling tasks + arithmetic.
- SFT: ARC-Easy/Challenge train + GSM8K train + a slice of SmolTalk + identity (x2) + spelling tasks + arithmetic.
- The synthetic tasks (spelling, arithmetic) are weighted by their size: conversations per mixture.
- RL: GSM8K train (rewarded), evaluated on GSM8K test.
- Only "train" splits feed training (offline, those are built from validation splits: see offline_data.py);
  validation losses use SmolTalk test and synthetic test streams. `tests/test_tasks.py` checks no test-split row
  reaches any training mixture.
- A source whose data is missing (e.g. GSM8K train offline without --gsm8k-train) is skipped with a warning unless
  `strict=True`, so a CPU run on partial offline data still trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nanochat.common import get_logger
from nanochat.tasks.arc import ARC
from nanochat.tasks.arithmetic import Arithmetic
from nanochat.tasks.base import Task, TaskMixture
from nanochat.tasks.custom_chat import with_custom_data
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.identity import Identity
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.spelling import SimpleSpelling, SpellingBee


@dataclass
class MixtureSizes:
    """Caps per source (None = all rows); tiny values make CPU tests fast."""
    smoltalk: int | None = None
    mmlu: int | None = None
    arc: int | None = None
    gsm8k: int | None = None
    spelling: int = 20_000
    arithmetic: int = 20_000
    identity_repeats: int = 2


def _maybe(factory: Callable[[], Task], limit: int | None, strict: bool, skipped: list[str]) -> list[Task]:
    try:
        task = factory()
    except FileNotFoundError as e:
        if strict:
            raise
        get_logger().warning("mixture: skipping a source: %s", e)
        skipped.append(str(e))
        return []
    if limit is not None:
        task = task[:limit]
    return [task] if len(task) else []


def _synthetic(task: Task) -> list[Task]:
    """A synthetic task of size 0 (weight 0) leaves the mixture."""
    return [task] if len(task) else []


def _mid_train_tasks(s: MixtureSizes, strict: bool, skipped: list[str]) -> list[Task]:
    return (_maybe(lambda: SmolTalk("train"), s.smoltalk, strict, skipped)
            + _maybe(lambda: MMLU("train"), s.mmlu, strict, skipped)
            + _maybe(lambda: GSM8K("train"), s.gsm8k, strict, skipped)
            + _maybe(Identity, None, strict, skipped) * s.identity_repeats
            + [SimpleSpelling(size=s.spelling, split="train"), SpellingBee(size=s.spelling, split="train")]
            + _synthetic(Arithmetic(size=s.arithmetic, split="train")))


def _sft_train_tasks(s: MixtureSizes, strict: bool, skipped: list[str]) -> list[Task]:
    return (_maybe(lambda: ARC("ARC-Easy", "train"), s.arc, strict, skipped)
            + _maybe(lambda: ARC("ARC-Challenge", "train"), s.arc, strict, skipped)
            + _maybe(lambda: GSM8K("train"), s.gsm8k, strict, skipped)
            + _maybe(lambda: SmolTalk("train"), s.smoltalk, strict, skipped)
            + _maybe(Identity, None, strict, skipped) * s.identity_repeats
            + [SimpleSpelling(size=s.spelling // 2, split="train"), SpellingBee(size=s.spelling // 2, split="train")]
            + _synthetic(Arithmetic(size=s.arithmetic, split="train")))


def _validation_tasks(s: MixtureSizes, strict: bool, skipped: list[str]) -> list[Task]:
    """Held-out conversations of both chat stages: SmolTalk test and test streams of the synthetic tasks."""
    return (_maybe(lambda: SmolTalk("test"), s.smoltalk, strict, skipped)
            + [SimpleSpelling(size=max(1, s.spelling // 20), split="test"),
               SpellingBee(size=max(1, s.spelling // 20), split="test")]
            + _synthetic(Arithmetic(size=s.arithmetic // 20, split="test")))


def _mixture(train_tasks, split: str, sizes: MixtureSizes | None, strict: bool, seed: int) -> TaskMixture:
    s, skipped = sizes or MixtureSizes(), []
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    tasks = train_tasks(s, strict, skipped) if split == "train" else _validation_tasks(s, strict, skipped)
    mixture = TaskMixture(tasks, seed=seed)
    mixture.skipped = skipped  # what was missing, for the stage's log and metrics
    return mixture


def mid_mixture(split: str = "train", sizes: MixtureSizes | None = None, strict: bool = False,
                seed: int = 42) -> TaskMixture:
    return _mixture(_mid_train_tasks, split, sizes, strict, seed)


def sft_mixture(split: str = "train", sizes: MixtureSizes | None = None, strict: bool = False,
                seed: int = 42) -> TaskMixture:
    return _mixture(_sft_train_tasks, split, sizes, strict, seed)


def stage_mixtures(args, mixture: Callable[..., TaskMixture]) -> tuple[TaskMixture, TaskMixture]:
    """(train, val) of a chat stage from its flags: `mixture` (mid_mixture or sft_mixture) capped by the stage's
    --*-limit / --*-size flags, plus or replaced by the --data files (tasks/custom_chat.py)."""
    sizes = MixtureSizes(smoltalk=args.smoltalk_limit, mmlu=getattr(args, "mmlu_limit", None),
                         arc=getattr(args, "arc_limit", None), gsm8k=args.gsm8k_limit, spelling=args.spelling_size,
                         arithmetic=args.arithmetic_size)
    return with_custom_data(lambda split: mixture(split, sizes, strict=args.strict_data, seed=args.seed), args.data,
                            args.data_only, args.seed)
