"""The sandbox's child side: trusted start-up code that locks a fresh interpreter in, then runs the untrusted program.

The layers, the threat model and every syscall decision are in the parent's docstring (nanochat.tools.sandbox); this
module is the half of the contract that runs in the child.

- The parent runs this file by path, `python -I <this file> CONFIG`, with the scratch dir as the working directory.
  Isolated mode ignores PYTHON* variables, the user site, the script's directory and the working directory, so
  nothing in the environment or the scratch dir can shadow a module loaded here. It imports the standard library
  and, for the kernel barrier, landlockpy and pyseccomp; never nanochat: the program must not find the package's
  code already loaded, and the bootstrap needs none of it.
- CONFIG is one JSON object (built by the parent's `child_config`): the scratch dir, the limits, the layer switches,
  the policy (read-only paths, syscall lists) and the descriptor numbers of the nonce pipe and of the driver's
  channel. It is data only: none of it becomes code.
- The program is `program.py` in the scratch dir. The layers go on in an order forced by what each one forbids:
  the barrier's libraries while every file is readable, namespaces before the uid drop and the syscall filter,
  Landlock before the uid drop (nobody may not be able to open the interpreter's dirs to name them), the syscall
  filter last.
- The first line on stderr is HEADER_MARKER and a JSON object {"protections", "unavailable", "refused"}; when
  "refused" is true the child exits with status 3 before the program's first line. When the program's top level
  ran to its end, the child writes a newline, the nonce it read from the nonce pipe and a newline to stdout.

Importing this module does nothing but define it: the parent parses the header with `parse_header`, and the tests
call each step on its own.
"""

from __future__ import annotations

import builtins
import ctypes
import ctypes.util
import errno
import json
import os
import resource
import select
import signal
import socket
import sys

HEADER_MARKER = "\x00NANOCHAT_SANDBOX "
HEADER_LIMIT = 65536  # a first stderr line longer than this is not a header

NOBODY = 65534  # uid and gid after the drop from root
CLONE_NEWNET, CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWPID = 0x40000000, 0x10000000, 0x00020000, 0x20000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
PR_SET_PDEATHSIG = 1
CLONE_THREAD, CLONE_NS_FLAGS = 0x00010000, 0x7E020000
SOCK_TYPE_MASK = 0xF  # socket type bits of socketpair's second argument (the rest are SOCK_NONBLOCK, SOCK_CLOEXEC)
REFUSED_STATUS = 3


class Unavailable(Exception):
    """A layer the kernel does not offer; the message is the reason shown in the header."""


class SandboxViolation(PermissionError):
    """Raised by the audit hook: the program attempted something the sandbox forbids."""


# ---------------------------------------------------------------------------------------------------------------
# The header: the child's first stderr line, read by the parent


def format_header(protections: list[str], unavailable: dict[str, str], refused: bool) -> str:
    return HEADER_MARKER + json.dumps({"protections": protections, "unavailable": unavailable,
                                       "refused": bool(refused)}) + "\n"


def parse_header(err: bytes) -> dict | None:
    """The header at the start of the child's stderr: None while its line is incomplete, {} when the first line is
    not a header (the bootstrap failed before writing it)."""
    marker = HEADER_MARKER.encode()
    end = err.find(b"\n")
    if end < 0 and len(err) <= HEADER_LIMIT:
        return None
    return json.loads(err[len(marker):end]) if err.startswith(marker) and end >= 0 else {}


# ---------------------------------------------------------------------------------------------------------------
# The steps, in the order `lock_in` runs them


def load_barrier_libraries(unavailable: dict[str, str]) -> tuple:
    """Step 0: (landlockpy, pyseccomp), each None where it cannot load; loaded while the whole filesystem is still
    readable (ctypes.util.find_library runs ldconfig)."""
    landlockpy = pyseccomp = None
    try:
        import landlockpy  # optional dependency: without it the header names the missing layer
    except Exception as e:
        unavailable["landlock"] = f"landlockpy: {e}"
    try:
        import pyseccomp  # optional dependency: without it the header names the missing layer
    except Exception as e:
        unavailable["seccomp"] = f"pyseccomp: {e}"
    return landlockpy, pyseccomp


