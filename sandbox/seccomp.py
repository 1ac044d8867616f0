"""Seccomp allowlists per profile: compiled once in the parent, loaded in each child.

Each profile is an *allowlist*: a syscall runs only if a rule allows it, with its arguments
where they matter. Everything else is denied, and every denial is *named*: a denied syscall
``nr`` fails with its own errno, ``VIOLATION_ERRNO_BASE + nr`` (3000-3511; real errnos stop
at 133, the kernel's limit is 4095). The child maps an escaping ``OSError`` with such an errno
to ``SandboxViolation(syscall=<name>)``; code that catches it simply sees the call fail.
(Killing on denial would be simpler, but then the parent learns only "SIGSYS", never which
syscall, and glibc's probe-and-fall-back paths would kill instead of failing.)

Rules of construction, each from something measured (see NOTES.md, Sandbox):

1. *Architecture first.* A syscall from another ABI (i386 ``int 0x80``, x32) kills the whole
   process (``SCMP_ACT_KILL_PROCESS``; libseccomp's default kills only the thread). Without
   the check, ``int 0x80`` reached the i386 table and bypassed every rule.
2. *Allow by argument, never deny by argument.* ``socket`` is allowed for the listed
   families only: a denylist on AF_INET was bypassed with AF_INET6 and with
   ``0x1_0000_0002`` (the kernel truncates to int). Rules compare all 64 bits, so a value
   with high bits set never equals an allowed one. The complement of every allowed set is
   spelled out as deny rules (gaps enumerated, ``> max``, one rule per wrong bit of a mask)
   so that a denied argument is named too; libseccomp cannot say "allow X, else errno Y".
3. *The dangerous set is denied in every profile*: ptrace, process_vm_*, bpf, userfaultfd,
   io_uring_*, keyctl/add_key/request_key, mount and the new mount API, pivot_root, chroot,
   unshare/setns, clone with namespace flags, kexec_*, module loading, perf_event_open,
   personality changes, the TIOCSTI/TIOCLINUX ioctls, memfd_create and execveat, SysV IPC,
   name_to_handle_at/open_by_handle_at, setuid and friends, and the path-based metadata
   calls Landlock does not cover (chmod, chown, utime, setxattr families).
4. *clone3 fails with ENOSYS*, not a violation: glibc then falls back to ``clone``, whose
   flags a filter can see (clone3's are behind a pointer). EPERM broke ``threading``.
5. *Signals stay home.* ``kill`` is allowed for the caller's own process group (pid 0);
   ``tgkill`` and the sigqueue calls for the caller's own pid. That pid is unknown when the
   filter is compiled, so rules compare against a placeholder, and :meth:`CompiledFilter.
   for_pid` patches the child's pid into the BPF (each compare of the placeholder is one
   ``BPF_JEQ`` instruction, found and checked at compile time). Where Landlock scopes
   signals (ABI 6), the shell profiles may signal any pid: the kernel confines them.
6. *Compile once, load many.* :func:`compile_filter` builds the BPF with pyseccomp in the
   parent (about 15 ms with the export, and importing pyseccomp costs 35 ms) and caches it;
   a child only patches its pid and loads the bytes (:func:`load`, well under 1 ms).
"""

from __future__ import annotations

__all__ = [
    "VIOLATION_ERRNO_BASE",
    "CompiledFilter",
    "compile_filter",
    "load",
    "set_no_new_privs",
    "syscall_name",
    "violation_syscall",
]

import ctypes
import dataclasses
import errno
import functools
import itertools
import os
import platform
import socket
import struct
import tempfile
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .policy import Profile

#: Errno of a denied syscall ``nr``: ``VIOLATION_ERRNO_BASE + nr`` (kept under 4095 - 512).
VIOLATION_ERRNO_BASE: Final = int(os.getenv("ASTRA_SANDBOX_ERRNO_BASE", 3000))
#: Syscall numbers the filters name one by one; anything above fails with plain ENOSYS.
MAX_SYSCALL_NR: Final = 512
assert VIOLATION_ERRNO_BASE >= 134, "must stay above every real errno"
assert VIOLATION_ERRNO_BASE + MAX_SYSCALL_NR <= 4095, "the kernel caps errno at 4095"

