"""The sandbox runs good code and turns every escape attempt into a failed sample without harming the parent."""

from __future__ import annotations

import os
import socket

import pytest

from nanochat.sandbox import SandboxLimits, available_protections, run_code

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


def test_listening_parent_socket_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        r = run_code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('in')", FAST)
        assert not r.success and "in" not in r.stdout
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


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


@pytest.mark.skipif("netns" not in available_protections(), reason="no network namespace on this system")
def test_kernel_layers_alone_block_network_and_foreign_writes(tmp_path):
    """With the audit hook off, the network namespace (and the uid drop, when root) still hold."""
    bare = SandboxLimits(timeout_s=3.0, audit=False)
    r = run_code("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\nprint('in')", bare)
    assert not r.success and "in" not in r.stdout and "audit" not in r.protections
    r = run_code("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)", bare)
    assert not r.success and ("unreachable" in r.stderr.lower() or "timed out" in r.stderr.lower()), r.stderr
    if "uid-drop" in r.protections:
        target = tmp_path / "escaped.txt"
        r = run_code(f"open({str(target)!r}, 'w').write('pwned')", bare)
        assert not r.success and not target.exists() and "PermissionError" in r.stderr


def test_bad_code_type():
    with pytest.raises(TypeError, match="code must be a str"):
        run_code(b"print(1)")  # type: ignore[arg-type]
