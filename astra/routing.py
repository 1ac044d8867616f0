"""``astra.routing``: agent names and topic routing, built as a plugin on the kernel's
extension API (``astra.plugin``), the same one a third party uses.

``RoutingPlugin`` registers ``DefaultRouter`` as every kernel process's default router
(kernel/plugins.py protocol 7): names live in the kernel instance's shared registry
(kernel/registry.py: unique per instance, freed when their agent stops for good or its
worker dies), and each worker's agent host keeps its subscriptions in a ``TopicTable``
(kernel/topics.py: AMQP patterns, ``papers.*`` and ``papers.#``).

    k.agent("r1"), k.spawn(name=...) --> Registry (shared segment) <-- router.names(): wNN, astrad
    k.publish("papers.new", x) --> every worker --> router.topics().match() --> mailboxes

A plugin that registers its own router with ``ctx.router(r)`` replaces this one in every
process where it loads (only one may); wrap ``DefaultRouter``'s objects to observe or
extend them. Clients load no plugins: they claim and look up names in the shared registry
directly, so a replacement's names must stay in it (docs/plugins.md, "Routing").
"""

from __future__ import annotations

__all__ = ["RoutingPlugin"]

from typing import TYPE_CHECKING

from kernel.plugins import DefaultRouter, Plugin

if TYPE_CHECKING:
    from kernel.plugins import PluginContext


class RoutingPlugin(Plugin):
    """The default router: the shared name registry and a topic table per agent host."""

    name = "routing"

    def setup(self, ctx: PluginContext) -> None:
        ctx.router(DefaultRouter(), default=True)
