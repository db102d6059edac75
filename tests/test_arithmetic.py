"""The synthetic arithmetic task: deterministic generation, disjoint splits, the scorer's edge cases, the render masks
of its tool parts, and that the engine executes its reference answers exactly as rendered (a replaying model)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanochat.engine import Engine
from nanochat.tiny import tiny_tokenizer
from nanochat.tasks.arithmetic import (Arithmetic, expression, final_number, is_test_problem, numbers_match,
                                       problem_key)
from nanochat.calculator import evaluate as calculate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(512)


def test_generator_is_deterministic_and_seeded():
    a = [json.dumps(c) for c in Arithmetic(size=60, split="train")]
    assert a == [json.dumps(c) for c in Arithmetic(size=60, split="train")]
    assert a[10] == json.dumps(Arithmetic(size=60, split="train")[10])  # index access needs no earlier rows
    assert a != [json.dumps(c) for c in Arithmetic(size=60, split="train", seed=1)]
    assert len(set(a)) > 55


def test_reference_answers_call_the_calculator_and_state_its_result():
    ops, stories = set(), 0
    for conv in Arithmetic(size=300, split="train"):
        user, assistant = conv["messages"]
        python, output, text = assistant["content"]
        assert (python["type"], output["type"], text["type"]) == ("python", "python_output", "text")
        assert python["text"] == conv["expression"] and output["text"] == conv["answer"]
        assert calculate(conv["expression"]) == conv["answer"]
        assert text["text"] == f"\n\nThe answer is {conv['answer']}."
        ops |= {op for op in "+*/" if op in conv["expression"]}
        stories += user["content"].count(".") >= 1 and user["content"].endswith("?") and len(user["content"]) > 50
        for operand in re.findall(r"\d+(?:\.\d+)?", conv["expression"]):
            assert operand in user["content"]  # every number of the call is copied from the question
    assert ops == {"+", "*", "/"} and stories > 30


def test_splits_share_no_problem_whatever_the_phrasing():
    train = {c["problem"] for c in Arithmetic(size=3000, split="train")}
    test = {c["problem"] for c in Arithmetic(size=400, split="test")}
    assert len(test) > 350 and not train & test
    assert problem_key("+", "7", "5") == problem_key("+", "5", "7") == problem_key("+", "5.0", "7")
    assert problem_key("-", "7", "5") != problem_key("-", "5", "7")
    assert is_test_problem("*", "28", "379") == is_test_problem("*", "379", "28")
    # the held-out test split is a different stream from a different seed's train split too
    assert not {c["problem"] for c in Arithmetic(size=500, split="train", seed=3)} & test


def test_demo_questions_of_the_cpu_default_are_held_out():
    script = (REPO / "runs" / "cpu_default.sh").read_text()
    demo = {"What is 379 times 28?": ("*", "379", "28"),
            "Mia had 144 stickers and gave 48 to a friend. How many stickers does she have left?": ("-", "144", "48")}
    for question, problem in demo.items():
        assert f'"{question}"' in script
        assert is_test_problem(*problem)


@pytest.mark.parametrize("completion,number", [
    ("The answer is 5535.", "5535"),
    ("The answer is 5,535.", "5535"),
    ("The answer is 1,234,567.25 dollars", "1234567.25"),
    ("The answer is -387.", "-387"),
    ("That is 2.5 apples, I think!", "2.5"),
    ("12-7 leaves 5", "5"),  # a minus between numbers is not a sign
    ("first 3, then 4", "4"),
    ("<|python_start|>123*45<|python_end|><|output_start|>5535<|output_end|>\n\nThe answer is 5535.", "5535"),
    ("<|python_start|>123*45<|python_end|><|output_start|>5535<|output_end|>", None),  # the tool's number is not
    ("<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> so 84, no wait 48", "48"),  # the last one
    ("<|python_start|>12*7 and then", None),  # an unclosed call hides its numbers too
    ("no number here", None),
])
def test_final_number_reads_the_last_number_of_the_text(completion, number):
    assert final_number(completion) == number


def test_numbers_match_numerically():
    assert numbers_match("84", "84") and numbers_match("84.0", "84") and numbers_match("2.50", "2.5")
    assert numbers_match("-387", "-387") and not numbers_match("387", "-387")
    assert numbers_match("0.3", "0.3") and not numbers_match("0.33", "0.3333333333")
    assert not numbers_match(None, "1") and not numbers_match("84", "48")


def test_scoring_of_whole_replies():
    task = Arithmetic(size=5, split="test")
    conv = task[0]
    right = f"<|python_start|>{conv['expression']}<|python_end|><|output_start|>{conv['answer']}<|output_end|>" \
            f"\n\nThe answer is {conv['answer']}."
    assert task.evaluate(conv, right) and task.reward(conv, right) == 1.0
    assert task.evaluate(conv, right.replace("The answer is", "The answer is 1 + 2 ="))  # the last number counts
    assert not task.evaluate(conv, right.replace(f"is {conv['answer']}", f"is {conv['answer']}1"))
    assert not task.evaluate(conv, right.rsplit("\n\n", 1)[0])  # stopping after the tool output earns nothing
    assert Arithmetic(size=5, split="test", tools=False).name == "Arithmetic-NoTool"
    with pytest.raises(ValueError):
        Arithmetic(split="dev")


def test_render_masks_learn_the_call_and_the_statement_not_the_output(tok):
    conv = Arithmetic(size=1, split="train")[0]
    ids, mask = tok.render_conversation(conv)
    S = tok.encode_special
    start, end = ids.index(S("<|python_start|>")), ids.index(S("<|python_end|>"))
    out_start, out_end = ids.index(S("<|output_start|>")), ids.index(S("<|output_end|>"))
    assert ids[start + 1:end] == tok.encode(conv["expression"]) and set(mask[start:end + 1]) == {1}
    assert ids[out_start + 1:out_end] == tok.encode(conv["answer"]) and set(mask[out_start:out_end + 1]) == {0}
    assert out_start == end + 1  # the tool's output comes right after the call, as the engine forces it
    assert set(mask[out_end + 1:]) == {1} and ids[-1] == S("<|assistant_end|>")
    assert set(mask[:ids.index(S("<|assistant_start|>")) + 1]) == {0}


class ReplayModel(torch.nn.Module):
    """A 'model' whose prediction at absolute position p is token p + 1 of one fixed sequence."""

    def __init__(self, vocab_size: int, sequence: list[int]):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=256, vocab_size=vocab_size, n_layer=1, n_kv_head=1, head_dim=2)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.sequence = torch.tensor(sequence)

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        pos = kv_cache.positions(B, T)  # (B, T) absolute positions (see kv_cache.py)
        nxt = self.sequence[(pos + 1).clamp(max=len(self.sequence) - 1)]
        logits = torch.zeros(B, T, self.config.vocab_size).scatter_(2, nxt.unsqueeze(-1), 10.0)
        logits = kv_cache.select(logits)  # the positions the engine samples from
        kv_cache.advance(T)
        return logits


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_engine_executes_the_reference_answer_as_rendered(tok, index):
    """Replaying only the reference's own tokens, the engine's calculator supplies the output part: the generation
    equals the render token for token, with the render's mask, and the task scores it correct. (A different output
