"""The sandbox's child module, step by step: each helper is imported and called directly. The layers are irrevocable,
so every step that installs one runs in a forked process and reports back through a pipe; the end-to-end behaviour
is tests/test_sandbox.py's and tests/test_sandbox_escapes.py's."""

from __future__ import annotations

import ast
import json
import os
import resource
import socket
import sys
import threading
from pathlib import Path

import pytest

from nanochat.tools import sandbox_child as child
from nanochat.tools.sandbox import SandboxLimits, child_config, run_code


def in_fork(fn):
    """fn() in a forked process; returns its JSON-able result, or raises AssertionError with the child's error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = {"result": fn()}
        except BaseException as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    out = json.loads(data)
    assert "error" not in out, out["error"]
    return out["result"]


def outcome(fn) -> str:
    """"ok" or the exception's type name (with its errno for OSError)."""
    try:
        fn()
    except OSError as e:
        return f"{type(e).__name__}:{e.errno}"
    except Exception as e:
        return type(e).__name__
    return "ok"


def config(scratch: Path) -> dict:
    """The configuration the parent would pass, through JSON as it travels."""
    cfg = child_config(str(scratch), SandboxLimits(), nonce_fd=-1, channel_fds=[], require_isolation=True)
    return json.loads(json.dumps(cfg))


def test_the_configuration_is_plain_data(tmp_path):
    cfg = child_config(str(tmp_path), SandboxLimits(cpu_s=3), nonce_fd=7, channel_fds=[8, 9], require_isolation=False)
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["cpu_s"] == 3 and cfg["nonce_fd"] == 7 and cfg["channel_fds"] == [8, 9]
    assert not cfg["require_isolation"] and "socketpair" not in cfg["seccomp_allow"]


def test_header_round_trip_and_partial_lines():
    line = child.format_header(["rlimits", "seccomp"], {"netns": "Operation not permitted"}, False).encode()
    expected = {"protections": ["rlimits", "seccomp"], "unavailable": {"netns": "Operation not permitted"},
                "refused": False}
    assert child.parse_header(line + b"Traceback (most recent call last):\n") == expected
    assert child.parse_header(line[:-1]) is None  # the line is not complete yet
    assert child.parse_header(b"Traceback (most recent call last):\n") == {}  # the bootstrap failed before it
    assert child.parse_header(b"x" * (child.HEADER_LIMIT + 1)) == {}


def test_the_child_imports_only_the_standard_library_and_the_barrier_libraries():
    tree = ast.parse(Path(child.__file__).read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert names - set(sys.stdlib_module_names) == {"landlockpy", "pyseccomp"}


def test_the_program_runs_isolated_without_the_package():
    """Isolated mode, no module of the package loaded, neither the child's dir nor the working dir on sys.path."""
    tools = os.path.dirname(os.path.realpath(child.__file__))
    r = run_code("import os, sys\n"
                 "print(sys.flags.isolated, sorted(m for m in sys.modules if m.split('.')[0] == 'nanochat'),\n"
                 f"      [p for p in sys.path if p in ('', '.', os.getcwd()) or os.path.realpath(p) == {tools!r}])",
                 SandboxLimits(timeout_s=5.0), allow_unsandboxed=True)
    assert r.success, r.stderr
    assert r.stdout.split("\n")[0] == "1 [] []"


def test_set_limit_takes_the_value_or_the_lower_hard_limit():
    def body():
        if os.getuid() == 0:  # root may raise a hard limit: the clamp is for an unprivileged process
            os.setgroups([])
            os.setgid(child.NOBODY)
            os.setuid(child.NOBODY)
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
        child.set_limit(resource.RLIMIT_NOFILE, 64)  # above the hard limit: the hard limit
        above = resource.getrlimit(resource.RLIMIT_NOFILE)
        child.set_limit(resource.RLIMIT_NOFILE, 40)
        below = resource.getrlimit(resource.RLIMIT_NOFILE)
        child.set_limit(resource.RLIMIT_CPU, 7)
        return [above, below, resource.getrlimit(resource.RLIMIT_CPU)]

    assert in_fork(body) == [[48, 48], [40, 40], [7, 7]]


def test_set_limits_applies_the_configured_values(tmp_path):
    cfg = {**config(tmp_path), "cpu_s": 4, "memory_mb": 1 << 24, "max_file_mb": 2, "max_open_files": 50,
           "max_processes": 30}

    def body():
        child.set_limits(cfg)
        return [resource.getrlimit(k) for k in (resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_FSIZE,
                                                resource.RLIMIT_NOFILE, resource.RLIMIT_NPROC, resource.RLIMIT_CORE)]

    got = in_fork(body)
    assert got == [[4, 4], [1 << 44] * 2, [2 << 20] * 2, [50, 50], [30, 30], [0, 0]]


def test_the_seccomp_filter_lets_computation_through_and_refuses_escapes(tmp_path):
    sc = pytest.importorskip("pyseccomp")
    cfg = config(tmp_path)
    target = tmp_path / "f.txt"
    target.write_text("x")
    target.chmod(0o600)

    def fork_once():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    def thread():
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()

    def body():
        child.seccomp_filter(sc, cfg, os.getpid()).load()
        return {
            "own kill": outcome(lambda: os.kill(os.getpid(), 0)),
            "parent kill": outcome(lambda: os.kill(os.getppid(), 0)),
            "inet socket": outcome(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
            "unix stream pair": outcome(lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)),
            "unix datagram pair": outcome(lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)),
            "fork": outcome(fork_once),
            "thread": outcome(thread),
            "chmod": outcome(lambda: os.chmod(target, 0o777)),
            "mode after chmod": oct(os.stat(target).st_mode & 0o777),
            "setrlimit": outcome(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (10, 10))),
            "getrlimit": outcome(lambda: resource.getrlimit(resource.RLIMIT_NOFILE)),
            "read file": outcome(lambda: target.read_text()),
        }

    assert in_fork(body) == {
        "own kill": "ok", "parent kill": "PermissionError:1", "inet socket": "PermissionError:1",
        "unix stream pair": "ok", "unix datagram pair": "PermissionError:1", "fork": "PermissionError:1",
        "thread": "ok", "chmod": "ok", "mode after chmod": "0o600", "setrlimit": "ValueError", "getrlimit": "ok",
        "read file": "ok"}


