"""Plugins: the kernel's extension API. The kernel does a small set of things well; memory,
and whatever a third party adds, plugs in here through one public class, ``Plugin``.

A plugin is a class with a ``setup(ctx)`` method. It is found three ways: the
``astra.plugins`` entry-point group of installed distributions, ``astrad --plugin
pkg.mod:Class`` (and the ``plugins`` key of the config), and ``astra.Kernel(plugins=[...])``
for an embedded kernel, which also takes classes. Through its ``PluginContext`` it registers
*services* (named operations that clients call with ``k.call_service("name.op", ...)`` and
agents with ``await self.service("name.op", ...)``), *tools* (sandboxed, granted to agents
like any tool), *listeners* of lifecycle events, and an *agent API* (what ``self.plugin(name)``
returns inside an agent); it keeps state in its own LMDB sub-database (``ctx.table()``).
One plugin of a kernel provides its *router* (``ctx.router()``): agent names and topic
routing; the built-in ``astra.routing`` registers the default one.

    entry points "astra.plugins" --.
    astrad --plugin, config --------+--> discover() --> PluginHost("supervisor") --fork--> wNN:
    Kernel(plugins=[cls, ...]) ----'     cls(); setup(ctx)     |             PluginHost("worker")
                                         status --> <data_dir>/plugins       cls(); setup(ctx)
                                         (LMDB: status, failures, p:<name>)  services, tools,
                                                                             events, agent APIs

Protocols:

1. *Discovery.* ``discover`` turns names into classes: builtins first (the astra layer's
   own, memory), then entry points (sorted by name), then the requested ones, in order. An
   import that fails, an object that is not a ``Plugin`` subclass, a bad or taken name all
   give a candidate that carries its error instead of a class: it is reported and skipped.
   The same class reached twice (a builtin also installed as an entry point) counts once.
2. *Load.* Every kernel process has one ``PluginHost``. The supervisor's loads the
   candidates first (astrad and the embedded kernel alike), before it forks a worker; it
   writes each plugin's status (services, tools, events, error) to the ``status`` table of
   the ``plugins`` journal, which ``astra plugins`` and ``Client.plugins()`` read. Each
   worker, right after its fork, builds its own instances of the plugins that loaded in the
   supervisor (``for_worker``): instances are per process and never cross a fork, so a
   plugin opens its files and LMDB environments in the process that uses them. What
   ``setup`` registers takes effect only when it returns: a ``setup`` that raises leaves
   nothing behind.
3. *Events.* ``events`` holds one flag per event kind, true only while a listener exists in
   this process. The hot paths test the flag before they build anything
   (``if events.task_started: emit(...)``), so an event nobody listens to costs one
   attribute load. Listeners run synchronously on the thread where the event happens (a
   worker's main thread for tasks, its loop thread for agents), in registration order, so
   the events of one task or one agent are seen in the order they happened; they must be
   quick.
4. *Services.* A client's call is a task, ``call_service(name, args, kwargs)``, run by a
   worker like any other (``retries=0``: a service may not be idempotent); an agent's runs
   in its own worker on an executor thread. What a service raises is its caller's error.
   A service registered with ``where="worker"`` (the default) runs right there, in the
   caller's worker; one registered with ``where="supervisor"`` runs in the supervisor's
   instance only (protocol 6), so it is one per kernel (a counter, a rate limiter).
5. *Failure.* A plugin that raises in ``setup`` or in a listener is disabled in that
   process (its services, tools, listeners and agent API are removed, ``close()`` is
   called) and reported: a ``plugin_failed`` log line and a row in the ``failures`` table
   (``astra plugins`` shows it). The process carries on; a plugin never takes a worker or
   astrad down with it. Exceptions raised by services and agent APIs go to their callers.

6. *Supervisor services.* Before it forks worker ``wNN`` (and again for each replacement)
   the supervisor makes a ``SOCK_SEQPACKET`` socketpair: it polls its end in the loop that
   polls the pidfds, the worker keeps the other (``SupervisorLink``, on its host). A worker
   call of a supervisor service sends one record, ``id | pickle((name, args, kwargs))``, and
   blocks for the reply ``id | pickle((ok, result or packed exception))``, one call at a
   time per worker (a lock) and at most ``SERVICE_TIMEOUT_S``; a reply whose id is not the
   awaited one answers a call that timed out and is skipped. The supervisor answers on its
   loop thread, one call at a time in arrival order: a supervisor service needs no lock of
   its own, but it must be short (while it runs, no exit is reaped and no other call
   answered). It never blocks on a reply (``MSG_DONTWAIT``: a worker that stopped reading
   loses it). A dead worker's end closes with it; the supervisor closes its own when it
   reaps the worker. A record is at most the socket's send buffer (about 200 KiB).

       worker wNN                                    astrad (supervisor loop)
       caller --lock--> SupervisorLink ==request==> PluginHost.serve --> service fn
                        (blocks)       <==reply===  (one call at a time)

7. *Routing.* A process routes through one ``Router``: its ``names(instance)`` opens the
   agent registry (``claim``, ``lookup``, ``move``, ``release``, ``entries``) where the
   worker's ``AgentService`` and the supervisor read and write names, and its ``topics()``
   makes each ``AgentHost``'s table of subscriptions (``subscribe``, ``match``...). The
   host keeps the chosen router as it keeps the services: a plugin that registers one
   with ``default=True`` (the built-in ``routing``) is replaced by one registered
   without; a second router of either kind is a ``PluginError`` in its plugin's
   ``setup``, which disables that plugin. ``router()`` is read when a process builds its
   registry handle and its agent host, never per message: the hot path calls the table's
   own ``match``, one attribute load as before. Without a router (a process without
   plugins, a unit test) it is ``DefaultRouter``, the shared ``Registry`` plus one
   ``TopicTable`` per host. A router is chosen once: one registered after ``setup``
   returns is refused, and the objects built from a plugin that is disabled later stay.

Open questions:

- XX: a supervisor service runs on the supervisor's loop thread: one that blocks stalls
  supervision (restarts, watchdog pings, every other worker's calls). A thread pool would
  lift that, at the price of the singleton's serial semantics and a reply written from
  another thread to a socket the loop may close when its worker dies.
- XX: a worker's calls of supervisor services wait for each other (one link, one lock).
- XX: a listener that blocks or loops forever stalls its thread; there is no watchdog.
- XX: a plugin disabled in one worker stays enabled in the others (they did not fail).
- XX: clients (astra/_agents.py) read and claim names in the shared ``Registry`` itself,
  not through a router (they load no plugins): a router's names must stay in that
  segment (wrap ``DefaultRouter``'s, do not replace the store) for clients to see them.
- XX: at about 1,100 lines this module is past the 800-line mark; discovery and status
  (protocols 1 and 2) could move out, leaving the API, the host and the link.
"""

