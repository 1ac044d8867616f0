"""The child's lockdown: the ordered steps that turn a forked child into a sandbox.

The parent resolves everything that needs a decision or a slow library into a :class:`Plan`
(the compiled seccomp filter, the Landlock rules, the workdir, the uid); the child only
makes syscalls. :func:`lock_down` runs in the child, right after fork, in this order:

1. *Process.* A new session and process group, so the wall timeout can kill everything the
   call starts with one ``killpg``. Then the *lifeline*: a pipe whose only write end the
   parent holds; its read end is set ``O_ASYNC`` with ``F_SETSIG=SIGKILL`` and
   ``F_SETOWN=-pgid``, so when the parent process dies (and its end closes) the kernel
   kills the whole sandbox group. ``PR_SET_PDEATHSIG`` would not do: it fires when the
   parent *thread* that forked exits, which kills idle pool children forked by a
   short-lived thread, and it reaches only the direct child.
2. *Descriptors and shared memory.* stdin is /dev/null, stdout/stderr the capture pipes,
   fd 3 the call pipe, fd 4 the reply pipe, fd 5 the lifeline; every other inherited fd
   (rings, sockets, the journal) closed. Then every *shared* mapping fork carried over is
   unmapped (``/proc/self/maps``, the ``s`` flag): the kernel's rings, control block,
   arena, metrics table, semaphores. Closing their fds is not enough: a MAP_SHARED page
   stays mapped and writable in the child, so a call could write the kernel's memory.
3. *Environment.* ``os.environ`` replaced by the policy's; the exec-time environment block
   (what ``/proc/<pid>/environ`` shows) zeroed, since fork copied the parent's secrets.
4. *Namespaces, where permitted.* As root, a shell profile first switches to the sandbox
   uid (``ASTRA_SANDBOX_UID``). Then a new mount namespace (plus a user namespace if not
   root, plus a network namespace unless the profile is ``network``): a fresh workdir
   becomes a tmpfs of ``max_file_bytes`` (the only total disk quota there is: RLIMIT_FSIZE
   is per file), and empty tmpfs hide ``/proc`` and ``/dev/shm`` (the parent's
   ``/proc/<pid>/mem`` and ``environ``, the kernel's segments).
5. *Limits.* rlimits (after the user namespace, so RLIMIT_NPROC counts only this
   sandbox's processes); capabilities dropped (root's, or those the new namespace gave).
6. *no_new_privs*, then *Landlock* (files, TCP, abstract sockets, signals), then
   *seccomp* last: each later step would deny the syscalls of the earlier ones.

A step that the kernel refuses (no user namespaces, no Landlock) is skipped and left out of
the returned layer names; the runner reports them in ``SandboxResult.layers``.
"""

from __future__ import annotations

__all__ = ["Plan", "base_rules", "descriptors_arranged", "lock_down", "root_sandbox_uid"]

import contextlib
import ctypes
import dataclasses
import faulthandler
import fcntl
import os
import resource
import select
import signal
import sys
from typing import TYPE_CHECKING, Final

from . import landlock, seccomp

if TYPE_CHECKING:
    import io

    from .policy import Policy

#: The uid (and gid) a root parent's shell/network sandboxes run as.
SANDBOX_UID: Final = int(os.getenv("ASTRA_SANDBOX_UID", 65534))
SANDBOX_GID: Final = int(os.getenv("ASTRA_SANDBOX_GID", 65534))
#: Open files a call may hold at once (RLIMIT_NOFILE).
MAX_FDS: Final = int(os.getenv("ASTRA_SANDBOX_MAX_FDS", 256))
#: Inodes (files and directories) a fresh tmpfs workdir holds: caps a many-files fill.
MAX_WORKDIR_INODES: Final = int(os.getenv("ASTRA_SANDBOX_MAX_INODES", 4096))

#: The fixed descriptor layout of a child after step 2.
CALL_FD: Final = 3
REPLY_FD: Final = 4
LIFELINE_FD: Final = 5

_CLONE_NEWNS: Final = 0x0002_0000
_CLONE_NEWUSER: Final = 0x1000_0000
_CLONE_NEWNET: Final = 0x4000_0000
_MS_RDONLY: Final = 1
_MS_NOSUID: Final = 2
_MS_NODEV: Final = 4
_MS_REC: Final = 0x4000
_MS_PRIVATE: Final = 1 << 18
_PR_SET_DUMPABLE: Final = 4
_F_SETSIG: Final = 10  # not in Python's fcntl module
_PR_CAPBSET_DROP: Final = 24
_PR_CAP_AMBIENT: Final = 47
_PR_CAP_AMBIENT_CLEAR_ALL: Final = 4
_LINUX_CAPABILITY_VERSION_3: Final = 0x2008_0522

