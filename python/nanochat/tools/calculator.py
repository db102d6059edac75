"""The calculator the model calls between <|python_start|> and <|python_end|>: a safe evaluator of small expressions.

Notable choices:
- An AST walk over an allow-list of node types; never `eval`/`exec`, no names, no attribute access except the listed
  string methods, no imports, no comprehensions, no lambdas.
- Numbers (int, float) with + - * / // % ** and unary + -; string literals with + and * (repeat), `len(s)` and the
  methods count, upper, lower, replace, strip, startswith, endswith, find, index, split; parentheses come for free.
- Numbers are read as people write them: Python's `1_234` for "1,234", and English number words outside string
  literals ("81 * two hundred fifty-nine", "one thousand and five"), so a model copies the operands of a request as
  written and the tool, not the model, turns them into digits. A run of words that is not one well-formed number
  ("five five", "hundred") is an error, never a guess.
- Work is bounded without signals or threads: the input length, the number of AST nodes, the bit size of every
  integer (checked *before* computing a product or a power), string lengths, float overflow, and the output length.
- Failures return a short text starting with "Error:" and never raise, so a bad tool call can never crash a
  generation.
- The result is always valid text (it encodes as UTF-8): a string literal may spell a lone surrogate ('\\ud800'),
  which Python strings hold but no tokenizer can encode, so such a result is refused with an error text.
"""

from __future__ import annotations

import ast
import io
import math
import operator
import tokenize
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------------------------
# Limits


@dataclass(frozen=True)
class CalculatorLimits:
    max_chars: int = 1000  # input expression length
    max_nodes: int = 200  # AST nodes visited
    max_int_bits: int = 4096  # about 1233 decimal digits
    max_str_len: int = 10_000  # any intermediate string
    max_output_chars: int = 1000  # the returned text
    max_exponent: int = 10_000  # |b| in a ** b


class CalculatorError(Exception):
    """A user-level failure (bad syntax, disallowed construct, a limit hit); turned into an error text."""


STRING_METHODS = {
    "count": (1, 3), "upper": (0, 0), "lower": (0, 0), "replace": (2, 3), "strip": (0, 1), "startswith": (1, 1),
    "endswith": (1, 1), "find": (1, 3), "index": (1, 3), "split": (0, 2),
}

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}


# ---------------------------------------------------------------------------------------------------------------
# Evaluator


