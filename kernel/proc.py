"""Process plumbing shared by the supervisor and the workers: naming, pinning, parent-death
signals and fork hygiene.

``setproctitle`` is not a dependency: ``prctl(PR_SET_NAME)`` sets the name ``ps -e``, ``top``
and psutil show (the kernel's ``comm``, at most 15 bytes, so ``astra-w00`` fits), and
``PR_SET_PDEATHSIG`` makes a child die with the thread that forked it. Both go through libc
by ctypes. On a system without them (not Linux) the calls quietly do nothing.
"""

from __future__ import annotations

__all__ = [
    "after_fork_in_child",
    "pin",
    "process_alive",
    "process_start",
    "set_name",
    "set_parent_death_signal",
]

import contextlib
import ctypes
import ctypes.util
import os
import random
import signal
from typing import TYPE_CHECKING, Final

from ipc import is_alive, process_start_time

if TYPE_CHECKING:
    from collections.abc import Iterable

_PR_SET_PDEATHSIG: Final = 1
_PR_SET_NAME: Final = 15

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
except OSError:  # pragma: no cover - not glibc/musl
    _libc = None


def set_name(name: str) -> None:
    """Set this process's name as ``ps``/``top`` show it (truncated to 15 bytes)."""
    raw = name.encode()[:15]
    if _libc is not None:
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)
        return
    with contextlib.suppress(OSError), open("/proc/self/comm", "wb") as f:  # pragma: no cover
        f.write(raw)


def set_parent_death_signal(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when the thread that forked it exits."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def pin(index: int) -> int | None:
    """Pin this process to the ``index``-th core it may run on (modulo their number).
    Returns the core, or None where affinity cannot be set."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
        core = allowed[index % len(allowed)]
        os.sched_setaffinity(0, {core})
    except (AttributeError, OSError):
        return None
    return core


def after_fork_in_child(
    name: str, *, parent_pid: int, death_signal: int, close_fds: Iterable[int] = ()
) -> None:
    """Fork hygiene in one place (STYLE.md 6): name the process, arrange to die with the
    parent, restore default signal dispositions (SIGINT ignored: a Ctrl-C in the terminal is
    the parent's to handle), reseed the RNG and close the parent's private fds."""
    set_name(name)
    set_parent_death_signal(death_signal)
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(ValueError):  # only the main thread may touch the wakeup fd
        signal.set_wakeup_fd(-1)
    random.seed()
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def process_start(pid: int) -> int:
    """Start time (ticks since boot) of a live process."""
    start = process_start_time(pid)
    assert start is not None
    return start


def process_alive(pid: int, start: int) -> bool:
    """Whether process ``pid`` that started at ``start`` still runs."""
    return is_alive(pid, start)
