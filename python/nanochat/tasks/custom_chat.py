"""Your own conversations as a task: `nanochat chat-sft --data FILE.jsonl[:WEIGHT]` (and `mid-train --data`).

The file holds one conversation per line (blank lines are ignored), in the OpenAI-style format:

    {"messages": [{"role": "system", "content": "You are terse."},          <- optional, first only
                  {"role": "user", "content": "What is 2 + 3?"},
                  {"role": "assistant", "content": [                         <- a str, or a list of parts
                      {"type": "text", "text": "Let me compute."},
                      {"type": "python", "text": "2 + 3"},                   <- a tool call the model learns
                      {"type": "python_output", "text": "5"},                <- the tool's answer (not learned)
                      {"type": "text", "text": "It is 5."}]}]}

- roles alternate user/assistant after the optional system message and the conversation has at least one
  assistant message (else it teaches nothing); the rules are the chat renderer's own (tokenizer._turns)
- validated up front: every bad line is reported with its number and reason, and nothing trains
- weight: the task holds round(WEIGHT x N) conversations (whole passes over the file, then its first rows), so
  `--data mine.jsonl:3` shows each conversation three times per pass of the mixture; 0 < WEIGHT
- validation: when the file has >= 20 conversations, every 20th one (lines 20, 40, ... of the conversations) is held
  out for the validation loss and never trained on
- `--data-only` trains on the given files alone; otherwise they join the stage's built-in mixture
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nanochat.tasks.base import Task, TaskMixture
from nanochat.tokenizer import _turns

HOLDOUT_EVERY = 20   # every 20th conversation is held out (5%) when the file has at least this many
MAX_LISTED = 20      # bad lines reported with their reason; the rest by number only


class ChatDataError(ValueError):
    """A conversation file that does not follow the format; the message lists every bad line."""


@dataclass
class ChatData:
    path: Path
    weight: float
    conversations: list[dict]


def _check(record) -> str | None:
    """None when the record is a valid training conversation, else the reason."""
    if isinstance(record, dict) and "messages" not in record:
        return "expected an object with a 'messages' list"
    if not isinstance(record, (dict, list)):
        return f"expected an object with a 'messages' list, got a {type(record).__name__}"
    try:
        turns = _turns(record)
    except ValueError as e:
        return str(e)
    if not any(role == "assistant" for role, _ in turns):
        return "no assistant message (nothing to learn)"
    return None


def load_conversations(path: str | os.PathLike) -> list[dict]:
    """Every conversation of a JSONL file, or ChatDataError naming each bad line."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"no such conversation file: {path}")
    conversations, bad = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad.append((lineno, f"invalid UTF-8 at byte {e.start}"))
                continue
            except json.JSONDecodeError as e:
                bad.append((lineno, f"not valid JSON ({e.msg} at column {e.colno})"))
                continue
            reason = _check(record)
            if reason:
                bad.append((lineno, reason))
                continue
            conversations.append({"messages": record["messages"] if isinstance(record, dict) else record})
    if bad:
        lines = [f"{path}: {len(bad)} bad conversation line(s); the format is "
                 '{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]} per line']
        lines += [f"  line {n}: {reason}" for n, reason in bad[:MAX_LISTED]]
        if len(bad) > MAX_LISTED:
            lines.append(f"  and lines {', '.join(str(n) for n, _ in bad[MAX_LISTED:])}")
        raise ChatDataError("\n".join(lines))
    if not conversations:
        raise ChatDataError(f"{path} holds no conversations")
    return conversations


def parse_data_arg(spec: str) -> ChatData:
    """FILE or FILE:WEIGHT -> ChatData with the file loaded and validated (an argparse `type`)."""
    path, weight = spec, 1.0
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        try:
            weight, path = float(tail), head
        except ValueError:
            pass  # a colon that is part of the file name
    if not weight > 0:
        raise argparse.ArgumentTypeError(f"the weight in {spec!r} must be > 0, got {weight}")
    try:
        return ChatData(Path(path), weight, load_conversations(path))
    except ChatDataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_data_args(group) -> None:
    """The --data and --data-only flags of mid-train and chat-sft."""
    group.add_argument("--data", action="append", default=[], type=parse_data_arg, metavar="FILE[:WEIGHT]",
                       help="your conversations (JSONL, one {'messages': [...]} per line; see "
                            "nanochat/tasks/custom_chat.py), mixed in with WEIGHT (default 1 = one pass); "
                            "repeat for several files")
    group.add_argument("--data-only", action="store_true", help="train on the --data files alone")


# ---------------------------------------------------------------------------------------------------------------
# The task


class CustomChat(Task):
    """The train or val share of a conversation file, repeated to its weight (train only)."""

    def __init__(self, data: ChatData, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        convs = data.conversations
        holdout = len(convs) >= HOLDOUT_EVERY
        self.rows = [c for i, c in enumerate(convs)
                     if (holdout and i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == (split == "val")]
        self.size = max(1, round(data.weight * len(self.rows))) if split == "train" and self.rows else len(self.rows)
        self._name = f"CustomChat({data.path.name})"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        return self.rows[index % len(self.rows)]

    @property
    def name(self) -> str:
        return self._name


def with_custom_data(builtin: Callable[[str], TaskMixture], data: list[ChatData], data_only: bool = False,
                     seed: int = 42) -> tuple[TaskMixture, TaskMixture]:
    """The stage's (train, val) mixtures, builtin("train") and builtin("val"), with the --data files added; with
    data_only the files alone (the built-in mixture is then never built)."""
    if not data:
        if data_only:
            raise ChatDataError("--data-only needs at least one --data FILE")
        return builtin("train"), builtin("val")
    extra_train = [CustomChat(d, "train") for d in data]
    extra_val = [t for t in (CustomChat(d, "val") for d in data) if len(t)]
    if data_only:
        # files under 20 conversations hold nothing out: their validation loss is measured on training rows
        train_tasks, val_tasks, skipped = extra_train, extra_val or extra_train, []
    else:
        train, val = builtin("train"), builtin("val")
        train_tasks, val_tasks, skipped = train.tasks + extra_train, val.tasks + extra_val, train.skipped
    mixed_train, mixed_val = TaskMixture(train_tasks, seed=seed), TaskMixture(val_tasks, seed=seed)
    mixed_train.skipped = mixed_val.skipped = skipped
    return mixed_train, mixed_val
