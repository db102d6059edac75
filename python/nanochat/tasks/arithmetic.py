"""Synthetic one-step arithmetic that a tiny model can solve by calling its calculator (the python tool).

- Questions in varied English: bare ("What is 123 times 45?", "Add 17 and 905.", "How much is 7.5 divided by 3?")
  and one-step word problems ("There are 12 boxes with 7 pencils in each. How many pencils are there in total?").
- The reference answer is exactly what the engine executes at inference: a python part with the expression
  (`123*45`), the calculator's own output (`nanochat.calculator.evaluate`, so the two can never disagree), then the
  result stated in text: "The answer is 5535." Nothing precedes the call, so the first sampled token decides it.
- Examples are a pure function of (seed, split, index). A problem is (operation, operands) with + and * operands
  sorted; its SHA-256 puts it in the held-out split (1 in 8) or the training split, and each split draws until it
  gets one of its own, so the splits share no problem whatever the phrasing, sizes or seeds.
- Scoring: the last number of the reply's text outside the tool blocks (commas, a trailing period or words, a
  leading minus all handled) must equal the calculator's result. `tools=False` marks the evaluation without the
  tool: the engine then runs no calculator and the model must produce the number itself.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from decimal import Decimal

from nanochat.tasks.base import Task
from nanochat.calculator import evaluate as calculate

OPS = "+-*/"
TEST_FRACTION = 8  # one problem in 8 is held out
ANSWER_TEXT = "\n\nThe answer is {}."

# Bare questions, per operation; {a} and {b} are the operands in expression order (a op b).
PHRASES = {
    "+": ["What is {a} plus {b}?", "What's {a} + {b}?", "Add {a} and {b}.", "How much is {a} plus {b}?",
          "Calculate {a} + {b}.", "What is the sum of {a} and {b}?", "{a} plus {b} is what?", "Compute {a}+{b}.",
          "what is {a} added to {b}", "Please add {a} to {b}."],
    "-": ["What is {a} minus {b}?", "What's {a} - {b}?", "Subtract {b} from {a}.", "How much is {a} minus {b}?",
          "Calculate {a} - {b}.", "What do you get if you take {b} away from {a}?", "{a} minus {b} is what?",
          "Compute {a}-{b}.", "what is {b} less than {a}", "What is the difference {a} minus {b}?"],
    "*": ["What is {a} times {b}?", "What's {a} * {b}?", "Multiply {a} by {b}.", "How much is {a} multiplied by {b}?",
          "Calculate {a} * {b}.", "What is the product of {a} and {b}?", "{a} times {b} is what?",
          "Compute {a}*{b}.", "what is {a} x {b}", "How much is {a} times {b}?"],
    "/": ["What is {a} divided by {b}?", "What's {a} / {b}?", "Divide {a} by {b}.", "How much is {a} divided by {b}?",
          "Calculate {a} / {b}.", "What is {a} over {b}?", "{a} divided by {b} is what?", "Compute {a}/{b}.",
          "what is {a} split into {b} equal parts", "How much is {a} shared by {b}?"],
}
# One-step word problems; {a} op {b} again. Counts are whole numbers; "dollars" problems may have cents.
STORIES = {
    "+": ["{name} has {a} {things}. {Pro} gets {b} more. How many {things} does {pro} have now?",
          "A shop sold {a} {things} in the morning and {b} in the afternoon. How many {things} did it sell in all?",
          "There are {a} {things} in one box and {b} in another. How many {things} are there altogether?",
          "{name} spent {a} dollars on Monday and {b} dollars on Tuesday. How much did {pro} spend in total?"],
    "-": ["{name} had {a} {things} and gave {b} to a friend. How many {things} does {pro} have left?",
          "A library had {a} {things}. It lent out {b} of them. How many are still there?",
          "{name} needs {a} {things} and already has {b}. How many more does {pro} need?",
          "{name} had {a} dollars and spent {b} dollars. How much money is left?"],
    "*": ["There are {a} boxes with {b} {things} in each. How many {things} are there in total?",
          "{name} buys {a} packs of {things}. Each pack has {b}. How many {things} is that?",
          "A garden has {a} rows of {b} plants. How many plants are in the garden?",
          "One ticket costs {b} dollars. How much do {a} tickets cost?"],
    "/": ["{a} {things} are shared equally among {b} children. How many does each child get?",
          "{name} puts {a} {things} into {b} equal piles. How many {things} are in each pile?",
          "{b} friends split a bill of {a} dollars equally. How much does each friend pay?",
          "A ribbon {a} meters long is cut into {b} equal pieces. How long is each piece in meters?"],
}
NAMES = [("Sam", "he"), ("Mia", "she"), ("Leo", "he"), ("Ana", "she"), ("Tom", "he"), ("Zoe", "she"),
         ("Ravi", "he"), ("Lena", "she"), ("Omar", "he"), ("Iris", "she")]
THINGS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "coins", "cards", "shells", "stamps"]


# ---------------------------------------------------------------------------------------------------------------
# Problems


def _number(rng: random.Random, digits: int, decimal: bool = False) -> Decimal:
    value = Decimal(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1))
    return value + Decimal(rng.randint(1, 9)) / 10 if decimal else value


def _digits(rng: random.Random) -> int:
    return rng.choices([1, 2, 3, 4], weights=[2, 4, 3, 1])[0]


def _text(x: Decimal) -> str:
    return format(x.normalize(), "f") if x != x.to_integral_value() else str(int(x))


def problem_key(op: str, a: str, b: str) -> str:
    """The problem without its phrasing: + and * operands sorted (7+5 is 5+7), numbers canonical (7.50 is 7.5)."""
    a, b = _text(Decimal(a)), _text(Decimal(b))
    if op in "+*":
        a, b = sorted((a, b))
    return f"{a}{op}{b}"


def is_test_problem(op: str, a: str, b: str) -> bool:
    digest = hashlib.sha256(problem_key(op, a, b).encode()).digest()
    return int.from_bytes(digest[:8], "big") % TEST_FRACTION == 0


def expression(op: str, a: str, b: str) -> str:
    """The calculator call: `123*45`, a negative right operand in parentheses (`5-(-12)`)."""
    return f"{a}{op}({b})" if b.startswith("-") else f"{a}{op}{b}"


def draw_problem(rng: random.Random, op: str, decimals: bool, negatives: bool) -> tuple[str, str]:
    """Operands (a, b) of `a op b` as they will be written. Without `negatives`, a subtraction never goes below 0;
    quotients are exact and short (a = b x quotient); products stay within 8 digits."""
    decimal = decimals and rng.random() < 0.15
    if op == "/":
        b = Decimal(rng.randint(2, 99) if rng.random() < 0.7 else rng.randint(2, 9))
        a = b * _number(rng, rng.choice([1, 2, 2, 3]), decimal)
    else:
        a, b = _number(rng, _digits(rng), decimal), _number(rng, _digits(rng), decimal and rng.random() < 0.5)
        if op == "*" and a * b >= 10 ** 8:
            b = _number(rng, 2, False)
        if op == "-" and not negatives and b > a:
            a, b = b, a
        if negatives and rng.random() < 0.08:
            a, b = (-a, b) if rng.random() < 0.5 else (a, -b)
    return _text(a), _text(b)


# ---------------------------------------------------------------------------------------------------------------
# Scoring


_TOOL_BLOCK = re.compile(r"<\|python_start\|>.*?(?:<\|python_end\|>|$)|<\|output_start\|>.*?(?:<\|output_end\|>|$)",
                         re.DOTALL)
# a number: optional minus (not the minus of "12-7", which reads 12 and 7), digits with optional thousands commas,
# optional decimals; "5,535" is one number, "1,2" is two
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\d+(?:,\d{3})*(?:\.\d+)?")


def final_number(completion: str) -> str | None:
    """The last number in the reply's own text (tool calls and outputs removed), without commas; None if none."""
    found = _NUMBER.findall(_TOOL_BLOCK.sub(" ", completion))
    return found[-1].replace(",", "") if found else None