class _Evaluator:
    def __init__(self, limits: CalculatorLimits):
        self.limits = limits
        self.nodes = 0

    def check(self, value):
        lim = self.limits
        if isinstance(value, bool):
            raise CalculatorError("booleans are not supported")
        if isinstance(value, int) and value.bit_length() > lim.max_int_bits:
            raise CalculatorError(f"integer too large (more than {lim.max_int_bits} bits)")
        if isinstance(value, float) and not math.isfinite(value):
            raise CalculatorError("result is not a finite number")
        if isinstance(value, str) and len(value) > lim.max_str_len:
            raise CalculatorError(f"string too long (more than {lim.max_str_len} characters)")
        if isinstance(value, list):
            if len(value) > lim.max_str_len:
                raise CalculatorError("list too long")
            for item in value:
                self.check(item)
        return value

    def visit(self, node: ast.AST):
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:
            raise CalculatorError(f"expression too complex (more than {self.limits.max_nodes} nodes)")
        if isinstance(node, ast.Expression):
            return self.visit(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float, str)):
                raise CalculatorError(f"unsupported literal {node.value!r}")
            return self.check(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            operand = self.visit(node.operand)
            if not isinstance(operand, (int, float)):
                raise CalculatorError("unary + and - need a number")
            return self.check(-operand if isinstance(node.op, ast.USub) else +operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return self.binop(node.op, self.visit(node.left), self.visit(node.right))
        if isinstance(node, ast.Call):
            return self.call(node)
        raise CalculatorError(f"unsupported syntax: {type(node).__name__}")

    def binop(self, op: ast.operator, a, b):
        lim = self.limits
        num = (int, float)
        if isinstance(a, num) and isinstance(b, num):
            if isinstance(op, ast.Mult) and isinstance(a, int) and isinstance(b, int):
                if a.bit_length() + b.bit_length() > lim.max_int_bits + 1:
                    raise CalculatorError(f"integer too large (more than {lim.max_int_bits} bits)")
            if isinstance(op, ast.Pow):
                if abs(b) > lim.max_exponent:
                    raise CalculatorError(f"exponent {b} too large (limit {lim.max_exponent})")
                both_int = isinstance(a, int) and isinstance(b, int)
                if both_int and b > 0 and (abs(a).bit_length() - 1) * b > lim.max_int_bits:
                    raise CalculatorError(f"integer too large (more than {lim.max_int_bits} bits)")
                if a == 0 and b < 0:
                    raise CalculatorError("division by zero")
                if isinstance(a, float) or isinstance(b, float) or b < 0:
                    if a < 0 and not float(b).is_integer():
                        raise CalculatorError("fractional power of a negative number")
            try:
                return self.check(_BINOPS[type(op)](a, b))
            except ZeroDivisionError:
                raise CalculatorError("division by zero") from None
            except OverflowError:
                raise CalculatorError("numeric overflow") from None
        if isinstance(op, ast.Add) and isinstance(a, str) and isinstance(b, str):
            if len(a) + len(b) > lim.max_str_len:
                raise CalculatorError(f"string too long (more than {lim.max_str_len} characters)")
            return a + b
        str_times_int = (isinstance(a, str) and isinstance(b, int)) or (isinstance(a, int) and isinstance(b, str))
        if isinstance(op, ast.Mult) and str_times_int:
            s, k = (a, b) if isinstance(a, str) else (b, a)
            if len(s) * max(k, 0) > lim.max_str_len:
                raise CalculatorError(f"string too long (more than {lim.max_str_len} characters)")
            return s * k
        raise CalculatorError(f"unsupported operand types for {type(op).__name__}: "
                              f"{type(a).__name__} and {type(b).__name__}")

    def call(self, node: ast.Call):
        if node.keywords:
            raise CalculatorError("keyword arguments are not supported")
        if isinstance(node.func, ast.Name) and node.func.id == "len" and len(node.args) == 1:
            arg = self.visit(node.args[0])
            if not isinstance(arg, (str, list)):
                raise CalculatorError("len() needs a string")
            return len(arg)
        if isinstance(node.func, ast.Attribute) and node.func.attr in STRING_METHODS:
            target = self.visit(node.func.value)
            if not isinstance(target, str):
                raise CalculatorError(f".{node.func.attr}() is only supported on strings")
            lo, hi = STRING_METHODS[node.func.attr]
            if not lo <= len(node.args) <= hi:
                raise CalculatorError(f".{node.func.attr}() takes {lo} to {hi} arguments, got {len(node.args)}")
            args = [self.visit(a) for a in node.args]
            if node.func.attr in ("count", "find", "index") and any(not isinstance(a, int) for a in args[1:]):
                raise CalculatorError(f".{node.func.attr}() start/end must be integers")
            needs_str = ("count", "replace", "startswith", "endswith", "find", "index")
            if node.func.attr in needs_str and not isinstance(args[0], str):
                raise CalculatorError(f".{node.func.attr}() needs a string argument")
            if node.func.attr == "replace":
                if not all(isinstance(a, str) for a in args[:2]) or (len(args) == 3 and not isinstance(args[2], int)):
                    raise CalculatorError(".replace() needs (str, str[, int])")
                worst = len(target) + (target.count(args[0]) if args[0] else len(target) + 1) * len(args[1])
                if worst > self.limits.max_str_len:
                    raise CalculatorError(f"string too long (more than {self.limits.max_str_len} characters)")
            sep_ok = args and (isinstance(args[0], str) or (node.func.attr == "split" and args[0] is None))
            if node.func.attr in ("strip", "split") and args and not sep_ok:
                raise CalculatorError(f".{node.func.attr}() needs a string argument")
            if node.func.attr == "split" and len(args) == 2 and not isinstance(args[1], int):
                raise CalculatorError(".split() maxsplit must be an integer")
            try:
                return self.check(getattr(target, node.func.attr)(*args))
            except ValueError as e:  # "".split(""), .index() not found
                raise CalculatorError(str(e)) from None
        raise CalculatorError("only len() and the string methods " + ", ".join(sorted(STRING_METHODS))
                              + " may be called")


# ---------------------------------------------------------------------------------------------------------------
# Number words

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SCALES = {"thousand": 1000, "million": 1_000_000, "billion": 1_000_000_000}
_SMALL = {w: i for i, w in enumerate(ONES)} | {w: 10 * i for i, w in enumerate(TENS) if w}
NUMBER_WORDS = frozenset(_SMALL) | {"hundred", "and"} | frozenset(SCALES)


def words_value(words: list[str]) -> int:
    """The value of number words already split on spaces and hyphens ("two hundred and fifty nine" -> 259), case
    insensitive. Well-formed means: scales descend (billion, million, thousand, then the rest), each group below a
    thousand reads [ones|teens|tens ones "hundred"] ["and"] [tens [ones] | teens | ones] ("twenty-five hundred" is
    2500), "and" only after a hundred or a scale; "zero" only alone. Anything else raises ValueError."""
    words = [w.lower() for w in words]
    if not words or any(w not in NUMBER_WORDS for w in words):
        raise ValueError(f"not a number: {' '.join(words)!r}")
    if words == ["zero"]:
        return 0
    total, part, hundred, last_scale = 0, 0, False, None
    state = "start"  # what the last word was: start (nothing, or a scale) | and | hundred | tens | unit
    for w in words:
        small = _SMALL.get(w)
        if w == "and":
            ok = state == "hundred" or (state == "start" and last_scale is not None)
        elif w == "hundred":
            ok = state in ("unit", "tens") and 0 < part < 100 and not hundred
        elif w in SCALES:
            ok = state in ("unit", "tens", "hundred") and (last_scale is None or SCALES[w] < last_scale)
        elif small == 0:
            ok = False
        elif small < 10:
            ok = state in ("start", "and", "hundred", "tens")
        else:
            ok = state in ("start", "and", "hundred")
        if not ok:
            raise ValueError(f"not a number: {' '.join(words)!r} ({w!r} cannot come where it does)")
        if w == "and":
            state = "and"
        elif w == "hundred":
            part, hundred, state = part * 100, True, "hundred"
        elif w in SCALES:
            total, part, hundred, last_scale, state = total + part * SCALES[w], 0, False, SCALES[w], "start"
        else:
            part += small
            state = "tens" if small >= 20 else "unit"
    if state == "and" or (state == "start" and last_scale is None):
        raise ValueError(f"not a number: {' '.join(words)!r}")
    return total + part


def read_number_words(expression: str) -> str:
    """`expression` with every run of number words outside string literals replaced by its digits ("81 * two
    hundred fifty-nine" -> "81 * 259"); unchanged where there are none. Raises CalculatorError for a run that is
    not one number. Text Python cannot tokenize is returned as is (the parser reports it)."""
    if not any(c.isalpha() for c in expression):  # digits and operators only: the common call, nothing to read
        return expression
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expression).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return expression
    lines = expression.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(pos: tuple[int, int]) -> int:
        return starts[pos[0] - 1] + pos[1]

    runs, i = [], 0  # (start offset, end offset, value)
    while i < len(tokens):
        t = tokens[i]
        after_dot = i > 0 and tokens[i - 1].string == "."  # an attribute: "x.one" is never a number
        if t.type == tokenize.NAME and t.string.lower() in NUMBER_WORDS and not after_dot:
            j, words = i, []
            while j < len(tokens):
                tj = tokens[j]
                if tj.type == tokenize.NAME and tj.string.lower() in NUMBER_WORDS:
                    words.append(tj.string)
                    j += 1
                elif (tj.string == "-" and words and words[-1].lower() in TENS and j + 1 < len(tokens)
                      and tokens[j + 1].string.lower() in ONES[1:10] and tokens[j - 1].end == tj.start
                      and tj.end == tokens[j + 1].start):  # "fifty-nine", but "fifty - nine" is a subtraction
                    j += 1
                else:
                    break
            try:
                value = words_value(words)
            except ValueError as e:
                raise CalculatorError(str(e)) from None
            glued = (i > 0 and tokens[i - 1].end == t.start and tokens[i - 1].type == tokenize.NUMBER) or (
                j < len(tokens) and tokens[j].start == tokens[j - 1].end and tokens[j].type in (tokenize.NUMBER,
                                                                                                  tokenize.NAME))
            if glued:  # "2two", "forty-two.5": digits glued to words are no one number
                raise CalculatorError(f"number words glued to other characters near {t.string!r}")
            runs.append((offset(t.start), offset(tokens[j - 1].end), value))
            i = j
        else:
            i += 1
    for start, end, value in reversed(runs):
        expression = expression[:start] + str(value) + expression[end:]
    return expression


# ---------------------------------------------------------------------------------------------------------------
# Public API


def format_result(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value)) if abs(value) >= 1 or value == 0 else repr(value)
    if isinstance(value, float):
        return repr(round(value, 10))
    return repr(value) if isinstance(value, list) else str(value)


