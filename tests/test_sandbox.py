"""The sandbox runs good code and turns every escape attempt into a failed sample without harming the parent."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from nanochat.tools.sandbox import SandboxLimits, SandboxUnavailable, available_protections, run_code, sandbox_mode

FAST = SandboxLimits(timeout_s=3.0, cpu_s=3, memory_mb=512)


def test_runs_good_code_and_captures_output():
    r = run_code("import math\nprint(math.factorial(5))\nprint(sum(range(10)))", FAST)
    assert r.success and r.status == "ok" and r.returncode == 0
    assert r.stdout.split() == ["120", "45"]
    assert "audit" in r.protections and "rlimits" in r.protections


def test_failing_assertion_is_a_failed_sample():
    r = run_code("def f(x):\n    return x + 1\nassert f(1) == 3", FAST)
    assert not r.success and r.status == "error" and "AssertionError" in r.stderr


def test_scratch_dir_is_cwd_and_writable():
    r = run_code("open('notes.txt', 'w').write('hi')\nimport os\nprint(open('notes.txt').read(), os.getcwd())", FAST)
    assert r.success, r.stderr
    text, cwd = r.stdout.split()
    assert text == "hi" and "nanochat_sandbox_" in cwd and not os.path.exists(cwd)  # removed afterwards


def test_write_outside_scratch_fails(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_code(f"open({str(target)!r}, 'w').write('pwned')", FAST)
    assert not r.success and r.status == "violation"
    assert not target.exists()
    r = run_code(f"import os\nos.remove({str(tmp_path)!r})", FAST)
    assert not r.success and tmp_path.exists()


def test_socket_fails():
    r = run_code("import socket\ns = socket.create_connection(('127.0.0.1', 9), timeout=1)\nprint('connected')", FAST)
    assert not r.success and "connected" not in r.stdout


def test_listening_parent_socket_is_unreachable(loopback_listener):
    port = loopback_listener.getsockname()[1]
    r = run_code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('in')", FAST)
    assert not r.success and "in" not in r.stdout
    with pytest.raises(socket.timeout):
        loopback_listener.accept()


def test_fork_bomb_fails():
    r = run_code("import os\nwhile True:\n    os.fork()", FAST)
    assert not r.success
    r = run_code("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])", FAST)
    assert not r.success


def test_memory_exhaustion_fails():
    r = run_code("x = bytearray(8 << 30)\nprint('allocated')", FAST)
    assert not r.success and r.status == "memory" and "allocated" not in r.stdout
    r = run_code("xs = []\nwhile True:\n    xs.append(' ' * (1 << 20))", FAST)
    assert not r.success and r.status in ("memory", "timeout")


def test_infinite_loop_times_out():
    r = run_code("while True:\n    pass", SandboxLimits(timeout_s=1.0, cpu_s=5))
    assert not r.success and r.status == "timeout" and r.duration_s < 4


def test_environment_secrets_are_invisible(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    r = run_code("import os\nprint(dict(os.environ))", FAST)
    assert r.success and "hunter2" not in r.stdout and "NANOCHAT_TEST_SECRET" not in r.stdout
    r = run_code(f"print(open('/proc/{os.getpid()}/environ').read())", FAST)
    assert not r.success and "hunter2" not in r.stdout
    r = run_code("print(open('/proc/1/environ').read())", FAST)
    assert not r.success


def test_output_flood_is_capped():
    r = run_code("while True:\n    print('x' * 4096)", SandboxLimits(timeout_s=5.0, max_output_bytes=1 << 16))
    assert not r.success and r.status == "output_limit" and len(r.stdout) < (1 << 18)


def test_ctypes_is_blocked():
    r = run_code("import ctypes\nprint('loaded')", FAST)
    assert not r.success and "loaded" not in r.stdout


@pytest.mark.skipif(os.getuid() != 0, reason="the namespace + uid-drop mode needs root")
def test_namespace_mode_is_unsandboxed_but_its_layers_hold(tmp_path):
    """Without the kernel barrier the namespaces and the uid drop are no sandbox: run_code refuses unless the caller
    accepts that; when it does, they still block the network and foreign writes."""
    bare = SandboxLimits(timeout_s=3.0, audit=False, kernel_barrier=False)
    marker = tmp_path / "ran"
    tmp_path.chmod(0o777)
    with pytest.raises(SandboxUnavailable, match="--allow-unsandboxed"):
        run_code(f"open({str(marker)!r}, 'w').write('ran')", bare)
    assert not marker.exists()
    r = run_code("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\nprint('in')", bare,
                 allow_unsandboxed=True)
    assert r.protections == ["netns", "disk-quota", "pidns", "rlimits", "uid-drop"]
    assert sandbox_mode(r.protections) == "namespace"
    assert not r.success and "in" not in r.stdout
    r = run_code("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)", bare, allow_unsandboxed=True)
    assert not r.success and ("unreachable" in r.stderr.lower() or "timed out" in r.stderr.lower()), r.stderr
    target = tmp_path / "escaped.txt"
    tmp_path.chmod(0o755)
    r = run_code(f"open({str(target)!r}, 'w').write('pwned')", bare, allow_unsandboxed=True)
    assert not r.success and not target.exists() and "PermissionError" in r.stderr


def test_modes_on_this_machine():
    """As root every layer applies; as an unprivileged user at least the kernel barrier does (where the kernel has
    Landlock and libseccomp is installed, as on CI)."""
    import ctypes.util

    import landlockpy

    protections = available_protections()
    assert "rlimits" in protections and "audit" in protections
    if landlockpy.abi_version() >= 1:
        assert "landlock" in protections
    if ctypes.util.find_library("seccomp"):
        assert "seccomp" in protections
    if os.getuid() == 0:
        assert {"netns", "uid-drop"} <= set(protections)
    else:
        assert "uid-drop" not in protections
        if subprocess.run(["unshare", "--user", "--net", "true"], capture_output=True).returncode != 0:
            assert "netns" not in protections  # no user namespaces: the kernel barrier is all there is (CI's 2nd run)
    if {"landlock", "seccomp"} <= set(protections):
        assert sandbox_mode(protections) == "kernel"


def test_refuses_without_kernel_isolation(tmp_path):
    """Without the kernel barrier and without namespace + uid drop, the program is never started unless the caller
    accepts running unsandboxed."""
    marker = tmp_path / "ran"
    tmp_path.chmod(0o777)
    none = SandboxLimits(timeout_s=3.0, kernel_barrier=False, namespaces=False, drop_uid=False)
    with pytest.raises(SandboxUnavailable, match="--allow-unsandboxed"):
        run_code(f"open({str(marker)!r}, 'w').write('ran')", none)
    assert not marker.exists()
    r = run_code("print('hi')", none, allow_unsandboxed=True)
    assert r.success and r.stdout == "hi\n" and sandbox_mode(r.protections) == "none"
    assert "seccomp" not in r.protections and "landlock" not in r.protections


# ---------------------------------------------------------------------------------------------------------------
# A pass means the program ran to its last line


def test_a_filled_quota_counts_when_the_program_exits_before_the_watchdog_looks(monkeypatch):
    """A program that fills its tmpfs and exits at once ends "disk_limit", not "ok", even when the parent's watchdog
    never looked while it ran (here: a 30 s interval; the run takes well under a second)."""
    if "disk-quota" not in available_protections():
        pytest.skip("needs the tmpfs disk quota (a mount namespace)")
    from nanochat.tools import sandbox

    monkeypatch.setattr(sandbox, "DISK_CHECK_INTERVAL_S", 30.0)
    fill = ("import os\nfd = os.open('f', os.O_CREAT | os.O_WRONLY, 0o600)\ntry:\n"
            "    os.write(fd, bytes(16 << 20))\n    os.write(fd, bytes(16 << 20))\nexcept OSError as e:\n"
            "    print('refused', e.errno)\n")
    r = run_code(fill, SandboxLimits(timeout_s=10.0, cpu_s=10, memory_mb=512, max_disk_mb=8))
    assert "refused 28" in r.stdout, (r.status, r.stdout, r.stderr[-500:])  # ENOSPC: the kernel held the quota
    assert r.status == "disk_limit" and not r.success, (r.status, r.stdout, r.stderr[-500:])


def test_exit_zero_before_the_end_is_not_a_pass():
    for code in ["import sys\nsys.exit(0)\nprint('end')", "import os\nos._exit(0)", "raise SystemExit(0)",
                 "import sys\nprint('0' * 32)\nsys.stdout.flush()\nimport os\nos._exit(0)",
                 "import sys\nprint(sys.stdin.read())\nraise SystemExit"]:
        r = run_code(code, FAST)
        assert r.returncode == 0 and r.status == "incomplete" and not r.completed and not r.success, code
    r = run_code("print('end', end='')", FAST)
    assert r.success and r.completed and r.stdout == "end"  # the proof line is removed from the output


ROW = {"task_id": "T/0", "entry_point": "add",
       "prompt": 'import math\n\n\ndef add(a, b):\n    """Return a + b."""\n',
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n"}


@pytest.mark.parametrize("completion", [
    "    import sys\n    sys.exit(0)",                                    # exit 0 inside the function
    "```python\nimport sys\nsys.exit(0)\n```",                           # exit 0 at top level
    "    import os\n    os._exit(0)",                                    # no clean-up, no exception
    "    raise SystemExit(0)",                                          # raised inside check's caller
    "    import builtins\n    raise builtins.SystemExit",
    "```python\ndef add(a, b):\n    raise SystemExit\nimport atexit\natexit.register(print, '0' * 32)\n```",
    "    print('0123456789abcdef0123456789abcdef')\n    import os\n    os._exit(0)",  # a guessed nonce
    "    import sys\n    print(sys.stdin.read())\n    sys.exit(0)",        # the nonce is not on stdin
    "    return a - b",
])
def test_humaneval_fails_everything_but_a_returning_check(completion):
    from nanochat.tasks.humaneval import passes

    assert not passes(ROW, completion, FAST)


def test_humaneval_passes_correct_solutions():
    from nanochat.tasks.humaneval import passes

    assert passes(ROW, "    return a + b", FAST)
    assert passes(ROW, "```python\ndef add(a, b):\n    print('noise')\n    return math.fsum([a, b])\n```", FAST)


def test_chat_eval_refuses_humaneval_without_a_sandbox(monkeypatch, capsys, base_dir):
    import nanochat.tools.sandbox
    from nanochat.evals import chat_eval

    for layers in (["rlimits", "audit"], ["netns", "pidns", "rlimits", "uid-drop", "audit"]):  # none, namespace
        monkeypatch.setattr(nanochat.tools.sandbox, "available_protections", lambda *a, layers=layers, **k: layers)
        assert chat_eval.main(["--tasks", "HumanEval", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "--allow-unsandboxed" in err and "Traceback" not in err


@pytest.mark.slow
def test_remove_tree_any_depth_without_following_links(tmp_path):
    """The scratch clean-up: 3,000 nested dirs (paths past PATH_MAX), a dir without permissions and a symlink to a
    dir outside; the tree is gone, the link's target is untouched, and nothing raises."""
    from nanochat.tools.sandbox import remove_tree

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    root = tmp_path / "scratch"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for _ in range(3000):
        os.mkdir("d", dir_fd=fd)
        sub = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.symlink(str(outside), "link", dir_fd=fd)
    os.mkdir("locked", dir_fd=fd)
    os.chmod("locked", 0, dir_fd=fd)
    os.close(fd)
    assert remove_tree(str(root)) and not root.exists()
    assert (outside / "keep.txt").read_text() == "keep"
    assert remove_tree(str(root))  # already gone: fine


def test_bad_code_type():
    with pytest.raises(TypeError, match="code must be a str"):
        run_code(b"print(1)")  # type: ignore[arg-type]


def test_report_card_names_the_sandbox_mode():
    from nanochat.evals.report import _eval_metrics

    metrics = _eval_metrics({"summary": {"HumanEval": 0.5}, "sandbox": {"mode": "kernel",
                                                                        "protections": ["seccomp", "landlock"]}})
    assert metrics["HumanEval sandbox"] == "kernel (seccomp, landlock)" and metrics["HumanEval"] == 0.5
    metrics = _eval_metrics({"summary": {"HumanEval": 0.5}, "sandbox": {"mode": "namespace", "unsandboxed": True,
                                                                        "protections": ["netns", "uid-drop"]}})
    assert "UNSANDBOXED" in metrics["HumanEval sandbox"] and "--allow-unsandboxed" in metrics["HumanEval sandbox"]