def numbers_match(got: str | None, want: str) -> bool:
    if got is None:
        return False
    try:
        return math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-9)
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# The task


class Arithmetic(Task):
    """`size` problems of the train or test split; `tools=False` is the same split evaluated without the tool."""

    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, tools: bool = True, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"split must be train|test, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size, self.split, self.seed, self.tools = size, split, seed, tools

    @property
    def name(self) -> str:
        return "Arithmetic" if self.tools else "Arithmetic-NoTool"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"Arithmetic:{self.seed}:{self.split}:{index}")
        op = rng.choice(OPS)
        story = rng.random() < 0.3
        template = rng.choice(STORIES[op] if story else PHRASES[op])
        measured = "dollars" in template or "meters" in template  # counts of things stay whole
        while True:
            a, b = draw_problem(rng, op, decimals=measured or not story, negatives=not story)
            result = calculate(expression(op, a, b))
            if is_test_problem(op, a, b) == (self.split == "test") and len(result) <= 12 \
                    and not result.startswith("Error"):
                break
        name, pro = rng.choice(NAMES)
        question = template.format(a=a, b=b, name=name, pro=pro, Pro=pro.capitalize(), things=rng.choice(THINGS))
        expr = expression(op, a, b)
        parts = [{"type": "python", "text": expr}, {"type": "python_output", "text": result},
                 {"type": "text", "text": ANSWER_TEXT.format(result)}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": result, "expression": expr, "problem": problem_key(op, a, b)}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return numbers_match(final_number(completion), conversation["answer"])
