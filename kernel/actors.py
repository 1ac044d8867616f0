"""Agents inside one worker: the ``Agent`` base class and ``AgentHost``, which runs many agents
on one asyncio event loop with a bounded mailbox each, supervises them and checkpoints them.

The host knows nothing of rings or processes. Work comes in through plain method calls
(``spawn``, ``post``/``put``, ``resolve``, ``publish``, ``stop``, ``kill``), and everything
that leaves goes through two small protocols the worker implements: ``Outbox`` (replies to
other processes, messages to agents elsewhere, events, spawns, exit reports) and
``Checkpointer`` (durable agent state; ``JournalCheckpointer`` is one over ``kernel.journal``).
The module is long: dispatch, supervision and persistence share one record per agent and
one state machine, and would reach into each other's fields if split (XX: ``Mailbox`` and the
checkpoint format with ``JournalCheckpointer`` are self-contained and could move out).

    worker main thread                       loop thread (single writer of everything here)
    ring frame --call_soon_threadsafe--> host.post(id, Message) --> Mailbox (bounded FIFO)
                                                                        | one at a time
    Outbox.reply / deliver / publish <-- replies, sends <-- handler <---'
    Checkpointer.checkpoint          <-- state + seen ids (persist=True)

Single writer: every method of ``AgentHost``, ``Mailbox`` and the ``Agent`` hooks runs with the
host's event loop held: on its thread, or on the worker's main thread borrowing the idle loop
(``kernel/sharedloop.py``); other threads hop on with ``loop.call_soon_threadsafe``. Outbox
and Checkpointer methods are called the same way.

Protocols:

1. *Delivery.* ``post(id, msg)`` appends to the agent's mailbox or returns False when it
   holds ``capacity`` messages (never an unbounded queue): the caller applies backpressure,
   by waiting in ``await put(id, msg)`` (FIFO among waiters, so per-sender order holds) or by
   failing the ask with ``MailboxFullError``. An idle agent costs no task: a post to it
   schedules one ``call_soon`` callback that drains the mailbox.
2. *Handling.* One message at a time per agent, in arrival order, so messages of one sender
   are handled in the order posted. A plain handler runs inline on the loop thread; an
   ``async def`` handler becomes a task, and the agent's next message waits until it
   finishes while other agents run. After ``DRAIN_BATCH`` messages an agent yields the loop.
   ``Message.method`` names a public method of the agent; a publish (``Message.topic``)
   calls ``on_message(topic, payload)``.
3. *Replies.* An ask carries ``ReplyTo(origin, call_id)``. The answer (the handler's result,
   or its exception with its traceback) goes to the host's own waiting future when
   ``origin`` is this host's, else to ``Outbox.reply``. Values travelling between two
   agents of one host are copied (pickled and unpickled, immutable scalars excepted), so an
   agent never shares mutable state with another, wherever they run.
4. *Crash and restart.* A handler that raises fails its ask with that exception; an unknown
   method (``UnknownMethodError``) or arguments that do not bind (``TypeError``) fail the ask
   and leave the agent alone. After a crash the restart policy decides: ``permanent`` and
   ``on-failure`` restart it, ``temporary`` removes it (queued asks fail with
   ``AgentCrashedError``, later ones get ``AgentNotFoundError``). An agent that calls
   ``self.exit()`` is restarted only if ``permanent``. A restart builds a fresh instance with
   ``cls(*args, **kwargs)``, restores the last checkpoint (persist=True), re-subscribes the
   class's ``subscriptions`` and runs ``on_start``; the mailbox is kept. More than
   ``max_restarts`` restarts within ``within_s`` seconds (OTP's restart intensity) stop the
   agent for good, reported through ``Outbox.agent_exited``. ``stop()`` and ``kill()`` never
   restart. Plugins (kernel/plugins.py) see ``agent_spawned``, ``agent_restarted`` and
   ``agent_stopped`` events, each behind its flag.
5. *Checkpoints (persist=True).* After ``checkpoint_every`` handled messages, after
   ``checkpoint_ms`` with un-checkpointed messages, whenever the mailbox empties and before
   an ``async def`` handler starts (so a long await holds no earlier replies back), the host
   pickles the agent's state (``__getstate__`` or its ``__dict__``), adds the highest message
   id handled per sender and the replies it releases, and hands the encoded ``Checkpoint`` to
   ``Checkpointer.checkpoint``, which must make it durable before returning. Replies to asks
   are held until the checkpoint covering them is written; a crash before it rolls the
   state back to the last checkpoint and fails those asks with ``AgentCrashedError``. A
   checkpoint that fails (state that will not pickle, a full journal) is a crash.

Delivery semantics, exactly:

- Without ``persist``: at most once. An accepted message is handled once, unless the agent
  is removed first (its asks then fail with a typed error) or the worker dies (the worker's
  crash handling answers the asks). State lives in memory; a crash loses it.
- With ``persist``: a successful reply means the message's effects on the agent's state
  are in a checkpoint. Messages handled after the last checkpoint are rolled back by a
  crash and, if the worker died, never answered: their sender may re-send them, keeping
  their ``msg_id`` and order. A re-sent message whose id is at most the highest id the
  checkpoint records for its sender is a duplicate and is not handled again: an ask gets the
  reply cached in the restored checkpoint when it is there (the replies that checkpoint
  released), else ``DuplicateMessageError``; a tell is dropped. With re-sending that makes
  asks effectively once *for the agent's state*; effects outside it (a tool run, an LLM call,
  messages the handler sent) happen again when a rolled-back message is handled again.
- Senders number their messages with ids that strictly increase per sender, across the
  sender's own restarts (``AgentHost.new_msg_id`` is a hybrid clock for that); id 0 opts a
  message out of deduplication. Events from ``publish`` are never deduplicated. The
  highest ids of at most ``MAX_SEEN_SENDERS`` senders are kept per agent (least recently
  seen dropped first).
- The Outbox must deliver every reply handed to ``reply()`` before a ``checkpoint()`` call
  even if the worker dies afterwards (flush pending replies before writing the checkpoint);
  otherwise a re-sent ask may get ``DuplicateMessageError`` instead of its cached reply.

Open questions:

- XX: checkpoints are written one agent at a time on the loop thread (an fsync each with
  ``sync=True``); group commit across agents would batch them into one transaction.
- XX: ``new_msg_id`` follows the wall clock; a clock stepped back across a sender's restart
  could make its new ids look like duplicates until the clock catches up.
"""

from __future__ import annotations

__all__ = [
    "CHECKPOINT_TABLE",
    "DRAIN_BATCH",
    "MAILBOX_CAPACITY",
    "MAX_RESTARTS",
    "MAX_SEEN_SENDERS",
    "RESTART_WITHIN_S",
    "Agent",
    "AgentCrashedError",
    "AgentError",
    "AgentExit",
    "AgentHost",
    "AgentNotFoundError",
    "AgentState",
    "AgentStats",
    "CachedReply",
    "Checkpoint",
    "Checkpointer",
    "Context",
    "DuplicateMessageError",
    "ExitReason",
    "JournalCheckpointer",
    "Mailbox",
    "MailboxFullError",
    "Message",
    "Outbox",
    "ReplyTo",
    "Restart",
    "SpawnSpec",
    "UnknownMethodError",
    "decode_checkpoint",
]

import asyncio
import collections
import dataclasses
import enum
import functools
import inspect
import logging
import os
import time
import traceback
import types
import weakref
from typing import TYPE_CHECKING, ClassVar, Final, NoReturn, Protocol, cast

import msgspec

from . import shipping
from .errors import KernelError
from .logs import log_event
from .plugins import emit, events, router
from .topics import split_pattern

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterable, Mapping

    from .journal import Journal
    from .memory import MemoryView
    from .plugins import Topics

#: Messages an agent's mailbox holds before ``post`` returns False (per-spawn override).
MAILBOX_CAPACITY: Final = int(os.getenv("ASTRA_MAILBOX_CAPACITY", "1024"))
#: Restart intensity: at most this many restarts of one agent within ``RESTART_WITHIN_S``.
MAX_RESTARTS: Final = int(os.getenv("ASTRA_AGENT_MAX_RESTARTS", "3"))
RESTART_WITHIN_S: Final = float(os.getenv("ASTRA_AGENT_RESTART_WITHIN_S", "5.0"))
#: Messages one agent handles in a row before it yields the loop to the others.
DRAIN_BATCH: Final = 64
#: Senders whose highest message id a persisted agent remembers for deduplication.
MAX_SEEN_SENDERS: Final = int(os.getenv("ASTRA_AGENT_MAX_SEEN_SENDERS", "4096"))
#: The journal table ``JournalCheckpointer`` writes (key: the agent id in UTF-8).
CHECKPOINT_TABLE: Final = "agents"
#: Version of the ``Checkpoint`` encoding.
CHECKPOINT_VERSION: Final = 1