def enter_namespaces(libc, cfg: dict, scratch: str, program: str, protections: list[str],
                     unavailable: dict[str, str]) -> set[str]:
    """Step 1: a new network namespace and, where the kernel allows them, pid and mount namespaces (a new user
    namespace first when not root); with the mount namespace, a tmpfs of the disk quota over the scratch dir, with
    the program written back onto it. Returns the namespaces entered ("net", "mnt", "pid")."""
    uid, gid = os.getuid(), os.getgid()
    user = 0 if uid == 0 else CLONE_NEWUSER
    namespaces: set[str] = set()
    if libc.unshare(user | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID) == 0:
        namespaces = {"net", "mnt", "pid"}
    elif libc.unshare(user | CLONE_NEWNET) == 0:
        namespaces = {"net"}
    else:
        unavailable["netns"] = os.strerror(ctypes.get_errno())
    if namespaces:
        protections.append("netns")
    if user and namespaces:  # map our own ids so that files on the tmpfs can be owned
        try:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError as e:
            namespaces.discard("mnt")
            unavailable["disk-quota"] = f"id maps: {e}"
    if "mnt" in namespaces:
        owner = f",uid={NOBODY},gid={NOBODY}" if uid == 0 and cfg["drop_uid"] else ""
        opts = f"size={cfg['max_disk_mb']}m,nr_inodes={cfg['max_files'] + 1},mode=0700{owner}"
        if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0 and libc.mount(
                b"tmpfs", scratch.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()) == 0:
            os.chdir(scratch)  # the cwd was the dir under the mount
            with open("program.py", "w", encoding="utf-8") as f:  # for tracebacks
                f.write(program)
            protections.append("disk-quota")
        else:
            unavailable["disk-quota"] = os.strerror(ctypes.get_errno())
    return namespaces


def split_pid_namespace(libc, own_fds: list[int]) -> None:
    """Step 2, after unshare(CLONE_NEWPID): this process stays outside as the monitor, its child is the namespace's
    init (trusted: it only waits), and init's child returns from here to run the program. The monitor exits with
    the program's status or dies of its signal, so the parent sees it; when init dies (the program ended, or the
    parent killed the group) the kernel kills everything left in the namespace. `own_fds` (the nonce pipe and the
    channel) are closed in the monitor and in init."""
    alive_r, alive_w = os.pipe()     # EOF for init when the monitor is gone
    status_r, status_w = os.pipe()   # init -> monitor: the program's wait status
    init = os.fork()
    if init:
        for fd in own_fds + [alive_r, status_w]:
            os.close(fd)
        os.waitpid(init, 0)
        raw = os.read(status_r, 32)
        st = int(raw) if raw.strip() else signal.SIGKILL  # init killed before it could report
        if os.WIFEXITED(st):
            os._exit(os.WEXITSTATUS(st))
        sig = os.WTERMSIG(st)  # die of the program's signal, so that the parent sees it (no core file)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os.close(alive_w)
    os.close(status_r)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # init dies with the monitor
    if select.select([alive_r], [], [], 0)[0]:
        os._exit(1)  # the monitor died before the line above
    child = os.fork()
    if child:
        for fd in own_fds + [alive_r]:
            os.close(fd)
        while True:  # init reaps every orphan of the namespace until the program itself ends
            try:
                pid, st = os.waitpid(-1, 0)
            except ChildProcessError:
                os._exit(1)
            if pid == child:
                os.write(status_w, str(st).encode())
                os._exit(0)
    os.close(alive_r)
    os.close(status_w)


def preload(names: list[str]) -> None:
    """Step 3: modules a solution commonly needs, loaded now in case the uid drop makes the stdlib unreadable."""
    for name in names:
        try:
            __import__(name)
        except Exception:
            pass


def set_limit(kind: int, value: int) -> None:
    """Soft and hard limit `kind` to `value`; where the hard limit is already lower and may not be raised (an
    unprivileged user), to that hard limit."""
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        _, hard = resource.getrlimit(kind)
        if hard == resource.RLIM_INFINITY or value <= hard:
            raise
        resource.setrlimit(kind, (hard, hard))