#: Read-only files every profile needs: the dynamic loader's cache, time zones, randomness.
_SYSTEM_READ: Final = (
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/usr/share/zoneinfo",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
)
#: Directories programs run from (shell profiles): read and execute.
_SYSTEM_EXEC: Final = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: What command-line tools read in /etc; never all of /etc (shadow, ssh keys, sudoers).
_SHELL_ETC: Final = (
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/alternatives",
    "/etc/mime.types",
)
#: What name resolution and TLS read (network profile).
_NETWORK_ETC: Final = (
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ssl",
    "/etc/ca-certificates",
)

_libc = ctypes.CDLL(None, use_errno=True)
#: The parent's stream objects, parked in the child (see _arrange_fds).
_ORPHANED_STREAMS: list[object] = []
#: Set once fds 0-5 are the call's (step 2): before that, fd 4 may be anything of the
#: parent's, and a failure must not be reported through it.
_fds_arranged = False


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """Everything a child needs to lock itself down, resolved in the parent."""

    policy: Policy
    workdir: str  # absolute; exists; owned by ``uid`` when that is set
    fresh_workdir: bool  # made for this call: may become a tmpfs (nobody sees it after)
    env: tuple[tuple[str, str], ...]  # the child's whole environment
    bpf: seccomp.CompiledFilter
    landlock_abi: int  # 0: no Landlock (the weaker mode)
    rules: landlock.Rules  # the workdir already included
    uid: int | None  # root parent only: the uid to switch to (None: stay, drop caps)


def root_sandbox_uid(policy: Policy) -> int | None:
    """The uid a root parent's child switches to: :data:`SANDBOX_UID` for the profiles that
    exec (programs are world-readable), None for ``python`` (the interpreter may live where
    only root can read it, as under /root here; that child stays uid 0 without
    capabilities). Always None for a non-root parent."""
    if os.geteuid() != 0 or not policy.exec_allowed:
        return None
    return SANDBOX_UID


def base_rules(policy: Policy) -> landlock.Rules:
    """The Landlock rules of ``policy`` before its workdir is known."""
    read = list(_SYSTEM_READ) + list(policy.read_paths)
    execute: list[str] = []
    if policy.profile == "python":
        read += _interpreter_paths()
    else:
        execute += _SYSTEM_EXEC
        read += _SHELL_ETC
    if policy.network:
        read += _NETWORK_ETC
    write = ["/dev/null", *policy.write_paths]
    return landlock.Rules(
        read=tuple(dict.fromkeys(read)),
        execute=tuple(execute),
        write=tuple(write),
        deny_tcp=not policy.network,
    )


def _interpreter_paths() -> list[str]:
    """Where this interpreter's code lives: its prefixes and ``sys.path`` entries, but never
    the current directory nor a top-level one (``/``, ``/root``, ``/usr``): a daemon started
    from ``/`` or a home directory must not hand the sandbox every file below it. Modules
    already imported need no file access; a call that imports from elsewhere needs that
    place in ``Policy.read_paths``."""
    cwd = os.getcwd()
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix]
    paths.append(os.path.dirname(os.path.realpath(sys.executable)))
    paths += [os.path.abspath(p) for p in sys.path if p]  # "" is the current directory
    return [
        p
        for p in dict.fromkeys(paths)
        if p != cwd and p.count("/") >= 2 and os.path.exists(p)  # "/usr/lib" and deeper
    ]


