"""Run model-written Python in a throw-away subprocess that cannot hurt the machine or see the parent.

The untrusted program runs inside a fresh interpreter (`python -I`) after a trusted bootstrap has locked it in.
It may take over every Python object of its own process (the bootstrap's globals, audit hooks, builtins, ctypes):
the layers that matter are enforced by the kernel, installed before the program's first line and irrevocable.
Each layer that applied is named in `SandboxResult.protections`; `sandbox_mode` sums them up.

Kernel-enforced layers (they hold whatever the program does in Python):

- "seccomp": a syscall allow-list (libseccomp through PyPI `pyseccomp`), everything else fails with EPERM. It stops:
  creating sockets (only `socketpair(AF_UNIX)`, which reaches nothing outside the process), fork and exec (clone only
  for threads, no execve), signals to any other process or process group (kill/tgkill only to its own pid), ptrace,
  process_vm_readv/writev, pidfd_*, mount/unshare/setns/chroot, setuid and friends, prctl, bpf, perf_event_open,
  io_uring, keyctl, userfaultfd, chown and xattrs (which Landlock does not cover), F_SETOWN/F_SETSIG
  (SIGIO aimed at other processes), ioctls other than a few terminal queries, and setting any rlimit (a child
  left as root could raise its own) or reading another process's. chmod and utime (also beyond Landlock's reach)
  return success without doing anything: shutil.copy still works in the scratch dir, and no mode or timestamp
  outside it changes.
- "landlock": filesystem rules (PyPI `landlockpy`): read-only access to the standard library and system libraries
  (/usr, /lib, /lib64, the stdlib dirs, /etc/ld.so.cache, /etc/localtime, /dev/null and the random devices),
  read-write access to the scratch dir only. It stops writing, creating, removing, renaming, truncating or linking
  anything outside the scratch dir (absolute or relative paths, symlinks and hard links alike, since the kernel
  checks the resolved file: /dev/shm, $HOME, the repository...), reading /proc and /sys (so no other process's
  cmdline, environ or memory), and reading the parent's files (checkpoints, venv, secrets in the home dir). Where the
  kernel has them it also denies TCP bind/connect (ABI 4) and, through scoping (ABI 6), signals and abstract
  unix-socket connections to any process outside the sandbox.
- "rlimits": setrlimit caps on CPU seconds, address space, processes/threads, file size, open files, core dumps;
  the parent adds a wall-clock timeout that kills the whole process group and a cap on captured output.
- "netns": a new, empty network namespace (unshare CLONE_NEWNET; with CLONE_NEWUSER when not root), where the
  kernel permits it: no interface but a down loopback, so no connection to the host or the internet.
- "uid-drop": when started as root, the child becomes uid/gid 65534 (nobody) after the layers above are set up, so
  the ordinary permission checks also refuse writes to files it does not own and signals to other users' processes.

Process hygiene (always): a new session (own process group), every inherited descriptor closed, a scrubbed
environment (PATH, HOME/TMPDIR pointing into the scratch dir, LANG), a fresh scratch dir as cwd, removed afterwards.

Convenience layer: "audit", a PEP 578 audit hook that turns the usual attempts (writing outside the scratch dir,
reading /proc, fork/exec/system, sockets, ctypes) into a clear `SandboxViolation` message. The program can disarm
it; it exists for readable errors, not for safety.

A pass is honest: the parent sends a random nonce through a pipe after the child starts, and the bootstrap prints it
only when the program's top level ran to its end (for HumanEval: after `check(entry_point)` returned). An exit(0)
anywhere, os._exit, SystemExit raised from inside the tested function, or printing a guessed value is "incomplete",
never "ok". (A program written against this harness could read the pipe itself; that is a flaw in a score, not an
escape from the sandbox, which the kernel layers bound regardless.)

When neither the kernel barrier (seccomp + Landlock) nor namespace + uid drop is available, `run_code` refuses with
`SandboxUnavailable` unless the caller passes `allow_unsandboxed=True` (the CLI's `--allow-unsandboxed`). A network
namespace alone does not count: it guards only the network.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import termios
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
    # Tests only: switch layers off to show that the remaining ones hold on their own.
    audit: bool = True              # the in-process audit hook
    namespaces: bool = True         # the network namespace
    drop_uid: bool = True           # the switch to nobody when started as root
    kernel_barrier: bool = True     # seccomp + Landlock (without them run_code refuses unless allow_unsandboxed)


@dataclass
class SandboxResult:
    # "ok" | "incomplete" (exited 0 before its last line) | "error" | "timeout" | "memory" | "violation"
    # | "output_limit"
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    protections: list[str] = field(default_factory=list)
    completed: bool = False          # the program's top level ran to its end (the nonce came back)

    @property
    def success(self) -> bool:
        return self.status == "ok"


class SandboxUnavailable(RuntimeError):
    """No kernel-enforced isolation here and the caller did not accept running without it."""


# ---------------------------------------------------------------------------------------------------------------
# Policy (passed to the child's bootstrap as JSON)

# Syscalls allowed without conditions. Everything absent fails with EPERM. Kept to what CPython and its stdlib use
# for computation, files (which Landlock confines), threads, time and pipes.
SECCOMP_ALLOW = [
    # descriptors and files (paths are Landlock's business)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "lseek", "close", "close_range", "dup", "dup2", "dup3", "pipe", "pipe2", "open", "openat", "creat",
    "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs", "access", "faccessat", "faccessat2",
    "readlink", "readlinkat", "getcwd", "chdir", "fchdir", "getdents", "getdents64", "mkdir", "mkdirat", "rmdir",
    "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat",
    "truncate", "ftruncate", "fallocate", "fsync", "fdatasync", "fadvise64", "sendfile", "copy_file_range", "umask",
    "flock",
    "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait",
    "epoll_pwait", "eventfd2",
    # memory
    "brk", "mmap", "munmap", "mprotect", "mremap", "madvise", "msync", "mincore",
    # own process and threads
    "exit", "exit_group", "getpid", "getppid", "gettid", "getuid", "geteuid", "getgid", "getegid", "getgroups",
    "getresuid", "getresgid", "getpgrp", "getpgid", "getsid", "set_tid_address", "set_robust_list", "rseq",
    "futex", "sched_yield", "sched_getaffinity", "arch_prctl", "getrlimit", "getrusage", "times", "uname",
    "sysinfo", "getcpu", "wait4", "waitid", "restart_syscall",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend", "rt_sigtimedwait",
    "sigaltstack", "alarm", "setitimer", "getitimer", "pause",
    # time and randomness
    "clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep", "clock_nanosleep", "getrandom",
    # traffic on a socketpair (creating any other socket is refused)
    "sendto", "recvfrom", "sendmsg", "recvmsg", "shutdown", "getsockopt", "setsockopt", "getsockname",
    "getpeername",
]
# Answered without running, with this errno (0: success). Mode and timestamp changes, which Landlock does not confine
# to the scratch dir, do nothing; extended attributes look unsupported (what shutil.copy2 tolerates); clone3 looks
# absent, so glibc creates threads with clone, whose flags the filter can check.
SECCOMP_FAKE = {**{name: 0 for name in ("chmod", "fchmod", "fchmodat", "utime", "utimes", "utimensat", "futimesat")},
                **{f"{prefix}{op}xattr": errno.EOPNOTSUPP for prefix in ("", "l", "f")
                   for op in ("get", "set", "list", "remove")},
                "clone3": errno.ENOSYS}
# ioctl: terminal queries that io.open and friends make (isatty, window size), blocking mode, close-on-exec.
SECCOMP_IOCTLS = [termios.TCGETS, termios.TIOCGWINSZ, termios.FIONREAD, termios.FIONBIO, termios.FIOCLEX,
                  termios.FIONCLEX]
# fcntl: descriptor flags and record locks (sqlite, dbm; only on files Landlock lets it open), never
# F_SETOWN/F_SETSIG, which would aim SIGIO at other processes.
SECCOMP_FCNTLS = [fcntl.F_DUPFD, fcntl.F_DUPFD_CLOEXEC, fcntl.F_GETFD, fcntl.F_SETFD, fcntl.F_GETFL, fcntl.F_SETFL,
                  fcntl.F_GETLK, fcntl.F_SETLK, fcntl.F_SETLKW, fcntl.F_OFD_GETLK, fcntl.F_OFD_SETLK,
                  fcntl.F_OFD_SETLKW]

# Files and directories the program may read (Landlock); everything else outside the scratch dir is invisible.
SYSTEM_READ_ONLY = ["/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom",
                    "/dev/random", "/dev/zero"]


def _read_only_paths() -> list[str]:
    """The interpreter's standard library (and its shared libraries) plus the system library dirs, as they exist."""
    paths = [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"), sysconfig.get_config_var("LIBDIR")]
    out: list[str] = []
    for p in paths + SYSTEM_READ_ONLY:
        if p and os.path.exists(p):
            real = os.path.realpath(p)
            if real != "/" and real not in out:  # never the whole tree
                out.append(real)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The child's bootstrap: runs inside the fresh interpreter before the untrusted program

_MARKER = "\x00NANOCHAT_SANDBOX "

_BOOTSTRAP = r'''
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
scratch = os.path.realpath(cfg["scratch"])
nonce_fd = cfg["nonce_fd"]
os.set_inheritable(nonce_fd, False)
protections, unavailable = [], {}

# 0. the kernel-barrier libraries, loaded while the whole filesystem is still readable (find_library runs ldconfig)
landlockpy = pyseccomp = None
if cfg["kernel_barrier"]:
    try:
        import landlockpy
    except Exception as e:
        unavailable["landlock"] = f"landlockpy: {e}"
    try:
        import pyseccomp
    except Exception as e:
        unavailable["seccomp"] = f"pyseccomp: {e}"
else:
    unavailable["seccomp"] = unavailable["landlock"] = "switched off by the caller"

# 1. network namespace (must happen while we still may: before the uid drop and the syscall filter)
if cfg["namespaces"]:
    import ctypes, ctypes.util
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
    if _libc.unshare(CLONE_NEWNET) == 0:
        protections.append("netns")
    elif os.getuid() != 0 and _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        protections.append("netns")
    else:
        unavailable["netns"] = os.strerror(ctypes.get_errno())
    del _libc

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

# Landlock and seccomp bind the calling thread only: make sure it is the only one
if os.path.isdir("/proc/self/task") and len(os.listdir("/proc/self/task")) != 1:
    raise SystemExit("sandbox bootstrap: more than one thread before the kernel barrier")

# 4. Landlock (before the uid drop: nobody may not be able to open the interpreter's dirs to name them)
if landlockpy is not None:
    try:
        abi = landlockpy.abi_version()
        if abi < 1:
            unavailable["landlock"] = "the kernel has no Landlock (or it is disabled)"
        else:
            A, N, S = landlockpy.AccessFS, landlockpy.AccessNet, landlockpy.Scope
            read_dir, read_file = A.READ_FILE | A.READ_DIR | A.EXECUTE, A.READ_FILE
            no_devices = ~(A.MAKE_CHAR | A.MAKE_BLOCK | A.IOCTL_DEV | A.EXECUTE)
            with landlockpy.Ruleset(handled_net=N.BIND_TCP | N.CONNECT_TCP | N.BIND_UDP | N.CONNECT_SEND_UDP,
                                    scoped=S.ABSTRACT_UNIX_SOCKET | S.SIGNAL) as rs:
                for p in cfg["read_only"]:
                    rs.allow_path(p, read_dir if os.path.isdir(p) else read_file)
                rs.allow_path("/dev/null", A.READ_FILE | A.WRITE_FILE | A.TRUNCATE)
                rs.allow_path(scratch, landlockpy.fs_for_abi(abi) & no_devices)
                rs.restrict()  # sets no_new_privs first
            protections.append("landlock")
    except Exception as e:
        unavailable["landlock"] = f"{type(e).__name__}: {e}"

# 5. drop root
if os.getuid() == 0 and cfg["drop_uid"]:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    protections.append("uid-drop")

# 6. seccomp allow-list, last: after it nothing above would be permitted
if pyseccomp is not None:
    try:
        import errno
        sc = pyseccomp
        f = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
        for name in cfg["seccomp_allow"]:
            if sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0:  # names this architecture lacks are skipped
                f.add_rule(sc.ALLOW, name)
        for name, err in cfg["seccomp_fake"].items():
            if sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0:
                f.add_rule(sc.ERRNO(err), name)
        pid = os.getpid()
        for name in ("kill", "tgkill"):  # signals to itself only (raise(), os.kill(os.getpid(), ...))
            f.add_rule(sc.ALLOW, name, sc.Arg(0, sc.EQ, pid))
        # read its own limits only: a child left as root could otherwise raise its hard limits
        f.add_rule(sc.ALLOW, "prlimit64", sc.Arg(0, sc.EQ, 0), sc.Arg(2, sc.EQ, 0))
        # clone: threads only (CLONE_THREAD set, no namespace flags)
        CLONE_THREAD, NS_FLAGS = 0x00010000, 0x7E020000
        f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD | NS_FLAGS, CLONE_THREAD))
        f.add_rule(sc.ALLOW, "socketpair", sc.Arg(0, sc.EQ, 1))  # AF_UNIX
        for cmd in cfg["seccomp_ioctls"]:
            f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, cmd))
        for cmd in cfg["seccomp_fcntls"]:
            f.add_rule(sc.ALLOW, "fcntl", sc.Arg(1, sc.EQ, cmd))
        f.load()  # with no_new_privs (libseccomp's default), so no privilege is needed
        protections.append("seccomp")
        del f, sc
    except Exception as e:
        unavailable["seccomp"] = f"{type(e).__name__}: {e}"

# 7. no isolation from the kernel and the caller did not accept that: stop before the program's first line
refused = cfg["require_isolation"] and not (
    {"seccomp", "landlock"} <= set(protections) or {"netns", "uid-drop"} <= set(protections))

# 8. audit hook (convenience: readable errors for the usual attempts; the program can disarm it)
program = open(os.path.join(scratch, "program.py"), encoding="utf-8").read()

def _make_hook(scratch, proc_self):
    class SandboxViolation(PermissionError):
        pass
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    forbidden = frozenset({
        "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
        "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "socket.__new__",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.sethostname", "os.setuid",
        "os.setgid", "resource.setrlimit", "resource.prlimit", "sys.remote_exec", "mmap.__new__"})
    path_events = frozenset({
        "os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.link", "os.symlink", "os.chmod", "os.chown",
        "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.setxattr",
        "os.removexattr"})
    blocked_imports = frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend"})
    realpath, fsdecode = os.path.realpath, os.fsdecode

    def inside(path):
        if isinstance(path, int):
            return True  # operations on an already-open descriptor were checked when it was opened
        try:
            p = realpath(fsdecode(path))
        except Exception:
            return False
        return p == scratch or p.startswith(scratch + "/")

    def hook(event, args):
        if event in forbidden:
            raise SandboxViolation(f"sandbox: {event} is not allowed")
        if event == "import" and args and str(args[0]).split(".")[0] in blocked_imports:
            raise SandboxViolation(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                      (isinstance(flags, int) and flags & write_flags)
            if writing and not inside(path):
                raise SandboxViolation(f"sandbox: writing {path!r} outside the scratch dir is not allowed")
            if isinstance(path, (str, bytes)):
                p = realpath(fsdecode(path))  # relative paths too (os.chdir('/proc'); open('1/cmdline'))
                if p.startswith(("/proc/", "/sys/")) and not p.startswith(proc_self):
                    raise SandboxViolation(f"sandbox: reading {p!r} is not allowed")
        elif event in path_events:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if not all(inside(p) for p in paths):
                raise SandboxViolation(f"sandbox: {event} outside the scratch dir is not allowed")
    return hook

# the barrier's helpers leave the process: a plain `import ctypes` then meets the audit hook again
for _name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes", "landlockpy", "pyseccomp")]:
    del sys.modules[_name]
landlockpy = pyseccomp = None
if cfg["audit"] and not refused:
    sys.addaudithook(_make_hook(scratch, ("/proc/self/", f"/proc/{os.getpid()}/")))
    protections.append("audit")
del _make_hook
sys.stderr.write(__MARKER__ + json.dumps({"protections": protections, "unavailable": unavailable,
                                         "refused": bool(refused)}) + "\n")
sys.stderr.flush()
if refused:
    os._exit(3)
del cfg, json, resource
sys.argv = ["program.py"]
exec(compile(program, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
# Only reached when the program's top level ran to its end: prove it with the nonce the parent sent after start.
try:
    sys.stdout.flush()
finally:
    nonce = os.read(nonce_fd, 64).strip()
    os.write(1, b"\n" + nonce + b"\n")
'''.replace("__MARKER__", repr(_MARKER))

# Loaded before the uid drop; run-as-nobody cannot import from a root-only interpreter install (e.g. /root/.pyenv).
PRELOAD = ["math", "cmath", "itertools", "functools", "collections", "collections.abc", "re", "string", "heapq",
           "bisect", "random", "statistics", "fractions", "decimal", "hashlib", "copy", "operator", "datetime",
           "typing", "dataclasses", "enum", "textwrap", "unicodedata", "numbers", "array", "io", "struct",
           "traceback", "linecache", "time", "json", "socket", "encodings.idna", "encodings.ascii", "encodings.latin_1"]


# ---------------------------------------------------------------------------------------------------------------
# Public API


def run_code(code: str, limits: SandboxLimits | None = None, stdin_text: str | None = None,
             allow_unsandboxed: bool = False) -> SandboxResult:
    """Execute `code` (a complete Python program) in the sandbox; never raises for anything the program does.

    Raises SandboxUnavailable when the machine offers no kernel-enforced isolation and `allow_unsandboxed` is
    False (the program is then never started)."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    limits = limits or SandboxLimits()
    scratch = tempfile.mkdtemp(prefix="nanochat_sandbox_")
    try:
        with open(os.path.join(scratch, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if os.getuid() == 0 and limits.drop_uid:  # the child runs as nobody and must own its scratch dir
            os.chown(scratch, 65534, 65534)
            os.chmod(scratch, 0o700)
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        result = _run(scratch, env, limits, stdin_text, require_isolation=not allow_unsandboxed)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _run(scratch: str, env: dict, limits: SandboxLimits, stdin_text: str | None,
         require_isolation: bool) -> SandboxResult:
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    cfg = {"scratch": scratch, "cpu_s": int(limits.cpu_s), "memory_mb": int(limits.memory_mb),
           "max_file_mb": int(limits.max_file_mb), "max_open_files": int(limits.max_open_files),
           "max_processes": int(limits.max_processes), "preload": PRELOAD, "audit": bool(limits.audit),
           "namespaces": bool(limits.namespaces), "drop_uid": bool(limits.drop_uid),
           "kernel_barrier": bool(limits.kernel_barrier), "nonce_fd": nonce_r,
           "read_only": _read_only_paths(), "seccomp_allow": SECCOMP_ALLOW, "seccomp_fake": SECCOMP_FAKE,
           "seccomp_ioctls": SECCOMP_IOCTLS, "seccomp_fcntls": SECCOMP_FCNTLS, "require_isolation": require_isolation}
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(cfg)], cwd=scratch, env=env,
                                stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True, pass_fds=(nonce_r,),
                                start_new_session=True)
    finally:
        os.close(nonce_r)
    # the nonce travels only now, through a pipe: it is in no file, argument or environment variable of the child
    try:
        os.write(nonce_w, nonce + b"\n")
    except BrokenPipeError:
        pass
    os.close(nonce_w)
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
    out = b"".join(chunks[proc.stdout])
    proof = b"\n" + nonce + b"\n"
    completed = out.endswith(proof)
    if completed:
        out = out[:-len(proof)]
    stdout = out.decode("utf-8", "replace")
    stderr = b"".join(chunks[proc.stderr]).decode("utf-8", "replace")
    header: dict = {}
    if stderr.startswith(_MARKER):
        line, _, stderr = stderr.partition("\n")
        header = json.loads(line[len(_MARKER):])
    protections = header.get("protections", [])
    if header.get("refused"):
        unavailable = "; ".join(f"{k}: {v}" for k, v in header.get("unavailable", {}).items()) or "unknown"
        raise SandboxUnavailable(
            f"no kernel-enforced sandbox on this machine (layers: {', '.join(protections) or 'none'}; missing: "
            f"{unavailable}); refusing to run model-written code (accept the risk with --allow-unsandboxed)")
    if status is None:
        status = _classify(returncode, stderr, protections, completed)
    return SandboxResult(status, returncode, stdout, stderr, duration, protections, completed and status == "ok")


def _classify(returncode: int, stderr: str, protections: list[str], completed: bool) -> str:
    if not protections:
        return "error"  # the bootstrap itself failed: never count as a pass
    if returncode == 0:
        return "ok" if completed else "incomplete"
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


def available_protections(limits: SandboxLimits | None = None) -> list[str]:
    """Which protections apply on this machine (runs a trivial program, whatever they are)."""
    return run_code("pass", limits, allow_unsandboxed=True).protections


def sandbox_mode(protections: list[str]) -> str:
    """"kernel" (seccomp + Landlock hold), "namespace" (network namespace + uid drop hold) or "none"."""
    if {"seccomp", "landlock"} <= set(protections):
        return "kernel"
    if {"netns", "uid-drop"} <= set(protections):
        return "namespace"
    return "none"
