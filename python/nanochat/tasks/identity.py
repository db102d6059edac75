"""Identity conversations: who the assistant is, from a JSONL file the user can edit.

- Default file: nanochat/tasks/identity_conversations.jsonl (package data); `path=` or $NANOCHAT_IDENTITY_FILE
  points elsewhere. One conversation per line, either {"messages": [...]} or a bare list of messages.
- Midtraining and SFT oversample it (it is small) so the model answers "who are you?" consistently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nanochat.tasks.base import Task
from nanochat.tasks.smoltalk import is_well_formed


def default_identity_path() -> Path:
    env = os.environ.get("NANOCHAT_IDENTITY_FILE")
    return Path(env) if env else Path(__file__).resolve().parent / "identity_conversations.jsonl"


class Identity(Task):
    eval_type = "generative"

    def __init__(self, path: str | os.PathLike | None = None, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path) if path else default_identity_path()
        self.rows = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                messages = row["messages"] if isinstance(row, dict) else row
                if not is_well_formed(messages):
                    raise ValueError(f"{self.path}:{lineno}: expected alternating user/assistant messages, "
                                     f"got roles {[m.get('role') for m in messages]}")
                self.rows.append({"messages": messages})

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        return self.rows[index]
