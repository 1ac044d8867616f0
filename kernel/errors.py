"""Errors of the kernel layer.

Every error the kernel raises derives from :class:`KernelError`. Control-flow signals are
bare nouns (``TaskTimeout``); failures end in ``Error``. Kernel classes never reach users: the
client (``astra._client``) maps them onto ``astra.errors`` at the boundary.

    KernelError
    +-- InstanceExistsError   another live astrad already serves this name
    +-- RegistrationError     no free client slot, or the kernel is not accepting clients

    TaskTimeout (BaseException)  raised inside a running task when its timeout_s passes
"""

from __future__ import annotations

__all__ = ["InstanceExistsError", "KernelError", "RegistrationError", "TaskTimeout"]


class KernelError(Exception):
    """Root of every error raised by the ``kernel`` layer."""


class InstanceExistsError(KernelError):
    """Raised by ``Daemon.start`` when another live ``astrad`` holds the name's lock."""


class RegistrationError(KernelError):
    """Raised by ``ControlBlock.register`` when every client slot is taken, or when the
    kernel is draining or stopped."""


class TaskTimeout(BaseException):
    """Raised inside a running task by the worker's timer when the task's ``timeout_s``
    passes. A ``BaseException``, like ``KeyboardInterrupt``, so that ``except Exception`` in
    user code does not swallow it."""
