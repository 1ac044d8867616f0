"""Astra: an operating system for AI agents on one large Linux host.

This module only re-exports the public API; implementation lives in private modules.
"""

from __future__ import annotations

from kernel.actors import Agent as Agent

from . import errors as errors, memory as memory, plugin as plugin
from ._agents import AgentRef as AgentRef
from ._client import Client as Client, cancelled as cancelled
from ._errors import (
    AstraError as AstraError,
    AstraInternalError as AstraInternalError,
    CapabilityError as CapabilityError,
    CycleError as CycleError,
    KernelNotRunningError as KernelNotRunningError,
    RemoteError as RemoteError,
    SerializationError as SerializationError,
    TaskTimeoutError as TaskTimeoutError,
    TooManyClientsError as TooManyClientsError,
    UpstreamError as UpstreamError,
    WorkerCrashedError as WorkerCrashedError,
)
from ._future import Future as Future
from ._graph import Graph as Graph, Node as Node
from ._kernel import Kernel as Kernel, connect as connect
from ._tools import tool as tool
from ._version import __version__ as __version__
from .memory import Memory as Memory

__all__ = [
    "Agent",
    "AgentRef",
    "AstraError",
    "AstraInternalError",
    "CapabilityError",
    "Client",
    "CycleError",
    "Future",
    "Graph",
    "Kernel",
    "KernelNotRunningError",
    "Memory",
    "Node",
    "RemoteError",
    "SerializationError",
    "TaskTimeoutError",
    "TooManyClientsError",
    "UpstreamError",
    "WorkerCrashedError",
    "__version__",
    "cancelled",
    "connect",
    "errors",
    "memory",
    "plugin",
    "tool",
]


def _fixup_module_metadata() -> None:
    # Show public objects as astra.X in reprs and docs, not astra._errors.X (as trio does).
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("astra._"):
            obj.__module__ = "astra"


_fixup_module_metadata()
del _fixup_module_metadata
