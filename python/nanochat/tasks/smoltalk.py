"""SmolTalk: general multi-turn conversations for midtraining and SFT.

- Hub: HuggingFaceTB/smol-smoltalk, train / test (rows carry "messages").
- Offline: `nanochat data evals` synthesises a stand-in from templates and from validation splits of datasets that
  no reported evaluation uses (SciQ, TriviaQA, Natural Questions, Social IQa; see offline_data.py).
- Conversations that break the format (roles not alternating user/assistant after an optional system message,
  empty content) are dropped at load time rather than failing a training run halfway.
"""

from __future__ import annotations

from nanochat.tasks.base import Task, hub_dataset, load_rows


def is_well_formed(messages: list[dict]) -> bool:
    if not messages:
        return False
    body = messages[1:] if messages[0].get("role") == "system" else messages
    if len(body) < 2:
        return False
    for i, message in enumerate(body):
        if message.get("role") != ("user" if i % 2 == 0 else "assistant") or not message.get("content"):
            return False
    return True


class SmolTalk(Task):
    eval_type = "generative"

    def __init__(self, split: str, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train|test, got {split!r}")
        self.split = split
        rows = load_rows("smoltalk", split,
                         lambda: [{"messages": r["messages"]}
                                  for r in hub_dataset("HuggingFaceTB/smol-smoltalk", None, split)])
        self.rows = [r for r in rows if is_well_formed(r["messages"])]

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        return {"messages": self.rows[index]["messages"]}