def _check_text(s: str, what: str) -> str:
    """`s` when it is valid text (encodes as UTF-8), else a CalculatorError naming the first lone surrogate."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CalculatorError(f"{what} is not valid text (it holds U+{ord(s[e.start]):04X}, a lone surrogate, "
                              f"at character {e.start})") from None
    return s


def evaluate(expression: str, limits: CalculatorLimits | None = None) -> str:
    """Evaluate one calculator expression; returns the result as text, or "Error: ..." (never raises)."""
    limits = limits or CalculatorLimits()
    try:
        if not isinstance(expression, str):
            raise CalculatorError(f"expression must be a string, got {type(expression).__name__}")
        if len(expression) > limits.max_chars:
            raise CalculatorError(f"expression too long ({len(expression)} characters, limit {limits.max_chars})")
        if not expression.strip():
            raise CalculatorError("empty expression")
        _check_text(expression, "the expression")
        expression = read_number_words(expression.strip())
        try:
            tree = ast.parse(expression, mode="eval")
        except SyntaxError as e:
            raise CalculatorError(f"invalid syntax: {e.msg}") from None
        out = format_result(_Evaluator(limits).visit(tree))
        if len(out) > limits.max_output_chars:
            raise CalculatorError(f"result too long ({len(out)} characters, limit {limits.max_output_chars})")
        return _check_text(out, "the result")
    except CalculatorError as e:
        return f"Error: {e}"
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as e:  # deep nesting, odd input
        return f"Error: {type(e).__name__}"