from __future__ import annotations

__all__ = [
    "ENTRY_POINT_GROUP",
    "EVENTS",
    "JOURNAL",
    "SERVICE_TIMEOUT_S",
    "AgentInfo",
    "Candidate",
    "DefaultRouter",
    "Event",
    "EventFlags",
    "Names",
    "Plugin",
    "PluginContext",
    "PluginError",
    "PluginHost",
    "PluginInfo",
    "Router",
    "ServiceNotFoundError",
    "SupervisorLink",
    "Topics",
    "activate",
    "call_service",
    "current",
    "discover",
    "emit",
    "events",
    "read_plugins",
    "router",
]

import contextlib
import dataclasses
import errno
import importlib
import itertools
import logging
import os
import re
import socket
import struct
import threading
import time
import traceback
from typing import TYPE_CHECKING, ClassVar, Final, Literal, Protocol, cast

import msgspec

from . import shipping
from .errors import KernelError
from .journal import Journal, JournalError, Table
from .logs import log_event
from .registry import Registry
from .topics import TopicTable

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

    from ipc import Instance

    from .tools import ToolSpec

    #: A service: any callable; its arguments are whatever its callers pass.
    ServiceFn = Callable[..., object]  # type: ignore[explicit-any]
    #: A call of a supervisor service on a link: (full name, args, kwargs).
    _Request = tuple[str, tuple[object, ...], dict[str, object]]

#: The lifecycle events a listener may subscribe to (``ctx.on(kind, fn)``), in the order of
#: ``EventFlags``' slots.
EVENTS: Final = (
    "agent_spawned",  # an agent was built (spawn, or a restart after its worker died)
    "agent_stopped",  # an agent left its worker for good (detail: the reason)
    "agent_restarted",  # an agent was rebuilt after a crash (detail: the error's type)
    "task_submitted",  # a task entered a worker's queue (not again when stolen)
    "task_started",  # a worker began running a task
    "task_finished",  # a task returned (its reply is on its way)
    "task_failed",  # a task raised or timed out (detail: the error's type)
    "tool_called",  # a tool call ended, or was refused (detail: its outcome)
)
#: The entry-point group installed distributions list their plugins in.
ENTRY_POINT_GROUP: Final = "astra.plugins"
#: The journal (under the kernel's data dir) with the plugins' status and their own tables.
JOURNAL: Final = "plugins"
#: Where plugins' private files go: ``<data_dir>/plugins.d/<plugin>`` (``ctx.path()``).
FILES_DIR: Final = "plugins.d"
_STATUS_TABLE: Final = "status"  # plugin name -> PluginInfo (written by the supervisor)
_FAILURES_TABLE: Final = "failures"  # name \0 where \0 ns -> "stage: error" (any process)
_NAME: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # plugin, service and tool names

#: How long a worker waits for the supervisor to answer one call of a supervisor service.
SERVICE_TIMEOUT_S: Final = float(os.getenv("ASTRA_SERVICE_TIMEOUT_S", "30"))
_LINK_ID: Final = struct.Struct("<Q")  # the call id that heads every record on a link
_LINK_RECV_BYTES: Final = 1 << 20  # > any send buffer: a record this long was truncated

Role = Literal["supervisor", "worker"]

_log = logging.getLogger("astra.plugins")


class PluginError(KernelError):
    """Root of the plugin API's errors (a ``KernelError``). Raised by ``PluginContext``
    for a bad registration (a name, an unknown event kind) and by ``discover`` users."""


class ServiceNotFoundError(PluginError, LookupError):
    """Raised by ``call_service`` (so set on the caller's future) when no enabled plugin
    of this worker offers the service: never registered, or its plugin was disabled."""


# ---- Events (protocol 3) ----


class EventFlags:
    """One flag per event kind: true while some listener of this process wants it. Written
    by ``PluginHost`` under its lock; read without one by the hot paths (a stale read
    only makes one event be emitted to nobody, or missed while a listener is being added).
    """

    __slots__ = EVENTS
    agent_spawned: bool
    agent_stopped: bool
    agent_restarted: bool
    task_submitted: bool
    task_started: bool
    task_finished: bool
    task_failed: bool
    tool_called: bool

    def __init__(self) -> None:
        for kind in EVENTS:
            setattr(self, kind, False)

    def __repr__(self) -> str:
        on = [kind for kind in EVENTS if getattr(self, kind)]
        return f"<EventFlags {' '.join(on) or 'none'}>"


assert tuple(EventFlags.__annotations__) == EVENTS, "one flag per event kind"

