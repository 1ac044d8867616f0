"""Public namespace for Astra's exceptions: ``from astra.errors import AstraError``."""

from __future__ import annotations

from ._errors import (
    AstraError as AstraError,
    AstraInternalError as AstraInternalError,
    KernelNotRunningError as KernelNotRunningError,
    RemoteError as RemoteError,
    RemoteTraceback as RemoteTraceback,
    SerializationError as SerializationError,
    TaskTimeoutError as TaskTimeoutError,
    TooManyClientsError as TooManyClientsError,
    WorkerCrashedError as WorkerCrashedError,
)

__all__ = [
    "AstraError",
    "AstraInternalError",
    "KernelNotRunningError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeoutError",
    "TooManyClientsError",
    "WorkerCrashedError",
]