#: Longest run of denied argument values spelled out one rule each (see _complement).
_MAX_GAP: Final = 64
#: The answer to syscalls the filter does not name (numbers beyond the table, clone3).
_DEFAULT_ERRNO: Final = errno.ENOSYS
#: Stand-in for the child's pid in compiled rules; above PID_MAX_LIMIT (2**22), so no real
#: pid or other constant of the profiles equals it.
_SELF_PID: Final = 0x7A57_0CED

# ---- Argument conditions: how a rule looks at a syscall's arguments ----


@dataclasses.dataclass(frozen=True, slots=True)
class _OneOf:
    """Allowed iff ``args[arg]`` (all 64 bits) is one of ``values``."""

    arg: int
    values: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class _Masked:
    """Allowed iff ``args[arg] & mask == value``."""

    arg: int
    mask: int
    value: int


@dataclasses.dataclass(frozen=True, slots=True)
class _AtMost:
    """Allowed iff ``args[arg] <= limit`` (unsigned 64-bit)."""

    arg: int
    limit: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Fails:
    """Always fails with ``errno``: a well-known answer, not a violation."""

    errno: int


_Condition = _OneOf | _Masked | _AtMost | _Fails | None  # None: allowed unconditionally


def _names(text: str) -> frozenset[str]:
    """Syscall names from a whitespace-separated block (denser to read than a literal)."""
    return frozenset(text.split())


# ---- The profiles ----

_CLONE_THREAD: Final = 0x0001_0000
#: Every namespace flag clone(2) accepts (CLONE_NEWTIME lives in the exit-signal byte).
_CLONE_NS_FLAGS: Final = (
    0x0002_0000  # CLONE_NEWNS
    | 0x0200_0000  # CLONE_NEWCGROUP
    | 0x0400_0000  # CLONE_NEWUTS
    | 0x0800_0000  # CLONE_NEWIPC
    | 0x1000_0000  # CLONE_NEWUSER
    | 0x2000_0000  # CLONE_NEWPID
    | 0x4000_0000  # CLONE_NEWNET
)
#: ioctls a program needs on pipes, files and terminals: TCGETS, TIOCGPGRP, TIOCGWINSZ,
#: FIONREAD, FIONBIO, FIONCLEX, FIOCLEX. TIOCSTI (0x5412) and TIOCLINUX (0x541C) are not.
_IOCTLS: Final = (0x5401, 0x540F, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)
#: prctl options that read state or touch only the caller: PDEATHSIG set/get,
#: GET_DUMPABLE, SET_NAME/GET_NAME, GET_SECCOMP, CAPBSET_READ, NO_NEW_PRIVS set/get.
_PRCTLS: Final = (1, 2, 3, 15, 16, 21, 23, 38, 39)
#: fcntl commands: F_DUPFD .. F_SETLKW, F_GETOWN, F_GETSIG, the OFD locks, F_DUPFD_CLOEXEC,
#: pipe sizes and seals. Not F_SETOWN/F_SETOWN_EX/F_SETSIG: with O_ASYNC they let a
#: process have the kernel signal any pid its uid may signal, around the kill rules.
_FCNTLS: Final = (0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 36, 37, 38, 1030, 1031, 1032, 1033, 1034)
#: personality(0xffffffff) only reads the persona; any other value changes it.
_PERSONALITY_QUERY: Final = 0xFFFF_FFFF
#: The highest non-negative pid_t: with the high word clear, a pid argument is >= 0.
_PID_MAX_T: Final = 0x7FFF_FFFF

