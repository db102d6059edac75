"""The python tool's state machine without a model: token sequences pushed as a row would emit them (the tiny
tokenizer gives real ids), and the forced output it queues, checked against the calculator's own result."""

from __future__ import annotations

import pytest

import nanochat.inference.tool_calls as tool_calls_module
from nanochat.inference.rows import RowFailed
from nanochat.inference.tool_calls import MAX_EXPRESSION_TOKENS, ToolCalls, ToolTokens
from nanochat.tools.calculator import evaluate


@pytest.fixture
def calls(tok) -> ToolCalls:
    return ToolCalls(tok, ToolTokens.of(tok))


def push_all(calls: ToolCalls, tokens: list[int], mask: int = 1) -> None:
    for t in tokens:
        calls.push(t, mask)


def call(tok, expression: str) -> list[int]:
    """A sampled tool call: <|python_start|> expression <|python_end|>."""
    S = tok.encode_special
    return [S("<|python_start|>"), *tok.encode(expression), S("<|python_end|>")]


def output(tok, text: str) -> list[int]:
    S = tok.encode_special
    return [S("<|output_start|>"), *tok.encode(text), S("<|output_end|>")]


def test_a_sampled_call_forces_the_calculator_output(tok, calls):
    push_all(calls, tok.encode("so ") + call(tok, "7*6"))
    assert list(calls.forced) == output(tok, "42") and not calls.in_python
    push_all(calls, [calls.forced.popleft() for _ in range(len(calls.forced))], mask=0)  # the row emits them
    assert not calls.forced and not calls.in_python  # the forced output opens nothing
    push_all(calls, call(tok, "1/0"))  # a calculator error is the tool's output, as text
    assert list(calls.forced) == output(tok, evaluate("1/0")) and evaluate("1/0").startswith("Error")


def test_only_a_sampled_python_start_opens_a_call(tok, calls):
    push_all(calls, call(tok, "2+2"), mask=0)
    assert not calls.forced and not calls.in_python
    push_all(calls, tok.encode("2+2") + [tok.encode_special("<|python_end|>")])  # no call open
    assert not calls.forced


def test_a_rambling_block_is_not_evaluated(tok, calls):
    S = tok.encode_special
    one = tok.encode("1")
    assert len(one) == 1
    push_all(calls, [S("<|python_start|>"), *one * (MAX_EXPRESSION_TOKENS + 1), S("<|python_end|>")])
    assert not calls.forced and not calls.in_python
    push_all(calls, [S("<|python_start|>"), *one * MAX_EXPRESSION_TOKENS, S("<|python_end|>")])  # at the limit
    assert list(calls.forced) == output(tok, evaluate("1" * MAX_EXPRESSION_TOKENS))


def test_failures_name_their_stage(tok, calls, monkeypatch):
    def crash(expression):
        raise RuntimeError(f"crashed on {expression!r}")
    monkeypatch.setattr(tool_calls_module, "evaluate", crash)
    with pytest.raises(RowFailed, match=r"^the tool call failed: RuntimeError: crashed on '7\*6'$"):
        push_all(calls, call(tok, "7*6"))
    monkeypatch.setattr(tool_calls_module, "evaluate", lambda expression: "\ud800")  # not encodable text
    with pytest.raises(RowFailed, match=r"^encoding the tool output failed: ValueError: "):
        push_all(calls, call(tok, "7*6"))
    assert not calls.forced
