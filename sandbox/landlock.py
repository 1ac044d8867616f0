"""Landlock through raw syscalls (ctypes): the filesystem, TCP and signal fences of a child.

Landlock lets an unprivileged process give up access to every file outside a list of
directory trees, for itself and its descendants, irrevocably. Root is bound as well: it is not
bypassed by capabilities. The runner applies it in the child after the namespaces and before
seccomp (``runner.py``, step 6).

What each ABI adds, and what this module asks for when the kernel has it:

====  =================================================================================
ABI   rights handled (everything handled and not granted by a rule is denied)
====  =================================================================================
1     execute, read/write files, read dirs, create/remove files, dirs, links, sockets
2     ``REFER``: links and renames across directories (granted inside write paths only)
3     ``TRUNCATE``
4     TCP ``bind``/``connect`` (handled without rules, so denied, unless the profile is
      ``network``)
5     ``IOCTL_DEV``: ioctls on device files
6     scopes: abstract UNIX sockets and signals to processes outside the sandbox
====  =================================================================================

Landlock does not cover metadata changes (chmod, chown, setxattr, utime), ``connect`` to a
UNIX path socket, or exec from a memfd; the seccomp profiles deny those syscalls instead.
Nor does it cover reading metadata (stat, readlink, access): a call can learn that a file
outside its rules exists, and its size, but not read it.

Invariant: :func:`restrict` is called only in a forked child, after ``PR_SET_NO_NEW_PRIVS``
(Landlock requires it of unprivileged callers) and before the seccomp filter (which denies
the Landlock syscalls themselves).
"""

from __future__ import annotations

__all__ = [
    "Rules",
    "abi_version",
    "restrict",
]

import ctypes
import dataclasses
import errno
import functools
import os
import stat
from typing import Final

# x86-64 and the generic syscall table (aarch64, riscv64) share these numbers.
_NR_CREATE_RULESET: Final = 444
_NR_ADD_RULE: Final = 445
_NR_RESTRICT_SELF: Final = 446
_CREATE_RULESET_VERSION: Final = 1
_RULE_PATH_BENEATH: Final = 1

# ---- Access rights (linux/landlock.h) ----

_EXECUTE: Final = 1 << 0
_WRITE_FILE: Final = 1 << 1
_READ_FILE: Final = 1 << 2
_READ_DIR: Final = 1 << 3
_REMOVE_DIR: Final = 1 << 4
_REMOVE_FILE: Final = 1 << 5
_MAKE_CHAR: Final = 1 << 6
_MAKE_DIR: Final = 1 << 7
_MAKE_REG: Final = 1 << 8
_MAKE_SOCK: Final = 1 << 9
_MAKE_FIFO: Final = 1 << 10
_MAKE_BLOCK: Final = 1 << 11
_MAKE_SYM: Final = 1 << 12
_REFER: Final = 1 << 13  # ABI 2
_TRUNCATE: Final = 1 << 14  # ABI 3
_IOCTL_DEV: Final = 1 << 15  # ABI 5
_NET_BIND_TCP: Final = 1 << 0  # ABI 4
_NET_CONNECT_TCP: Final = 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET: Final = 1 << 0  # ABI 6
_SCOPE_SIGNAL: Final = 1 << 1  # ABI 6

#: Rights that apply to a file (not a directory); a rule on a file may grant only these.
_FILE_RIGHTS: Final = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV
_READ_RIGHTS: Final = _READ_FILE | _READ_DIR
# Creating devices is left out even where writing is allowed: without CAP_MKNOD it fails
# anyway, and a root child that kept the capability must not make one.
_WRITE_RIGHTS: Final = (
    _READ_RIGHTS
    | _WRITE_FILE
    | _REMOVE_DIR
    | _REMOVE_FILE
    | _MAKE_DIR
    | _MAKE_REG
    | _MAKE_SOCK
    | _MAKE_FIFO
    | _MAKE_SYM
    | _REFER
    | _TRUNCATE
)


def _handled_fs(abi: int) -> int:
    """Every filesystem right this ABI knows: all of them are handled, so all are denied
    unless a rule grants them."""
    rights = (1 << 13) - 1  # ABI 1: bits 0-12
    if abi >= 2:
        rights |= _REFER
    if abi >= 3:
        rights |= _TRUNCATE
    if abi >= 5:
        rights |= _IOCTL_DEV
    return rights


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),  # ABI 4
        ("scoped", ctypes.c_uint64),  # ABI 6
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # packed in the kernel's uapi header: 12 bytes, no padding
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(nr: int, *args: object) -> int:
    """Run a raw syscall; raise OSError on failure."""
    ret = int(_libc.syscall(nr, *args))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


@functools.cache
def abi_version() -> int:
    """The Landlock ABI of the running kernel (0 if it has none, or if
    ``ASTRA_SANDBOX_LANDLOCK=0`` turns it off). Cached: called once per process, in the
    parent, before any child is forked."""
    if os.getenv("ASTRA_SANDBOX_LANDLOCK", "1") == "0":
        return 0
    try:
        return _syscall(_NR_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    except OSError as exc:
        # ENOSYS: built without Landlock; EOPNOTSUPP: built in but not enabled at boot.
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


@dataclasses.dataclass(frozen=True, slots=True)
class Rules:
    """What a child keeps: files and trees it may read, run, or read and write.

    Paths that do not exist, or that the child's uid cannot reach, are skipped when the
    rules are applied (a rule cannot grant more than the uid has anyway).
    """

    read: tuple[str, ...] = ()  # read files and list directories
    execute: tuple[str, ...] = ()  # as read, and execve
    write: tuple[str, ...] = ()  # as read, and create, write, remove, rename within
    deny_tcp: bool = True  # handle TCP bind/connect (ABI 4) with no rule: all denied
    scope: bool = True  # no abstract UNIX sockets or signals across the fence (ABI 6)


def restrict(rules: Rules, abi: int) -> None:
    """Confine the calling process (and its future children) to ``rules``, for good.

    Called only by the runner's child, after PR_SET_NO_NEW_PRIVS; blocks for about 0.4 ms.

    Raises:
        OSError: the kernel refused the ruleset (never expected where ``abi`` > 0).
    """
    assert abi > 0, "restrict() needs a kernel with Landlock"
    attr = _RulesetAttr(handled_access_fs=_handled_fs(abi))
    size = 8  # only the fields this ABI knows: older kernels reject a larger struct
    if abi >= 4:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP if rules.deny_tcp else 0
        size = 16
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if rules.scope else 0
        size = 24
    ruleset = _syscall(_NR_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    try:
        handled = attr.handled_access_fs
        for paths, rights in (
            (rules.read, _READ_RIGHTS),
            (rules.execute, _READ_RIGHTS | _EXECUTE),
            (rules.write, _WRITE_RIGHTS),
        ):
            for path in paths:
                _add_path_rule(ruleset, path, rights & handled)
        _syscall(_NR_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)


def _add_path_rule(ruleset: int, path: str, rights: int) -> None:
    """Grant ``rights`` beneath ``path`` (only the file rights if it is not a directory)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # missing, or out of this uid's reach: nothing to grant
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_RIGHTS
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        _syscall(_NR_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0)
    finally:
        os.close(fd)
