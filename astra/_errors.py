"""The public exception tree. Every error Astra raises to users derives from AstraError.

    AstraError
    +-- AstraInternalError     this should never happen; please file a bug
    +-- KernelNotRunningError  the kernel is stopped, draining, or died; or no astrad runs
    +-- TooManyClientsError    every client slot of the astrad is taken
    +-- WorkerCrashedError     a task's worker died more often than its retries allow
    +-- TaskTimeoutError       a task ran past its timeout=
    +-- SerializationError     a function, argument or result would not (un)pickle
    +-- RemoteError            a task raised an exception that could not cross back
    +-- UpstreamError          a task's dependency failed (names the root failure)
    +-- CycleError             a graph has a cycle (also a ValueError)
    +-- AgentError             misuse of agents (a name taken, not an Agent class)
        +-- AgentNotFoundError  no live agent of that name (also a LookupError)
        +-- MailboxFullError    the mailbox stayed full for the ask's timeout
        +-- AgentCrashedError   the agent or its worker died before answering
        +-- UnknownMethodError  no such handler (also an AttributeError)

    CapabilityError            a tool not granted (or unknown), or a memory namespace not
                               granted: kernel.tools' class, re-exported (a PermissionError), so
                               agents and clients catch the same one
    PluginError                misuse of the plugin API (kernel.plugins' class, re-exported)
    +-- ServiceNotFoundError   no enabled plugin offers the service (also a LookupError)
    MemoryStoreError           a bad key, value or vector, or a storage failure in agent memory
    +-- DimensionMismatchError a vector's length differs from its index's (kernel.memory's)
    RemoteTraceback            not raised: the ``__cause__`` of an exception a task raised,
                               holding the worker-side traceback

Lower layers define their own roots (``ipc.IPCError``, ``sandbox.SandboxError``,
``kernel.KernelError``); the client maps them onto this tree at the boundary (the sandbox's
typed outcomes, ``SandboxTimeout`` and the like, reach a tool call's future as they are).
"""

from __future__ import annotations

import kernel.memory as _kernel_memory
import kernel.plugins as _kernel_plugins
import kernel.tools as _kernel_tools

__all__ = [
    "AgentCrashedError",
    "AgentError",
    "AgentNotFoundError",
    "AstraError",
    "AstraInternalError",
    "CapabilityError",
    "CycleError",
    "DimensionMismatchError",
    "KernelNotRunningError",
    "MailboxFullError",
    "MemoryStoreError",
    "PluginError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "ServiceNotFoundError",
    "TaskTimeoutError",
    "TooManyClientsError",
    "UnknownMethodError",
    "UpstreamError",
    "WorkerCrashedError",
]


class AstraError(Exception):
    """Root of every error Astra raises to users."""


class AstraInternalError(AstraError):
    """Raised when Astra finds itself in a state it believes impossible.

    This should never happen; please file a bug with the traceback.
    """


class KernelNotRunningError(AstraError):
    """Raised by ``submit``/``map`` on a closed, draining or dead kernel, by ``connect``
    when no ``astrad`` of that name runs, and set on every pending future when the kernel
    goes away (an ``astrad`` killed with SIGKILL, say) instead of leaving it to hang."""


class TooManyClientsError(AstraError):
    """Raised by ``astra.connect`` when every client slot of the ``astrad`` is taken."""


class WorkerCrashedError(AstraError):
    """Set on a future whose task was running when its worker died (SIGKILL, a segfault,
    ``os._exit``) more times than the task's ``retries`` allow (as in CPython's
    ``BrokenProcessPool``)."""


class TaskTimeoutError(AstraError):
    """Set on a future whose task ran longer than its ``timeout=``. The worker interrupts
    the task (a timer signal for plain functions, cancellation for ``async def`` ones)."""


class SerializationError(AstraError):
    """Raised by ``submit``/``map`` when the function or an argument cannot be pickled, and
    set on a future when the worker cannot unpickle them or cannot pickle the result. The
    worker is unharmed."""


class UpstreamError(AstraError):
    """Set on a future whose task depended on one that failed: it never ran. ``root`` is
    the first failure up the graph (the exception itself, also the ``__cause__``) and
    ``root_task`` a description of the task that raised it; every task further down gets
    an ``UpstreamError`` with the same root."""

    def __init__(self, message: str, root: BaseException, root_task: str) -> None:
        super().__init__(message)
        self.root = root
        self.root_task = root_task

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.root, self.root_task))


class CycleError(AstraError, ValueError):
    """Raised by ``run`` for a graph whose dependencies form a cycle; ``cycle`` lists the
    nodes around it (the first repeated at the end) and the message names them."""

    def __init__(self, message: str, cycle: list[object]) -> None:
        super().__init__(message)
        self.cycle = cycle


class AgentError(AstraError):
    """Raised for misuse of agents: a name already taken, a class that is not an
    ``astra.Agent``; root of the agent errors below."""


class AgentNotFoundError(AgentError, LookupError):
    """No live agent has that name: never spawned, stopped, or lost with its worker."""


class MailboxFullError(AgentError):
    """The agent's mailbox stayed full for the ask's timeout (backpressure)."""


class AgentCrashedError(AgentError):
    """The agent (or its worker) died before answering the ask."""


class UnknownMethodError(AgentError, AttributeError):
    """The agent has no handler of that name."""


# Raised by the kernel's tool runner (kernel/tools.py), so that agents, workers and
# clients raise and catch the one class.
CapabilityError = _kernel_tools.CapabilityError
# Raised in workers and agents by the plugin API and the memory store, and re-raised by the
# client as they are: one class wherever it is caught.
PluginError = _kernel_plugins.PluginError
ServiceNotFoundError = _kernel_plugins.ServiceNotFoundError
MemoryStoreError = _kernel_memory.MemoryStoreError
DimensionMismatchError = _kernel_memory.DimensionMismatchError


class RemoteError(AstraError):
    """Set on a future when its task raised an exception that could not be pickled back;
    the message holds the exception's repr and ``__cause__`` its traceback."""


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception raised by a task: its text is the worker-side
    traceback (as CPython's ``concurrent.futures.process._RemoteTraceback``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