def lock_down(plan: Plan, fds: tuple[int, int, int, int, int]) -> list[str]:
    """Run steps 1-6 in the calling (freshly forked) child; return the layers applied.

    ``fds`` are the child's ends of (call, reply, stdout, stderr, lifeline); call may be -1
    (a cold call arrives in memory). Called only by the runner's child, which exits after.

    Raises:
        OSError: a step that must not be skipped failed (seccomp, Landlock where the
            kernel has it, rlimits); the caller reports it and exits.
    """
    layers: list[str] = []
    os.setsid()
    _reset_signals()
    _arrange_fds(*fds)
    _hold_lifeline()
    _unmap_shared()  # before /proc is hidden
    vm_bytes = _vm_size_bytes()
    _scrub_environment(dict(plan.env))
    layers += ["session", "fds", "shm", "env"]
    # ---- Step 4: identity and namespaces ----
    if plan.uid is not None:
        _switch_uid(plan.uid)
        layers.append("uid")
    layers += _enter_namespaces(plan)
    os.chdir(plan.workdir)  # after the tmpfs mount, so the cwd is on it
    # ---- Step 5: limits ----
    _set_rlimits(plan.policy, vm_bytes)
    _drop_capabilities()
    layers += ["rlimits", "caps"]
    # ---- Step 6: the fences, each after what it would deny ----
    seccomp.set_no_new_privs()
    if plan.landlock_abi > 0:
        landlock.restrict(plan.rules, plan.landlock_abi)
        layers.append(f"landlock{plan.landlock_abi}")
    seccomp.load(plan.bpf.for_pid(os.getpid()))
    layers.append("seccomp")
    return layers


# ---- Steps 1-3: process, descriptors, environment ----


def _check(ret: int) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _reset_signals() -> None:
    """Unblock every signal and drop the parent's Python handlers (test runners, servers):
    the child starts like a fresh interpreter (SIGPIPE and SIGXFSZ stay ignored, so a
    full pipe or an oversized file is an exception, as in any Python program)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # The parent's fatal-error handler writes to an fd about to be closed (cancelling its
    # watchdog here would hang: the watchdog thread did not survive the fork).
    faulthandler.disable()


def _arrange_fds(call: int, reply: int, out: int, err: int, lifeline: int) -> None:
    """Put the call's descriptors at 0-5 and close every other one."""
    devnull = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    sources = [devnull, out, err, call if call >= 0 else devnull, reply, lifeline]
    # Copy first, above the targets: a source may itself sit on one of fds 0-5.
    copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, LIFELINE_FD + 1) for fd in sources]
    for target, fd in enumerate(copies):
        # 0-2 survive exec; the others close then (the lifeline too: after exec the
        # program is killed by the signal the kernel sends for it, not by reading it).
        os.dup2(fd, target, inheritable=target <= 2)
    os.closerange(LIFELINE_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    global _fds_arranged
    _fds_arranged = True
    # New file objects: the inherited ones may be a test runner's capture objects. The old
    # ones are kept alive, never collected: collecting one would flush the parent's
    # buffered output into this child's capture pipe.
    _ORPHANED_STREAMS.extend((sys.stdin, sys.stdout, sys.stderr))
    _ORPHANED_STREAMS.extend((sys.__stdin__, sys.__stdout__, sys.__stderr__))
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = _text_stream(1)
    sys.stderr = _text_stream(2)
    # The originals too (typeshed marks them Final; they are plain attributes).
    for name in ("stdin", "stdout", "stderr"):
        setattr(sys, f"__{name}__", getattr(sys, name))
    faulthandler.enable(sys.stderr)  # a crash leaves its Python traceback in the capture


def _text_stream(fd: int) -> io.TextIOWrapper:
    # Line-buffered: what a call printed before it crashed or called os._exit is kept.
    return open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)


def descriptors_arranged() -> bool:
    """Whether step 2 is done: fd 4 is the reply pipe (the runner's child asks before it
    reports a failed lockdown)."""
    return _fds_arranged


def _unmap_shared() -> None:
    """Unmap every shared mapping this child inherited (step 2). Nothing of the call needs
    one; Python objects over them (mmap, numpy views) are never touched here again, and the
    child leaves with ``os._exit``, so no finalizer runs on them."""
    spans = []
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            addresses, perms = line.split(maxsplit=2)[:2]
            if perms[3:4] == b"s":
                lo, hi = (int(a, 16) for a in addresses.split(b"-"))
                spans.append((lo, hi))
    for lo, hi in spans:
        _check(_libc.munmap(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo)))


def _hold_lifeline() -> None:
    """Have the kernel SIGKILL this process group when the parent's end of the lifeline
    closes (the parent died); exit now if it already has."""
    fcntl.fcntl(LIFELINE_FD, fcntl.F_SETOWN, -os.getpid())  # negative: the process group
    fcntl.fcntl(LIFELINE_FD, _F_SETSIG, signal.SIGKILL)
    flags = fcntl.fcntl(LIFELINE_FD, fcntl.F_GETFL)
    fcntl.fcntl(LIFELINE_FD, fcntl.F_SETFL, flags | os.O_ASYNC)
    poller = select.poll()
    poller.register(LIFELINE_FD, select.POLLHUP)
    if poller.poll(0):  # closed before O_ASYNC was set: no signal will come
        os._exit(1)


