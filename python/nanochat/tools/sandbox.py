"""Run model-written Python in a throw-away subprocess that cannot hurt the machine or see the parent.

The untrusted program runs inside a fresh interpreter after a trusted bootstrap has locked it in: the module
`nanochat.tools.sandbox_child`, run by path in isolated mode (`python -I`), configured by one JSON argument.
It may take over every Python object of its own process (the bootstrap's globals, audit hooks, builtins, ctypes):
the layers that matter are enforced by the kernel, installed before the program's first line and irrevocable.
Each layer that applied is named in `SandboxResult.protections`; `sandbox_mode` sums them up.

Kernel-enforced layers (they hold whatever the program does in Python):

- "seccomp": a syscall allow-list (libseccomp through PyPI `pyseccomp`) that checks arguments where a name is not
  enough; everything else fails with EPERM. The decisions for every syscall that takes a path, an address or a pid
  are in the table below. It stops creating sockets (only a connected stream `socketpair(AF_UNIX)`), sending to any
  address, passing descriptors (sendmsg), fork and exec (clone only for threads, no execve), signals to any other
  process, ptrace, process_vm_readv/writev, pidfd_*, mount/unshare/setns/chroot, setuid and friends, prctl, bpf,
  perf_event_open, io_uring, keyctl, userfaultfd, chown and xattrs (which Landlock does not cover), mknod,
  fallocate (blocks without writing them), F_SETOWN/F_SETSIG (SIGIO aimed at other processes), ioctls other than a
  few terminal queries, and setting any rlimit (a child left as root could raise its own) or reading another
  process's. chmod and utime (also beyond Landlock's reach) return success without doing anything: shutil.copy
  still works in the scratch dir, and no mode or timestamp outside it changes.
- "landlock": filesystem rules (PyPI `landlockpy`): read-only access to the standard library and system libraries
  (/usr, /lib, /lib64, the stdlib dirs, /etc/ld.so.cache, /etc/localtime, /dev/null and the random devices),
  read-write access to the scratch dir only. It stops writing, creating, removing, renaming, truncating or linking
  anything outside the scratch dir (absolute or relative paths, symlinks and hard links alike, since the kernel
  checks the resolved file: /dev/shm, $HOME, the repository...), reading /proc and /sys (so no other process's
  cmdline, environ or memory), and reading the parent's files (checkpoints, venv, secrets in the home dir). Where the
  kernel has them it also denies TCP bind/connect (ABI 4) and, through scoping (ABI 6), signals and abstract
  unix-socket connections to any process outside the sandbox. It does not cover sending to a filesystem unix
  socket (ABI 7): the syscall filter does (no socket that could take an address exists).
- "rlimits": setrlimit caps on CPU seconds, address space, processes/threads, file size, open files, core dumps;
  the parent adds a wall-clock timeout that kills the whole process group and a cap on captured output.
- "netns": a new, empty network namespace (with a new user namespace when not root), where the kernel permits it:
  no interface but a down loopback, so no connection to the host or the internet.
- "pidns": with the network namespace, a new pid namespace (and mount namespace) whose init is a trusted copy of the
  bootstrap, not the program: when the program ends, or the parent kills the group on a timeout, init dies and the
  kernel kills every process left in the namespace, daemons that left the process group included.
- "disk-quota": with the mount namespace, the scratch dir is a tmpfs of `max_disk_mb` MiB and `max_files` inodes
  mounted over it for the child alone: the kernel refuses (ENOSPC) what exceeds it, and none of it touches the disk.
- "uid-drop": when started as root, the child becomes uid/gid 65534 (nobody) after the layers above are set up, so
  the ordinary permission checks also refuse writes to files it does not own and signals to other users' processes.

Disk bound without "disk-quota" (no mount namespace, e.g. an unprivileged user without user namespaces): RLIMIT_FSIZE
bounds each file, seccomp refuses fallocate (so every block must be written), and a parent-side watchdog measures the
scratch dir every 20 ms (allocated blocks and entries, walked iteratively and cut off past `max_files`) and kills the
program once it exceeds `max_disk_mb` or `max_files`. That bounds the total to the quota plus what the program can
write in one 20 ms interval (at page-cache speed, some hundreds of MB), not to the quota itself. Either way exceeding
the quota ends the program with status "disk_limit" (with the tmpfs the watchdog reads its statfs through
/proc/<pid>/root).

Children: with "pidns" no process outlives `run_code`. Without it, "seccomp" allows no fork at all. With neither
(only with `allow_unsandboxed`, see below), the documented limit is the process group: `run_code` kills the
group, and a process that started its own session (a double-forking daemon) survives it.

Syscalls that take a path, an address or a pid (everything not listed is refused, or is an operation on a
descriptor the process already holds):

    paths, writing (open/openat/creat with write flags, mkdir, rmdir, unlink, rename*, link*, symlink*, truncate):
        allowed; Landlock confines them to the scratch dir (and refuses devices). mknod(at): refused.
    paths, reading (open/openat read-only, getdents via an open dir, execve is refused): allowed; Landlock confines
        them to the read-only list and the scratch dir.
    paths, metadata (stat, lstat, newfstatat, statx, statfs, access, faccessat*, readlink*, chdir): allowed;
        Landlock does not cover them, so the program can learn that a path exists, its size, mode and owner, and a
        symlink's target (not file contents). Accepted: CPython's import system needs them everywhere on sys.path.
    paths, attributes (chmod*, utime*, *xattr): answered without effect (above); chown*: refused.
    addresses: socket, connect, bind, listen, accept: refused (no socket but a socketpair exists); socketpair only
        with AF_UNIX and SOCK_STREAM (a datagram socket could sendto any unix socket path on the host); sendto only
        with a NULL address; sendmsg and sendmmsg refused (their msghdr holds an address and SCM_RIGHTS in memory
        the filter cannot read); recvfrom, recvmsg, getsockname, getpeername, get/setsockopt: allowed (they only
        act on the process's own connected pair or write into its memory).
    memory addresses (mmap, mprotect, madvise, mremap, msync, mincore, futex, set_robust_list, rseq): allowed; own
        address space only. process_vm_readv/writev: refused.
    pids: kill and tgkill only with its own pid; getpgid, getsid and sched_getaffinity only with 0 or its own pid;
        prlimit64 only to read its own limits; wait4/waitid allowed (they only reach its own children, and it can
        have none); ptrace, pidfd_*, rt_sigqueueinfo, setpgid, setpriority, sched_set*: refused.

Process hygiene (always): a new session (own process group), every inherited descriptor closed, a scrubbed
environment (PATH, HOME/TMPDIR pointing into the scratch dir, LANG), a fresh scratch dir as cwd, removed afterwards
by an iterative walk on directory descriptors that never recurses (3,000 nested dirs are fine) and never raises.

Convenience layer: "audit", a PEP 578 audit hook that turns the usual attempts (writing outside the scratch dir,
reading /proc, fork/exec/system, sockets, ctypes) into a clear `SandboxViolation` message. The program can disarm
it; it exists for readable errors, not for safety.

"completed": the parent sends a random nonce through a pipe after the child starts, and the bootstrap prints it
when the program's top level ran to its end, so an exit(0) halfway is "incomplete", not "ok". It guards against
accidents, not against the program: the pipe is the program's own descriptor and it can read it. Nothing that
decides a score may rest on it; scores are decided outside the sandbox (`driver` below, tasks/humaneval.py).

Calls into the program: `run_code(..., driver=f)` gives the program a message channel (two pipes, named in the
environment variable NANOCHAT_CHANNEL as "read_fd,write_fd"; each message is a 4-byte big-endian length and that
many bytes, at most `max_message_bytes`) and calls `f(channel)` in the parent while the program runs; `channel.call`
sends a request and waits for the answer within a time limit while the parent keeps draining the program's output
and watching its limits. What the bytes mean is the caller's business (tasks/humaneval.py decodes plain data only).

Modes: "kernel" (seccomp + Landlock hold), "namespace" (network namespace + uid drop hold, but no syscall filter or
Landlock: the program can read files its uid may read, write world-writable places and exec binaries) or "none".
Only "kernel" is a sandbox. In any other mode `run_code` refuses with `SandboxUnavailable` unless the caller passes
`allow_unsandboxed=True` (the CLI's `--allow-unsandboxed`), and the report card says it ran unsandboxed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import selectors
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import termios
import time
from dataclasses import dataclass, field
from typing import Callable

from nanochat.tools import sandbox_child

# ---------------------------------------------------------------------------------------------------------------
# Configuration and result


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0          # wall clock, seconds
    cpu_s: int = 5                  # RLIMIT_CPU, seconds of CPU time
    memory_mb: int = 1024           # RLIMIT_AS, MiB of address space
    max_processes: int = 64         # RLIMIT_NPROC (per uid; counts threads)
    max_file_mb: int = 16           # RLIMIT_FSIZE, MiB per written file
    max_disk_mb: int = 64           # the scratch dir in total (tmpfs size, or the watchdog's bound)
    max_files: int = 4096           # entries in the scratch dir (tmpfs inodes, or the watchdog's bound)
    max_open_files: int = 64        # RLIMIT_NOFILE
    max_output_bytes: int = 1 << 20  # stdout + stderr captured; more kills the program
    max_message_bytes: int = 4 << 20  # one message on the driver's channel, either way
    # Tests only: switch layers off to show that the remaining ones hold on their own.
    audit: bool = True              # the in-process audit hook
    namespaces: bool = True         # the network (+ pid, mount) namespace
    drop_uid: bool = True           # the switch to nobody when started as root
    kernel_barrier: bool = True     # seccomp + Landlock (without them run_code refuses unless allow_unsandboxed)


@dataclass
class SandboxResult:
    # "ok" | "incomplete" (exited 0 before its last line) | "error" | "timeout" | "memory" | "violation"
    # | "output_limit" | "disk_limit" | "stopped" (with a driver: it returned and the program was ended)
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


class ChannelError(RuntimeError):
    """A call on the driver's channel got no valid answer: the program ended, hung past the limit, or sent garbage."""