#: This process's flags (``from kernel.plugins import events``): the hot paths' check.
events: Final = EventFlags()


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One lifecycle event, as listeners get it."""

    kind: str  #: one of ``EVENTS``
    time: float  #: wall clock (seconds since the epoch)
    worker: int  #: the worker it happened in; -1 in the supervisor
    agent: str = ""  #: the agent (``agent_*``; ``tool_called`` by an agent)
    task: int = 0  #: the task's id, unique per client (``task_*``)
    client: int = -1  #: the submitting client's slot (``task_*``)
    name: str = ""  #: the agent's class, the task's function, the tool's name
    detail: str = ""  #: the stop reason, the error's type, the tool call's outcome


@dataclasses.dataclass(frozen=True, slots=True)
class AgentInfo:
    """Who is asking, as a plugin's agent API factory sees it."""

    id: str  #: the agent's id (its name)
    worker: int  #: the worker it runs on
    grants: tuple[str, ...]  #: what it was granted for this plugin at spawn (``memory=[...]``)


# ---- Routing: what a router provides (protocol 7) ----


class Names(Protocol):
    """One process's handle on the agent names of a kernel instance (``Router.names``):
    which worker hosts each named agent. ``kernel.registry.Registry`` is the default."""

    def claim(self, name: str, worker: int, /) -> bool:
        """Register ``name`` on ``worker``; False if it is taken. Raises ``ValueError``
        (a bad name), ``RegistryFullError``."""
        ...

    def lookup(self, name: str, /) -> int:
        """The worker hosting ``name``, or -1."""
        ...

    def move(self, name: str, worker: int, /) -> bool:
        """``name`` now lives on ``worker`` (the supervisor, after a worker died)."""
        ...

    def release(self, name: str, worker: int | None = None) -> bool:
        """Free ``name`` (only if it is on ``worker``, when given); False if it was not."""
        ...

    def entries(self) -> list[tuple[str, int]]:
        """Every (name, worker) (the supervisor, to restart a dead worker's agents)."""
        ...

    def close(self) -> None:
        """Release the handle (its process is done with it)."""
        ...


class Topics(Protocol):
    """One agent host's subscriptions (``Router.topics``): single writer, the host's loop
    thread. Patterns reach it validated (kernel/topics.py). ``TopicTable`` is the default."""

    def subscribe(self, pattern: str, agent_id: str, /) -> bool:
        """Subscribe ``agent_id`` to ``pattern``; False if it already was."""
        ...

    def unsubscribe(self, pattern: str, agent_id: str, /) -> bool:
        """Remove one subscription; False if there was none."""
        ...

    def unsubscribe_all(self, agent_id: str, /) -> int:
        """Remove every subscription of ``agent_id`` (it stopped or restarted)."""
        ...

    def match(self, topic: str, /) -> Collection[str]:
        """The agents to deliver ``topic`` to, each once (every publish, on the hot path).
        Raises ``TopicError`` for a malformed topic."""
        ...

    def patterns(self, agent_id: str, /) -> frozenset[str]:
        """The patterns ``agent_id`` is subscribed to."""
        ...


class Router(Protocol):
    """Agent names and topic routing for one process, registered with ``ctx.router``."""

    def names(self, instance: Instance, /) -> Names:
        """Open this process's handle on the names of ``instance`` (whose segment the
        kernel created). Raises ``SegmentError`` or ``OSError`` if it has none."""
        ...

    def topics(self) -> Topics:
        """A fresh, empty table of subscriptions for one agent host."""
        ...


class DefaultRouter:
    """The built-in router: the instance's shared ``Registry`` (which clients read too)
    and a ``TopicTable`` per host. A custom router may wrap what it returns."""

    def names(self, instance: Instance, /) -> Names:
        return Registry.open(instance)

    def topics(self) -> Topics:
        table: TopicTable[str] = TopicTable()
        return table


_DEFAULT_ROUTER: Final = DefaultRouter()


# ---- The public classes: Plugin, PluginContext ----


class Plugin:
    """Base class of plugins. Subclass it, set ``name``, register things in ``setup``.

        class Counter(Plugin):
            name = "counter"
            def setup(self, ctx):
                self.table = ctx.table()
                ctx.on("task_finished", self.count)
                ctx.service("total", self.total)

    The class is instantiated with no arguments once in the supervisor and once in every
    worker (see ``PluginContext.role``); open files and databases in the process that uses
    them, lazily, not in ``setup`` of the supervisor.
    """

    #: Unique name: lowercase letters, digits and ``_``; prefixes the plugin's services and
    #: tools (``counter.total``). Default: the class name, lowercased.
    name: ClassVar[str] = ""

    def setup(self, ctx: PluginContext) -> None:
        """Register services, tools, listeners and the agent API. An exception disables
        the plugin in this process (nothing it registered stays)."""

    def close(self) -> None:
        """Release what the plugin opened; called when its process stops or it is
        disabled. Exceptions are logged and ignored."""


def plugin_name(cls: type[Plugin]) -> str:
    """The plugin's ``name``, or its class name lowercased."""
    return cls.__dict__.get("name") or cls.name or cls.__name__.lower()