#: What any Python process needs: files through descriptors, memory, threads, time,
#: signals to itself, polling, UNIX socketpairs.
_PYTHON_ALLOW: Final = _names(
    """
    read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2 lseek close
    close_range open openat openat2 stat fstat lstat newfstatat statx access faccessat
    faccessat2 readlink readlinkat getdents getdents64 getcwd chdir fchdir mkdir mkdirat
    rmdir unlink unlinkat rename renameat renameat2 symlink symlinkat link linkat
    truncate ftruncate fallocate fsync fdatasync flock dup dup2 dup3 pipe pipe2 umask
    statfs fstatfs fchmod getxattr lgetxattr fgetxattr listxattr llistxattr flistxattr
    sendfile copy_file_range splice tee fadvise64 readahead brk mmap munmap mprotect
    mremap madvise msync mincore membarrier futex set_robust_list rseq set_tid_address
    sched_yield sched_getaffinity sched_getparam sched_getscheduler
    sched_get_priority_max sched_get_priority_min getpid getppid gettid getuid geteuid
    getgid getegid getgroups getresuid getresgid getpgrp getpgid getsid uname sysinfo
    getrusage times getcpu getrandom capget getrlimit setrlimit clock_gettime
    clock_getres clock_nanosleep nanosleep gettimeofday time getitimer setitimer alarm
    timer_create timer_settime timer_gettime timer_getoverrun timer_delete rt_sigaction
    rt_sigprocmask rt_sigreturn sigaltstack rt_sigsuspend rt_sigpending rt_sigtimedwait
    pause restart_syscall poll ppoll select pselect6 epoll_create epoll_create1
    epoll_ctl epoll_wait epoll_pwait epoll_pwait2 eventfd eventfd2 signalfd signalfd4
    timerfd_create timerfd_settime timerfd_gettime getsockopt setsockopt getsockname
    getpeername recvfrom recvmsg shutdown exit exit_group wait4 waitid
    """
)
#: Added by the shell profile: running programs and forking (without namespaces);
#: arch_prctl sets a new program's thread-local storage base (x86-64).
_SHELL_ALLOW: Final = frozenset({"execve", "fork", "vfork", "arch_prctl"})
#: Added by the network profile: the rest of the socket API.
_NETWORK_ALLOW: Final = frozenset(
    {"connect", "bind", "listen", "accept", "accept4", "sendmsg", "sendmmsg", "recvmmsg"}
)
#: Legacy syscalls the generic table (aarch64, riscv64) lacks: absent there, not typos.
_ARCH_OPTIONAL: Final = _names(
    """
    open stat lstat access readlink getdents mkdir rmdir unlink rename symlink link dup2
    pipe poll select epoll_create epoll_wait eventfd signalfd time alarm pause fork
    vfork getpgrp getrlimit arch_prctl
    """
)
#: x86-64 syscalls newer than libseccomp 2.5.4's table (Linux 6.7-6.17), named by hand.
_X86_64_NEWER: Final = {
    457: "statmount",
    458: "listmount",
    459: "lsm_get_self_attr",
    460: "lsm_set_self_attr",
    461: "lsm_list_modules",
    462: "mseal",
    463: "setxattrat",
    464: "getxattrat",
    465: "listxattrat",
    466: "removexattrat",
    467: "open_tree_attr",
    468: "file_getattr",
    469: "file_setattr",
}


def _profile_rules(profile: Profile, *, signals_scoped: bool) -> dict[str, _Condition]:
    """The profile as ``{syscall name: condition}``; every other syscall is denied."""
    rules: dict[str, _Condition] = dict.fromkeys(_PYTHON_ALLOW)
    self_only = _OneOf(0, (_SELF_PID,))
    rules |= {
        "socket": _OneOf(0, (socket.AF_UNIX,)),
        "socketpair": _OneOf(0, (socket.AF_UNIX,)),
        "sendto": _OneOf(4, (0,)),  # no destination address: only connected sockets
        "clone": _Masked(0, _CLONE_NS_FLAGS | _CLONE_THREAD, _CLONE_THREAD),  # threads only
        "clone3": _Fails(errno.ENOSYS),
        "ioctl": _OneOf(1, _IOCTLS),
        "fcntl": _OneOf(1, _FCNTLS),
        "prctl": _OneOf(0, _PRCTLS),
        "kill": _OneOf(0, (0,)),  # own process group: the sandbox is its session leader
        "tgkill": self_only,
        "rt_sigqueueinfo": self_only,
        "rt_tgsigqueueinfo": self_only,
        "prlimit64": _OneOf(0, (0,)),  # own limits only
        "getpriority": _OneOf(1, (0,)),
        "setpriority": _OneOf(1, (0,)),
        "utimensat": _OneOf(1, (0,)),  # through a descriptor (NULL path) only
        "personality": _OneOf(0, (_PERSONALITY_QUERY,)),
    }
    if profile == "python":
        return rules
    rules |= dict.fromkeys(_SHELL_ALLOW)
    rules["clone"] = _Masked(0, _CLONE_NS_FLAGS, 0)
    if signals_scoped:  # Landlock confines signals to the sandbox's own processes
        any_pid = _AtMost(0, _PID_MAX_T)
        rules |= {"kill": any_pid, "tgkill": any_pid}
        rules |= {"rt_sigqueueinfo": any_pid, "rt_tgsigqueueinfo": any_pid}
    if profile == "shell":
        return rules
    rules |= dict.fromkeys(_NETWORK_ALLOW)
    # IPv4/IPv6 only: a UNIX socket could connect to any path socket, which Landlock does
    # not fence (docker.sock, astrad's). socketpair stays AF_UNIX.
    rules |= {"socket": _OneOf(0, (socket.AF_INET, socket.AF_INET6)), "sendto": None}
    return rules