_log = logging.getLogger("astra.agents")
_NO_KWARGS: Final[Mapping[str, object]] = types.MappingProxyType({})


# ---- Errors ----


class AgentError(KernelError):
    """Root of the agent runtime's errors (a ``KernelError``). Raised as such for misuse:
    a duplicate agent id or name, ``persist=True`` without a checkpointer, a closed host, a
    hook called on an agent that no host runs."""


class AgentNotFoundError(AgentError):
    """Raised (or set on an ask) when no live agent has the id or name: never spawned,
    stopped, exited, or removed after a crash; also for a message to an agent that is
    stopping."""


class MailboxFullError(AgentError):
    """Raised by ``tell`` and set on an ask when the target's mailbox is full (a local
    target here; the Outbox raises it for remote ones). Retry later or slow down."""


class AgentCrashedError(AgentError):
    """Set on an ask whose message was accepted but never answered because the agent went
    away: killed, removed after a crash (``temporary``), stopped for good past its restart
    intensity, or crashed before the checkpoint covering this ask (``persist=True``: its
    effects were rolled back). ``__cause__`` holds the crash's exception when there is one."""


class UnknownMethodError(AgentError):
    """Set on an ask whose ``method`` is not a public method of the agent's class."""


class DuplicateMessageError(AgentError):
    """Set on a re-sent ask that a persisted agent had already handled (see the module doc)
    when its reply is no longer cached; the first answer was lost, the effects were not."""


class AgentExit(BaseException):
    """Raised by ``Agent.exit()`` to end the agent normally. A ``BaseException``, so that
    ``except Exception`` in handlers does not swallow it."""


# ---- Records ----


class Restart(enum.StrEnum):
    """Restart policy of an agent (OTP's permanent / transient / temporary)."""

    PERMANENT = "permanent"  # restarted after a crash and after its own exit()
    ON_FAILURE = "on-failure"  # restarted after a crash only
    TEMPORARY = "temporary"  # never restarted: a crash removes it


class AgentState(enum.Enum):
    """What an agent is doing, as ``stats()`` shows it."""

    IDLE = "idle"  # empty mailbox, nothing scheduled: no task, no callback
    RUNNING = "running"  # its drain is scheduled, or a plain handler is running
    WAITING = "waiting"  # an async handler (or hook) is awaiting


class ExitReason(enum.Enum):
    """Why an agent left its host, as reported to ``Outbox.agent_exited``."""

    STOPPED = "stopped"  # stop(): the mailbox was drained and on_stop ran
    KILLED = "killed"  # kill(): at once, queued asks failed
    EXITED = "exited"  # it called exit() and its policy does not restart it
    CRASHED = "crashed"  # it crashed and its policy does not restart it (temporary)
    RESTART_LIMIT = "restart-limit"  # more than max_restarts restarts within within_s
    CLOSED = "closed"  # the host closed


class _Control(enum.Enum):
    """Mailbox items that are not messages; they bypass the capacity limit."""

    START = "start"  # run on_start (first item after a spawn or a restart)
    STOP = "stop"  # run on_stop and leave (after the messages queued before stop())