# ---------------------------------------------------------------------------------------------------------------
# Policy (passed to the child's bootstrap as JSON)

# Syscalls allowed without conditions. Everything absent fails with EPERM. Kept to what CPython and its stdlib use
# for computation, files (which Landlock confines), threads, time and pipes. The module docstring has the decision
# for each one that takes a path, an address or a pid.
SECCOMP_ALLOW = [
    # descriptors and files (paths are Landlock's business)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "lseek", "close", "close_range", "dup", "dup2", "dup3", "pipe", "pipe2", "open", "openat", "creat",
    "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs", "access", "faccessat", "faccessat2",
    "readlink", "readlinkat", "getcwd", "chdir", "fchdir", "getdents", "getdents64", "mkdir", "mkdirat", "rmdir",
    "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat",
    "truncate", "ftruncate", "fsync", "fdatasync", "fadvise64", "sendfile", "copy_file_range", "umask",
    "flock",
    "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait",
    "epoll_pwait", "eventfd2",
    # memory
    "brk", "mmap", "munmap", "mprotect", "mremap", "madvise", "msync", "mincore",
    # own process and threads
    "exit", "exit_group", "getpid", "getppid", "gettid", "getuid", "geteuid", "getgid", "getegid", "getgroups",
    "getresuid", "getresgid", "getpgrp", "set_tid_address", "set_robust_list", "rseq",
    "futex", "sched_yield", "arch_prctl", "getrlimit", "getrusage", "times", "uname",
    "sysinfo", "getcpu", "wait4", "waitid", "restart_syscall",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend", "rt_sigtimedwait",
    "sigaltstack", "alarm", "setitimer", "getitimer", "pause",
    # time and randomness
    "clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep", "clock_nanosleep", "getrandom",
    # traffic on the process's own socketpair (sendto only without an address: a rule below)
    "recvfrom", "recvmsg", "shutdown", "getsockopt", "setsockopt", "getsockname", "getpeername",
]
# Allowed only when their first argument (a pid) is 0 or the process's own pid.
SECCOMP_OWN_PID = ["getpgid", "getsid", "sched_getaffinity"]
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