# ---- Compiling ----


@dataclasses.dataclass(frozen=True, slots=True)
class CompiledFilter:
    """A profile's BPF program, ready to load once the child's pid is patched in."""

    profile: str
    bpf: bytes  # struct sock_filter[]: u16 code, u8 jt, u8 jf, u32 k
    self_slots: tuple[int, ...]  # indexes of the instructions comparing with _SELF_PID

    @property
    def instructions(self) -> int:
        return len(self.bpf) // 8

    def for_pid(self, pid: int) -> bytes:
        """The program with ``pid`` in place of the placeholder (cheap: a few writes)."""
        prog = bytearray(self.bpf)
        for index in self.self_slots:
            struct.pack_into("=I", prog, index * 8 + 4, pid)
        return bytes(prog)


@functools.cache
def compile_filter(profile: Profile, *, signals_scoped: bool = False) -> CompiledFilter:
    """Build ``profile``'s filter with pyseccomp and export it as BPF. Cached per process.

    Called in the parent (by ``runner.Runner`` when it is made); blocks for about 15 ms the
    first time, plus the pyseccomp import.

    Raises:
        ValueError: a syscall name in the profile that libseccomp does not know on this
            architecture (pyseccomp would silently resolve it to -1).
    """
    import pyseccomp as sc  # 35 ms (it runs ldconfig): only ever in the parent, once

    table = _syscall_table()
    flt = sc.SyscallFilter(sc.ERRNO(_DEFAULT_ERRNO))
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    flt.set_attr(sc.Attr.CTL_OPTIMIZE, 2)  # binary tree: ~10 compares per syscall, not ~400
    rules = _profile_rules(profile, signals_scoped=signals_scoped)
    for name in rules:
        if sc.resolve_syscall(sc.Arch.NATIVE, name) < 0 and name not in _ARCH_OPTIONAL:
            raise ValueError(f"profile {profile!r}: libseccomp does not know syscall {name!r}")
    for nr, name in table.items():
        deny = sc.ERRNO(VIOLATION_ERRNO_BASE + nr)
        if name not in rules:
            flt.add_rule(deny, nr)
        else:
            _add_conditional(sc, flt, nr, rules[name], deny)
    with tempfile.TemporaryFile() as f:  # libseccomp exports to a real fd only
        flt.export_bpf(f)
        f.seek(0)
        bpf = f.read()
    return CompiledFilter(profile, bpf, _self_slots(bpf))


def _add_conditional(sc: Any, flt: Any, nr: int, cond: _Condition, deny: int) -> None:
    """Add the allow rules of ``cond`` and deny rules covering exactly its complement.

    ``sc`` is the pyseccomp module (imported lazily, untyped) and ``flt`` its filter.
    """
    if cond is None:
        flt.add_rule(sc.ALLOW, nr)
    elif isinstance(cond, _Fails):
        # A rule whose action equals the default fails with EACCES: ENOSYS needs none.
        if cond.errno != _DEFAULT_ERRNO:
            flt.add_rule(sc.ERRNO(cond.errno), nr)
    elif isinstance(cond, _AtMost):
        flt.add_rule(sc.ALLOW, nr, sc.Arg(cond.arg, sc.LE, cond.limit))
        flt.add_rule(deny, nr, sc.Arg(cond.arg, sc.GT, cond.limit))
    elif isinstance(cond, _Masked):
        arg, mask, value = cond.arg, cond.mask, cond.value
        flt.add_rule(sc.ALLOW, nr, sc.Arg(arg, sc.MASKED_EQ, mask, value))
        for bit in _bits(mask):  # one rule per bit that has the wrong value
            flt.add_rule(deny, nr, sc.Arg(arg, sc.MASKED_EQ, bit, ~value & bit))
    else:
        for value in cond.values:
            flt.add_rule(sc.ALLOW, nr, sc.Arg(cond.arg, sc.EQ, value))
        for op, value in _complement(cond.values):
            flt.add_rule(deny, nr, sc.Arg(cond.arg, getattr(sc, op), value))


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(64) if mask >> i & 1]


