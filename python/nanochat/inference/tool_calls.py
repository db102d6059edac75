"""The python tool as one generated row sees it: a state machine over the row's emitted tokens.

Contract: the model opens a call by sampling <|python_start|> and closes it with <|python_end|>; the tokens between
are decoded and handed to `nanochat.tools.calculator.evaluate` (a bounded evaluator: model output is never run as
Python), and the row must then emit <|output_start|> result <|output_end|> as forced tokens (mask 0, not the
model's: RL does not train on them). Only a sampled <|python_start|> opens a call, so the tool's own output can
never start another one. A block longer than MAX_EXPRESSION_TOKENS is not evaluated (the model is rambling) and
forces nothing. A failure of the call or of encoding its result raises `RowFailed` naming that stage, so the
scheduler ends this row alone.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from nanochat.inference.rows import row_stage
from nanochat.tools.calculator import evaluate

MAX_EXPRESSION_TOKENS = 512


@dataclass(frozen=True)
class ToolTokens:
    """The ids of the four tool tokens in one tokenizer."""
    python_start: int
    python_end: int
    output_start: int
    output_end: int

    @classmethod
    def of(cls, tokenizer) -> ToolTokens:
        S = tokenizer.encode_special
        return cls(S("<|python_start|>"), S("<|python_end|>"), S("<|output_start|>"), S("<|output_end|>"))


class ToolCalls:
    """One row's tool state: `push` every token the row emits; `forced` holds the tokens the row must emit next,
    in order, instead of sampling."""

    def __init__(self, tokenizer, tokens: ToolTokens):
        self.tokenizer, self.tokens = tokenizer, tokens
        self.forced: collections.deque[int] = collections.deque()
        self.in_python = False
        self.expression: list[int] = []  # the tokens of the open call

    def push(self, token: int, mask: int) -> None:
        """Advance on one emitted token (mask 1 sampled, 0 forced); a closed call queues its output in `forced`."""
        t = self.tokens
        if mask == 1 and token == t.python_start:
            self.in_python, self.expression = True, []
        elif self.in_python and token == t.python_end:
            self.in_python = False
            if len(self.expression) <= MAX_EXPRESSION_TOKENS:
                with row_stage("the tool call"):
                    result = evaluate(self.tokenizer.decode(self.expression))
                with row_stage("encoding the tool output"):
                    output = self.tokenizer.encode(result)
                self.forced.extend([t.output_start, *output, t.output_end])
        elif self.in_python:
            self.expression.append(token)
