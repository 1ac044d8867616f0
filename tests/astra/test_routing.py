"""Routing as a plugin (astra/routing.py, kernel/plugins.py protocol 7) in real kernels: the
built-in ``routing`` plugin is the default router; a plugin's own router replaces it in the
workers and the supervisor (names claimed, looked up, moved and freed through it, every
publish matched by it); a second router is refused and its plugin disabled; the docs'
example router runs."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import threading

import pytest

import astra
from astra._kernel import BUILTIN_PLUGINS
from astra.plugin import DefaultRouter, Names, Plugin, PluginContext, Topics
from tests.astra.agents import Counter, Listener, Relay
from tests.helpers import wait_until

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- A third party's router: case-folding topics, every routing call logged ----


class FoldedTopics:
    """Topics matched without regard to case; each match logged."""

    def __init__(self, inner: Topics, log) -> None:
        self.inner, self.log = inner, log

    def subscribe(self, pattern, agent_id, /):
        return self.inner.subscribe(pattern.lower(), agent_id)

    def unsubscribe(self, pattern, agent_id, /):
        return self.inner.unsubscribe(pattern.lower(), agent_id)

    def unsubscribe_all(self, agent_id, /):
        return self.inner.unsubscribe_all(agent_id)

    def match(self, topic, /):
        found = self.inner.match(topic.lower())
        self.log("match", topic, sorted(found))
        return found

    def patterns(self, agent_id, /):
        return self.inner.patterns(agent_id)


class LoggedNames:
    """The shared registry (so clients see the same names), each write and lookup logged."""

    def __init__(self, inner: Names, log) -> None:
        self.inner, self.log = inner, log

    def claim(self, name, worker, /):
        self.log("claim", name, worker)
        return self.inner.claim(name, worker)

    def lookup(self, name, /):
        self.log("lookup", name)
        return self.inner.lookup(name)

    def move(self, name, worker, /):
        self.log("move", name, worker)
        return self.inner.move(name, worker)

    def release(self, name, worker=None):
        self.log("release", name)
        return self.inner.release(name, worker)

    def entries(self):
        return self.inner.entries()

    def close(self):
        self.inner.close()


class AuditRouter:
    def __init__(self, log) -> None:
        self.inner, self.log = DefaultRouter(), log

    def names(self, instance, /):
        return LoggedNames(self.inner.names(instance), self.log)

    def topics(self):
        return FoldedTopics(self.inner.topics(), self.log)


class Audit(Plugin):
    """Registers ``AuditRouter``; its log (every process's, in one table) is a service."""

    name = "audit"

    def setup(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        self.seq = itertools.count()
        self.lock = threading.Lock()
        ctx.router(AuditRouter(self.record))
        ctx.service("log", self.entries)

    def record(self, *what: object) -> None:
        with self.lock:
            key = f"{self.ctx.worker:03d}.{os.getpid():08d}.{next(self.seq):09d}".encode()
        self.ctx.table().put(key, json.dumps([self.ctx.worker, *what]).encode())

    def entries(self) -> list[list[object]]:
        return [json.loads(v) for _, v in self.ctx.table().scan()]


class SecondRouter(Plugin):
    """A second router in a kernel that has one: refused, so this plugin is disabled."""

    name = "second_router"

    def setup(self, ctx: PluginContext) -> None:
        ctx.service("alive", lambda: True)
        ctx.router(DefaultRouter())


class Shouting(Listener):
    subscriptions = ("Papers.*",)  # mixed case: matches only through FoldedTopics


def _log(k, kind=None):
    rows = k.call_service("audit.log").result(timeout=30)
    return [r for r in rows if kind is None or r[1] == kind]


# ---- Tests ----


def test_the_default_router_is_the_builtin_routing_plugin(kernel1):
    assert BUILTIN_PLUGINS[0] == "astra.routing:RoutingPlugin"  # loaded before anything else
    rows = {r.name: r for r in kernel1.plugins()}
    routing = rows["routing"]
    assert (routing.state, routing.source, routing.router) == ("enabled", "builtin", "in use")
    assert routing.spec == "astra.routing:RoutingPlugin"
    assert rows["memory"].router == ""
    ref = kernel1.spawn(Shouting, name="loud")
    kernel1.publish("papers.new", 1)  # the default table is case-sensitive
    kernel1.publish("Papers.new", 2)
    wait_until(lambda: ref.ask("received").result(timeout=10), timeout_s=10)
    assert ref.ask("received").result(timeout=10) == [("Papers.new", 2)]


def test_a_plugins_router_routes_names_and_topics_in_the_workers():
    with astra.Kernel(workers=2, plugins=[Audit, SecondRouter]) as k:
        rows = {r.name: r for r in k.plugins()}
        assert (rows["audit"].state, rows["audit"].router) == ("enabled", "in use")
        assert (rows["routing"].state, rows["routing"].router) == ("enabled", "replaced")
        # Pub/sub: each worker's agent host matches through the plugin's table.
        loud = [k.spawn(Shouting, name=f"loud{i}", worker=i) for i in range(2)]
        k.publish("PAPERS.NEW", {"id": 1})  # folded: reaches "Papers.*"
        k.publish("papers.new.extra", {"id": 2})  # still one segment only
        for ref in loud:
            wait_until(lambda ref=ref: ref.ask("received").result(timeout=10), timeout_s=10)
            assert ref.ask("received").result(timeout=10) == [("PAPERS.NEW", {"id": 1})]
        found = sorted((w, f) for w, _, topic, f in _log(k, "match") if topic == "PAPERS.NEW")
        assert found == [(0, ["loud0"]), (1, ["loud1"])]  # each worker matched its own
        # Names: a worker looks a remote agent up, and frees a stopped one's name, through it.
        k.spawn(Counter, 100, name="target", worker=0)
        relay = k.spawn(Relay, "target", worker=1)
        assert relay.ask("via", 5).result(timeout=10) == 105
        assert [1, "lookup", "target"] in _log(k, "lookup")
        k.agent("target").stop()
        assert [0, "release", "target"] in _log(k, "release")
        # The second router was refused in setup: its plugin is disabled, reported.
        assert rows["second_router"].state == "disabled"
        assert rows["second_router"].error == (
            "PluginError: a router is registered already, by plugin 'audit'"
        )
        with pytest.raises(astra.errors.ServiceNotFoundError, match="disabled"):
            k.call_service("second_router.alive").result(timeout=30)


@pytest.mark.slow
def test_the_supervisor_moves_a_dead_workers_names_through_the_router():
    with astra.Kernel(workers=2, plugins=[Audit]) as k:
        ref = k.spawn(Counter, 7, name="mover", worker=1, restart="permanent")
        assert ref.ask("value").result(timeout=10) == 7
        os.kill(k.worker_pids()[1], signal.SIGKILL)
        wait_until(lambda: _log(k, "move"), timeout_s=20)
        assert _log(k, "move") == [[-1, "move", "mover", 0]]  # by the supervisor, to w00
        wait_until(lambda: k.agent("mover").ask("value").result(timeout=10) == 7, timeout_s=20)


def _routing_doc_example() -> dict[str, object]:
    with open(os.path.join(ROOT, "docs", "plugins.md")) as f:
        section = f.read().split("## Routing", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict[str, object] = {"__name__": "routing_doc_example"}
    exec(block, namespace)
    return namespace


def test_the_docs_router_example_runs():
    lower = _routing_doc_example()["Lower"]
    with astra.Kernel(workers=1, plugins=[lower]) as k:
        assert {r.name: r.router for r in k.plugins()}["lower"] == "in use"
        ref = k.spawn(Shouting)
        k.publish("PAPERS.new", 1)
        wait_until(lambda: ref.ask("received").result(timeout=10), timeout_s=10)
        assert ref.ask("received").result(timeout=10) == [("PAPERS.new", 1)]
