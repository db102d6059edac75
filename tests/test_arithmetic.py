"""The synthetic arithmetic task: deterministic generation, disjoint splits (by problem and by phrasing family),
numbers in words and with separators, the scorer's edge cases, the render masks of its tool parts, that the engine
executes its reference answers exactly as rendered (a replaying model), and its chat-eval and report rows."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanochat.inference.engine import Engine
from nanochat.model.tiny import tiny_tokenizer
from nanochat.tasks.arithmetic import (
    HELD_OUT,
    Arithmetic,
    add_typo,
    expression,
    families,
    final_number,
    is_test_problem,
    numbers_match,
    parse_number,
    problem_key,
    spell,
)
from nanochat.tools.calculator import evaluate as calculate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(512)


@pytest.mark.parametrize("split,phrasing", [("train", "seen"), ("test", "seen"), ("test", "unseen")])
def test_generator_is_deterministic_and_seeded(split, phrasing):
    a = [json.dumps(c) for c in Arithmetic(size=60, split=split, phrasing=phrasing)]
    assert a == [json.dumps(c) for c in Arithmetic(size=60, split=split, phrasing=phrasing)]
    assert a[10] == json.dumps(Arithmetic(size=60, split=split, phrasing=phrasing)[10])  # no earlier rows needed
    assert a != [json.dumps(c) for c in Arithmetic(size=60, split=split, phrasing=phrasing, seed=1)]
    assert len(set(a)) > 55


@pytest.mark.parametrize("split,phrasing", [("train", "seen"), ("test", "unseen")])
def test_reference_answers_call_the_calculator_and_state_its_result(split, phrasing):
    ops, stories, ordered = set(), 0, 0
    for conv in Arithmetic(size=300, split=split, phrasing=phrasing):
        user, assistant = conv["messages"]
        python, output, text = assistant["content"]
        assert (python["type"], output["type"], text["type"]) == ("python", "python_output", "text")
        assert python["text"] == conv["expression"] and output["text"] == conv["answer"]
        assert calculate(conv["expression"]) == conv["answer"]
        assert text["text"] == f"\n\nThe answer is {conv['answer']}."
        ops |= {op for op in "+*/" if op in conv["expression"]}
        stories += conv["family"] in {f for op in "+-*/" for kind in ("story", "composed")
                                      for f in families(split, phrasing)[f"{kind}{op}"]}
        # the call's operands are the question's numbers as it writes them ("1,234" as Python's 1_234, words as
        # words, lower case), compact between digits and spaced around the operator next to words
        a, op, b = split_call(conv["expression"])
        spaced = " " in conv["expression"]
        assert spaced == any(re.search("[a-z]", x) for x in (a, b))
        for x in (a, b):
            assert x.replace("_", ",") in user["content"].lower()
        assert problem_key(op, *(str(parse_number(x.replace("_", ","))) for x in (a, b))) == conv["problem"]
        written = [x.lower().replace(",", "_") for x in conv["operands"]]
        assert [a, b] == written or (op in "+*" and [b, a] == written)
        if op in "+*" and a != b:  # commutative: in the order the question names them
            at = [[m.start() for m in re.finditer(rf"(?<![\w,.]){re.escape(x.replace('_', ','))}(?![\w,]|\.\d)",
                                                  user["content"].lower())] for x in (a, b)]
            if len(at[0]) == len(at[1]) == 1:  # (a distractor "Question 5:" may repeat an operand)
                assert at[0][0] < at[1][0], (user["content"], conv["expression"])
                ordered += 1
    assert ops == {"+", "*", "/"} and stories > 60 and ordered > 50


def split_call(call: str) -> tuple[str, str, str]:
    """(a, op, b) of a reference call: `12*7`, `5-(-12)`, `1_234/2`, `81 * two hundred fifty-nine`."""
    m = re.fullmatch(r"(.+) ([-+*/]) \(?(.+?)\)?", call) or re.fullmatch(r"(-?[\d_.]+)([-+*/])\(?(-?[\d_.]+)\)?", call)
    return m.groups()


def test_numbers_are_written_in_digits_separators_and_words():
    written = [w for conv in Arithmetic(size=2000, split="train") for w in conv["operands"]]
    assert sum("," in w for w in written) > 50  # "1,234"
    assert sum(w.isalpha() for w in written) > 100  # "twelve"
    assert sum(" " in w or "-" in w[1:] for w in written if not any(c.isdigit() for c in w)) > 100  # "forty-two"
    assert sum(re.fullmatch(r"-?\d+(\.\d+)?", w) is not None for w in written) > len(written) // 2


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("1,234", 1234), ("$1,200", 1200), ("-12", -12), ("7.5", Decimal("7.5")),
    ("12,345.6", Decimal("12345.6")),
    ("zero", 0), ("Twelve", 12), ("forty-two", 42), ("forty two", 42), ("one hundred", 100),
    ("one thousand and five", 1005), ("three hundred and twelve thousand four hundred and nine", 312409),
    ("nine hundred ninety-nine thousand nine hundred ninety-nine", 999999)])
def test_parse_number_reads_every_style(text, value):
    assert parse_number(text) == Decimal(value)


def test_spell_and_parse_round_trip():
    assert spell(1205) == "one thousand two hundred five"
    assert spell(1205, british=True) == "one thousand two hundred and five"
    assert spell(1005, british=True) == "one thousand and five" and spell(42, hyphen=False) == "forty two"
    assert spell(90) == "ninety" and spell(17000) == "seventeen thousand"
    for n in list(range(0, 2000)) + list(range(2000, 1_000_000, 997)) + [999_999]:
        for british in (False, True):
            assert parse_number(spell(n, british=british, hyphen=n % 2 == 0)) == n
    for bad in ("twelve apples", "", "1,23", "1.2.3"):
        with pytest.raises(ValueError):
            parse_number(bad)
    with pytest.raises(ValueError):
        spell(1_000_000)


def test_phrasing_families_are_disjoint_between_training_and_the_unseen_split():
    train, unseen = families("train"), families("test", "unseen")
    assert families("test") == train  # the seen test set asks in the training families
    assert train.keys() == unseen.keys()
    for kind in train:  # every kind (frames around a phrase, noun frames, each operation's stories) has both,
        if kind.startswith("composed"):  # but composed stories (their events) are for training only
            assert train[kind] and not unseen[kind]
            continue
        assert train[kind] and unseen[kind] and not train[kind].keys() & unseen[kind].keys()
        assert not set(train[kind].values()) & set(unseen[kind].values())
    names = [set().union(*(f.keys() for f in fams.values())) for fams in (train, unseen)]
    assert names[1] == HELD_OUT and not names[0] & HELD_OUT and len(names[0]) > 2 * len(names[1])
    # the generated rows follow: no training row in a held-out family, every unseen row in one, all of them used
    assert not {c["family"] for c in Arithmetic(size=3000, split="train")} & HELD_OUT
    assert {c["family"] for c in Arithmetic(size=1000, split="test", phrasing="unseen")} == HELD_OUT
    with pytest.raises(ValueError, match="never trained on"):
        Arithmetic(split="train", phrasing="unseen")
    with pytest.raises(ValueError, match="phrasing"):
        Arithmetic(split="test", phrasing="new")


def test_unseen_questions_share_no_template_with_training_questions():
    """With the numbers, names and things masked, no unseen-family question equals a training question (the
    noise can make two questions equal only by a typo, not a shared sentence)."""
    def shape(conv):
        q = conv["messages"][0]["content"].lower()
        for w in sorted(conv["operands"], key=len, reverse=True):
            q = q.replace(w.lower(), "#")
        return q

    train = {shape(c) for c in Arithmetic(size=3000, split="train")}
    unseen = [shape(c) for c in Arithmetic(size=300, split="test", phrasing="unseen")]
    assert sum(u in train for u in unseen) == 0


def test_add_typo_changes_one_word_and_never_a_number():
    import random

    rng = random.Random(0)
    text = "Please multiply forty-two by seven hundred and twelve thousand"
    seen = set()
    for _ in range(200):
        typo = add_typo(rng, text)
        changed = [(a, b) for a, b in zip(text.split(), typo.split()) if a != b]
        assert len(typo.split()) == len(text.split()) and len(changed) == 1  # one word changed by one edit
        assert changed[0][0] in ("Please", "multiply") and abs(len(changed[0][1]) - len(changed[0][0])) <= 1
        seen.add(changed[0][0])
    assert seen == {"Please", "multiply"}
    assert add_typo(rng, "So, 12 + 7 = ?") == "So, 12 + 7 = ?"  # no word of 4+ letters: unchanged


def test_splits_share_no_problem_whatever_the_phrasing():
    train = {c["problem"] for c in Arithmetic(size=3000, split="train")}
    test = {c["problem"] for c in Arithmetic(size=400, split="test")}
    assert len(test) > 350 and not train & test
    assert problem_key("+", "7", "5") == problem_key("+", "5", "7") == problem_key("+", "5.0", "7")
    assert problem_key("-", "7", "5") != problem_key("-", "5", "7")
    assert is_test_problem("*", "28", "379") == is_test_problem("*", "379", "28")
    # the held-out test split is a different stream from a different seed's train split too
    assert not {c["problem"] for c in Arithmetic(size=500, split="train", seed=3)} & test
    # the unseen-phrasing set holds out its numbers too
    unseen = {c["problem"] for c in Arithmetic(size=400, split="test", phrasing="unseen")}
    assert len(unseen) > 350 and not train & unseen and all(is_test_problem(*_split(p)) for p in unseen)


def _split(problem: str) -> tuple[str, str, str]:
    a, op, b = re.fullmatch(r"(-?[\d.]+)([-+*/])(-?[\d.]+)", problem).groups()
    return op, a, b


def test_demo_questions_of_the_cpu_default_are_held_out_in_numbers_and_phrasing():
    script = (REPO / "runs" / "cpu_default.sh").read_text()
    unseen = families("test", "unseen")
    would_you = unseen["verb"]["would-you"].replace("{v}", "multiply {a} by {b}").format(a=379, b=28)
    points = unseen["story-"]["points"].format(name="Zoe", pro="she", a=144, b=48)
    demo = {would_you: ("*", "379", "28"), points: ("-", "144", "48")}
    assert list(demo) == ["Would you multiply 379 by 28, please?",
                          "Zoe scored 144 points and then lost 48 points. How many points does she have now?"]
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


def test_expression_copies_the_operands_as_written_and_the_calculator_reads_them():
    assert expression("-", "5", "-12") == "5-(-12)" and calculate("5-(-12)") == "17"
    assert expression("*", "-3", "4") == "-3*4"
    assert expression("+", "1,234", "5") == "1_234+5" and calculate("1_234+5") == "1239"
    assert expression("/", "12,345.5", "5") == "12_345.5/5" and calculate("12_345.5/5") == "2469.1"
    assert expression("*", "81", "Two hundred fifty-nine") == "81 * two hundred fifty-nine"
    assert calculate("81 * two hundred fifty-nine") == "20979"
    assert expression("-", "forty two", "-3") == "forty two - (-3)" and calculate("forty two - (-3)") == "45"


def test_a_separated_number_and_its_call_share_their_digit_tokens(tok):
    """The call writes "1,234" as 1_234: the digit tokens are the question's, only the separator token differs, so
    the model copies rather than regroups digits (its tokenizer splits "1234" and "1,234" into different chunks)."""
    for number in ("1,234", "12,345", "999,999.5", "3,000"):
        question, call = tok.encode(number), tok.encode(number.replace(",", "_"))
        assert len(question) == len(call)
        assert [q == c for q, c in zip(question, call)].count(False) == number.count(",")


def test_composed_stories_ask_the_same_question_after_events_of_different_operations():
    train = Arithmetic(size=4000, split="train")
    questions = {}  # the last sentence of a composed story -> the operations it followed
    for conv in train:
        if conv["family"] in families("train")["composed+"] | families("train")["composed-"]:
            last = re.split(r"(?<=[.!?]) ", conv["messages"][0]["content"].rstrip())[-1]
            questions.setdefault(last, set()).add(split_call(conv["expression"])[1])
    assert sum(ops == {"+", "-"} for ops in questions.values()) >= 3


def test_chat_eval_runs_the_no_tool_split_without_the_calculator_and_outside_chatcore(tok, monkeypatch):
    from nanochat.evals import chat, chat_eval, report

    rows = ["Arithmetic", "Arithmetic-Unseen", "Arithmetic-Unseen-NoTool"]
    assert [t for t in chat_eval.ALL_TASKS if t.startswith("Arithmetic")] == rows  # what chat-eval runs by default
    assert [chat.build_task(r, arithmetic_size=3).name for r in rows] == rows
    assert [chat.build_task(r, arithmetic_size=3).phrasing for r in rows] == ["seen", "unseen", "unseen"]
    # the report card's rows, each reading its own key
    assert [keys for label, keys in report.SUMMARY_METRICS if label.startswith("Arithmetic")] == [(r,) for r in rows]

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
    results = chat.run_chat_eval(None, tok, "cpu", ["GSM8K"] + rows, max_problems=2, log=lambda *a: None,
                                 arithmetic_problems=5, tasks={"GSM8K": always})
    assert calls == [True, True, True, False]
    assert [results["tasks"][r]["n"] for r in rows] == [5, 5, 5]  # not capped at 2
    assert results["tasks"]["GSM8K"]["n"] == 2
    assert results["chatcore"] == 1.0  # GSM8K alone: the arithmetic rows stay out of ChatCORE
    assert set(results["summary"]) == {"GSM8K", "ChatCORE", *rows}
