"""Run model-written Python in a throw-away subprocess that cannot hurt the machine or see the parent.

Layered protections, each reported in `SandboxResult.protections` so a caller knows which ones applied here:

- a fresh interpreter (`python -I`: no user site, no PYTHON* variables) in a new session (own process group, so a
  timeout kills every descendant), stdin closed, every inherited descriptor closed, a scrubbed environment (only
  PATH, HOME/TMPDIR pointing into the scratch dir, LANG), a fresh scratch temp dir as cwd, removed afterwards;
- resource limits (setrlimit): CPU seconds, address space (memory), processes, file size, open files, no core dumps;
  plus a wall-clock timeout enforced by the parent and a cap on captured output;
- no network: a new, empty network namespace (unshare CLONE_NEWNET; CLONE_NEWUSER|CLONE_NEWNET when not root) when
  the kernel permits it ("netns"); in every case an audit hook refuses socket creation and name lookups ("audit");
- when started as root, the child drops to uid/gid 65534 (nobody) after the namespace is made ("uid-drop"), so the
  kernel itself refuses writes to files it does not own and signals to other users' processes;
- an audit hook (PEP 578) refuses: opening files for writing, creating, removing or renaming outside the scratch
  dir; reading /proc of other processes; fork/exec/spawn/system/kill; importing ctypes/cffi (which could bypass it).

Audit hooks alone are not a security boundary against a determined adversary; the namespace, the uid drop and the
rlimits are the kernel-enforced layers. A violation raises `SandboxViolation` inside the child, which ends the
program with a failed status; the caller treats any non-ok result as a failed sample.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------------------------
# Configuration and result


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0          # wall clock, seconds
    cpu_s: int = 5                  # RLIMIT_CPU, seconds of CPU time
    memory_mb: int = 1024           # RLIMIT_AS, MiB of address space
    max_processes: int = 64         # RLIMIT_NPROC (per uid; counts threads)
    max_file_mb: int = 16           # RLIMIT_FSIZE, MiB per written file
    max_open_files: int = 64        # RLIMIT_NOFILE
    max_output_bytes: int = 1 << 20  # stdout + stderr captured; more kills the program
    audit: bool = True              # False only to test the kernel-enforced layers on their own


@dataclass
class SandboxResult:
    status: str                      # "ok" | "error" | "timeout" | "memory" | "violation" | "output_limit"
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    protections: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------------------------------------------------------
# The child's bootstrap: runs inside the fresh interpreter before the untrusted program

_MARKER = "\x00NANOCHAT_SANDBOX "

_BOOTSTRAP = r'''
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
scratch = os.path.realpath(cfg["scratch"])
protections = []

# 1. network namespace (must happen while we still may: before the uid drop)
import ctypes, ctypes.util
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
if _libc.unshare(CLONE_NEWNET) == 0:
    protections.append("netns")
elif os.getuid() != 0 and _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
    protections.append("netns")
del _libc
for _name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.") or m == "_ctypes"]:
    del sys.modules[_name]

# 2. modules a solution commonly needs, loaded now in case the uid drop makes the stdlib unreadable
for _name in cfg["preload"]:
    try:
        __import__(_name)
    except Exception:
        pass

# 3. resource limits
def _limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(kind)
        if hard == resource.RLIM_INFINITY or value <= hard:
            raise
        resource.setrlimit(kind, (hard, hard))
_limit(resource.RLIMIT_CPU, cfg["cpu_s"])
_limit(resource.RLIMIT_AS, cfg["memory_mb"] << 20)
_limit(resource.RLIMIT_FSIZE, cfg["max_file_mb"] << 20)
_limit(resource.RLIMIT_NOFILE, cfg["max_open_files"])
_limit(resource.RLIMIT_NPROC, cfg["max_processes"])
_limit(resource.RLIMIT_CORE, 0)
protections.append("rlimits")

# 4. drop root
if os.getuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    protections.append("uid-drop")

# 5. audit hook
program = open(os.path.join(scratch, "program.py"), encoding="utf-8").read()

class SandboxViolation(PermissionError):
    pass

def _inside(path):
    try:
        if isinstance(path, int):
            return True  # operations on an already-open descriptor were checked when it was opened
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return p == scratch or p.startswith(scratch + os.sep)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_FORBIDDEN_EVENTS = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                     "subprocess.Popen", "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym",
                     "ctypes.cdata", "socket.__new__", "socket.getaddrinfo", "socket.gethostbyname",
                     "socket.gethostbyaddr", "socket.sethostname", "os.setuid", "os.setgid", "resource.setrlimit",
                     "resource.prlimit", "sys.remote_exec", "winreg.OpenKey", "mmap.__new__"}
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.link", "os.symlink", "os.chmod", "os.chown",
                "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.chflags",
                "os.lchflags", "os.setxattr", "os.removexattr"}
_BLOCKED_IMPORTS = {"ctypes", "_ctypes", "cffi", "_cffi_backend"}

def _hook(event, args):
    if event in _FORBIDDEN_EVENTS:
        raise SandboxViolation(f"sandbox: {event} is not allowed")
    if event == "import" and args and str(args[0]).split(".")[0] in _BLOCKED_IMPORTS:
        raise SandboxViolation(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                  (isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and not _inside(path):
            raise SandboxViolation(f"sandbox: writing {path!r} outside the scratch dir is not allowed")
        if isinstance(path, (str, bytes)):
            p = os.fsdecode(path)
            if p.startswith("/proc/") and not p.startswith(("/proc/self/", f"/proc/{os.getpid()}/")):
                raise SandboxViolation(f"sandbox: reading {p!r} is not allowed")
    elif event in _PATH_EVENTS:
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        if not all(_inside(p) for p in paths):
            raise SandboxViolation(f"sandbox: {event} outside the scratch dir is not allowed")

if cfg["audit"]:
    sys.addaudithook(_hook)
    protections.append("audit")
sys.stderr.write(__MARKER__ + json.dumps(protections) + "\n")
sys.stderr.flush()
del cfg, json, resource
sys.argv = ["program.py"]
exec(compile(program, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''.replace("__MARKER__", repr(_MARKER))

# Loaded before the uid drop; run-as-nobody cannot import from a root-only interpreter install (e.g. /root/.pyenv).
PRELOAD = ["math", "cmath", "itertools", "functools", "collections", "collections.abc", "re", "string", "heapq",
           "bisect", "random", "statistics", "fractions", "decimal", "hashlib", "copy", "operator", "datetime",
           "typing", "dataclasses", "enum", "textwrap", "unicodedata", "numbers", "array", "io", "struct",
           "traceback", "linecache", "time", "json", "socket", "encodings.idna", "encodings.ascii", "encodings.latin_1"]


# ---------------------------------------------------------------------------------------------------------------
# Public API


def run_code(code: str, limits: SandboxLimits | None = None, stdin_text: str | None = None) -> SandboxResult:
    """Execute `code` (a complete Python program) in the sandbox; never raises for anything the program does."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    limits = limits or SandboxLimits()
    scratch = tempfile.mkdtemp(prefix="nanochat_sandbox_")
    try:
        with open(os.path.join(scratch, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if os.getuid() == 0:  # the child runs as nobody and must own its scratch dir
            os.chown(scratch, 65534, 65534)
            os.chmod(scratch, 0o700)
        cfg = {"scratch": scratch, "cpu_s": int(limits.cpu_s), "memory_mb": int(limits.memory_mb),
               "max_file_mb": int(limits.max_file_mb), "max_open_files": int(limits.max_open_files),
               "max_processes": int(limits.max_processes), "preload": PRELOAD, "audit": bool(limits.audit)}
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        return _run(cfg, env, scratch, limits, stdin_text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(cfg: dict, env: dict, scratch: str, limits: SandboxLimits, stdin_text: str | None) -> SandboxResult:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(cfg)], cwd=scratch, env=env,
                            stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True, start_new_session=True)
    if stdin_text is not None:
        try:
            proc.stdin.write(stdin_text.encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
    chunks = {proc.stdout: [], proc.stderr: []}
    total, status = 0, None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline = t0 + limits.timeout_s
    while sel.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            status = "timeout"
            break
        for key, _ in sel.select(timeout=min(remaining, 0.1)):
            data = key.fileobj.read1(65536) if hasattr(key.fileobj, "read1") else os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
                continue
            chunks[key.fileobj].append(data)
            total += len(data)
        if total > limits.max_output_bytes:
            status = "output_limit"
            break
    if status is not None:
        _kill_group(proc)
    try:
        returncode = proc.wait(timeout=max(0.1, deadline - time.monotonic()) if status is None else 5)
    except subprocess.TimeoutExpired:
        status = "timeout"
        _kill_group(proc)
        returncode = proc.wait()
    _kill_group(proc)  # descendants that outlived the program (daemonised children)
    sel.close()
    proc.stdout.close()
    proc.stderr.close()
    duration = time.monotonic() - t0
    stdout = b"".join(chunks[proc.stdout]).decode("utf-8", "replace")
    stderr = b"".join(chunks[proc.stderr]).decode("utf-8", "replace")
    protections: list[str] = []
    if stderr.startswith(_MARKER):
        line, _, stderr = stderr.partition("\n")
        protections = json.loads(line[len(_MARKER):])
    if status is None:
        status = _classify(returncode, stderr, protections)
    return SandboxResult(status, returncode, stdout, stderr, duration, protections)


def _classify(returncode: int, stderr: str, protections: list[str]) -> str:
    if not protections:
        return "error"  # the bootstrap itself failed: never count as a pass
    if returncode == 0:
        return "ok"
    if "SandboxViolation" in stderr:
        return "violation"
    if "MemoryError" in stderr or returncode in (-signal.SIGSEGV, -signal.SIGKILL):
        return "memory"
    if returncode in (-signal.SIGXCPU,):
        return "timeout"
    return "error"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def available_protections() -> list[str]:
    """Which protections apply on this machine (runs a trivial program)."""
    return run_code("pass").protections
