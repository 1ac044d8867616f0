"""Public namespace for writing plugins: ``from astra.plugin import Plugin``.

A plugin is a ``Plugin`` subclass whose ``setup(ctx)`` registers services, tools, lifecycle
event listeners and an agent API through its ``PluginContext``; kernels find it through the
``astra.plugins`` entry-point group, ``astrad --plugin pkg.mod:Class`` or
``astra.Kernel(plugins=[...])``. The guide, with a complete example: docs/plugins.md.
"""

from __future__ import annotations

from kernel.plugins import (
    ENTRY_POINT_GROUP as ENTRY_POINT_GROUP,
    EVENTS as EVENTS,
    AgentInfo as AgentInfo,
    Event as Event,
    Plugin as Plugin,
    PluginContext as PluginContext,
    PluginError as PluginError,
    PluginInfo as PluginInfo,
    ServiceNotFoundError as ServiceNotFoundError,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "EVENTS",
    "AgentInfo",
    "Event",
    "Plugin",
    "PluginContext",
    "PluginError",
    "PluginInfo",
    "ServiceNotFoundError",
]