DISK_CHECK_INTERVAL_S = 0.02  # the watchdog's period: the overshoot without a tmpfs is what fits in one period


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


# Loaded before the uid drop; run-as-nobody cannot import from a root-only interpreter install (e.g. /root/.pyenv).
PRELOAD = ["math", "cmath", "itertools", "functools", "collections", "collections.abc", "re", "string", "heapq",
           "bisect", "random", "statistics", "fractions", "decimal", "hashlib", "copy", "operator", "datetime",
           "typing", "dataclasses", "enum", "textwrap", "unicodedata", "numbers", "array", "io", "struct",
           "traceback", "linecache", "time", "json", "socket", "encodings.idna", "encodings.ascii", "encodings.latin_1"]

# The child's start-up code, run by path in isolated mode (its docstring has the contract).
CHILD = os.path.abspath(sandbox_child.__file__)


def child_config(scratch: str, limits: SandboxLimits, nonce_fd: int, channel_fds: list[int],
                 require_isolation: bool) -> dict:
    """The child's whole configuration, as plain data (passed to it as one JSON argument)."""
    return {"scratch": scratch, "cpu_s": int(limits.cpu_s), "memory_mb": int(limits.memory_mb),
            "max_file_mb": int(limits.max_file_mb), "max_open_files": int(limits.max_open_files),
            "max_processes": int(limits.max_processes), "max_disk_mb": int(limits.max_disk_mb),
            "max_files": int(limits.max_files), "preload": PRELOAD, "audit": bool(limits.audit),
            "namespaces": bool(limits.namespaces), "drop_uid": bool(limits.drop_uid),
            "kernel_barrier": bool(limits.kernel_barrier), "nonce_fd": nonce_fd, "channel_fds": list(channel_fds),
            "read_only": _read_only_paths(), "seccomp_allow": SECCOMP_ALLOW, "seccomp_own_pid": SECCOMP_OWN_PID,
            "seccomp_fake": SECCOMP_FAKE, "seccomp_ioctls": SECCOMP_IOCTLS, "seccomp_fcntls": SECCOMP_FCNTLS,
            "require_isolation": require_isolation}