format or a calculator result unlike the reference would make the replay diverge.)"""
    task = Arithmetic(size=4, split="test")
    conv = task[index]
    ids, mask = tok.render_conversation(conv)
    prompt = tok.render_for_completion(conv)
    engine = Engine(ReplayModel(tok.vocab_size, ids), tok)
    [[(generated, generated_mask)]] = engine.generate([prompt], max_tokens=100, temperature=0.0)
    results, masks = [prompt + generated], [[0] * len(prompt) + generated_mask]
    # the engine stops at <|assistant_end|> and leaves it out
    assert results[0] == ids[:-1] and masks[0][len(prompt):] == mask[len(prompt):-1]
    assert task.evaluate(conv, tok.decode(results[0][len(prompt):]))


def test_expression_parenthesises_a_negative_right_operand():
    assert expression("-", "5", "-12") == "5-(-12)" and calculate("5-(-12)") == "17"
    assert expression("*", "-3", "4") == "-3*4"


def test_chat_eval_runs_the_no_tool_split_without_the_calculator_and_outside_chatcore(tok, monkeypatch):
    from nanochat.evals import chat

    calls = []

    class FakeEngine:
        def __init__(self, model, tokenizer, tools=True, **kwargs):
            self.tokenizer, self.tools = tokenizer, tools

        def generate(self, prompts, *args, **kwargs):
            calls.append(self.tools)
            return [[(list(self.tokenizer.encode("The answer is 1.")), [1] * 3)] for _ in prompts]

    monkeypatch.setattr(chat, "Engine", FakeEngine)
    always = Arithmetic(size=3, split="test")
    always.evaluate = lambda conv, completion: True
    report = chat.run_chat_eval(None, tok, "cpu", ["GSM8K", "Arithmetic", "Arithmetic-NoTool"], max_problems=2,
                                log=lambda *a: None, arithmetic_problems=5,
                                tasks={"GSM8K": always})
    assert calls == [True, True, False]
    assert report["tasks"]["Arithmetic"]["n"] == report["tasks"]["Arithmetic-NoTool"]["n"] == 5  # not capped at 2
    assert report["tasks"]["GSM8K"]["n"] == 2
    assert report["chatcore"] == 1.0  # GSM8K alone: the arithmetic rows stay out of ChatCORE
    assert set(report["summary"]) == {"GSM8K", "Arithmetic", "Arithmetic-NoTool", "ChatCORE"}