class PluginContext:
    """What a plugin's ``setup`` registers through; kept by the plugin if it likes. What
    ``setup`` registers takes effect when it returns (all of it, or none if it raises);
    later registrations take effect at once."""

    def __init__(self, host: PluginHost, name: str) -> None:
        self._host = host
        self.name = name  #: the plugin's name
        self.role: Role = host.role  #: "supervisor" or "worker": where this instance runs
        self.worker = host.worker  #: the worker's index; -1 in the supervisor
        self.data_dir = host.data_dir  #: the kernel's data directory
        self.log = logging.getLogger(f"astra.plugins.{name}")  #: the plugin's logger
        self._services: dict[str, ServiceFn] = {}
        self._where: dict[str, Role] = {}  # service -> where it runs (protocol 6)
        self._tools: dict[str, ToolSpec] = {}
        self._listeners: list[tuple[str, Callable[[Event], object]]] = []
        self._agent_api: Callable[[AgentInfo], object] | None = None
        self._router: tuple[Router, bool] | None = None  # (router, default)
        self._live = False  # setup returned: later registrations take effect at once

    def _registered(self) -> None:
        if self._live:
            self._host._changed()

    def service(self, name: str, fn: ServiceFn, *, where: Role = "worker") -> str:
        """Offer ``fn`` as the service ``<plugin>.<name>``; returns that full name. Clients
        call it with ``k.call_service(full_name, *args, **kwargs)`` (a task on a worker),
        agents with ``await self.service(full_name, ...)``; arguments and the result are
        pickled. ``where="worker"`` runs it in the caller's worker (this instance of the
        plugin, in every worker); ``where="supervisor"`` runs every call, from anywhere, in
        the supervisor's instance, one at a time on its loop thread (protocol 6): register
        it in every process alike (the workers' ``fn`` is never called) and keep it short.
        Raises ``PluginError`` for a bad or taken name, or a bad ``where``."""
        if where not in ("worker", "supervisor"):
            raise PluginError(f"bad where {where!r}: 'worker' or 'supervisor'")
        full = self._full(name, self._services)
        self._services[name] = fn
        self._where[name] = where
        self._registered()
        return full

    def tool(
        self,
        name: str,
        fn: ServiceFn,
        *,
        profile: str = "python",
        timeout_s: float | None = None,
        **limits: object,
    ) -> str:
        """Offer ``fn`` as the sandboxed tool ``<plugin>.<name>`` under a ``sandbox.Policy``
        (as ``@astra.tool``); granted to agents with ``tools=[full_name]`` and called by
        ``k.call_tool``. Returns the full name. Raises ``PluginError`` for a bad name,
        ``ValueError`` for a bad limit, ``ShippingError`` if ``fn`` cannot be pickled."""
        from sandbox import Policy

        from .tools import ToolSpec

        full = self._full(name, self._tools)
        fields: dict[str, object] = {"profile": profile, **limits}
        if timeout_s is not None:
            fields["wall_s"] = timeout_s
        Policy(**fields)  # type: ignore[arg-type]  # validates now
        self._tools[name] = ToolSpec(full, shipping.function_key(fn)[1], fields)
        self._registered()
        return full

    def on(self, kind: str, fn: Callable[[Event], object]) -> None:
        """Call ``fn(event)`` for every event of ``kind`` (one of ``EVENTS``, or ``"*"`` for
        all) in this process. A listener that raises disables the plugin (protocol 5)."""
        kinds = EVENTS if kind == "*" else (kind,)
        if kind != "*" and kind not in EVENTS:
            raise PluginError(f"unknown event {kind!r}; known: {', '.join(EVENTS)}")
        self._listeners += [(k, fn) for k in kinds]
        self._registered()

    def agent_api(self, factory: Callable[[AgentInfo], object]) -> None:
        """What ``self.plugin(<name>)`` returns inside an agent: ``factory(info)``, called
        once per agent on first use, in the agent's worker (so it may read local state
        without a message round trip). ``info.grants`` holds what the agent was granted
        for this plugin at spawn; the factory enforces them."""
        self._agent_api = factory
        self._registered()

    def router(self, router: Router, *, default: bool = False) -> None:
        """Route this kernel's agent names and topics through ``router`` (protocol 7), in
        this process; call it in ``setup`` (the routers of a kernel's processes must agree:
        register it in every role). ``default=True`` (the built-in ``routing`` plugin):
        any other plugin's router replaces it.

        Raises:
            PluginError: called after ``setup``, or a router of this kind is registered
                already, by this plugin or another one (one router per kernel).
        """
        if self._live:
            raise PluginError(f"{self.name}: register a router in setup(), not later")
        owner = self._host._router_owner(default)
        if self._router is not None and self._router[1] == default:
            owner = self.name
        if owner:
            kind = "default router" if default else "router"
            raise PluginError(f"a {kind} is registered already, by plugin {owner!r}")
        self._router = (router, default)

    def table(self, name: str = "") -> Table:
        """This plugin's own LMDB sub-database (``p:<plugin>`` or ``p:<plugin>:<name>``) in
        the kernel's ``plugins`` journal: bytes to bytes, every write one transaction,
        shared by all the kernel's processes. Raises ``JournalError``."""
        suffix = f":{name}" if name else ""
        return self._host.journal().table(f"p:{self.name}{suffix}")

    def path(self) -> str:
        """A private directory of this plugin, ``<data_dir>/plugins.d/<plugin>``, created
        0700 on first use: for its own files and LMDB environments."""
        path = os.path.join(self.data_dir, FILES_DIR, self.name)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def _full(self, name: str, taken: Mapping[str, object]) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(f"bad name {name!r}: lowercase letters, digits and _, at most 32")
        if name in taken:
            raise PluginError(f"{self.name}.{name} is already registered")
        return f"{self.name}.{name}"


# ---- Discovery (protocol 1) ----


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """A plugin as discovered: its class, or the error that kept it from loading."""

    name: str  #: the plugin's name (or the spec, when it could not be imported)
    spec: str  #: ``pkg.mod:Class``
    source: str  #: "builtin", "entry point <dist>", "flag --plugin", "config"...
    cls: type[Plugin] | None = None  #: None if it failed
    error: str = ""  #: why it failed


def discover(
    builtin: Iterable[str | type[Plugin]] = (),
    requested: Iterable[tuple[str | type[Plugin], str]] = (),
    *,
    entry_points: bool = True,
) -> list[Candidate]:
    """Every plugin to load, in load order (protocol 1). Never raises for a bad plugin:
    its candidate carries the error.

    Args:
        builtin: the astra layer's own plugins (``"pkg.mod:Class"`` or classes).
        requested: (plugin, source) pairs from the command line, the config or a caller.
        entry_points: also load the ``astra.plugins`` entry-point group.
    """
    found: list[Candidate] = [_resolve(p, "builtin") for p in builtin]
    if entry_points:
        found += _entry_points()
    found += [_resolve(p, source) for p, source in requested]
    out: list[Candidate] = []
    seen: dict[str, Candidate] = {}
    for cand in found:
        prior = seen.get(cand.name)
        if prior is not None and cand.cls is not None and prior.cls is cand.cls:
            continue  # one class reached twice (a builtin that is also an entry point)
        if prior is not None and cand.cls is not None:
            cand = dataclasses.replace(
                cand, cls=None, error=f"the name {cand.name!r} is taken by {prior.spec}"
            )
        seen.setdefault(cand.name, cand)
        out.append(cand)
    return out


