"""Escape attempts written as the untrusted program would write them, one test per category.

Every attack first disarms whatever it can reach in its own interpreter (the bootstrap's globals through
sys.modules["__main__"], the audit hook's closure cells and policy sets) and then tries its escape; each runs twice:

- "attacker": the default sandbox (every layer this machine offers, including the audit hook it disarms);
- "barrier": the kernel barrier alone (seccomp + Landlock + rlimits: no audit hook, no namespace, no uid drop),
  which is all an unprivileged user without user namespaces gets.

An attack prints "ESCAPED <what>" when an attempt works and "done" at its end (so a crash cannot pass for a block);
the tests also look at the side effects from outside (files, listeners, victim processes).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from nanochat.tools.sandbox import SandboxLimits, available_protections, run_code, sandbox_mode

PROTECTIONS = available_protections()
MODES = {
    "attacker": SandboxLimits(timeout_s=5.0, cpu_s=5, memory_mb=512),
    "barrier": SandboxLimits(timeout_s=5.0, cpu_s=5, memory_mb=512, audit=False, namespaces=False, drop_uid=False),
}

# Neutralise every in-process layer the bootstrap left behind: module-level policy (sets, `_inside`) and closure
# cells of its functions (sets, path prefixes, helper predicates). The bootstrap is the interpreter's __main__ module
# (the program runs in a namespace of its own), so its functions are the ones compiled from __main__'s file. Counts
# what it found.
DISARM = r'''
import gc, os, sys, types
def _disarm():
    allow = lambda *a, **k: True
    found = 0
    BOOT = sys.modules["__main__"].__file__
    boot = [f for f in gc.get_objects() if isinstance(f, types.FunctionType) and f.__code__.co_filename == BOOT]
    for g in [sys.modules["__main__"].__dict__] + [f.__globals__ for f in boot]:
        for k, v in list(g.items()):
            if isinstance(v, (set, frozenset)):
                g[k], found = set(), found + 1
            elif isinstance(v, types.FunctionType) and v.__code__.co_filename == BOOT and k != "_disarm":
                g[k], found = allow, found + 1
    for f in boot:
        for cell in f.__closure__ or ():
            try:
                v = cell.cell_contents
            except ValueError:
                continue
            if isinstance(v, (set, frozenset)):
                cell.cell_contents = frozenset()
            elif isinstance(v, tuple) and v and all(isinstance(x, str) for x in v):
                cell.cell_contents = ("",)
            elif isinstance(v, types.FunctionType) and v.__code__.co_filename == BOOT:
                cell.cell_contents = allow
            else:
                continue
            found += 1
    print("disarmed", found)
_disarm()

def attempt(what, fn):
    try:
        out = fn()
    except BaseException as e:
        print("blocked", what, type(e).__name__, e)
    else:
        print("ESCAPED", what, repr(out)[:80])

def get_ctypes():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)
'''


def attack(mode: str, body: str, **limits):
    base = MODES[mode]
    lim = SandboxLimits(**{**base.__dict__, **limits})
    return run_code(DISARM + textwrap.dedent(body) + "\nprint('done')\n", lim)


def assert_held(r, needs_completion: bool = True):
    assert "ESCAPED" not in r.stdout, r.stdout
    if needs_completion:
        assert "done" in r.stdout and r.completed, (r.status, r.stdout[-2000:], r.stderr[-2000:])


@pytest.fixture(params=list(MODES))
def mode(request):
    if request.param == "barrier" and sandbox_mode(PROTECTIONS) != "kernel":
        pytest.skip(f"no kernel barrier on this machine (layers: {PROTECTIONS})")
    return request.param


@pytest.fixture
def open_dir():
    """A world-writable dir with a world-writable file: only the sandbox, not file permissions, protects them."""
    d = Path(tempfile.mkdtemp(prefix="nanochat_victim_", dir="/tmp"))
    d.chmod(0o777)
    (d / "victim.txt").write_text("original")
    (d / "victim.txt").chmod(0o666)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def victim():
    """A process of the test's own user in its own process group, for the signal and ptrace attacks."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_write_outside_scratch(mode, open_dir):
    shm = f"/dev/shm/nanochat_escape_{secrets.token_hex(4)}"
    target = open_dir / "victim.txt"
    r = attack(mode, f"""
        D, T, SHM, S = {str(open_dir)!r}, {str(target)!r}, {shm!r}, os.getcwd()
        attempt("absolute", lambda: open(T, "w").write("pwned"))
        attempt("append", lambda: open(T, "a").write("pwned"))
        attempt("os.open", lambda: os.write(os.open(T, os.O_WRONLY), b"pwned"))
        attempt("relative", lambda: (os.chdir(D), open("victim.txt", "w").write("pwned")))
        os.chdir(S)
        attempt("new file", lambda: open(D + "/new.txt", "w").write("pwned"))
        attempt("mkdir", lambda: os.mkdir(D + "/newdir"))
        attempt("symlink", lambda: (os.symlink(T, "link"), open("link", "w").write("pwned")))
        attempt("hardlink", lambda: (os.link(T, "hard"), open("hard", "w").write("pwned")))
        attempt("rename in", lambda: os.rename(T, "stolen"))
        attempt("unlink", lambda: os.unlink(T))
        attempt("truncate", lambda: os.truncate(T, 0))
        # chmod and utime may report success (a no-op under the syscall filter): what counts is the file's state
        attempt("chmod", lambda: (os.chmod(T, 0o600), os.stat(T).st_mode & 0o777 == 0o600 or 1 / 0))
        attempt("fchmod", lambda: (os.fchmod(os.open(T, os.O_RDONLY), 0o600), os.stat(T).st_mode & 0o777 == 0o600
                                   or 1 / 0))
        attempt("utime", lambda: (os.utime(T, (0, 0)), os.stat(T).st_mtime == 0 or 1 / 0))
        attempt("/dev/shm", lambda: open(SHM, "w").write("pwned"))
    """)
    try:
        assert_held(r)
        assert target.read_text() == "original" and (target.stat().st_mode & 0o777) == 0o666
        assert target.stat().st_mtime > 0
        assert sorted(p.name for p in open_dir.iterdir()) == ["victim.txt"]
        assert not os.path.exists(shm)
        assert "SandboxViolation" not in r.stdout  # the kernel refused, not the (disarmed) audit hook
    finally:
        if os.path.exists(shm):
            os.remove(shm)


