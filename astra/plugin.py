"""Public namespace for writing plugins: ``from astra.plugin import Plugin``.

A plugin is a ``Plugin`` subclass whose ``setup(ctx)`` registers services, tools, lifecycle
event listeners, an agent API and perhaps a ``Router`` (agent names and topic routing:
``Names``, ``Topics``; the default is ``DefaultRouter``) through its ``PluginContext``;
kernels find it through the ``astra.plugins`` entry-point group, ``astrad --plugin
pkg.mod:Class`` or ``astra.Kernel(plugins=[...])``. The guide, with a complete example:
docs/plugins.md.
"""

from __future__ import annotations

from kernel.plugins import (
    ENTRY_POINT_GROUP as ENTRY_POINT_GROUP,
    EVENTS as EVENTS,
    AgentInfo as AgentInfo,
    DefaultRouter as DefaultRouter,
    Event as Event,
    Names as Names,
    Plugin as Plugin,
    PluginContext as PluginContext,
    PluginError as PluginError,
    PluginInfo as PluginInfo,
    Router as Router,
    ServiceNotFoundError as ServiceNotFoundError,
    Topics as Topics,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "EVENTS",
    "AgentInfo",
    "DefaultRouter",
    "Event",
    "Names",
    "Plugin",
    "PluginContext",
    "PluginError",
    "PluginInfo",
    "Router",
    "ServiceNotFoundError",
    "Topics",
]