def _vm_size_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _scrub_environment(env: dict[str, str]) -> None:
    """Replace the environment, and zero the block the kernel shows as /proc/self/environ
    (fork copied the parent's; ``os.environ.clear()`` only drops the pointers to it)."""
    os.environ.clear()
    os.environ.update(env)
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # comm may hold spaces and parens
    start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50, 51)
    if 0 < start < end:
        ctypes.memset(start, 0, end - start)


# ---- Step 4: identity and namespaces ----


def _switch_uid(uid: int) -> None:
    """As root, become ``uid`` for good (every capability goes with uid 0)."""
    os.setgroups([])
    os.setresgid(SANDBOX_GID, SANDBOX_GID, SANDBOX_GID)
    os.setresuid(uid, uid, uid)
    # A uid change makes /proc/self root-owned, so the user namespace maps below could not
    # be written: make it ours again.
    _check(_libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0))


def _enter_namespaces(plan: Plan) -> list[str]:
    """Unshare what is permitted; set up the mounts. Returns the layers applied."""
    userns = os.geteuid() != 0
    flags = _CLONE_NEWNS | (_CLONE_NEWUSER if userns else 0)
    if not plan.policy.network:
        flags |= _CLONE_NEWNET
    if _libc.unshare(flags) != 0:
        return []  # no namespaces for this uid here: Landlock and seccomp still hold
    layers = ["mountns"] + (["userns"] if userns else [])
    layers += [] if plan.policy.network else ["netns"]
    if userns:
        _map_identity()
    # Private first: a shared / would propagate our mounts back to the host.
    _mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, b"")
    if plan.fresh_workdir:
        size, uid, gid = plan.policy.max_file_bytes, os.geteuid(), os.getegid()
        opts = f"size={size},nr_inodes={MAX_WORKDIR_INODES},mode=0700,uid={uid},gid={gid}"
        _mount(b"tmpfs", plan.workdir.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts.encode())
        layers.append("tmpfs")
    hidden = _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    for path in ("/proc", "/dev/shm"):
        if os.path.isdir(path):  # a minimal container may lack /dev/shm
            _mount(b"tmpfs", path.encode(), b"tmpfs", hidden, b"size=4k,nr_inodes=1,mode=0555")
    layers.append("hidden-proc-shm")
    return layers


def _map_identity() -> None:
    """Map our uid and gid to themselves in the new user namespace (an unmapped uid shows
    as 65534 and cannot create files)."""
    uid, gid = os.geteuid(), os.getegid()
    maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))
    for name, text in maps:
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _mount(src: bytes, target: bytes, fstype: bytes | None, flags: int, data: bytes) -> None:
    _check(_libc.mount(src, target, fstype, ctypes.c_ulong(flags), data or None))


# ---- Step 5: limits ----


def _set_rlimits(policy: Policy, vm_bytes: int) -> None:
    """Hard limits, soft = hard except CPU (SIGXCPU at the soft limit, SIGKILL 1 s later)."""
    cpu = max(1, int(-(-policy.cpu_s // 1)))  # whole seconds, rounded up
    memory = vm_bytes + policy.memory_mb * (1 << 20)  # on top of what fork handed over
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: (memory, memory),
        resource.RLIMIT_FSIZE: (policy.max_file_bytes, policy.max_file_bytes),
        resource.RLIMIT_NPROC: (policy.max_procs, policy.max_procs),
        resource.RLIMIT_NOFILE: (MAX_FDS, MAX_FDS),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_MEMLOCK: (0, 0),
    }
    for which, (soft, hard) in limits.items():
        _, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:  # never ask to raise a hard limit
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _drop_capabilities() -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable sets: a root child
    that stays uid 0 keeps no power over other users' processes or files, and no exec can
    bring any back (the bounding set caps what a file grants)."""
    for cap in range(64):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # EINVAL past the last capability; EPERM where we have none to drop
    with contextlib.suppress(OSError):  # EINVAL on kernels without ambient sets
        _check(_libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(ctypes.byref(header), ctypes.byref((_CapData * 2)())))
