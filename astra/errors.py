"""Public namespace for Astra's exceptions: ``from astra.errors import AstraError``."""

from __future__ import annotations

from ._errors import (
    AgentCrashedError as AgentCrashedError,
    AgentError as AgentError,
    AgentNotFoundError as AgentNotFoundError,
    AstraError as AstraError,
    AstraInternalError as AstraInternalError,
    CapabilityError as CapabilityError,
    CycleError as CycleError,
    KernelNotRunningError as KernelNotRunningError,
    MailboxFullError as MailboxFullError,
    RemoteError as RemoteError,
    RemoteTraceback as RemoteTraceback,
    SerializationError as SerializationError,
    TaskTimeoutError as TaskTimeoutError,
    TooManyClientsError as TooManyClientsError,
    UnknownMethodError as UnknownMethodError,
    UpstreamError as UpstreamError,
    WorkerCrashedError as WorkerCrashedError,
)

__all__ = [
    "AgentCrashedError",
    "AgentError",
    "AgentNotFoundError",
    "AstraError",
    "AstraInternalError",
    "CapabilityError",
    "CycleError",
    "KernelNotRunningError",
    "MailboxFullError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeoutError",
    "TooManyClientsError",
    "UnknownMethodError",
    "UpstreamError",
    "WorkerCrashedError",
]