def set_limits(cfg: dict) -> None:
    """Step 4: CPU seconds, address space, file size, open files, processes (threads count), no core dumps."""
    set_limit(resource.RLIMIT_CPU, cfg["cpu_s"])
    set_limit(resource.RLIMIT_AS, cfg["memory_mb"] << 20)
    set_limit(resource.RLIMIT_FSIZE, cfg["max_file_mb"] << 20)
    set_limit(resource.RLIMIT_NOFILE, cfg["max_open_files"])
    set_limit(resource.RLIMIT_NPROC, cfg["max_processes"])
    set_limit(resource.RLIMIT_CORE, 0)


def restrict_filesystem(landlockpy, scratch: str, read_only: list[str]) -> None:
    """Step 5, Landlock: `read_only` readable (dirs listable, their files executable by the loader), /dev/null
    readable and writable, `scratch` fully accessible except device nodes and exec; where the kernel has them, TCP
    and UDP bind/connect denied and signals and abstract unix sockets scoped to the sandbox. Binds the calling
    thread and its future children only. Unavailable when the kernel has no Landlock."""
    abi = landlockpy.abi_version()
    if abi < 1:
        raise Unavailable("the kernel has no Landlock (or it is disabled)")
    A, N, S = landlockpy.AccessFS, landlockpy.AccessNet, landlockpy.Scope
    read_dir, read_file = A.READ_FILE | A.READ_DIR | A.EXECUTE, A.READ_FILE
    no_devices = ~(A.MAKE_CHAR | A.MAKE_BLOCK | A.IOCTL_DEV | A.EXECUTE)
    with landlockpy.Ruleset(handled_net=N.BIND_TCP | N.CONNECT_TCP | N.BIND_UDP | N.CONNECT_SEND_UDP,
                            scoped=S.ABSTRACT_UNIX_SOCKET | S.SIGNAL) as rs:
        for p in read_only:
            rs.allow_path(p, read_dir if os.path.isdir(p) else read_file)
        rs.allow_path("/dev/null", A.READ_FILE | A.WRITE_FILE | A.TRUNCATE)
        rs.allow_path(scratch, landlockpy.fs_for_abi(abi) & no_devices)
        rs.restrict()  # sets no_new_privs first


