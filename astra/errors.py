"""Public namespace for Astra's exceptions: ``from astra.errors import AstraError``."""

from __future__ import annotations

from ._errors import (
    AstraError as AstraError,
    AstraInternalError as AstraInternalError,
    CycleError as CycleError,
    KernelNotRunningError as KernelNotRunningError,
    RemoteError as RemoteError,
    RemoteTraceback as RemoteTraceback,
    SerializationError as SerializationError,
    TaskTimeoutError as TaskTimeoutError,
    TooManyClientsError as TooManyClientsError,
    UpstreamError as UpstreamError,
    WorkerCrashedError as WorkerCrashedError,
)

__all__ = [
    "AstraError",
    "AstraInternalError",
    "CycleError",
    "KernelNotRunningError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeoutError",
    "TooManyClientsError",
    "UpstreamError",
    "WorkerCrashedError",
]