def _resolve(plugin: str | type[Plugin], source: str) -> Candidate:
    if isinstance(plugin, type):
        spec = f"{plugin.__module__}:{plugin.__qualname__}"
        return _check(plugin, spec, source)
    spec = str(plugin)
    module, _, attr = spec.partition(":")
    if not module or not attr:
        return Candidate(spec, spec, source, error="expected 'package.module:Class'")
    try:
        obj: object = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (Exception, SystemExit) as exc:  # an import runs arbitrary code
        return Candidate(spec, spec, source, error=_describe(exc))
    return _check(obj, spec, source)


def _entry_points() -> list[Candidate]:
    import importlib.metadata

    out = []
    try:
        eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    except Exception as exc:  # a broken distribution's metadata
        log_event(_log, logging.ERROR, "plugin_discovery_failed", error=_describe(exc))
        return []
    for ep in eps:
        dist = ep.dist.name if ep.dist is not None else "?"
        source = f"entry point {ep.name} ({dist})"
        try:
            obj = ep.load()
        except (Exception, SystemExit) as exc:
            out.append(Candidate(ep.name, ep.value, source, error=_describe(exc)))
            continue
        out.append(_check(obj, ep.value, source))
    return out


def _check(obj: object, spec: str, source: str) -> Candidate:
    if not (isinstance(obj, type) and issubclass(obj, Plugin)) or obj is Plugin:
        return Candidate(spec, spec, source, error=f"{obj!r} is not a Plugin subclass")
    name = plugin_name(obj)
    if not _NAME.match(name):
        return Candidate(spec, spec, source, error=f"bad plugin name {name!r}")
    return Candidate(name, spec, source, obj)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ---- Status: what astra plugins shows ----


class PluginInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One plugin's row in the status table (``astra plugins``, ``Client.plugins()``)."""

    name: str  #: the plugin's name
    spec: str  #: ``pkg.mod:Class``
    source: str  #: where it was found
    state: str  #: "enabled", or "disabled" (it failed to load; see ``error``)
    error: str = ""  #: why it is disabled
    services: tuple[str, ...] = ()  #: full names
    supervisor_services: tuple[str, ...] = ()  #: those of ``services`` run in the supervisor
    tools: tuple[str, ...] = ()  #: full names
    events: tuple[str, ...] = ()  #: the kinds it listens to
    #: "in use": this kernel routes through its router; "replaced": it registered a
    #: default router that another plugin's replaced; "": it registers none (protocol 7)
    router: str = ""
    failures: tuple[str, ...] = ()  #: "w01: hook task_started: ValueError: ..." per failure


_info_decoder: Final = msgspec.msgpack.Decoder(PluginInfo)
_encoder: Final = msgspec.msgpack.Encoder()


def read_plugins(data_dir: str) -> list[PluginInfo]:
    """The status of the plugins of the kernel whose data dir is ``data_dir`` (its last
    run, if it is not running), with every process's failures; [] if there is none."""
    path = os.path.join(data_dir, JOURNAL)
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return []
    with Journal.open(path, sync=False) as journal:
        rows = [_info_decoder.decode(v) for _, v in journal.table(_STATUS_TABLE).scan()]
        failures: dict[str, list[str]] = {}
        for key, value in journal.table(_FAILURES_TABLE).scan():
            name, where, _ = key.decode().split("\0", 2)
            failures.setdefault(name, []).append(f"{where}: {value.decode()}")
    return [msgspec.structs.replace(r, failures=tuple(failures.get(r.name, ()))) for r in rows]


# ---- The host: one per process ----


@dataclasses.dataclass(slots=True)
class _Loaded:
    """A plugin instance that set up in this process, and what it registered."""

    cand: Candidate
    plugin: Plugin
    ctx: PluginContext