def test_landlock_confines_files_to_the_scratch_dir_and_the_read_only_list(tmp_path):
    landlockpy = pytest.importorskip("landlockpy")
    if landlockpy.abi_version() < 1:
        pytest.skip("the kernel has no Landlock")
    scratch, outside = tmp_path / "scratch", tmp_path / "outside.txt"
    scratch.mkdir()
    outside.write_text("secret")
    cfg = config(scratch)

    def body():
        child.restrict_filesystem(landlockpy, str(scratch), cfg["read_only"])
        return {
            "write scratch": outcome(lambda: (scratch / "a.txt").write_text("hi")),
            "read scratch": (scratch / "a.txt").read_text(),
            "read outside": outcome(outside.read_text),
            "write outside": outcome(lambda: (tmp_path / "new.txt").write_text("x")),
            "proc": outcome(lambda: open("/proc/self/status").read()),
            "stdlib": outcome(lambda: open(os.__file__).read()),
        }

    assert in_fork(body) == {"write scratch": "ok", "read scratch": "hi", "read outside": "PermissionError:13",
                             "write outside": "PermissionError:13", "proc": "PermissionError:13", "stdlib": "ok"}
    assert not (tmp_path / "new.txt").exists()


def test_the_audit_hook_names_what_it_refuses(tmp_path):
    scratch = str(tmp_path.resolve())
    (tmp_path / "out").symlink_to("/tmp")
    hook = child.make_audit_hook(scratch, ("/proc/self/", f"/proc/{os.getpid()}/"))
    for event, args in [("open", (f"{scratch}/a.txt", "w", os.O_WRONLY)), ("open", ("/etc/hostname", "r", 0)),
                        ("open", ("/proc/self/status", "r", 0)), ("open", (3, "w", os.O_WRONLY)),
                        ("os.remove", (f"{scratch}/a.txt", -1)), ("import", ("json", None, [], [], [])),
                        ("os.rename", (f"{scratch}/a", f"{scratch}/b", -1, -1))]:
        hook(event, args)  # allowed: returns
    refused = [(("os.system", (b"true",)), "os.system is not allowed"),
               (("socket.__new__", (None, 2, 1, 0)), "socket.__new__ is not allowed"),
               (("open", ("/tmp/x", "w", os.O_WRONLY)), "writing '/tmp/x' outside the scratch dir"),
               (("open", (f"{scratch}/out/x", "a", os.O_WRONLY)), "outside the scratch dir"),
               (("open", ("/proc/1/cmdline", "rb", 0)), "reading '/proc/1/cmdline'"),
               (("import", ("ctypes.util", None, [], [], [])), "importing ctypes.util"),
               (("os.rename", (f"{scratch}/a", "/tmp/b", -1, -1)), "os.rename outside the scratch dir")]
    for (event, args), message in refused:
        with pytest.raises(child.SandboxViolation, match=message):
            hook(event, args)
    assert issubclass(child.SandboxViolation, PermissionError)


def test_run_program_proves_completion_only_at_the_end():
    def body(program):
        nonce_r, nonce_w = os.pipe()
        os.write(nonce_w, b"c0ffee\n")
        out_r, out_w = os.pipe()
        os.dup2(out_w, 1)
        sys.stdout = open(1, "w", closefd=False)  # the program's print, not pytest's capture
        try:
            child.run_program(program, nonce_r)
        except SystemExit as e:
            sys.stdout.write(f"[exit {e.code}]")
        sys.stdout.flush()
        os.close(1)
        os.close(out_w)
        with os.fdopen(out_r, "rb") as f:
            return f.read().decode()

    assert in_fork(lambda: body("print('hi')")) == "hi\n\nc0ffee\n"
    assert in_fork(lambda: body("print('hi')\nraise SystemExit(0)\nprint('never')")) == "hi\n[exit 0]"
