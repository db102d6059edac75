"""The calculator tool: arithmetic and string methods agree with Python, everything else is refused with an error
text, and every limit holds without raising."""

import random
import time

import pytest

from nanochat.tools.calculator import CalculatorLimits, evaluate


@pytest.mark.parametrize("expr", [
    "1+2*3", "(1+2)*3", "7//2", "-7%3", "2**10", "-(3-10)", "+4", "17 % 5 * 3", "2**-1", "1.5*2.25",
    "123456789*987654321", "(2**64)//7", "10/4",
])
def test_arithmetic_matches_python(expr):
    expected = eval(expr)  # noqa: S307 - the trusted reference for literals written in this file
    got = evaluate(expr)
    assert float(got) == pytest.approx(float(expected)), (expr, got)


def test_random_expressions_match_python():
    rng = random.Random(0)
    for _ in range(200):
        a, b, c = rng.randint(-999, 999), rng.randint(1, 999), rng.randint(-50, 50)
        op1, op2 = rng.choice("+-*"), rng.choice(["+", "-", "*", "//", "%"])
        expr = f"({a} {op1} {c}) {op2} {b}"
        assert evaluate(expr) == str(eval(expr)), expr  # noqa: S307


@pytest.mark.parametrize("expr,expected", [
    ('"strawberry".count("r")', "3"), ('len("hello world")', "11"), ('"Abc".upper()', "ABC"),
    ('"Abc".lower()', "abc"), ('"banana".replace("a", "o")', "bonono"), ('"ab" * 3', "ababab"),
    ('"ab" + "cd"', "abcd"), ('"a,b".split(",")', "['a', 'b']"), ('len("x" * 50)', "50"),
])
def test_string_methods(expr, expected):
    assert evaluate(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "open('/etc/passwd')", "().__class__", "(1).real", "x + 1",
    "[1, 2]", "{1: 2}", "lambda: 1", "[i for i in 'ab']", "True", "None", "'a'.format(1)", "'a'.__len__()",
    "len('a', 'b')", "1 if 1 else 2", "1 < 2", "f'{1}'", "a := 3", "import os",
])
def test_disallowed_constructs_are_errors(expr):
    out = evaluate(expr)
    assert out.startswith("Error:"), (expr, out)


@pytest.mark.parametrize("expr", [
    "9**9**9", "2**100000", "10**5000", "(10**1000)*(10**1000)", "'a'*10**9", "'ab'.replace('', 'x'*9000)",
    "10.0**400", "1/0", "5 % 0", "2**4000/3", "(-8)**0.5", "0**-1", "(" * 300 + "1" + ")" * 300, "1+" * 2000 + "1",
    "", "   ", "1 +", "'unterminated",
])
def test_limits_and_failures_return_error_text_quickly(expr):
    t0 = time.perf_counter()
    out = evaluate(expr)
    assert out.startswith("Error:"), (expr[:40], out)
    assert time.perf_counter() - t0 < 0.5


def test_output_size_is_bounded():
    limits = CalculatorLimits(max_output_chars=20)
    assert evaluate("'x' * 10", limits) == "x" * 10
    assert evaluate("'x' * 100", limits).startswith("Error: result too long")
    assert evaluate(12345) .startswith("Error:")  # not a string


@pytest.mark.parametrize("expr,bad", [
    (r"'\ud800'", "U+D800"), (r"'ok \udfff'.upper()", "U+DFFF"), (r"'\ud83d\ude00'", "U+D83D"),
    (r"'a' + '\udc80'", "U+DC80"),
])
def test_results_that_are_not_valid_text_are_refused(expr, bad, tok):
    """A lone surrogate is a Python string but not text: the tokenizer could not encode it as the tool output."""
    out = evaluate(expr)
    assert out.startswith("Error: the result is not valid text") and bad in out, (expr, out)
    tok.encode(out)  # the error text itself is what the model then reads


def test_an_expression_that_is_not_valid_text_is_refused():
    """The character itself, not a spelled escape: refused before parsing, with the same kind of message."""
    assert evaluate("'\ud800'") == ("Error: the expression is not valid text (it holds U+D800, a lone surrogate, "
                                     "at character 1)")


@pytest.mark.parametrize("expr,expected", [
    (r"len('\ud800')", "1"), (r"'\ud800'.split('x')", r"['\ud800']"), (r"'\U0001F600'", "\U0001F600"),
    (r"'caf\xe9'", "café"),
])
def test_valid_text_from_escapes_still_evaluates(expr, expected):
    assert evaluate(expr) == expected


@pytest.mark.parametrize("expr,expected", [
    ("81 * two hundred fifty-nine", "20979"), ("one thousand and five + 1", "1006"), ("Twenty-five hundred / 5", "500"),
    ("fifty-nine", "59"), ("fifty - nine", "41"), ("ninety six*466", "44736"), ("twelve hundred", "1200"),
    ("one million two hundred thousand", "1200000"), ("seven thousand five hundred twenty-eight - 772", "6756"),
    ("-five", "-5"), ("(two)*3", "6"), ("zero", "0"), ("2*(three+four)", "14"), ("1_887*51", "96237"),
    ("'one two'.upper()", "ONE TWO"),  # words inside a string literal stay text
    ("len('seven')+one", "6"),
])
def test_number_words_and_separators_read_as_numbers(expr, expected):
    assert evaluate(expr) == expected


@pytest.mark.parametrize("expr", [
    "five five", "hundred", "three and four", "zero zero", "one thousand thousand", "two hundred and",
    "thousand one", "twenty twelve", "forty-two.5", "2two", "and", "one hundred hundred", "twenty thirty",
])
def test_malformed_number_words_are_an_error_not_a_guess(expr):
    assert evaluate(expr).startswith("Error:"), expr


def test_words_value_agrees_with_the_task_spelling_of_every_number():
    from nanochat.tasks.arithmetic import spell
    from nanochat.tools.calculator import words_value

    for n in list(range(3000)) + list(range(3000, 1_000_000, 991)):
        for british in (False, True):
            text = spell(n, british=british, hyphen=n % 3 == 0)
            assert words_value(text.replace("-", " ").split()) == n
            assert evaluate(f"{text} + 0") == str(n)