class PluginHost:
    """The plugins of one process (the supervisor, or a worker). Built by the supervisor
    (``load``) and, in each worker right after its fork, by ``for_worker``; made this
    process's with ``activate``. Thread-safe: events come from several threads."""

    def __init__(
        self, role: Role, worker: int, data_dir: str, link: SupervisorLink | None = None
    ) -> None:
        self.role: Role = role
        self.worker = worker
        self.data_dir = data_dir
        self._link = link  # a worker's way to the supervisor's services (protocol 6)
        self._lock = threading.Lock()  # guards the maps below and the journal handle
        self._candidates: list[Candidate] = []
        self._loaded: dict[str, _Loaded] = {}  # enabled plugins, in load order
        self._errors: dict[str, str] = {}  # plugins disabled here -> why
        # Snapshots replaced whole under the lock, read without it (the hot paths):
        self._services: dict[str, ServiceFn] = {}  # full name -> fn
        self._in_supervisor: frozenset[str] = frozenset()  # full names, where="supervisor"
        self._tools: dict[str, ToolSpec] = {}  # full name -> spec
        self._agent_apis: dict[str, Callable[[AgentInfo], object]] = {}  # plugin -> factory
        self._listeners: dict[str, tuple[tuple[str, Callable[[Event], object]], ...]] = {}
        self._router: Router | None = None  # what router() returns here (protocol 7)
        self._router_by = ""  # the plugin it came from
        self._journal: Journal | None = None
        self._pid = os.getpid()
        self._started_ns = time.time_ns()  # failures reported before this are an earlier run's

    @classmethod
    def load(cls, candidates: Sequence[Candidate], data_dir: str) -> PluginHost:
        """The supervisor's host: set up every candidate, then write the status table
        (protocol 2). Failures are reported, never raised."""
        host = cls("supervisor", -1, data_dir)
        host._start(candidates)
        host._write_status()
        return host

    def for_worker(self, index: int, link: SupervisorLink | None = None) -> PluginHost:
        """A fresh host for worker ``index`` (call it in the worker, after the fork): new
        instances of the plugins that loaded here. ``link``: its end of the supervisor's
        socketpair, which it then owns (closed by ``close``); without one, a supervisor
        service cannot be called from this worker."""
        host = PluginHost("worker", index, self.data_dir, link)
        host._errors = {name: f"in the supervisor: {why}" for name, why in self._errors.items()}
        host._start([c for c in self._candidates if c.name in self._loaded])
        return host

    def _start(self, candidates: Sequence[Candidate]) -> None:
        self._candidates = list(candidates)
        for cand in candidates:
            if cand.cls is None:
                self._errors[cand.name] = cand.error
                self._report(cand.name, "load", cand.error)
                continue
            plugin: Plugin | None = None
            ctx = PluginContext(self, cand.name)
            try:
                plugin = cand.cls()
                plugin.setup(ctx)
            except (Exception, SystemExit) as exc:
                self._errors[cand.name] = _describe(exc)
                self._report(cand.name, "setup", _describe(exc), exc)
                if plugin is not None:  # what setup opened before it raised
                    self._close_one(_Loaded(cand, plugin, ctx))
                continue
            ctx._live = True
            self._loaded[cand.name] = _Loaded(cand, plugin, ctx)
        with self._lock:
            self._rebuild()

    def _changed(self) -> None:
        """A plugin registered something after its setup: make it visible."""
        with self._lock:
            self._rebuild()

    def _rebuild(self) -> None:
        """Recompute the snapshots and this process's event flags. Lock held."""
        services: dict[str, ServiceFn] = {}
        in_supervisor: set[str] = set()
        tools: dict[str, ToolSpec] = {}
        apis: dict[str, Callable[[AgentInfo], object]] = {}
        listeners: dict[str, list[tuple[str, Callable[[Event], object]]]] = {}
        for name, loaded in self._loaded.items():
            ctx = loaded.ctx
            services.update({f"{name}.{op}": fn for op, fn in ctx._services.items()})
            in_supervisor.update(f"{name}.{op}" for op in _supervisor_ops(ctx))
            tools.update({spec.name: spec for spec in ctx._tools.values()})
            if ctx._agent_api is not None:
                apis[name] = ctx._agent_api
            for kind, fn in ctx._listeners:
                listeners.setdefault(kind, []).append((name, fn))
        self._services, self._tools, self._agent_apis = services, tools, apis
        self._in_supervisor = frozenset(in_supervisor)
        self._listeners = {kind: tuple(fns) for kind, fns in listeners.items()}
        self._router, self._router_by = None, ""
        for name, loaded in self._loaded.items():
            registered = loaded.ctx._router
            if registered is not None and (self._router is None or not registered[1]):
                self._router, self._router_by = registered[0], name  # a default gives way
        if _current is self:
            _set_flags(self._listeners)

    def _router_owner(self, default: bool) -> str:
        """The enabled plugin that registered a router of this kind, or ""."""
        for name, loaded in self._loaded.items():
            if loaded.ctx._router is not None and loaded.ctx._router[1] == default:
                return name
        return ""

    # ---- Using plugins ----

    def names(self) -> list[str]:
        """The plugins enabled in this process, in load order."""
        return list(self._loaded)

    def plugin(self, name: str) -> Plugin | None:
        """The instance of plugin ``name`` in this process, if enabled here."""
        loaded = self._loaded.get(name)
        return None if loaded is None else loaded.plugin

    def call(self, name: str, args: tuple[object, ...], kwargs: Mapping[str, object]) -> object:
        """Run service ``name`` (protocol 4): here, or in the supervisor if it runs there
        (protocol 6). A name no plugin of this worker offers is asked of the supervisor too
        (a plugin may register a supervisor service in the supervisor only), unless its
        plugin is disabled here. Raises ``ServiceNotFoundError``, ``PluginError`` (the
        supervisor cannot be reached), or what the service raised."""
        fn = self._services.get(name)
        if self.role == "worker" and (
            name in self._in_supervisor
            or (
                fn is None and self._link is not None and name.partition(".")[0] not in self._errors
            )
        ):
            if self._link is None:
                raise PluginError(f"{name} runs in the supervisor; this worker has no link to it")
            return self._link.call(name, args, kwargs)
        if fn is None:
            raise ServiceNotFoundError(self._missing("service", name))
        return fn(*args, **kwargs)

    def tool_spec(self, name: str) -> ToolSpec | None:
        """The spec of plugin tool ``name``, if an enabled plugin here offers it."""
        return self._tools.get(name)

    def agent_api(self, name: str, info: AgentInfo) -> object:
        """``self.plugin(name)`` for the agent ``info``. Raises ``ServiceNotFoundError``."""
        factory = self._agent_apis.get(name)
        if factory is None:
            raise ServiceNotFoundError(self._missing("agent API of plugin", name))
        return factory(info)

    def _missing(self, what: str, name: str) -> str:
        plugin = name.partition(".")[0]
        why = self._errors.get(plugin)
        where = f"w{self.worker:02d}" if self.worker >= 0 else "the supervisor"
        if why:
            return f"no {what} {name!r}: plugin {plugin!r} is disabled in {where} ({why})"
        return f"no {what} {name!r} in {where} (plugins: {', '.join(self._loaded) or 'none'})"

    def emit(self, event: Event) -> None:
        """Hand ``event`` to its listeners, in registration order; a listener that raises
        disables its plugin (protocol 5)."""
        for name, fn in self._listeners.get(event.kind, ()):
            try:
                fn(event)
            except (Exception, SystemExit) as exc:
                self.disable(name, f"hook {event.kind}", exc)

    # ---- Supervisor services: the supervisor's side (protocol 6) ----

    def serve(self, sock: socket.socket) -> bool:
        """Answer the call waiting on ``sock``, the supervisor's end of a worker's link
        (the supervisor's loop calls it when ``sock`` is readable): run the service here,
        reply without blocking. Returns False once the worker's end is closed (nothing
        more will come), else True. Never raises for what a service or a worker does."""
        try:
            data, _, flags, _ = sock.recvmsg(_LINK_RECV_BYTES, 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True  # a stale wake-up: nothing waiting
        except OSError:
            return False
        if not data:
            return False  # EOF: the worker died
        if len(data) < _LINK_ID.size:
            log_event(_log, logging.ERROR, "service_request_malformed", bytes=len(data))
            return True
        (call_id,) = _LINK_ID.unpack_from(data)
        try:
            if flags & socket.MSG_TRUNC:
                raise PluginError(f"request over {_LINK_RECV_BYTES} bytes")
            request = shipping.loads(memoryview(data)[_LINK_ID.size :])
            name, args, kwargs = cast("_Request", request)  # what SupervisorLink sent
            result = self._serve_one(name, args, kwargs)
            reply = _LINK_ID.pack(call_id) + shipping.dumps((True, result))
        except (Exception, SystemExit) as exc:
            reply = _LINK_ID.pack(call_id) + shipping.dumps((False, shipping.pack_exception(exc)))
        _reply(sock, call_id, reply)
        return True

    def _serve_one(self, name: str, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
        fn = self._services.get(name)
        if fn is None or name not in self._in_supervisor:
            raise ServiceNotFoundError(self._missing("service", name))
        return fn(*args, **kwargs)

    # ---- Failure (protocol 5) ----

    def disable(self, name: str, stage: str, exc: BaseException) -> None:
        """Disable plugin ``name`` in this process and report why."""
        with self._lock:
            loaded = self._loaded.pop(name, None)
            if loaded is None:
                return  # another thread's event disabled it first
            self._errors[name] = f"{stage}: {_describe(exc)}"
            self._rebuild()
        self._report(name, stage, _describe(exc), exc)
        self._close_one(loaded)

    def _report(self, name: str, stage: str, error: str, exc: BaseException | None = None) -> None:
        where = f"w{self.worker:02d}" if self.worker >= 0 else "supervisor"
        tb = "".join(traceback.format_exception(exc)) if exc is not None else ""
        log_event(_log, logging.ERROR, "plugin_failed", plugin=name, where=where, stage=stage,
                  error=error, traceback=tb)  # fmt: skip
        key = f"{name}\0{where}\0{time.time_ns()}".encode()
        try:
            self.journal().table(_FAILURES_TABLE).put(key, f"{stage}: {error}".encode())
        except (JournalError, OSError):
            log_event(_log, logging.ERROR, "plugin_failure_unrecorded", plugin=name, exc_info=True)

    # ---- The journal: status and the plugins' own tables ----

    def journal(self) -> Journal:
        """This process's handle on ``<data_dir>/plugins`` (opened on first use)."""
        with self._lock:
            if self._journal is None or self._journal.closed or self._pid != os.getpid():
                self._journal = Journal.open(os.path.join(self.data_dir, JOURNAL))
                self._pid = os.getpid()
            return self._journal

    def _write_status(self) -> None:
        rows = []
        for cand in self._candidates:
            loaded = self._loaded.get(cand.name)
            state = "enabled" if loaded is not None else "disabled"
            ctx = loaded.ctx if loaded is not None else None
            rows.append(PluginInfo(
                name=cand.name, spec=cand.spec, source=cand.source, state=state,
                error="" if loaded is not None else self._errors.get(cand.name, cand.error),
                services=tuple(f"{cand.name}.{s}" for s in ctx._services) if ctx else (),
                supervisor_services=tuple(
                    f"{cand.name}.{s}" for s in _supervisor_ops(ctx)) if ctx else (),
                tools=tuple(t.name for t in ctx._tools.values()) if ctx else (),
                events=tuple(dict.fromkeys(k for k, _ in ctx._listeners)) if ctx else (),
                router=_router_state(ctx, self._router_by),
            ))  # fmt: skip
        try:
            journal = self.journal()
            status, failures = journal.table(_STATUS_TABLE), journal.table(_FAILURES_TABLE)
            with journal.batch() as batch:
                for key, _ in status.scan():  # an earlier run's rows
                    batch.delete(status, key)
                for key, _ in failures.scan():  # an earlier run's reports (keys end in the time)
                    if int(key.rpartition(b"\0")[2]) < self._started_ns:
                        batch.delete(failures, key)
                for row in rows:
                    batch.put(status, row.name.encode(), _encoder.encode(row))
        except (JournalError, OSError):
            log_event(_log, logging.ERROR, "plugin_status_unwritten", exc_info=True)

    # ---- Closing ----

    def close(self) -> None:
        """Close every plugin (reverse load order), then the journal. Idempotent."""
        with self._lock:
            loaded, self._loaded = list(self._loaded.values()), {}
            self._rebuild()
        for one in reversed(loaded):
            self._close_one(one)
        if self._link is not None:
            self._link.close()
        with self._lock:
            journal, self._journal = self._journal, None
        if journal is not None and self._pid == os.getpid():
            with contextlib.suppress(JournalError):
                journal.close()

    def _close_one(self, loaded: _Loaded) -> None:
        try:
            loaded.plugin.close()
        except (Exception, SystemExit):
            log_event(
                _log, logging.ERROR, "plugin_close_failed", plugin=loaded.cand.name, exc_info=True
            )


def _supervisor_ops(ctx: PluginContext) -> list[str]:
    return [op for op, where in ctx._where.items() if where == "supervisor"]


def _router_state(ctx: PluginContext | None, chosen_by: str) -> str:
    if ctx is None or ctx._router is None:
        return ""
    return "in use" if ctx.name == chosen_by else "replaced"


def _reply(sock: socket.socket, call_id: int, reply: bytes) -> None:
    """Send a reply without blocking the supervisor: a full buffer drops it (its worker
    times out), an oversized one is replaced by an error the caller gets instead."""
    try:
        sock.send(reply, socket.MSG_DONTWAIT)
    except OSError as exc:
        if exc.errno != errno.EMSGSIZE:
            log_event(_log, logging.WARNING, "service_reply_dropped", error=_describe(exc))
            return
        too_big = PluginError(f"the reply ({len(reply)} bytes) is over the link's limit")
        _reply(sock, call_id, _LINK_ID.pack(call_id) + shipping.dumps(
            (False, shipping.pack_exception(too_big))))  # fmt: skip


# ---- Supervisor services: a worker's side (protocol 6) ----


class SupervisorLink:
    """A worker's end of its socketpair with the supervisor: calls supervisor services.
    Built in the worker right after its fork; owned by its ``PluginHost``. Thread-safe:
    the main thread (clients' calls) and agents' executor threads take turns (a lock)."""

    def __init__(self, sock: socket.socket, timeout_s: float = SERVICE_TIMEOUT_S) -> None:
        self._sock = sock  # blocking, with a timeout per wait
        self._timeout_s = timeout_s
        self._lock = threading.Lock()  # one call in flight; guards _ids and the socket
        self._ids = itertools.count(1)

    def call(self, name: str, args: tuple[object, ...], kwargs: Mapping[str, object]) -> object:
        """Run supervisor service ``name`` and return its result; blocks for the reply.
        Raises ``ServiceNotFoundError``, what the service raised (its supervisor-side
        traceback as ``__cause__``), ``ShippingError``, or ``PluginError`` (no answer in
        ``timeout_s``, the supervisor gone, a request too large)."""
        with self._lock:
            call_id = next(self._ids)
            request = _LINK_ID.pack(call_id) + shipping.dumps((name, args, dict(kwargs)))
            ok, value = self._exchange(name, call_id, request)
        if ok:
            return value
        data, tb, summary = cast("tuple[bytes, str, str]", value)  # pack_exception's
        exc = shipping.loads(data) if data else PluginError(f"{name} raised {summary}")
        if not isinstance(exc, BaseException):
            exc = PluginError(f"{name} raised {summary}")
        raise exc from _SupervisorTraceback(tb)

    def _exchange(self, name: str, call_id: int, request: bytes) -> tuple[bool, object]:
        """Send a request, wait for its reply (skipping stale ones). Lock held."""
        deadline = time.monotonic() + self._timeout_s
        try:
            self._sock.settimeout(self._timeout_s)
            self._sock.send(request)
            while True:
                self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data, _, flags, _ = self._sock.recvmsg(_LINK_RECV_BYTES)
                if not data:
                    raise PluginError(f"cannot call {name}: the supervisor is gone")
                if flags & socket.MSG_TRUNC:
                    raise PluginError(f"the reply of {name} is over {_LINK_RECV_BYTES} bytes")
                if _LINK_ID.unpack_from(data)[0] == call_id:
                    reply = shipping.loads(memoryview(data)[_LINK_ID.size :])
                    return cast("tuple[bool, object]", reply)
                # else: the late reply to a call that timed out; skip it
        except TimeoutError:
            raise PluginError(
                f"{name}: no answer from the supervisor in {self._timeout_s} s"
            ) from None
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise PluginError(f"the request to {name} is over the link's limit") from exc
            raise PluginError(f"cannot call {name}: the supervisor is gone ({exc})") from exc

    def close(self) -> None:
        """Close this end (the supervisor then sees EOF). Idempotent."""
        self._sock.close()


class _SupervisorTraceback(Exception):
    """Not raised: the ``__cause__`` of an exception a supervisor service raised, carrying
    its traceback as formatted there."""

    def __str__(self) -> str:
        return f"\n{self.args[0]}" if self.args else ""


# ---- This process's host ----

_current: PluginHost | None = None


def activate(host: PluginHost | None) -> None:
    """Make ``host`` this process's (what ``emit`` and ``call_service`` use) and set the
    event flags from its listeners; None: no plugins here."""
    global _current
    _current = host
    _set_flags(host._listeners if host is not None else {})


def _set_flags(listeners: Mapping[str, object]) -> None:
    for kind in EVENTS:
        setattr(events, kind, kind in listeners)


def router() -> Router:
    """This process's router (protocol 7): its plugins', else ``DefaultRouter``. Read when
    the kernel builds a registry handle or an agent host, not per message."""
    host = _current
    chosen = host._router if host is not None else None
    return chosen if chosen is not None else _DEFAULT_ROUTER


def current() -> PluginHost | None:
    """This process's host, or None (a client, or a kernel built without plugins)."""
    return _current


def emit(
    kind: str,
    *,
    agent: str = "",
    task: int = 0,
    client: int = -1,
    name: str = "",
    detail: str = "",
) -> None:
    """Emit an event to this process's listeners. Call it only behind its flag
    (``if events.task_started: emit("task_started", ...)``)."""
    host = _current
    if host is not None:
        host.emit(Event(kind, time.time(), host.worker, agent, task, client, name, detail))


def call_service(name: str, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
    """The task a client's ``call_service`` submits, and what an agent's runs: service
    ``name`` of this worker's plugins. Raises ``ServiceNotFoundError`` or the service's
    own exception."""
    host = _current
    if host is None:
        raise ServiceNotFoundError(f"no service {name!r}: this process runs no plugins")
    return host.call(name, args, kwargs)