def drop_root() -> None:
    """Step 6: from root to nobody, with no supplementary groups."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def seccomp_filter(sc, cfg: dict, pid: int):
    """Step 7: the syscall allow-list for process `pid` (not loaded yet): everything not allowed fails with EPERM;
    the parent's policy lists what is allowed outright, allowed for the process's own pid only, or answered without
    running, and which ioctl and fcntl commands pass. Names this architecture lacks are skipped."""
    f = sc.SyscallFilter(sc.ERRNO(errno.EPERM))

    def rule(action, name, *args):
        if sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0:
            f.add_rule(action, name, *args)

    for name in cfg["seccomp_allow"]:
        rule(sc.ALLOW, name)
    for name, err in cfg["seccomp_fake"].items():
        rule(sc.ERRNO(err), name)
    for name in ("kill", "tgkill"):  # signals to itself only (raise(), os.kill(os.getpid(), ...))
        rule(sc.ALLOW, name, sc.Arg(0, sc.EQ, pid))
    for name in cfg["seccomp_own_pid"]:
        for own in (0, pid):
            rule(sc.ALLOW, name, sc.Arg(0, sc.EQ, own))
    # read its own limits only: a child left as root could otherwise raise its hard limits
    rule(sc.ALLOW, "prlimit64", sc.Arg(0, sc.EQ, 0), sc.Arg(2, sc.EQ, 0))
    # clone: threads only (CLONE_THREAD set, no namespace flags)
    rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD | CLONE_NS_FLAGS, CLONE_THREAD))
    # a connected unix stream pair only: a datagram socket could sendto any unix socket path on the host
    rule(sc.ALLOW, "socketpair", sc.Arg(0, sc.EQ, socket.AF_UNIX),
         sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, socket.SOCK_STREAM))
    rule(sc.ALLOW, "sendto", sc.Arg(4, sc.EQ, 0))  # no destination address
    for cmd in cfg["seccomp_ioctls"]:
        rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, cmd))
    for cmd in cfg["seccomp_fcntls"]:
        rule(sc.ALLOW, "fcntl", sc.Arg(1, sc.EQ, cmd))
    return f


def make_audit_hook(scratch: str, proc_self: tuple[str, ...]):
    """Step 9, the convenience layer: a PEP 578 hook that turns the usual attempts (writing outside `scratch`,
    reading /proc and /sys other than `proc_self`, fork/exec/system, sockets, ctypes) into a SandboxViolation with a
    readable message. The program can disarm it; the kernel layers do not depend on it."""
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


def forget_barrier_modules() -> None:
    """Before the program: the barrier's helpers leave sys.modules, so a plain `import ctypes` meets the audit hook
    again."""
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes", "landlockpy", "pyseccomp")]:
        del sys.modules[name]


def lock_in(cfg: dict, scratch: str, program: str) -> dict:
    """Steps 0-9 in order; returns the header's fields. Only the process that is to run the program returns."""
    protections: list[str] = []
    unavailable: dict[str, str] = {}
    landlockpy = pyseccomp = None
    if cfg["kernel_barrier"]:
        landlockpy, pyseccomp = load_barrier_libraries(unavailable)
    else:
        unavailable["seccomp"] = unavailable["landlock"] = "switched off by the caller"

    if cfg["namespaces"]:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        namespaces = enter_namespaces(libc, cfg, scratch, program, protections, unavailable)
        if "pid" in namespaces:
            split_pid_namespace(libc, [cfg["nonce_fd"]] + cfg["channel_fds"])
            protections.append("pidns")
        del libc

    preload(cfg["preload"])
    set_limits(cfg)
    protections.append("rlimits")

    # Landlock and seccomp bind the calling thread only: make sure it is the only one
    if os.path.isdir("/proc/self/task") and len(os.listdir("/proc/self/task")) != 1:
        raise SystemExit("sandbox bootstrap: more than one thread before the kernel barrier")

    if landlockpy is not None:
        try:
            restrict_filesystem(landlockpy, scratch, cfg["read_only"])
            protections.append("landlock")
        except Unavailable as e:
            unavailable["landlock"] = str(e)
        except Exception as e:
            unavailable["landlock"] = f"{type(e).__name__}: {e}"

    if os.getuid() == 0 and cfg["drop_uid"]:
        drop_root()
        protections.append("uid-drop")

    if pyseccomp is not None:  # last: after it nothing above would be permitted
        try:
            seccomp_filter(pyseccomp, cfg, os.getpid()).load()  # with no_new_privs (libseccomp's default)
            protections.append("seccomp")
        except Exception as e:
            unavailable["seccomp"] = f"{type(e).__name__}: {e}"

    # step 8: without the kernel barrier there is no sandbox (namespaces alone leave files, exec and the disk open):
    # stop before the program's first line unless the caller accepted that
    refused = cfg["require_isolation"] and not {"seccomp", "landlock"} <= set(protections)

    forget_barrier_modules()
    if cfg["audit"] and not refused:
        sys.addaudithook(make_audit_hook(scratch, ("/proc/self/", f"/proc/{os.getpid()}/")))
        protections.append("audit")
    return {"protections": protections, "unavailable": unavailable, "refused": bool(refused)}


def run_program(program: str, nonce_fd: int) -> None:
    """The program as `__main__` of its own namespace; the nonce goes out only when its top level ran to its end
    (see "completed" in the parent's docstring)."""
    sys.argv = ["program.py"]
    exec(compile(program, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    try:
        sys.stdout.flush()
    finally:
        nonce = os.read(nonce_fd, 64).strip()
        os.write(1, b"\n" + nonce + b"\n")


def main(argv: list[str]) -> None:
    cfg = json.loads(argv[0])
    scratch = os.path.realpath(cfg["scratch"])
    nonce_fd = cfg["nonce_fd"]
    os.set_inheritable(nonce_fd, False)
    with open(os.path.join(scratch, "program.py"), encoding="utf-8") as f:
        program = f.read()  # before a tmpfs hides it
    header = lock_in(cfg, scratch, program)
    sys.stderr.write(format_header(**header))
    sys.stderr.flush()
    if header["refused"]:
        os._exit(REFUSED_STATUS)
    run_program(program, nonce_fd)


if __name__ == "__main__":
    main(sys.argv[1:])