class ReplyTo(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Where the answer to an ask goes. The host compares ``origin`` with its own and hands
    any other to ``Outbox.reply`` untouched."""

    origin: int  #: who waits: a host's origin (say, its worker index), or a client's code
    call_id: int  #: the waiter's call number, unique per origin


class Message(msgspec.Struct, frozen=True):
    """One mailbox item: a call of ``method`` or, when ``topic`` is set, a published event
    (``args == (payload,)``). Built by the worker from ring frames or by the host itself.
    A ``msgspec.Struct``, not a dataclass: a frozen dataclass takes 0.6 us to build, a
    tenth of a worker's whole share of an ask; this takes 0.07."""

    sender: str  #: stable id of the sender (an agent id, a client's id); "" if anonymous
    method: str = ""  #: the handler to call; "" for an event
    args: tuple[object, ...] = ()  #: positional arguments (already unpickled)
    kwargs: Mapping[str, object] = msgspec.field(default_factory=lambda: _NO_KWARGS)
    reply_to: ReplyTo | None = None  #: where the answer goes; None for a tell or an event
    msg_id: int = 0  #: per-sender increasing id for deduplication; 0 for none
    topic: str = ""  #: the event's topic; "" for a call


@dataclasses.dataclass(frozen=True, slots=True)
class SpawnSpec:
    """What ``Agent.spawn`` asks the Outbox to start (the fields of ``AgentHost.spawn``)."""

    cls: type[Agent]
    args: tuple[object, ...] = ()
    kwargs: Mapping[str, object] = dataclasses.field(default_factory=lambda: _NO_KWARGS)
    name: str | None = None
    restart: Restart = Restart.ON_FAILURE
    persist: bool = False
    #: plugin name -> what the new agent is granted for it (``{"memory": ("team",)}``)
    grants: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class AgentStats:
    """One row of ``AgentHost.stats()``."""

    id: str  #: the agent's id
    name: str  #: its name (its id unless given)
    cls: str  #: qualified name of its class
    mailbox: int  #: messages waiting
    handled: int  #: messages handled (restored from its checkpoint, when persisted)
    state: AgentState  #: idle, running or waiting
    restarts: int  #: restarts so far
    dropped: int  #: published events dropped because its mailbox was full
    persist: bool  #: whether it is checkpointed


class CachedReply(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A successful reply released by a checkpoint, kept there for deduplication."""

    sender: str  #: the ask's sender
    msg_id: int  #: the ask's message id
    result: bytes  #: the pickled result; b"" if it would not pickle


class Checkpoint(msgspec.Struct, frozen=True, array_like=True):
    """What ``Checkpointer.checkpoint`` stores for one agent (msgpack; see protocol 5)."""

    version: int  #: CHECKPOINT_VERSION
    agent_id: str  #: the agent
    seq: int  #: checkpoints of this agent so far, this one included
    handled: int  #: messages handled so far
    state: bytes  #: the pickled state (``__getstate__()`` or ``__dict__``)
    seen: dict[str, int]  #: sender -> highest msg_id handled and covered by this checkpoint
    replies: tuple[CachedReply, ...]  #: the replies this checkpoint released


_encoder: Final = msgspec.msgpack.Encoder()
_checkpoint_decoder: Final = msgspec.msgpack.Decoder(Checkpoint)


def decode_checkpoint(data: bytes) -> Checkpoint:
    """Decode what ``Checkpointer.checkpoint`` was given. Raises ``AgentError``."""
    try:
        checkpoint = _checkpoint_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AgentError(f"undecodable agent checkpoint ({len(data)} B): {exc}") from exc
    if checkpoint.version != CHECKPOINT_VERSION:
        raise AgentError(f"agent checkpoint version {checkpoint.version} is not supported")
    return checkpoint


# ---- Protocols the worker implements ----


class Outbox(Protocol):
    """Everything the host sends out of the process. Called with the loop held; must not
    block for long (queue to a ring, wake its reader)."""

    def reply(self, to: ReplyTo, ok: bool, payload: object) -> None:
        """Answer an ask from another process: ``payload`` is the result (``ok``) or the
        exception, whose ``__traceback__`` carries the handler's frames."""

    def deliver(self, target: str, msg: Message) -> None:
        """Send ``msg`` to agent ``target`` (an id or a name) on another host. May raise
        ``AgentNotFoundError`` or ``MailboxFullError`` when it knows at once."""

    def publish(self, sender: str, topic: str, payload: object) -> None:
        """Fan an event out to the other hosts, each of which calls ``AgentHost.publish``
        (this host has already delivered it to its own subscribers)."""

    def spawn(self, parent: str, spec: SpawnSpec) -> str:
        """Start an agent for ``Agent.spawn`` (placement is the worker's policy; it may
        call this host's ``spawn``) and return its id."""

    def agent_exited(self, agent_id: str, reason: ExitReason, error: BaseException | None) -> None:
        """Report that an agent left this host for good (never called for a restart)."""


class Checkpointer(Protocol):
    """Durable storage for persisted agents' checkpoints."""

    def checkpoint(self, agent_id: str, data: bytes) -> None:
        """Store ``data`` (an encoded ``Checkpoint``) as the agent's latest checkpoint,
        durably, before returning. An exception counts as a crash of the agent."""


class Context(Protocol):
    """What an ``Agent``'s hook methods delegate to; the host gives each agent one."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    def ask(
        self,
        target: str,
        method: str,
        args: tuple[object, ...],
        kwargs: Mapping[str, object],
        timeout: float | None,
    ) -> asyncio.Future[object]: ...

    def tell(
        self, target: str, method: str, args: tuple[object, ...], kwargs: Mapping[str, object]
    ) -> None: ...

    def publish(self, topic: str, payload: object) -> None: ...

    def spawn(self, spec: SpawnSpec) -> str: ...

    def subscribe(self, pattern: str) -> bool: ...

    def unsubscribe(self, pattern: str) -> bool: ...


# ---- The Agent base class ----


class Agent:
    """Base class of user agents. Subclass it; public methods become handlers.

        class Researcher(Agent):
            subscriptions = ("papers.*",)
            def __init__(self, topic): self.topic = topic; self.notes = []
            def add(self, note): self.notes.append(note); return len(self.notes)
            async def think(self, q): return await self.ask("llm", "complete", q)
            def on_message(self, topic, payload): self.notes.append(payload)

    Inside a handler (and in ``__init__``) ``self.id``, ``self.name`` and the methods below
    work; they are the agent's view of its host. Names defined here are reserved: a subclass
    must not use them for its own handlers or attributes. Its state, for persistence, is
    ``__getstate__()`` if the class defines it, else its ``__dict__``.
    """

    __slots__ = ("_astra_ctx",)  # a slot: never part of the __dict__ that is checkpointed
    _astra_ctx: Context  # set by the host before __init__ runs

    #: Topic patterns this agent receives events for, through ``on_message``.
    subscriptions: ClassVar[tuple[str, ...]] = ()

    def _context(self) -> Context:
        try:
            ctx: Context = self._astra_ctx
        except AttributeError:
            raise AgentError(
                f"{type(self).__qualname__} is not running in an agent host; spawn it"
            ) from None
        return ctx

    @property
    def id(self) -> str:
        """The agent's id, unique in the kernel."""
        return self._context().id

    @property
    def name(self) -> str:
        """The agent's name (its id unless one was given at spawn)."""
        return self._context().name

    def ask(
        self,
        target: str,
        method: str,
        *args: object,
        timeout: float | None = None,
        **kwargs: object,
    ) -> asyncio.Future[object]:
        """Call ``method`` on agent ``target`` (id or name); await the returned future for the
        result. Never blocks, so a plain handler must not wait on it (that would stall the
        loop): await it in an ``async def`` handler. The future fails with the target's
        exception, ``AgentNotFoundError``, ``MailboxFullError``, ``UnknownMethodError``,
        ``AgentCrashedError``, ``TimeoutError`` (after ``timeout`` seconds), or
        ``AgentError`` for an ask of the agent itself (which could never be answered)."""
        return self._context().ask(target, method, args, kwargs, timeout)

    def tell(self, target: str, method: str, *args: object, **kwargs: object) -> None:
        """Send ``method`` to ``target`` without waiting for an answer; ordered per sender.

        Raises:
            AgentNotFoundError, MailboxFullError: at once, when known here.
            ShippingError: an argument would not pickle.
        """
        self._context().tell(target, method, args, kwargs)

    def publish(self, topic: str, msg: object) -> None:
        """Publish ``msg`` on ``topic`` to every agent subscribed to a matching pattern.
        A subscriber whose mailbox is full drops it (counted in its ``dropped``).

        Raises:
            TopicError: malformed topic.
        """
        self._context().publish(topic, msg)

    def spawn(
        self,
        cls: type[Agent],
        *args: object,
        name: str | None = None,
        restart: str = "on-failure",
        persist: bool = False,
        memory: Iterable[str] = (),
        grants: Mapping[str, Iterable[str]] | None = None,
        **kwargs: object,
    ) -> str:
        """Start another agent; returns its id. ``memory`` names the shared memory
        namespaces it may use and ``grants`` what it may use of other plugins; an agent
        can pass on only what it holds itself (and its own namespace). Raises
        ``AgentError``, ``ValueError``, or ``CapabilityError`` for a grant it lacks."""
        if isinstance(memory, str):
            raise TypeError(f"memory= takes a list of namespaces, not the string {memory!r}")
        given = {plugin: tuple(values) for plugin, values in (grants or {}).items()}
        if memory:
            given["memory"] = given.get("memory", ()) + tuple(memory)
        spec = SpawnSpec(cls, args, kwargs, name, Restart(restart), persist, given)
        return self._context().spawn(spec)

    def subscribe(self, pattern: str) -> bool:
        """Receive events matching ``pattern`` (until a restart, which resets subscriptions
        to the class's ``subscriptions``). Returns False if already subscribed.

        Raises:
            TopicError: malformed pattern.
            AgentError: the class has no ``on_message``.
        """
        return self._context().subscribe(pattern)

    def unsubscribe(self, pattern: str) -> bool:
        """Stop receiving events for ``pattern``; returns False if not subscribed."""
        return self._context().unsubscribe(pattern)

    def tool(self, name: str, *args: object, **kwargs: object) -> asyncio.Future[object]:
        """Run tool ``name`` (granted at spawn with ``tools=[...]``) in a sandbox; await the
        returned future in an ``async def`` handler for its value. The future fails with
        ``CapabilityError`` for a tool not granted (nothing runs), or with the sandbox's
        typed error (``SandboxTimeout``, ``SandboxMemoryError``, ...); the agent carries on.
        Every call is audited (kernel/tools.py)."""
        ctx = self._context()
        tool = getattr(ctx, "tool", None)
        if tool is None:
            raise AgentError("this agent's host runs no tools")
        result: asyncio.Future[object] = tool(name, args, kwargs)
        return result

    # -- Plugins (kernel/plugins.py): memory, services, agent APIs --

    @property
    def memory(self) -> MemoryView:
        """This agent's own memory namespace, named after it (the memory plugin,
        astra/memory.py): reads and writes go straight to the LMDB map in this worker, no
        message round trip; a write blocks for its commit. Raises ``ServiceNotFoundError``
        if the kernel runs no memory plugin."""
        return self._memory_namespace(None)

    def shared_memory(self, name: str) -> MemoryView:
        """The shared memory namespace ``name``, granted at spawn (``memory=[name]``).

        Raises:
            CapabilityError: this agent was not granted ``name``.
        """
        return self._memory_namespace(name)

    def _memory_namespace(self, name: str | None) -> MemoryView:
        namespace = getattr(self.plugin("memory"), "namespace", None)
        if namespace is None:
            raise AgentError("the memory plugin gives agents no namespaces")
        view: MemoryView = namespace(name)
        return view

    def plugin(self, name: str) -> object:
        """What plugin ``name`` offers agents (its ``ctx.agent_api``), made for this agent in
        its worker, within what it was granted at spawn. Raises ``ServiceNotFoundError``
        if no enabled plugin of that name runs here."""
        plugin = getattr(self._context(), "plugin", None)
        if plugin is None:
            raise AgentError("this agent's host runs no plugins")
        api: object = plugin(name)
        return api

    def service(self, name: str, *args: object, **kwargs: object) -> asyncio.Future[object]:
        """Call service ``name`` (``"plugin.operation"``) in this agent's worker, on an
        executor thread, so the agent's loop goes on; await the returned future. It fails
        with ``ServiceNotFoundError`` or with what the service raised."""
        service = getattr(self._context(), "service", None)
        if service is None:
            raise AgentError("this agent's host runs no plugins")
        result: asyncio.Future[object] = service(name, args, kwargs)
        return result

    def exit(self) -> NoReturn:
        """End this agent normally from inside a handler (the current ask gets None). It is
        restarted only under ``restart="permanent"``."""
        raise AgentExit

    def on_start(self) -> object:
        """Called before the first message, after a spawn and after every restart. May be
        ``async def``. An exception counts as a crash."""
        return None

    def on_stop(self) -> object:
        """Called by ``stop()`` after the queued messages were handled. May be ``async def``.
        Not called after a crash, a kill or ``exit()``."""
        return None


_RESERVED: Final = frozenset(dir(Agent)) | {"on_message"}


# ---- Mailbox ----

_Item = Message | _Control


class Mailbox:
    """A bounded FIFO of one agent. Idle and empty, it holds no deque."""

    __slots__ = ("_items", "_waiters", "capacity")

    def __init__(self, capacity: int) -> None:
        assert capacity >= 1, capacity
        self.capacity = capacity  #: messages it holds at most (control items aside)
        self._items: collections.deque[_Item] | None = None
        # put() callers waiting for room, in arrival order; take() admits them.
        self._waiters: collections.deque[tuple[Message, asyncio.Future[None]]] | None = None

    def __len__(self) -> int:
        return len(self._items) if self._items else 0

    def offer(self, msg: Message) -> bool:
        """Append ``msg``; False (and nothing appended) if full or if ``put`` callers wait
        (they came first)."""
        if self._waiters:
            return False
        items = self._items
        if items is None:
            items = self._items = collections.deque()
        elif len(items) >= self.capacity:
            return False
        items.append(msg)
        return True

    async def put(self, msg: Message) -> None:
        """Append ``msg``, waiting for room. A cancelled wait leaves ``msg`` out, unless it
        had already been admitted. Raises what ``close`` gives waiters."""
        if self.offer(msg):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = collections.deque()
        self._waiters.append((msg, waiter))
        await waiter

    def push_control(self, item: _Control, *, front: bool = False) -> None:
        """Queue a control item, regardless of capacity."""
        if self._items is None:
            self._items = collections.deque()
        if front:
            self._items.appendleft(item)
        else:
            self._items.append(item)

    def take(self) -> _Item | None:
        """Pop the oldest item (None if empty), admitting a waiting ``put`` into the room."""
        items = self._items
        if not items:
            self._items = None  # an empty, idle mailbox holds no deque
            return None
        item = items.popleft()
        waiters = self._waiters
        while waiters and len(items) < self.capacity:
            msg, waiter = waiters.popleft()
            if not waiter.done():  # done: its put() was cancelled
                items.append(msg)
                waiter.set_result(None)
        if not waiters:
            self._waiters = None
        return item

    def close(self, error: BaseException) -> list[_Item]:
        """Empty the mailbox for good: returns the queued items; waiting ``put`` calls raise
        ``error``."""
        items = list(self._items or ())
        self._items = None
        for _, waiter in self._waiters or ():
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters = None
        return items


# ---- Per-agent records ----


class _Persist:
    """Checkpoint bookkeeping of a persisted agent (protocol 5)."""

    __slots__ = (
        "cache",
        "dirty_at",
        "every",
        "held",
        "interval_s",
        "seen",
        "seq",
        "since",
        "snapshot",
    )

    def __init__(self, every: int, interval_s: float | None) -> None:
        self.every = every  # checkpoint after this many handled messages
        self.interval_s = interval_s  # ... or when the oldest un-checkpointed is this old
        self.since = 0  # messages handled since the last checkpoint
        self.dirty_at = 0.0  # monotonic time of the first of them
        self.seen: dict[str, int] = {}  # sender -> highest msg_id handled (LRU order)
        self.held: list[tuple[Message, object]] = []  # replies waiting for the checkpoint
        self.cache: dict[tuple[str, int], bytes] = {}  # replies restored from a checkpoint
        self.snapshot: bytes | None = None  # the last checkpoint, to restart from
        self.seq = 0


class _Agent:
    """The host's record of one agent; also the agent's ``Context``."""

    __slots__ = (
        "args",
        "cls",
        "current",
        "dropped",
        "gone",
        "handled",
        "handlers",
        "host",
        "id",
        "instance",
        "kwargs",
        "mailbox",
        "name",
        "persist",
        "restart",
        "restart_times",
        "restarts",
        "state",
        "stopped",
        "task",
    )

    def __init__(
        self,
        host: AgentHost,
        agent_id: str,
        name: str,
        cls: type[Agent],
        args: tuple[object, ...],
        kwargs: Mapping[str, object],
        restart: Restart,
        capacity: int,
    ) -> None:
        self.host = host
        self.id = agent_id
        self.name = name
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.restart = restart
        self.instance: Agent | None = None
        self.mailbox = Mailbox(capacity)
        self.state = AgentState.IDLE
        self.handled = 0
        self.restarts = 0
        self.restart_times: collections.deque[float] | None = None  # made at first restart
        self.dropped = 0
        self.persist: _Persist | None = None
        self.task: asyncio.Task[object] | None = None  # the running async handler, if any
        self.current: Message | None = None  # the message that task handles
        self.stopped: asyncio.Future[None] | None = None  # set by stop(); done when gone
        self.gone = False  # removed from the host; once set, never cleared
        self.handlers: frozenset[str] | None = None  # its class's handler names, once looked up

    # Context: thin delegations to the host.

    def ask(
        self,
        target: str,
        method: str,
        args: tuple[object, ...],
        kwargs: Mapping[str, object],
        timeout: float | None,
    ) -> asyncio.Future[object]:
        if self.host.lookup(target) == self.id:
            # Its own next message waits for the handler that would wait for it.
            future: asyncio.Future[object] = self.host._loop.create_future()
            future.set_exception(AgentError(f"agent {self.id!r} cannot ask itself; use tell"))
            return future
        return self.host.ask(target, method, args, kwargs, sender=self.id, timeout=timeout)

    def tell(
        self, target: str, method: str, args: tuple[object, ...], kwargs: Mapping[str, object]
    ) -> None:
        self.host.tell(target, method, args, kwargs, sender=self.id)

    def publish(self, topic: str, payload: object) -> None:
        self.host.publish(topic, payload, sender=self.id)
        self.host._outbox.publish(self.id, topic, payload)

    def spawn(self, spec: SpawnSpec) -> str:
        return self.host._outbox.spawn(self.id, spec)

    def subscribe(self, pattern: str) -> bool:
        if self.gone:
            raise AgentNotFoundError(f"agent {self.id!r} has left its host")
        if getattr(self.cls, "on_message", None) is None:
            raise AgentError(f"{self.cls.__qualname__} has no on_message to receive events")
        return self.host._topics.subscribe(pattern, self.id)

    def unsubscribe(self, pattern: str) -> bool:
        return self.host._topics.unsubscribe(pattern, self.id)

    def tool(
        self, name: str, args: tuple[object, ...], kwargs: Mapping[str, object]
    ) -> asyncio.Future[object]:
        return self._outbox_call("call_tool", "tools", name, args, kwargs)

    def _outbox_call(
        self,
        method: str,
        what: str,
        name: str,
        args: tuple[object, ...],
        kwargs: Mapping[str, object],
    ) -> asyncio.Future[object]:
        """The Outbox's optional ``method`` (``call_tool``, ``call_service``) for this agent;
        a future failed with ``AgentError`` where the host offers none (no ``what``)."""
        call = getattr(self.host._outbox, method, None)
        if call is None:
            future: asyncio.Future[object] = self.host._loop.create_future()
            future.set_exception(AgentError(f"this agent host runs no {what}"))
            return future
        result: asyncio.Future[object] = call(self.id, name, args, dict(kwargs))
        return result

    def plugin(self, name: str) -> object:
        plugin_api = getattr(self.host._outbox, "plugin_api", None)
        if plugin_api is None:
            raise AgentError("this agent host runs no plugins")
        api: object = plugin_api(self.id, name)
        return api

    def service(
        self, name: str, args: tuple[object, ...], kwargs: Mapping[str, object]
    ) -> asyncio.Future[object]:
        return self._outbox_call("call_service", "plugins", name, args, kwargs)


# ---- Helpers: copying values, agent state ----

_SCALARS: Final = frozenset({str, bytes, int, float, bool, complex, type(None)})


def _immutable(value: object) -> bool:
    kind = type(value)
    if kind in _SCALARS:
        return True
    if isinstance(value, tuple | frozenset) and (kind is tuple or kind is frozenset):
        return all(_immutable(v) for v in value)
    return False


def _isolate(value: object) -> object:
    """A copy of ``value`` that shares nothing mutable with it. Raises ``ShippingError``."""
    if _immutable(value):
        return value
    return shipping.loads(shipping.dumps(value))


def _state_of(instance: Agent) -> bytes:
    """The agent's state, pickled: ``__getstate__()`` if its class defines one, else its
    ``__dict__`` (the runtime's slot is not in it). Raises ``ShippingError``, AgentError."""
    getstate = type(instance).__getstate__
    if getstate is not object.__getstate__:
        state = instance.__getstate__()
    else:
        try:
            state = vars(instance)
        except TypeError:
            raise AgentError(
                f"{type(instance).__qualname__} has no __dict__; define __getstate__ and "
                f"__setstate__ to persist it"
            ) from None
    return shipping.dumps(state)


def _set_state(instance: Agent, data: bytes) -> None:
    state = shipping.loads(data)
    setstate = getattr(instance, "__setstate__", None)
    if setstate is not None:
        setstate(state)
    elif isinstance(state, dict):
        vars(instance).update(state)
    else:
        raise AgentError(
            f"{type(instance).__qualname__}: checkpointed state is a {type(state).__qualname__}"
            f", not a dict; define __setstate__"
        )


def _handler_names(cls: type[Agent]) -> frozenset[str]:
    """Public methods of ``cls`` that messages may call (plain or ``async def``)."""
    names = set()
    for name in dir(cls):
        if name.startswith("_") or name in _RESERVED:
            continue
        attr = inspect.getattr_static(cls, name)
        if isinstance(attr, staticmethod | classmethod):
            attr = attr.__func__
        if inspect.isfunction(attr) or inspect.ismethoddescriptor(attr):
            names.add(name)
    return frozenset(names)


# ---- The host ----


class AgentHost:
    """Runs agents on one asyncio event loop (see the module doc for the protocols).

    Built by the worker on its loop thread, or by tests inside ``asyncio.run``. Every method
    must be called with that loop held (its thread, or a borrower: kernel/sharedloop.py);
    none blocks.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        checkpointer: Checkpointer | None = None,
        origin: int = 0,
        loop: asyncio.AbstractEventLoop | None = None,
        mailbox_capacity: int = MAILBOX_CAPACITY,
        max_restarts: int = MAX_RESTARTS,
        within_s: float = RESTART_WITHIN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Args:
        outbox: where replies, remote messages, events, spawns and exit reports go.
        checkpointer: where checkpoints of ``persist=True`` agents go.
        origin: this host's ``ReplyTo.origin``; distinct per host (the worker index).
        loop: the loop to run on; default: the running loop.
        mailbox_capacity: default mailbox capacity per agent.
        max_restarts, within_s: restart intensity per agent.
        clock: seconds for restart intensity and ``checkpoint_ms`` (tests pass a fake).
        """
        if mailbox_capacity < 1:
            raise ValueError(f"mailbox_capacity must be at least 1, not {mailbox_capacity}")
        self._outbox = outbox
        self._checkpointer = checkpointer
        self.origin = origin
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._capacity = mailbox_capacity
        self._max_restarts = max_restarts
        self._within_s = within_s
        self._clock = clock
        self._agents: dict[str, _Agent] = {}
        # Since this host started, over every agent (metrics): messages handled, restarts.
        self.handled_total = 0
        self.restarts_total = 0
        self._names: dict[str, str] = {}  # name -> agent id (an agent's id is its default name)
        # This process's router's table (kernel/plugins.py protocol 7; TopicTable by default)
        self._topics: Topics = router().topics()
        self._pending: dict[int, asyncio.Future[object]] = {}  # call id -> the asker's future
        self._next_call = 0
        self._last_msg_id = 0
        self._handlers: weakref.WeakKeyDictionary[type[Agent], frozenset[str]] = (
            weakref.WeakKeyDictionary()
        )
        self._closed = False

    def __len__(self) -> int:
        return len(self._agents)

    def __contains__(self, target: object) -> bool:
        return isinstance(target, str) and self.lookup(target) is not None

    def lookup(self, target: str) -> str | None:
        """The id of the live agent with id or name ``target``, or None."""
        if target in self._agents:
            return target
        return self._names.get(target)

    def new_msg_id(self) -> int:
        """A message id larger than every earlier one of this host and, following the wall
        clock in nanoseconds, than those of earlier hosts (see the module doc)."""
        self._last_msg_id = max(self._last_msg_id + 1, time.time_ns())
        return self._last_msg_id

    # ---- Spawning ----

    def spawn(
        self,
        agent_id: str,
        cls: type[Agent],
        args: tuple[object, ...] = (),
        kwargs: Mapping[str, object] | None = None,
        *,
        name: str | None = None,
        restart: Restart | str = Restart.ON_FAILURE,
        persist: bool = False,
        checkpoint_every: int = 1,
        checkpoint_ms: float | None = None,
        state: bytes | None = None,
        mailbox_capacity: int | None = None,
    ) -> None:
        """Start agent ``agent_id`` running ``cls(*args, **kwargs)``.

        The instance is built here, so ``__init__`` errors reach the caller and no agent is
        left behind; ``on_start`` runs on the loop before the first message.

        Args:
            name: a second, user-facing key for ``ask``/``tell``; default: the id.
            restart: "permanent", "on-failure" or "temporary" (protocol 4).
            persist: checkpoint the agent (needs a checkpointer; protocol 5).
            checkpoint_every, checkpoint_ms: checkpoint after this many messages, or when
                the oldest un-checkpointed message is this old (besides when idle).
            state: an encoded ``Checkpoint`` to resume from (say, loaded from the journal
                after the worker died).
            mailbox_capacity: this agent's capacity; default: the host's.

        Raises:
            AgentError: the id or name is taken, the host is closed, persist without a
                checkpointer, a bad checkpoint.
            TypeError: ``cls`` is not an Agent subclass, or it subscribes without an
                ``on_message``.
            ValueError, TopicError: a bad policy, count or subscription pattern.
            Exception: whatever ``__init__`` or the state restore raised.
        """
        rec = self._new_record(agent_id, cls, args, kwargs, name, restart, mailbox_capacity)
        if persist:
            if self._checkpointer is None:
                raise AgentError("persist=True needs an AgentHost with a checkpointer")
            if checkpoint_every < 1 or (checkpoint_ms is not None and checkpoint_ms <= 0):
                raise ValueError("checkpoint_every must be >= 1 and checkpoint_ms > 0")
            interval_s = None if checkpoint_ms is None else checkpoint_ms / 1000.0
            rec.persist = _Persist(checkpoint_every, interval_s)
        patterns = tuple(cls.subscriptions)
        for pattern in patterns:
            split_pattern(pattern)
        if patterns and getattr(cls, "on_message", None) is None:
            raise TypeError(f"{cls.__qualname__} has subscriptions but no on_message")
        rec.instance = self._build(rec, state)
        self._agents[rec.id] = rec
        self._names[rec.name] = rec.id
        for pattern in patterns:
            self._topics.subscribe(pattern, rec.id)
        self._start(rec)
        log_event(_log, logging.DEBUG, "agent_spawned", id=rec.id, cls=cls.__qualname__)
        if events.agent_spawned:  # kernel/plugins.py: nothing is built unless one listens
            emit("agent_spawned", agent=rec.id, name=cls.__qualname__)

    def _new_record(
        self,
        agent_id: str,
        cls: type[Agent],
        args: tuple[object, ...],
        kwargs: Mapping[str, object] | None,
        name: str | None,
        restart: Restart | str,
        capacity: int | None,
    ) -> _Agent:
        if self._closed:
            raise AgentError("the agent host is closed")
        if not (isinstance(cls, type) and issubclass(cls, Agent)):
            raise TypeError(f"agents subclass astra.Agent; got {cls!r}")
        name = agent_id if name is None else name
        for key in (agent_id, name):
            if not isinstance(key, str) or not key:
                raise AgentError(f"agent ids and names are non-empty strings, not {key!r}")
        if agent_id in self._agents or agent_id in self._names:
            raise AgentError(f"an agent {agent_id!r} already runs here")
        if name != agent_id and (name in self._names or name in self._agents):
            raise AgentError(f"an agent named {name!r} already runs here")
        if capacity is not None and capacity < 1:
            raise ValueError(f"mailbox_capacity must be at least 1, not {capacity}")
        return _Agent(
            self,
            agent_id,
            name,
            cls,
            tuple(args),
            dict(kwargs) if kwargs else _NO_KWARGS,
            Restart(restart),
            capacity or self._capacity,
        )

    def _build(self, rec: _Agent, state: bytes | None) -> Agent:
        """A fresh instance of the agent's class, its context set before ``__init__`` runs,
        resumed from checkpoint ``state`` when given."""
        cls = rec.cls
        instance = (
            cls.__new__(cls)
            if cls.__new__ is object.__new__
            else cls.__new__(cls, *rec.args, **rec.kwargs)
        )
        instance._astra_ctx = rec
        cls.__init__(instance, *rec.args, **rec.kwargs)
        if state is not None:
            self._resume(rec, instance, state)
        return instance

    def _resume(self, rec: _Agent, instance: Agent, data: bytes) -> None:
        checkpoint = decode_checkpoint(data)
        _set_state(instance, checkpoint.state)
        rec.handled = checkpoint.handled
        p = rec.persist
        if p is not None:
            p.snapshot = data
            p.seq = checkpoint.seq
            p.seen = dict(checkpoint.seen)
            p.cache = {(r.sender, r.msg_id): r.result for r in checkpoint.replies if r.result}

    def _start(self, rec: _Agent) -> None:
        """Queue ``on_start`` first, if the class has one."""
        if rec.cls.on_start is not Agent.on_start:
            rec.mailbox.push_control(_Control.START, front=True)
            self._schedule(rec)

    # ---- Delivery (protocol 1) ----

    def _live(self, agent_id: str) -> _Agent:
        rec = self._agents.get(agent_id)
        if rec is None:
            raise AgentNotFoundError(f"no agent {agent_id!r} here")
        if rec.stopped is not None:
            raise AgentNotFoundError(f"agent {agent_id!r} is stopping")
        return rec

    def post(self, agent_id: str, msg: Message, now: bool = False) -> bool:
        """Queue ``msg`` for agent ``agent_id``; False if its mailbox is full (nothing was
        queued: wait with ``put``, or fail the ask with ``MailboxFullError``). The worker's
        entry point for messages from rings; arguments are not copied.

        ``now``: if the agent is idle (nothing queued, no handler running) and not
        persisted, handle ``msg`` on this stack, as the drain that queueing would schedule
        would, minus the trip through the loop's ready queue (a quarter of a worker's
        cost of an ask). An ``async def`` handler still continues in a task.

        Raises:
            AgentNotFoundError: no such agent, or it is stopping.
        """
        rec = self._agents.get(agent_id)
        if rec is None or rec.stopped is not None:
            rec = self._live(agent_id)  # raises
        # (mailbox._items, not len(mailbox): a call less on every message's path)
        if now and rec.state is AgentState.IDLE and rec.persist is None and not rec.mailbox._items:
            rec.state = AgentState.RUNNING
            if self._handle_message(rec, msg):
                if rec.mailbox._items:
                    self._drain(rec)  # what the handler queued (say, a restart's START)
                elif not rec.gone:
                    rec.state = AgentState.IDLE
            return True
        if not rec.mailbox.offer(msg):
            return False
        self._schedule(rec)
        return True

    async def put(self, agent_id: str, msg: Message) -> None:
        """Queue ``msg``, waiting while the mailbox is full (FIFO among waiters).

        Raises:
            AgentNotFoundError: no such agent, it is stopping, or it left while waiting.
        """
        rec = self._live(agent_id)
        if rec.mailbox.offer(msg):
            self._schedule(rec)
            return
        await rec.mailbox.put(msg)  # a full mailbox is being drained; it admits msg itself

    def ask(
        self,
        target: str,
        method: str,
        args: tuple[object, ...] = (),
        kwargs: Mapping[str, object] | None = None,
        *,
        sender: str = "",
        timeout: float | None = None,
    ) -> asyncio.Future[object]:
        """Call ``method`` on agent ``target`` (id or name; elsewhere through
        ``Outbox.deliver``) and return a future for the answer. Arguments to a local agent are
        copied. Errors (``AgentNotFoundError``, ``MailboxFullError``, the handler's
        exception, ``TimeoutError`` after ``timeout`` seconds, ...) are set on the future."""
        future: asyncio.Future[object] = self._loop.create_future()
        self._next_call += 1
        call_id = self._next_call
        self._pending[call_id] = future
        future.add_done_callback(lambda _: self._pending.pop(call_id, None))
        if timeout is not None:
            timer = self._loop.call_later(timeout, self._expire, call_id, timeout)
            future.add_done_callback(lambda _: timer.cancel())
        msg = Message(sender, method, args, kwargs or _NO_KWARGS, ReplyTo(self.origin, call_id))
        try:
            self._send(target, msg)
        except Exception as exc:  # AgentError, ShippingError, or the Outbox's own
            future.set_exception(exc)
        return future

    def tell(
        self,
        target: str,
        method: str,
        args: tuple[object, ...] = (),
        kwargs: Mapping[str, object] | None = None,
        *,
        sender: str = "",
    ) -> None:
        """Send ``method`` to ``target`` without an answer.

        Raises:
            AgentNotFoundError, MailboxFullError: the target is gone, or its mailbox full.
            ShippingError: an argument would not pickle.
        """
        self._send(target, Message(sender, method, args, kwargs or _NO_KWARGS))

    def _send(self, target: str, msg: Message) -> None:
        if msg.sender:  # an anonymous sender's ids could collide with another's: none
            msg = msgspec.structs.replace(msg, msg_id=self.new_msg_id())
        agent_id = self.lookup(target)
        if agent_id is None:
            self._outbox.deliver(target, msg)
            return
        rec = self._live(agent_id)
        if msg.args or msg.kwargs:
            copied = _isolate((msg.args, dict(msg.kwargs)))
            args, kwargs = cast("tuple[tuple[object, ...], dict[str, object]]", copied)
            msg = msgspec.structs.replace(msg, args=args, kwargs=kwargs)
        if not rec.mailbox.offer(msg):
            raise MailboxFullError(
                f"the mailbox of agent {agent_id!r} is full ({rec.mailbox.capacity} messages)"
            )
        self._schedule(rec)

    def publish(self, topic: str, payload: object, *, sender: str = "") -> int:
        """Deliver an event to this host's subscribers of matching patterns (each gets its
        own copy); returns how many took it. Mailboxes that are full drop it (counted in
        ``dropped`` and logged). The worker calls this for events from other hosts.

        Raises:
            TopicError: malformed topic.
            ShippingError: the payload would not pickle.
        """
        subscribers = self._topics.match(topic)
        if not subscribers:
            return 0
        shared = _immutable(payload)
        data = b"" if shared else shipping.dumps(payload)
        delivered = 0
        for agent_id in subscribers:
            rec = self._agents.get(agent_id)
            if rec is None or rec.stopped is not None:
                continue
            value = payload if shared else shipping.loads(data)
            if rec.mailbox.offer(Message(sender, args=(value,), topic=topic)):
                self._schedule(rec)
                delivered += 1
            else:
                rec.dropped += 1
                log_event(_log, logging.WARNING, "event_dropped", id=agent_id, topic=topic)
        return delivered

    def resolve(self, call_id: int, ok: bool, payload: object) -> bool:
        """Complete an ask this host sent elsewhere (the worker calls this with the reply);
        ``payload`` is the result, or the exception when not ``ok``. Returns False if the
        ask is no longer waiting (it timed out or was cancelled)."""
        future = self._pending.pop(call_id, None)
        if future is None or future.done():
            return False
        if ok:
            future.set_result(payload)
        elif isinstance(payload, BaseException):
            future.set_exception(payload)
        else:
            future.set_exception(AgentError(f"the ask failed: {payload!r}"))
        return True

    def _expire(self, call_id: int, timeout: float) -> None:
        future = self._pending.pop(call_id, None)
        if future is not None and not future.done():
            future.set_exception(TimeoutError(f"no reply within {timeout} s"))

    def _reply(self, to: ReplyTo, ok: bool, value: object) -> None:
        """Answer an ask: locally (copying the value) or through the Outbox (protocol 3)."""
        if to.origin != self.origin:
            try:
                self._outbox.reply(to, ok, value)
            except Exception:
                _log.exception("reply to %s failed and is lost", to)
            return
        if ok:
            try:
                value = _isolate(value)
            except shipping.ShippingError as exc:
                ok, value = False, exc
        self.resolve(to.call_id, ok, value)

    # ---- Handling (protocol 2) ----

    def _schedule(self, rec: _Agent) -> None:
        if rec.state is AgentState.IDLE:
            rec.state = AgentState.RUNNING
            self._loop.call_soon(self._drain, rec)

    def _drain(self, rec: _Agent) -> None:
        """Handle up to DRAIN_BATCH items of ``rec``'s mailbox, then yield the loop."""
        for _ in range(DRAIN_BATCH):
            if rec.gone:
                return
            item = rec.mailbox.take()
            if item is None:
                p = rec.persist
                if p is not None and p.since and not self._checkpoint(rec):
                    continue  # the checkpoint crashed the agent; go on with what is queued
                rec.state = AgentState.IDLE
                return
            if not self._handle(rec, item):
                return  # an async handler took over, or the agent left
        self._loop.call_soon(self._drain, rec)

    def _handle(self, rec: _Agent, item: _Item) -> bool:
        """Run one item; True to go on draining synchronously."""
        if item is _Control.START:
            assert rec.instance is not None
            return self._invoke(rec, item, rec.instance.on_start)
        if item is _Control.STOP:
            assert rec.instance is not None
            return self._stop_now(rec, rec.instance)
        assert isinstance(item, Message)
        return self._handle_message(rec, item)

    def _handle_message(self, rec: _Agent, msg: Message) -> bool:
        """Run one message (``_handle``'s common case, which ``post(now=True)`` calls
        directly); True to go on draining synchronously."""
        instance = rec.instance
        assert instance is not None
        p = rec.persist
        if p is not None and msg.msg_id and msg.msg_id <= p.seen.get(msg.sender, 0):
            self._duplicate(rec, msg)
            return True
        if msg.topic:
            on_message = instance.on_message  # type: ignore[attr-defined]
            return self._invoke(rec, msg, on_message, (msg.topic, *msg.args))
        handlers = rec.handlers
        if handlers is None:  # the class's, looked up once per class and once per agent
            handlers = self._handlers.get(rec.cls)
            if handlers is None:
                handlers = self._handlers[rec.cls] = _handler_names(rec.cls)
            rec.handlers = handlers
        if msg.method not in handlers:
            error = UnknownMethodError(f"{rec.cls.__qualname__} has no method {msg.method!r}")
            self._refuse(rec, msg, error)
            return True
        method = getattr(instance, msg.method)
        return self._invoke(rec, msg, method, msg.args, msg.kwargs)

    def _invoke(  # type: ignore[explicit-any]
        self,
        rec: _Agent,
        item: Message | _Control,
        call: Callable[..., object],
        args: tuple[object, ...] = (),
        kwargs: Mapping[str, object] = _NO_KWARGS,
    ) -> bool:
        """Call a handler or a hook (``call(*args, **kwargs)``, so that a ``TypeError`` for
        arguments that do not fit is raised with no frame below this one); an ``async def``
        one continues in a task."""
        try:
            result = call(*args, **kwargs)
        except AgentExit:
            self._exited(rec, item)
            return not rec.gone
        except TypeError as exc:
            tb = exc.__traceback__
            if isinstance(item, Message) and tb is not None and tb.tb_next is None:
                # Raised by the call itself, with no frame of the handler: the arguments do
                # not fit its signature. The caller's mistake: fail the ask, keep the agent.
                self._refuse(rec, item, exc)
                return True
            self._crashed(rec, item, exc)
            return not rec.gone
        except Exception as exc:
            self._crashed(rec, item, exc)
            return not rec.gone
        if isinstance(result, types.CoroutineType):  # inspect.iscoroutine, minus a call
            return self._await(rec, item, result)
        self._finished(rec, item, result)
        return not rec.gone

    def _await(
        self, rec: _Agent, item: Message | _Control, coro: Coroutine[object, object, object]
    ) -> bool:
        """Run an ``async def`` handler's coroutine as a task; ``_awaited`` takes its end."""
        p = rec.persist
        if p is not None and p.since and not self._checkpoint(rec):
            coro.close()  # the agent crashed (and restarted): this call never started
            if isinstance(item, Message) and item.reply_to is not None:
                error = AgentCrashedError(f"agent {rec.id!r} crashed before handling this call")
                self._reply(item.reply_to, False, error)
            return not rec.gone
        rec.state = AgentState.WAITING
        rec.current = item if isinstance(item, Message) else None
        # The coroutine itself is the task (no wrapper), so a kill before its first step
        # still closes it; its outcome is read in a done callback.
        task = self._loop.create_task(coro)
        rec.task = task
        task.add_done_callback(functools.partial(self._awaited, rec, item))
        return False

    def _awaited(self, rec: _Agent, item: Message | _Control, task: asyncio.Task[object]) -> None:
        if rec.task is task:
            rec.task = None
            rec.current = None
        # Once the agent is gone (killed, closed) _remove has answered the call: whatever
        # the coroutine did after its cancellation is ignored (but read, so asyncio does
        # not log it as never retrieved).
        error = None if task.cancelled() else task.exception()
        if rec.gone:
            return
        if task.cancelled():
            self._crashed(rec, item, AgentCrashedError("the handler was cancelled"))
        elif isinstance(error, AgentExit):
            self._exited(rec, item)
        elif error is not None:
            self._crashed(rec, item, error)
        else:
            self._finished(rec, item, task.result())
        if not rec.gone:
            rec.state = AgentState.RUNNING
            self._drain(rec)

    def _finished(self, rec: _Agent, item: Message | _Control, result: object) -> None:
        """A handler returned: count it, answer (or hold the answer), maybe checkpoint."""
        if item is _Control.STOP:
            self._remove(rec, ExitReason.STOPPED, None)
            return
        if not isinstance(item, Message):
            return  # on_start
        rec.handled += 1
        self.handled_total += 1
        p = rec.persist
        if p is None:
            if item.reply_to is not None:
                self._reply(item.reply_to, True, result)
            return
        if item.msg_id:
            p.seen.pop(item.sender, None)  # re-insert: the dict's order is least recent first
            p.seen[item.sender] = item.msg_id
            if len(p.seen) > MAX_SEEN_SENDERS:
                del p.seen[next(iter(p.seen))]
        if p.since == 0 and p.interval_s is not None:
            p.dirty_at = self._clock()
        p.since += 1
        if item.reply_to is not None:
            p.held.append((item, result))
        if p.since >= p.every or (
            p.interval_s is not None and self._clock() - p.dirty_at >= p.interval_s
        ):
            self._checkpoint(rec)

    def _refuse(self, rec: _Agent, msg: Message, error: Exception) -> None:
        """Fail a message the agent cannot take; the agent itself is fine."""
        if msg.reply_to is not None:
            self._reply(msg.reply_to, False, error)
        else:
            log_event(_log, logging.WARNING, "tell_refused", id=rec.id, error=str(error))

    def _duplicate(self, rec: _Agent, msg: Message) -> None:
        """A re-sent message the checkpoint says was handled (module doc)."""
        p = rec.persist
        assert p is not None
        log_event(_log, logging.INFO, "duplicate_dropped", id=rec.id, sender=msg.sender)
        if msg.reply_to is None:
            return
        cached = p.cache.pop((msg.sender, msg.msg_id), None)
        if cached is not None:
            try:
                self._reply(msg.reply_to, True, shipping.loads(cached))
                return
            except shipping.ShippingError:
                pass
        error = DuplicateMessageError(
            f"agent {rec.id!r} already handled message {msg.msg_id} of {msg.sender!r} "
            f"before a restart; its reply is no longer cached"
        )
        self._reply(msg.reply_to, False, error)

    # ---- Checkpoints (protocol 5) ----

    def _checkpoint(self, rec: _Agent) -> bool:
        """Write a checkpoint and release the replies it covers; False if that crashed the
        agent (then handled as a crash)."""
        p = rec.persist
        assert p is not None
        assert rec.instance is not None
        assert self._checkpointer is not None
        try:
            replies = tuple(
                CachedReply(msg.sender, msg.msg_id, _pickle_or_empty(value))
                for msg, value in p.held
                if msg.msg_id
            )
            checkpoint = Checkpoint(
                version=CHECKPOINT_VERSION,
                agent_id=rec.id,
                seq=p.seq + 1,
                handled=rec.handled,
                state=_state_of(rec.instance),
                seen=p.seen,
                replies=replies,
            )
            data = _encoder.encode(checkpoint)
            self._checkpointer.checkpoint(rec.id, data)
        except Exception as exc:
            self._crashed(rec, None, exc)
            return False
        p.seq += 1
        p.snapshot = data
        p.since = 0
        held, p.held = p.held, []
        for msg, value in held:
            assert msg.reply_to is not None
            self._reply(msg.reply_to, True, value)
        return True

    # ---- Crash and restart (protocol 4) ----

    def _crashed(
        self,
        rec: _Agent,
        item: Message | _Control | None,
        error: BaseException,
    ) -> None:
        """A handler, hook or checkpoint raised ``error``: answer, roll back, restart or
        remove per policy."""
        asked = isinstance(item, Message) and item.reply_to is not None
        log_event(
            _log,
            logging.WARNING,
            "agent_crashed",
            id=rec.id,
            cls=rec.cls.__qualname__,
            error=f"{type(error).__qualname__}: {error}",
            # An ask carries the traceback to its caller; anything else leaves it here.
            traceback="" if asked else "".join(traceback.format_exception(error)),
        )
        if asked:
            assert isinstance(item, Message)
            assert item.reply_to is not None
            self._reply(item.reply_to, False, error)
        self._roll_back(rec, error)
        if item is _Control.STOP:
            self._remove(rec, ExitReason.STOPPED, error)
        elif rec.restart is Restart.TEMPORARY:
            self._remove(rec, ExitReason.CRASHED, error)
        else:
            self._restart(rec, error)

    def _roll_back(self, rec: _Agent, error: BaseException) -> None:
        """Fail the asks whose replies waited for a checkpoint that will not come."""
        p = rec.persist
        if p is None:
            return
        held, p.held, p.since = p.held, [], 0
        for msg, _ in held:
            assert msg.reply_to is not None
            failure = AgentCrashedError(
                f"agent {rec.id!r} failed before checkpointing this call ({error}); its "
                f"effects were rolled back"
            )
            failure.__cause__ = error
            self._reply(msg.reply_to, False, failure)

    def _exited(self, rec: _Agent, item: Message | _Control) -> None:
        """The agent called exit(): a normal end; restarted only if permanent."""
        instance = rec.instance
        if isinstance(item, Message):
            self._finished(rec, item, None)
            if rec.gone or rec.instance is not instance:
                return  # its checkpoint failed: handled as a crash
        p = rec.persist
        if p is not None and p.since and not self._checkpoint(rec):
            return  # that was a crash after all, handled as one
        if item is _Control.STOP:
            self._remove(rec, ExitReason.STOPPED, None)
        elif rec.restart is Restart.PERMANENT:
            self._restart(rec, None)
        else:
            self._remove(rec, ExitReason.EXITED, None)

    def _restart(self, rec: _Agent, error: BaseException | None) -> None:
        """Replace the instance, within the restart intensity; else remove the agent."""
        p = rec.persist
        while True:
            if not self._may_restart(rec):
                log_event(
                    _log,
                    logging.ERROR,
                    "agent_restart_limit",
                    id=rec.id,
                    restarts=f"{self._max_restarts}/{self._within_s}s",
                )
                self._remove(rec, ExitReason.RESTART_LIMIT, error)
                return
            rec.restarts += 1
            self.restarts_total += 1
            try:
                rec.instance = self._build(rec, p.snapshot if p is not None else None)
            except Exception as exc:  # __init__ or the restore failed: that counts too
                log_event(_log, logging.WARNING, "agent_restart_failed", id=rec.id, error=repr(exc))
                error = exc
                continue
            break
        if p is not None and p.snapshot is None:
            p.seen = {}  # nothing was checkpointed: forget what the lost instance handled
        self._topics.unsubscribe_all(rec.id)
        for pattern in rec.cls.subscriptions:
            self._topics.subscribe(pattern, rec.id)
        log_event(_log, logging.INFO, "agent_restarted", id=rec.id, restarts=rec.restarts)
        if events.agent_restarted:
            detail = "" if error is None else type(error).__name__
            emit("agent_restarted", agent=rec.id, name=rec.cls.__qualname__, detail=detail)
        self._start(rec)

    def _may_restart(self, rec: _Agent) -> bool:
        now = self._clock()
        times = rec.restart_times
        if times is None:
            times = rec.restart_times = collections.deque()
        times.append(now)
        while times and now - times[0] > self._within_s:
            times.popleft()
        return len(times) <= self._max_restarts

    # ---- Stop, kill, close ----

    def stop(self, agent_id: str) -> asyncio.Future[None]:
        """Stop an agent gracefully: it handles what is queued, runs ``on_stop``, writes a
        final checkpoint (persist=True) and leaves; new messages are refused at once.
        Returns a future done when it has left. Never restarts it.

        Raises:
            AgentNotFoundError: no such agent (an agent already stopping returns its future).
        """
        rec = self._agents.get(agent_id)
        if rec is None:
            raise AgentNotFoundError(f"no agent {agent_id!r} here")
        if rec.stopped is None:
            rec.stopped = self._loop.create_future()
            rec.mailbox.push_control(_Control.STOP)
            self._schedule(rec)
        return rec.stopped

    def _stop_now(self, rec: _Agent, instance: Agent) -> bool:
        p = rec.persist
        if p is not None and p.since and not self._checkpoint(rec):
            if not rec.gone:  # it was restarted: stop the new instance instead
                rec.mailbox.push_control(_Control.STOP)
            return not rec.gone
        if rec.cls.on_stop is Agent.on_stop:
            self._remove(rec, ExitReason.STOPPED, None)
            return False
        return self._invoke(rec, _Control.STOP, instance.on_stop)

    def kill(self, agent_id: str) -> None:
        """Remove an agent at once: an async handler in progress is cancelled, its ask and
        every queued ask fail with ``AgentCrashedError``; ``on_stop`` does not run. Never
        restarts it.

        Raises:
            AgentNotFoundError: no such agent.
        """
        rec = self._agents.get(agent_id)
        if rec is None:
            raise AgentNotFoundError(f"no agent {agent_id!r} here")
        self._remove(rec, ExitReason.KILLED, None)

    def _remove(self, rec: _Agent, reason: ExitReason, error: BaseException | None) -> None:
        """Take the agent off the host for good and answer everything it still owed."""
        if rec.gone:
            return
        rec.gone = True
        del self._agents[rec.id]
        if self._names.get(rec.name) == rec.id:
            del self._names[rec.name]
        self._topics.unsubscribe_all(rec.id)
        gone_error: AgentError
        if reason in (ExitReason.STOPPED, ExitReason.EXITED):
            gone_error = AgentNotFoundError(f"agent {rec.id!r} {reason.value}")
        else:
            gone_error = AgentCrashedError(f"agent {rec.id!r} {reason.value}")
            gone_error.__cause__ = error
        owed = rec.mailbox.close(AgentNotFoundError(f"agent {rec.id!r} {reason.value}"))
        if rec.current is not None:
            owed.insert(0, rec.current)
        for item in owed:
            if isinstance(item, Message) and item.reply_to is not None:
                self._reply(item.reply_to, False, gone_error)
        if rec.persist is not None:
            self._roll_back(rec, gone_error)
        task, rec.task, rec.current = rec.task, None, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        rec.instance = None
        rec.state = AgentState.IDLE
        if rec.stopped is not None and not rec.stopped.done():
            rec.stopped.set_result(None)
        level = (
            logging.INFO if reason in (ExitReason.STOPPED, ExitReason.CLOSED) else logging.WARNING
        )
        log_event(_log, level, "agent_exited", id=rec.id, reason=reason.value)
        if events.agent_stopped:
            emit("agent_stopped", agent=rec.id, name=rec.cls.__qualname__, detail=reason.value)
        try:
            self._outbox.agent_exited(rec.id, reason, error)
        except Exception:
            _log.exception("agent_exited report for %s failed", rec.id)

    async def aclose(self) -> None:
        """Remove every agent (reason ``CLOSED``; their asks fail), wait for cancelled
        handlers to unwind, and fail asks still waiting for a reply. Idempotent."""
        self._closed = True
        tasks = [rec.task for rec in self._agents.values() if rec.task is not None]
        for rec in list(self._agents.values()):
            self._remove(rec, ExitReason.CLOSED, None)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(AgentError("the agent host closed"))
        self._pending.clear()

    # ---- Introspection ----

    def stats(self) -> list[AgentStats]:
        """One row per live agent, in spawn order."""
        return [
            AgentStats(
                id=rec.id,
                name=rec.name,
                cls=rec.cls.__qualname__,
                mailbox=len(rec.mailbox),
                handled=rec.handled,
                state=rec.state,
                restarts=rec.restarts,
                dropped=rec.dropped,
                persist=rec.persist is not None,
            )
            for rec in self._agents.values()
        ]

    def subscriptions(self, agent_id: str) -> frozenset[str]:
        """The patterns agent ``agent_id`` is subscribed to."""
        return self._topics.patterns(agent_id)


def _pickle_or_empty(value: object) -> bytes:
    try:
        return shipping.dumps(value)
    except shipping.ShippingError:
        return b""  # a duplicate of this ask gets DuplicateMessageError instead


# ---- Checkpoints in the journal ----


class JournalCheckpointer:
    """A ``Checkpointer`` over ``kernel.journal``: table ``agents``, key the agent id in
    UTF-8, value the encoded ``Checkpoint``. Durable per the journal's ``sync`` setting.
    Its methods raise ``JournalError`` (``JournalFullError`` when full)."""

    def __init__(self, journal: Journal, table: str = CHECKPOINT_TABLE) -> None:
        self._table = journal.table(table)

    def checkpoint(self, agent_id: str, data: bytes) -> None:
        """Store the agent's latest checkpoint (replacing the previous one)."""
        self._table.put(agent_id.encode(), data)

    def load(self, agent_id: str) -> bytes | None:
        """The latest checkpoint of ``agent_id`` (for ``AgentHost.spawn(state=...)``)."""
        return self._table.get(agent_id.encode())

    def load_checkpoint(self, agent_id: str) -> Checkpoint | None:
        """The latest checkpoint, decoded. Raises ``AgentError`` if it does not decode."""
        data = self.load(agent_id)
        return None if data is None else decode_checkpoint(data)

    def discard(self, agent_id: str) -> bool:
        """Forget the agent's checkpoint; returns whether there was one."""
        return self._table.delete(agent_id.encode())

    def agent_ids(self) -> list[str]:
        """Ids of the agents with a checkpoint, sorted."""
        return [key.decode() for key, _ in self._table.scan()]