def test_proc_of_other_processes(mode):
    r = attack(mode, """
        ppid = os.getppid()
        attempt("absolute cmdline", lambda: open("/proc/1/cmdline", "rb").read())
        attempt("parent environ", lambda: open(f"/proc/{ppid}/environ", "rb").read())
        attempt("parent mem", lambda: open(f"/proc/{ppid}/mem", "rb"))
        attempt("relative cmdline", lambda: (os.chdir("/proc"), open("1/cmdline", "rb").read()))
        attempt("relative parent status", lambda: (os.chdir("/proc"), open(f"{ppid}/status").read()))
        attempt("via self/..", lambda: open("/proc/self/../1/cmdline", "rb").read())
        attempt("listing", lambda: os.listdir("/proc"))
    """)
    assert_held(r)


def test_environment_secrets_stay_in_the_parent():
    """The secret is in the real environment block of the sandbox's parent, as a token in CI would be."""
    code = ("import sys\nfrom nanochat.tools.sandbox import run_code\n"
            "r = run_code(sys.stdin.read())\nprint(r.stdout, r.stderr)")
    attack_body = DISARM + textwrap.dedent("""
        ppid = os.getppid()
        print(dict(os.environ))
        attempt("own environ", lambda: print(open("/proc/self/environ", "rb").read()))
        attempt("parent environ", lambda: print(open(f"/proc/{ppid}/environ", "rb").read()))
        attempt("relative parent environ", lambda: (os.chdir("/proc"), print(open(f"{ppid}/environ", "rb").read())))
        print("done")
    """)
    env = {**os.environ, "NANOCHAT_TEST_SECRET": "hunter2-" + secrets.token_hex(4)}
    out = subprocess.run([sys.executable, "-c", code], input=attack_body, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "done" in out.stdout and env["NANOCHAT_TEST_SECRET"] not in out.stdout + out.stderr, out.stdout
    assert "ESCAPED" not in out.stdout, out.stdout


def test_no_socket_reaches_the_host(mode, loopback_listener):
    r = attack(mode, f"""
        import socket, _socket
        P = {loopback_listener.getsockname()[1]}
        attempt("create_connection", lambda: socket.create_connection(("127.0.0.1", P), timeout=1))
        attempt("_socket", lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM).connect(("127.0.0.1", P)))
        attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", P)))
        attempt("unix", lambda: socket.socket(socket.AF_UNIX).connect("/run/dbus/system_bus_socket"))
        def raw():  # socket(AF_INET, SOCK_STREAM) as a bare syscall, past the socket module
            fd = get_ctypes().syscall(41, 2, 1, 0)
            if fd < 0:
                raise OSError("socket() refused")
            socket.socket(fileno=fd).connect(("127.0.0.1", P))
        attempt("raw syscall", raw)
    """)
    assert_held(r)
    with pytest.raises(socket.timeout):
        loopback_listener.accept()


def test_signals_to_other_processes(mode, victim):
    r = attack(mode, f"""
        import signal
        V, ppid = {victim.pid}, os.getppid()
        attempt("kill victim", lambda: os.kill(V, signal.SIGKILL))
        attempt("killpg victim", lambda: os.killpg(V, signal.SIGKILL))
        attempt("probe parent", lambda: os.kill(ppid, 0))
        attempt("probe parent group", lambda: os.killpg(os.getpgid(ppid), 0))
        attempt("probe everyone", lambda: os.kill(-1, 0))
        attempt("pidfd", lambda: signal.pidfd_send_signal(os.pidfd_open(V), signal.SIGKILL))
        attempt("raw tgkill", lambda: get_ctypes().syscall(234, V, V, 9) == 0 or 1 / 0)
    """)
    assert_held(r)
    time.sleep(0.1)
    assert victim.poll() is None, "the victim process was killed"


def test_ptrace(mode, victim):
    r = attack(mode, f"""
        V = {victim.pid}
        def seize():
            import ctypes  # inside the attempt: run as nobody, the interpreter's lib-dynload may be unreadable
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.ptrace(0x4206, V, 0, 0) != 0:  # PTRACE_SEIZE: would not even stop the victim
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        def peek():  # process_vm_readv of one word at an unmapped address: EFAULT means the access was allowed
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            class iovec(ctypes.Structure):
                _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
            buf = ctypes.create_string_buffer(8)
            local, remote = iovec(ctypes.addressof(buf), 8), iovec(0x1000, 8)
            if libc.syscall(310, V, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) < 0:
                err = ctypes.get_errno()
                if err != 14:
                    raise OSError(err, os.strerror(err))
        attempt("ptrace seize", seize)
        attempt("process_vm_readv", peek)
    """)
    assert_held(r)
    assert victim.poll() is None


def test_fork_bomb_and_escaping_the_process_group(mode):
    r = attack(mode, """
        import time
        def escape():
            pid = os.fork()
            if pid == 0:  # a child in its own session would survive the kill of the process group
                os.setsid()
                time.sleep(30)
                os._exit(0)
            print("child", pid)
            return pid
        attempt("fork and setsid", escape)
        def bomb():
            n = 0
            while True:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                n += 1
        attempt("fork bomb", bomb)
    """, timeout_s=3.0)
    children = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("child ")]
    alive = [pid for pid in children if _alive(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "a forked child outlived the sandbox"
    assert_held(r, needs_completion=False)  # a bomb bounded only by rlimits may also end with a timeout


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_memory_limits_cannot_be_lifted(mode):
    r = attack(mode, """
        import resource
        inf = resource.RLIM_INFINITY
        attempt("raise RLIMIT_AS", lambda: resource.setrlimit(resource.RLIMIT_AS, (inf, inf)))
        attempt("raise RLIMIT_NPROC", lambda: resource.setrlimit(resource.RLIMIT_NPROC, (inf, inf)))
        attempt("8 GiB", lambda: len(bytearray(8 << 30)))
    """)
    assert_held(r)


def test_cpu_loop_ignoring_signals_is_killed(mode):
    r = attack(mode, """
        import signal
        for s in (signal.SIGXCPU, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        attempt("new session", os.setsid)
        while True:
            pass
    """, timeout_s=1.5, cpu_s=30)
    assert r.status == "timeout" and r.duration_s < 6 and not r.success
    assert_held(r, needs_completion=False)


def test_output_flood_is_cut(mode):
    r = attack(mode, """
        while True:
            os.write(1, b"x" * 65536)
    """, max_output_bytes=1 << 18)
    assert r.status == "output_limit" and len(r.stdout) < (1 << 21)


def test_inherited_descriptors(mode, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret-token-" + secrets.token_hex(4))
    fd = os.open(secret, os.O_RDWR)  # os.open is close-on-exec by default: make it inheritable, as a careless
    os.set_inheritable(fd, True)     # library might
    r_pipe, w_pipe = os.pipe()
    os.set_inheritable(w_pipe, True)
    os.set_blocking(r_pipe, False)
    try:
        r = attack(mode, """
            import stat
            for fd in range(3, 256):
                try:
                    st = os.fstat(fd)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    attempt(f"read fd {fd}", lambda: os.pread(fd, 100, 0).decode() if b"secret" in
                            os.pread(fd, 100, 0) else 1 / 0)
                elif stat.S_ISFIFO(st.st_mode):
                    try:
                        os.write(fd, b"pwned")
                        print("wrote to fd", fd)
                    except OSError:
                        pass
        """)
        assert "secret-token" not in r.stdout, r.stdout
        with pytest.raises(BlockingIOError):
            os.read(r_pipe, 100)  # nothing reached the parent's pipe
        assert_held(r, needs_completion=False)  # it may have drained its own nonce pipe: then it is no pass
    finally:
        os.close(fd)
        os.close(r_pipe)
        os.close(w_pipe)


@pytest.fixture
def host_log_socket():
    """A unix datagram socket on the host that the sandbox's uid may write to (as /dev/log or journald's are)."""
    d = Path(tempfile.mkdtemp(prefix="nanochat_log_", dir="/tmp"))
    d.chmod(0o777)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(d / "log.sock"))
    (d / "log.sock").chmod(0o777)
    sock.setblocking(False)
    yield sock, str(d / "log.sock")
    sock.close()
    shutil.rmtree(d, ignore_errors=True)


def test_no_datagram_or_descriptor_reaches_a_host_unix_socket(mode, host_log_socket):
    """socketpair(AF_UNIX, SOCK_DGRAM) + sendto(address) reached any unix datagram socket on the host (Landlock does
    not cover them, a network namespace does not isolate them), and sendmsg carried descriptors (SCM_RIGHTS)."""
    host, path = host_log_socket
    r = attack(mode, f"""
        import array, socket
        P = {path!r}
        def dgram_pair():
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            a.sendto(b"ESCAPED dgram", P)
        attempt("datagram pair + sendto", dgram_pair)
        def seqpacket_pair():
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            a.sendto(b"ESCAPED seqpacket", P)
        attempt("seqpacket pair + sendto", seqpacket_pair)
        def stream_pair_with_address():
            a, b = socket.socketpair()
            a.sendto(b"ESCAPED stream", P)
        attempt("stream pair + sendto with an address", stream_pair_with_address)
        def sendmsg_with_address():
            a, b = socket.socketpair()
            a.sendmsg([b"ESCAPED sendmsg"], [], 0, P)
        attempt("sendmsg with an address", sendmsg_with_address)
        def scm_rights():
            a, b = socket.socketpair()
            a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0]).tobytes())])
            return b.recvmsg(10, 64)
        attempt("SCM_RIGHTS", scm_rights)
        def plain_pair():  # what stays allowed: a connected stream pair and sendto without an address
            a, b = socket.socketpair()
            a.send(b"hi")  # sendto(fd, buf, len, 0, NULL, 0)
            return b.recv(2)
        print("pair", plain_pair())
    """)
    assert_held(r)
    assert "pair b'hi'" in r.stdout
    with pytest.raises(BlockingIOError):
        host.recv(100)  # nothing arrived


def test_disk_quota_over_many_fallocated_files(mode):
    """640 fallocate'd files of 16 MB put 10 GB in the scratch dir in 0.04 s: the quota ends the program first."""
    r = attack(mode, """
        total = 0
        def fill(how):
            global total
            for i in range(64):
                fd = os.open(f"{how}{i}", os.O_CREAT | os.O_WRONLY, 0o600)
                try:
                    if how == "fallocate":
                        os.posix_fallocate(fd, 0, 16 << 20)
                    else:
                        os.write(fd, bytes(16 << 20))
                finally:
                    os.close(fd)
                total += 16
                print("MB", total, flush=True)
        attempt("fallocate 64 x 16 MB", lambda: fill("fallocate"))
        attempt("write 64 x 16 MB", lambda: fill("write"))
    """, max_disk_mb=32, timeout_s=20.0, cpu_s=20)
    written = max([int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("MB ")], default=0)
    assert r.status == "disk_limit", (r.status, r.stdout[-500:], r.stderr[-500:])
    assert written < 64 * 16  # never the whole GB (with a tmpfs: never past 32 MB)
    if "disk-quota" in r.protections:
        assert written <= 32
    assert "ESCAPED" not in r.stdout


@pytest.mark.slow
def test_deep_tree_is_removed_without_recursion(mode):
    """3,000 nested dirs (past PATH_MAX) made shutil.rmtree raise RecursionError in run_code and left the folder."""
    r = attack(mode, """
        print("scratch", os.getcwd())
        for _ in range(3000):
            os.mkdir("d")
            os.chdir("d")
        open("bottom.txt", "w").write("x")
        print("deep")
    """, timeout_s=20.0, cpu_s=20, audit=False)  # the hook cannot resolve paths past PATH_MAX
    assert "deep" in r.stdout and r.completed, (r.status, r.stderr[-500:])
    scratch = next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("scratch "))
    assert not os.path.exists(scratch)


@pytest.mark.skipif(os.getuid() != 0, reason="fork is possible only without seccomp, in the namespace mode (root)")
def test_no_daemon_outlives_run_code(open_dir):
    """Without the syscall filter (namespace mode, unsandboxed) a double-forking daemon left the process group and
    survived the timeout; the pid namespace ends it with the run."""
    beat = open_dir / "beat"
    code = textwrap.dedent(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for _ in range(600):
                    with open({str(beat)!r}, "a") as f:
                        f.write("x")
                    time.sleep(0.05)
            os._exit(0)
        time.sleep(30)
    """)
    r = run_code(code, SandboxLimits(timeout_s=1.5, kernel_barrier=False, audit=False), allow_unsandboxed=True)
    size = beat.stat().st_size
    time.sleep(0.5)
    assert size > 0 and beat.stat().st_size == size, "the daemon is still running"
    assert r.status == "timeout" and "pidns" in r.protections