def _complement(values: tuple[int, ...]) -> list[tuple[str, int]]:
    """Comparisons (one per rule: libseccomp allows one per argument) that match the 64-bit
    values not in ``values``: all of them, except the values of gaps longer than
    :data:`_MAX_GAP`, which are left to the default action (denied with plain ENOSYS:
    still denied, only not named)."""
    if len(values) == 1:
        return [("NE", values[0])]
    ordered = sorted(set(values))
    out = [("LT", ordered[0])] if ordered[0] > 0 else []
    for lo, hi in itertools.pairwise(ordered):
        if hi - lo - 1 <= _MAX_GAP:
            out += [("EQ", v) for v in range(lo + 1, hi)]
    out.append(("GT", ordered[-1]))
    return out


def _self_slots(bpf: bytes) -> tuple[int, ...]:
    """Indexes of the ``JEQ k=_SELF_PID`` instructions; check no other use of the value."""
    bpf_jmp_jeq_k = 0x15
    slots = []
    for index, (code, _jt, _jf, k) in enumerate(struct.iter_unpack("=HBBI", bpf)):
        if k == _SELF_PID:
            assert code == bpf_jmp_jeq_k, f"placeholder in a non-compare instruction {code:#x}"
            slots.append(index)
    return tuple(slots)


@functools.cache
def _syscall_table() -> dict[int, str]:
    """``{nr: name}`` of the native architecture, from libseccomp plus :data:`_X86_64_NEWER`."""
    import pyseccomp as sc

    table = {}
    for nr in range(MAX_SYSCALL_NR):
        try:
            table[nr] = sc.resolve_syscall(sc.Arch.NATIVE, nr).decode()
        except ValueError:
            continue  # a gap in the table: such numbers fail with ENOSYS
    if platform.machine() == "x86_64":
        table |= {nr: name for nr, name in _X86_64_NEWER.items() if nr not in table}
    return table


def syscall_name(nr: int) -> str:
    """The name of syscall ``nr`` on this architecture (``"syscall_<nr>"`` if unknown)."""
    return _syscall_table().get(nr, f"syscall_{nr}")


def violation_syscall(err: int | None) -> tuple[str, int] | None:
    """``(name, nr)`` of the syscall a filter denied with errno ``err``, else None.

    Works in a child without pyseccomp as long as the parent compiled a filter (which fills
    the table the child inherits).
    """
    if err is None or not VIOLATION_ERRNO_BASE <= err < VIOLATION_ERRNO_BASE + MAX_SYSCALL_NR:
        return None
    nr = err - VIOLATION_ERRNO_BASE
    return syscall_name(nr), nr


# ---- Loading (child side) ----

#: seccomp(2) by architecture; where unknown, fall back to prctl (no TSYNC, which is fine
#: right after fork: the child has one thread).
_NR_SECCOMP: Final = {"x86_64": 317, "aarch64": 277, "riscv64": 277}.get(platform.machine())
_SECCOMP_SET_MODE_FILTER: Final = 1
_SECCOMP_FILTER_FLAG_TSYNC: Final = 1
_PR_SET_NO_NEW_PRIVS: Final = 38
_PR_SET_SECCOMP: Final = 22

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def _check(ret: int) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_no_new_privs() -> None:
    """Set PR_SET_NO_NEW_PRIVS: exec can never grant privileges again (setuid binaries,
    file capabilities). Required before an unprivileged Landlock or seccomp load."""
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))


def load(bpf: bytes) -> None:
    """Install ``bpf`` on every thread of the calling process, irrevocably.

    Called only in the runner's child, last in its lockdown (after no_new_privs).

    Raises:
        OSError: the kernel refused the program.
    """
    assert bpf, "an empty program"
    assert len(bpf) % 8 == 0, "not a whole number of sock_filter instructions"
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    if _NR_SECCOMP is None:
        _check(_libc.prctl(_PR_SET_SECCOMP, 2, ctypes.byref(prog), 0, 0))
        return
    # TSYNC: were a thread running already, it would otherwise stay unfiltered.
    mode, flags = _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC
    _check(_libc.syscall(_NR_SECCOMP, mode, flags, ctypes.byref(prog)))