# ---------------------------------------------------------------------------------------------------------------
# Public API


def run_code(code: str, limits: SandboxLimits | None = None, stdin_text: str | None = None,
             allow_unsandboxed: bool = False, driver: Callable[[Channel], object] | None = None) -> SandboxResult:
    """Execute `code` (a complete Python program) in the sandbox; never raises for anything the program does.

    `driver`, when given, is called in the parent with a `Channel` to the running program (module docstring); once
    it returns the program is killed (status "stopped" unless a limit ended it first), and an exception it raises
    propagates after the clean-up.
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
        result = _run(scratch, env, limits, stdin_text, not allow_unsandboxed, driver)
    finally:
        remove_tree(scratch)
    return result


class _Child:
    """The running bootstrap: drains its stdout/stderr, enforces the output cap and the disk quota, and keeps the
    first failure as `status`."""

    def __init__(self, proc: subprocess.Popen, scratch: str, limits: SandboxLimits, deadline: float):
        self.proc, self.scratch, self.limits, self.deadline = proc, scratch, limits, deadline
        self.sel = selectors.DefaultSelector()
        self.outputs = (proc.stdout, proc.stderr)
        self.chunks: dict = {f: [] for f in self.outputs}
        for f in self.outputs:
            self.sel.register(f, selectors.EVENT_READ)
        self.total, self.status, self.next_disk_check = 0, None, 0.0
        self._header: dict | None = None
        self._tmpfs: int | None = None  # an fd on the child's tmpfs: it outlives the child's mount namespace
        self._tmpfs_tried = False

    def pump(self, timeout: float) -> set:
        """One round: reads what the program wrote and checks the limits; returns the other registered fds that are
        ready (the channel's)."""
        ready = set()
        for key, _ in self.sel.select(timeout=max(0.0, timeout)):
            if key.fileobj not in self.outputs:
                ready.add(key.fileobj)
                continue
            data = os.read(key.fd, 65536)
            if not data:
                self.sel.unregister(key.fileobj)
                continue
            self.chunks[key.fileobj].append(data)
            self.total += len(data)
        if not self._tmpfs_tried:
            self._open_tmpfs()
        now = time.monotonic()
        if self.status is None and self.total > self.limits.max_output_bytes:
            self.status = "output_limit"
        if self.status is None and now >= self.next_disk_check:
            over = self._over_disk_quota()
            took = time.monotonic() - now  # a deep tree takes a while to walk: keep the watchdog under 1/3 of a core
            self.next_disk_check = now + max(DISK_CHECK_INTERVAL_S, 3 * took)
            if over:
                self.status = "disk_limit"
        if self.status is None and now >= self.deadline:
            self.status = "timeout"
        if self.status is not None:
            _kill_group(self.proc)
        return ready

    def _open_tmpfs(self) -> None:
        """Once the header is in: the tmpfs exists only in the child's mount namespace, so it is opened through the
        monitor's root as soon as the header says it is mounted (before the program can have done much), and the
        open fd keeps the filesystem readable after the namespace is gone (see settle)."""
        header = self.header()
        if not header and self._header is None:
            return  # the header's line is not complete yet
        self._tmpfs_tried = True
        if "disk-quota" in header.get("protections", []):
            with contextlib.suppress(OSError):
                self._tmpfs = os.open(f"/proc/{self.proc.pid}/root{self.scratch}", os.O_RDONLY | os.O_DIRECTORY)

    def settle(self) -> None:
        """After the program ended: a quota it filled counts even when it exited between two watchdog looks (a
        program that fills the tmpfs and exits within 20 ms would otherwise end "ok")."""
        try:
            if self.status is None and self._tmpfs is not None and self._over_disk_quota():
                self.status = "disk_limit"
        finally:
            if self._tmpfs is not None:
                os.close(self._tmpfs)
                self._tmpfs = None

    def header(self) -> dict:
        """The bootstrap's first stderr line (its layers), once it is complete."""
        if self._header is None:
            self._header = sandbox_child.parse_header(b"".join(self.chunks[self.proc.stderr]))
        return self._header or {}

    def _over_disk_quota(self) -> bool:
        quota, max_files = self.limits.max_disk_mb << 20, self.limits.max_files
        if "disk-quota" in self.header().get("protections", []):
            if self._tmpfs is None:
                return False  # not reachable (_open_tmpfs): the kernel still holds the quota, the early end is lost
            st = os.fstatvfs(self._tmpfs)
            return st.f_bavail == 0 or st.f_favail == 0
        used, files = disk_usage(self.scratch, max_files + 1)
        return used > quota or files > max_files


class Channel:
    """The parent's end of the message channel to a running program (module docstring)."""

    def __init__(self, child: _Child, request_fd: int, reply_fd: int):
        self.child, self.request_fd, self.reply_fd = child, request_fd, reply_fd
        self.broken: str | None = None
        os.set_blocking(request_fd, False)
        os.set_blocking(reply_fd, False)

    def call(self, request: bytes, timeout_s: float) -> bytes:
        """Send one message and return the answer; ChannelError when none comes within `timeout_s` (or the run's
        deadline), the program ended, a limit ended it, or the answer is malformed. After one error every later call
        fails at once."""
        limit = self.child.limits.max_message_bytes
        if self.broken is None and len(request) > limit:
            self.broken = f"request of {len(request)} bytes exceeds max_message_bytes={limit}"
        if self.broken is not None:
            raise ChannelError(self.broken)
        out = memoryview(len(request).to_bytes(4, "big") + request)
        reply, need = bytearray(), None
        sel, end = self.child.sel, min(time.monotonic() + timeout_s, self.child.deadline)
        sel.register(self.request_fd, selectors.EVENT_WRITE)
        sel.register(self.reply_fd, selectors.EVENT_READ)
        try:
            while True:
                if self.child.status is not None:
                    self.broken = f"the program was stopped ({self.child.status})"
                    break
                remaining = end - time.monotonic()
                if remaining <= 0:
                    self.broken = f"no answer within {timeout_s:g} s"
                    break
                ready = self.child.pump(min(remaining, DISK_CHECK_INTERVAL_S))
                if self.request_fd in ready and out:
                    try:
                        out = out[os.write(self.request_fd, out):]
                    except BrokenPipeError:
                        self.broken = "the program stopped reading"
                        break
                    if not out:
                        sel.unregister(self.request_fd)
                if self.reply_fd in ready:
                    data = os.read(self.reply_fd, 65536)
                    if not data:
                        self.broken = "the program ended without answering"
                        break
                    reply += data
                    if need is None and len(reply) >= 4:
                        need = 4 + int.from_bytes(reply[:4], "big")
                        if need - 4 > limit:
                            self.broken = f"answer of {need - 4} bytes exceeds max_message_bytes={limit}"
                            break
                    if need is not None and len(reply) >= need:
                        if len(reply) > need:
                            self.broken = "the program answered more than it was asked"
                            break
                        return bytes(reply[4:])
        finally:
            for fd in (self.request_fd, self.reply_fd):
                if any(k.fileobj == fd for k in sel.get_map().values()):
                    sel.unregister(fd)
        raise ChannelError(self.broken)


def _run(scratch: str, env: dict, limits: SandboxLimits, stdin_text: str | None, require_isolation: bool,
         driver: Callable[[Channel], object] | None) -> SandboxResult:
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    child_fds, parent_fds = [nonce_r], [nonce_w]
    if driver is not None:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        child_fds += [req_r, rep_w]
        parent_fds += [req_w, rep_r]
        env = {**env, "NANOCHAT_CHANNEL": f"{req_r},{rep_w}"}
    cfg = child_config(scratch, limits, nonce_r, child_fds[1:], require_isolation)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen([sys.executable, "-I", CHILD, json.dumps(cfg)], cwd=scratch, env=env,
                                stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
                                pass_fds=tuple(child_fds), start_new_session=True)
    except BaseException:
        for fd in parent_fds:
            os.close(fd)
        raise
    finally:
        for fd in child_fds:
            os.close(fd)
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
    child = _Child(proc, scratch, limits, t0 + limits.timeout_s)
    try:
        if driver is not None:
            try:
                driver(Channel(child, req_w, rep_r))
            finally:
                os.close(req_w)
                os.close(rep_r)
                if child.status is None:  # the caller is done with the program: no need to wait for it to exit
                    child.status = "stopped"
                    _kill_group(proc)
        drain_end = time.monotonic() + 1.0  # after a stop by the driver: what the ended program left in the pipes
        while any(k.fileobj in child.outputs for k in child.sel.get_map().values()):
            if child.status is not None and time.monotonic() >= drain_end:
                break
            child.pump(DISK_CHECK_INTERVAL_S)
        try:
            returncode = proc.wait(timeout=max(0.1, child.deadline - time.monotonic()) if child.status is None
                                   else 5)
        except subprocess.TimeoutExpired:
            child.status = "timeout"
            _kill_group(proc)
            returncode = proc.wait()
    finally:
        _kill_group(proc)  # descendants that outlived the program (without a pid namespace: same group only)
        if proc.returncode is None:
            proc.wait()
        child.settle()
        child.sel.close()
        proc.stdout.close()
        proc.stderr.close()
    status = child.status
    duration = time.monotonic() - t0
    out = b"".join(child.chunks[proc.stdout])
    proof = b"\n" + nonce + b"\n"
    completed = out.endswith(proof)
    if completed:
        out = out[:-len(proof)]
    stdout = out.decode("utf-8", "replace")
    stderr = b"".join(child.chunks[proc.stderr]).decode("utf-8", "replace")
    header = child.header()
    if header:
        stderr = stderr.partition("\n")[2]
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


def _walk(root: str, remove: bool, max_entries: int) -> tuple[int, int, bool]:
    """Depth-first over `root` without recursion and without long paths: one directory descriptor open at a time,
    each subdir opened by name relative to it (O_NOFOLLOW), and back up through ".." only after checking that it is
    the dir we came from. Returns (bytes allocated, entries seen, complete). Stops counting past `max_entries`. With
    `remove`, unlinks every file and removes every dir on the way back up, `root` last."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    used = entries = 0

    def scan(fd: int) -> list[str]:
        nonlocal used, entries
        subdirs = []
        with os.scandir(fd) as it:
            for entry in it:
                if entries >= max_entries:
                    break
                entries += 1
                try:
                    st = entry.stat(follow_symlinks=False)
                    used += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        subdirs.append(entry.name)
                    elif remove:
                        os.unlink(entry.name, dir_fd=fd)
                except FileNotFoundError:
                    continue
        return subdirs

    try:
        fd = os.open(root, flags)
    except FileNotFoundError:
        return 0, 0, True
    except OSError:
        return 0, 0, False
    try:
        st = os.fstat(fd)
        frames = [((st.st_dev, st.st_ino), scan(fd))]  # per dir from root down: its identity, subdirs to visit
        names: list[str] = []                           # each entered dir's name in its parent
        while True:
            pending = frames[-1][1]
            if pending and entries < max_entries:
                name = pending.pop()
                if remove:
                    try:  # undo a mode the program set (where chmod was not faked)
                        os.chmod(name, 0o700, dir_fd=fd)
                    except OSError:
                        pass
                try:
                    sub = os.open(name, flags, dir_fd=fd)
                except FileNotFoundError:
                    continue
                os.close(fd)
                fd = sub
                st = os.fstat(fd)
                frames.append(((st.st_dev, st.st_ino), scan(fd)))
                names.append(name)
                continue
            if len(frames) == 1:
                break
            frames.pop()
            name = names.pop()
            parent = os.open("..", flags, dir_fd=fd)
            os.close(fd)
            fd = parent
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != frames[-1][0]:  # moved while we walked: stop here
                return used, entries, False
            if remove:
                os.rmdir(name, dir_fd=fd)
        if remove:
            os.close(fd)
            fd = -1
            os.rmdir(root)
        return used, entries, True
    except OSError:
        return used, entries, False
    finally:
        if fd >= 0:
            os.close(fd)


def disk_usage(root: str, max_entries: int) -> tuple[int, int]:
    """(bytes allocated, entries) under `root`, counting stopped once `max_entries` entries were seen; any depth."""
    used, entries, _ = _walk(root, remove=False, max_entries=max_entries)
    return used, entries


def remove_tree(root: str) -> bool:
    """Remove `root` and everything under it, at any depth; True when it is gone. Never raises."""
    try:
        return _walk(root, remove=True, max_entries=sys.maxsize)[2]
    except Exception:
        return False


def available_protections(limits: SandboxLimits | None = None) -> list[str]:
    """Which protections apply on this machine (runs a trivial program, whatever they are)."""
    return run_code("pass", limits, allow_unsandboxed=True).protections


def sandbox_mode(protections: list[str]) -> str:
    """"kernel" (seccomp + Landlock hold: the only sandbox), "namespace" (network namespace + uid drop, no kernel
    barrier: unsandboxed) or "none"."""
    if {"seccomp", "landlock"} <= set(protections):
        return "kernel"
    if {"netns", "uid-drop"} <= set(protections):
        return "namespace"
    return "none"
