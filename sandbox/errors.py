"""Errors of the sandbox layer.

Every error the ``sandbox`` layer raises derives from :class:`SandboxError`. The four the issue
names are *outcomes* of a sandboxed call (they keep the issue's names, without the ``Error``
suffix, because ``kernel`` and ``astra`` re-export them under those names); the public
``astra`` package re-exports the ones users can meet.

    SandboxError              the sandbox could not run the call, or the call broke a rule
    +-- SandboxTimeout        the call ran past its wall-clock or CPU limit (``limit``)
    +-- SandboxMemoryError    the call ran out of its memory budget
    +-- SandboxViolation      the call made a syscall the profile denies (``syscall``)
    +-- SandboxCrashed        the child died by a signal, or exited without a reply
    +-- SandboxCallError      the call raised an exception the parent cannot rebuild safely

    SandboxWarning            a layer the kernel lacks: the sandbox runs in a weaker mode

Every error survives pickling (a custom ``__init__`` comes with a ``__reduce__`` that keeps
the instance ``__dict__``), so the kernel can forward it to a client unchanged. The runner
attaches ``result`` (a ``SandboxResult`` with what was captured before the failure: output,
duration, peak RSS) to the errors it raises; it is ``None`` on errors built elsewhere.
"""

from __future__ import annotations

__all__ = [
    "RemoteTraceback",
    "SandboxCallError",
    "SandboxCrashed",
    "SandboxError",
    "SandboxMemoryError",
    "SandboxTimeout",
    "SandboxViolation",
    "SandboxWarning",
]

import signal as _signal
from typing import Any


class SandboxError(Exception):
    """Root of every error raised by the ``sandbox`` layer.

    Raised as itself when the sandbox cannot run a call at all: the child could not be set up,
    its reply was malformed or too large, or its result cannot cross back as plain data.
    """

    #: What the child left before it failed (a ``sandbox.runner.SandboxResult``), or None.
    result: Any = None


class SandboxTimeout(SandboxError):
    """Raised by ``Runner.call`` and ``WarmPool.call`` when the call ran past ``Policy.wall_s``
    (``limit == "wall"``: its whole process group was killed) or used ``Policy.cpu_s`` seconds
    of CPU (``limit == "cpu"``: the kernel stopped it with SIGXCPU or SIGKILL)."""

    def __init__(self, message: str, limit: str = "wall", limit_s: float = 0.0) -> None:
        super().__init__(message)
        self.limit = limit
        self.limit_s = limit_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.limit, self.limit_s), self.__dict__)


class SandboxMemoryError(SandboxError):
    """Raised by ``Runner.call`` and ``WarmPool.call`` when the call ran out of the
    ``Policy.memory_mb`` it may add to what its child inherited (a ``MemoryError`` or an
    ``ENOMEM`` in the child)."""

    def __init__(self, message: str, limit_mb: int = 0) -> None:
        super().__init__(message)
        self.limit_mb = limit_mb

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.limit_mb), self.__dict__)


class SandboxViolation(SandboxError):
    """Raised by ``Runner.call`` and ``WarmPool.call`` when the call made a syscall its
    profile denies and did not handle the failure (or turned it into another exception).

    ``syscall`` names the denied syscall when the filter can tell (the seccomp filter answers
    each denied syscall with its own errno, ``VIOLATION_ERRNO_BASE + nr``); it is None when
    the process was killed outright: a syscall from a foreign ABI (i386 ``int 0x80``, x32)
    kills the whole process with SIGSYS before any errno can be chosen.
    """

    def __init__(self, message: str, syscall: str | None = None, nr: int | None = None) -> None:
        super().__init__(message)
        self.syscall = syscall
        self.nr = nr

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.syscall, self.nr), self.__dict__)


class SandboxCrashed(SandboxError):
    """Raised by ``Runner.call`` and ``WarmPool.call`` when the child died by a signal the
    limits do not explain (``signal``, e.g. SIGSEGV), or exited (``exit_code``) without
    sending a reply."""

    def __init__(
        self, message: str, signal: int | None = None, exit_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.signal = signal
        self.exit_code = exit_code

    @property
    def signal_name(self) -> str | None:
        """The signal's name (``"SIGSEGV"``), or None if the child was not killed by one."""
        if self.signal is None:
            return None
        try:
            return _signal.Signals(self.signal).name
        except ValueError:
            return f"signal {self.signal}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.signal, self.exit_code), self.__dict__)


class SandboxCallError(SandboxError):
    """Raised by ``Runner.call`` and ``WarmPool.call`` when the call raised an exception of a
    type the parent will not rebuild (anything but a built-in exception: rebuilding arbitrary
    classes from bytes the sandboxed code wrote would let it run code in the parent).

    ``type_name`` is the qualified name of the original type; the child's traceback is the
    ``__cause__`` (a :class:`RemoteTraceback`).
    """

    def __init__(self, message: str, type_name: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.type_name), self.__dict__)


class RemoteTraceback(Exception):
    """The child's formatted traceback, attached as ``__cause__`` of an exception re-raised in
    the parent (as CPython's ``concurrent.futures.process._RemoteTraceback`` does)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class SandboxWarning(UserWarning):
    """Emitted once per process by the runner when the kernel lacks a layer (Landlock) or the
    environment disables it (``ASTRA_SANDBOX_LANDLOCK=0``): calls still run, in the weaker
    mode the ``sandbox`` package docstring describes."""
