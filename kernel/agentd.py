"""Agents in a worker: the glue between the rings and ``kernel.actors.AgentHost``.

Each worker runs one ``AgentHost`` on its asyncio loop (the one ``async def`` tasks use),
a ``kernel.sharedloop.SharedLoop``. The worker's main thread reads ``SpawnAgent``,
``AgentCall``, ``AgentReply`` and ``StopAgent`` frames from its inbox, a batch at a time, in
arrival order, so the messages of one sender reach an agent's mailbox in the order sent.
When the loop is idle the main thread borrows it and runs the batch and the handlers it
makes ready itself, holding the replies to each client for one ring write at the end (an
ask then costs no thread wake-up); when the loop is busy it hands the batch over
(``call_soon_threadsafe``). Either way everything below runs with the loop held, one
callback at a time; ``AgentService`` is the host's ``Outbox`` and ``Checkpointer``.

Addresses. An agent's name is its id, unique per kernel instance through the shared
registry (kernel/registry.py, opened through the router of kernel/plugins.py protocol 7):
a client or an agent claims the name before the spawn, the worker frees it when the agent
stops for good, the supervisor frees the names of a dead worker. Who waits for an answer
is an *origin code*: a worker's index (>= 0), or ``client_origin(slot, generation)`` (< 0)
for a client.

Backpressure. A message for a full mailbox waits in the worker, in one FIFO per agent
(first come first served, so per-sender order holds), for the ask's ``timeout_s`` (a tell:
``TELL_WAIT_S``), then an ask fails with ``MailboxFullError``; a tell that still finds no
room is dropped and logged (``tell_dropped``), as its sender asked for no answer. Only the
FIFO's head waits on a timer: a message whose deadline passes behind it fails when it
reaches the head, so its failure may come later than its timeout, never its delivery.

Failure. An agent's handler error fails that ask and restarts the agent per its policy
(kernel/actors.py). Each live agent's spawn spec is kept in the runtime journal
(``RUNTIME_JOURNAL``). When a worker dies, the supervisor restarts its agents on the other
workers (round robin; on its replacement if it is the only one): it moves each name in the
registry and sends the new worker the agent's ``SpawnAgent``, which resumes a persisted
agent from its last checkpoint; ``temporary`` agents are not restarted and their names are
freed. Clients fail the asks that were waiting on the dead worker with
``AgentCrashedError``: at most once without ``persist`` (see kernel/actors.py for what
``persist`` adds).
"""

from __future__ import annotations

__all__ = [
    "RUNTIME_JOURNAL",
    "SPECS_TABLE",
    "TELL_WAIT_S",
    "AgentService",
    "AgentSpec",
    "client_origin",
    "decode_origin",
    "decode_spec",
    "encode_spec",
]

import asyncio
import collections
import contextlib
import functools
import logging
import os
import pickle
import weakref
from typing import TYPE_CHECKING, Final, cast

import msgspec

from ipc import IPCError

from . import plugins, shipping
from .actors import (
    AgentError,
    AgentHost,
    AgentNotFoundError,
    ExitReason,
    MailboxFullError,
    Message,
    ReplyTo,
    SpawnSpec,
)
from .journal import Journal, Table
from .kmetrics import AGENT_SAMPLE_S, AGENT_STATES
from .logs import log_event
from .messages import (
    MAX_REPLY_BYTES,
    AgentCall,
    AgentCalls,
    AgentReply,
    ListAgents,
    SpawnAgent,
    StopAgent,
    encode,
    encode_queue,
)
from .tools import CapabilityError, ToolSpec, refuse, run_tool

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ipc import Arena, ArrayRef

    from .actors import Agent
    from .plugins import Names
    from .sharedloop import SharedLoop
    from .worker import Worker

_Args = tuple[tuple[object, ...], dict[str, object]]
#: Messages for a full mailbox: (message, its frame, deadline on the loop's clock, timeout).
_Overflow = collections.deque[tuple["Message", "AgentCall", float, float]]
_OneFrame = SpawnAgent | AgentCall | AgentReply | StopAgent | ListAgents
AgentFrame = _OneFrame | AgentCalls
#: Replies held for one client: answers not yet encoded (they go as one ``AgentReplies``
#: frame) and frames already encoded, in order.
_Held = dict[tuple[int, int], list[bytes | AgentReply]]

#: How long a tell waits for room in a full mailbox before it is dropped (and logged).
TELL_WAIT_S: Final = float(os.getenv("ASTRA_TELL_WAIT_S", "5.0"))
#: A message for an agent registered here but not started yet (being restarted) is tried
#: again this often, this many times, before ``AgentNotFoundError``.
RESTART_WAIT_S: Final = 0.01
RESTART_WAIT_TRIES: Final = 200
#: How long an ask with no timeout waits for room in a full mailbox.
ASK_WAIT_S: Final = float(os.getenv("ASTRA_ASK_WAIT_S", "30.0"))

#: The journal (under the kernel's data dir, not synced: it describes this run only) and
#: table of the live agents' spawn specs, by name.
RUNTIME_JOURNAL: Final = "agents-runtime"
SPECS_TABLE: Final = "specs"

_log = logging.getLogger("astra.agents")


class AgentSpec(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """How to start an agent again: what its ``SpawnAgent`` carried."""

    cls: bytes
    args: bytes
    restart: str
    persist: bool
    mailbox: int
    tools: bytes = b""
    grants: dict[str, list[str]] = {}  # plugin -> what the agent was granted (SpawnAgent)


_spec_encoder: Final = msgspec.msgpack.Encoder()
_spec_decoder: Final = msgspec.msgpack.Decoder(AgentSpec)


def encode_spec(spec: AgentSpec) -> bytes:
    return _spec_encoder.encode(spec)


def decode_spec(data: bytes) -> AgentSpec:
    return _spec_decoder.decode(data)


def client_origin(slot: int, generation: int) -> int:
    """The origin code of client ``slot`` (of that claim ``generation``)."""
    return -1 - ((generation << 16) | slot)


def decode_origin(origin: int) -> tuple[int, int, int]:
    """(worker index, client slot, client generation): the worker is -1 for a client."""
    if origin >= 0:
        return origin, -1, 0
    code = -1 - origin
    return -1, code & 0xFFFF, code >> 16


def pack_reply(call_id: int, ok: bool, value: object) -> bytes:
    """An encoded ``AgentReply``: ``value`` is the result, or the exception if not ``ok``."""
    if ok:
        try:
            return encode(AgentReply(call_id, True, _result_bytes(value)))
        except shipping.ShippingError as exc:
            ok, value = False, exc
    assert isinstance(value, BaseException)
    data, tb, text = shipping.pack_exception(value)
    return encode(AgentReply(call_id, False, data, tb, text))


def _result_bytes(value: object) -> bytes:
    """``value`` pickled for a reply. Raises ``ShippingError`` (also when it is larger than
    ``MAX_REPLY_BYTES``: too large for a ring frame)."""
    data = shipping.dumps(value)
    if len(data) > MAX_REPLY_BYTES:
        raise shipping.ShippingError(
            f"the answer is {len(data)} B, over the {MAX_REPLY_BYTES} B a reply may carry: "
            "return large numpy arrays (they travel through the arena) or less"
        )
    return data


class AgentService:
    """One worker's agents (see the module docstring). Built by the worker on first use."""

    def __init__(self, worker: Worker, shared: SharedLoop) -> None:
        self._worker = worker
        self._shared = shared
        self._loop = shared.loop
        # Replies to clients held back while the main thread runs a batch on the borrowed
        # loop, to go one ring write per client: (slot, generation) -> frames.
        self._held: _Held | None = None
        self._overflow: dict[str, _Overflow] = {}  # agent -> messages waiting for room
        self._clients: dict[int, tuple[int, int]] = {}  # origin -> (slot, generation)
        self._counted = (0, 0)  # (handled_total, restarts_total) already in the metrics row
        self.index = worker.index
        self._registry: Names | None = None  # from this process's router (kernel/plugins.py)
        self._journals: dict[str, Journal] = {}
        self._journal_of: dict[str, Journal] = {}  # agent -> the journal of its checkpoints
        self._host: AgentHost | None = None
        self._names = 0
        self._grants: dict[str, dict[str, ToolSpec]] = {}  # agent -> the tools it may call
        # agent -> plugin -> what it was granted for that plugin (kernel/plugins.py), and the
        # agent APIs made for it: agent -> plugin -> the plugin's object (``self.plugin``)
        self._plugin_grants: dict[str, dict[str, tuple[str, ...]]] = {}
        self._plugin_apis: dict[str, dict[str, object]] = {}
        # Last: the loop thread may run it at once, and it reads the fields above.
        self._loop.call_soon_threadsafe(self._sample)

    # ---- From the worker's main thread ----

    def on_frames(self, msgs: list[AgentFrame], *, here: bool) -> None:
        """Handle frames read from the ring. ``here`` (the worker's main thread): run them on
        this thread when the loop is idle, saving the hop to the loop thread (a thread
        wake-up, most of an ask's latency); else, or if the loop is busy, hand them over."""
        if here:
            with self._shared.borrow() as held:
                if held:
                    if self._held is None:  # else a flush is already scheduled: join it
                        self._held = {}
                    try:
                        # Behind whatever is ready already (a batch the steal responder
                        # handed over, waiters for mailbox room): per-sender order holds.
                        self._loop.call_soon(self._dispatch_all, msgs)
                        self._shared.run_ready()  # it, and the handlers it makes ready
                    finally:
                        self._release_held()
                    return
        self._loop.call_soon_threadsafe(self._dispatch_all, msgs)

    def _release_held(self) -> None:
        held, self._held = self._held, None
        if held:
            self._send_held(held)

    def _send_held(self, held: _Held) -> None:
        for (slot, generation), items in held.items():
            try:
                self._worker.send_to_client(slot, generation, encode_queue(items))
            except Exception:  # one client's failure must not drop the others' replies
                log_event(_log, logging.ERROR, "replies_lost", client=slot, exc_info=True)

    def _dispatch_all(self, msgs: list[AgentFrame]) -> None:
        # On the loop thread, the answers of the handlers run here go when the batch is done,
        # not behind whatever else this loop pass runs (a slow handler of another agent).
        release = self._held is None  # (a borrowing thread set it: it releases them itself)
        try:
            self._dispatch_each(msgs)
        finally:
            if release:
                self._release_held()

    def _dispatch_each(self, msgs: list[AgentFrame]) -> None:
        for msg in msgs:
            if isinstance(msg, AgentCalls):  # a client's batch: the common case, written out
                for call in msg.calls:
                    try:
                        self._call(call)
                    except Exception:  # a bug here must not take the loop down
                        log_event(_log, logging.ERROR, "agent_message_failed",
                                  kind="AgentCall", exc_info=True)  # fmt: skip
            else:
                self._dispatch(msg)

    def close(self) -> None:
        """Main thread, after the loop stopped: send the answers still held, close journals
        and the registry."""
        self._release_held()
        for journal in self._journals.values():
            journal.close()
        if self._registry is not None:
            self._registry.close()

    # ---- On the loop thread ----

    def _sample(self) -> None:
        """Agents by state, mailbox depth, messages and restarts into this worker's metrics
        row (kernel/kmetrics.py); again every ``AGENT_SAMPLE_S``."""
        row = self._worker.metrics
        if row is None or self._loop.is_closed():
            return
        try:
            counts = dict.fromkeys(AGENT_STATES, 0)
            mailbox = 0
            host = self._host
            stats = host.stats() if host is not None else []
            for st in stats:
                counts[st.state.value] += 1
                mailbox += st.mailbox
            handled = host.handled_total if host is not None else 0
            restarts = host.restarts_total if host is not None else 0
            with self._worker.metrics_lock:
                for state, n in counts.items():
                    row.set(f"agents_{state}", n)
                row.set("agent_mailbox", mailbox)
                row.inc("agent_messages", handled - self._counted[0])
                row.inc("agent_restarts", restarts - self._counted[1])
            self._counted = (handled, restarts)
        finally:
            self._loop.call_later(AGENT_SAMPLE_S, self._sample)

    @property
    def host(self) -> AgentHost:
        if self._host is None:
            self._host = AgentHost(self, checkpointer=self, origin=self.index, loop=self._loop)
        return self._host

    @property
    def registry(self) -> Names:
        if self._registry is None:
            self._registry = plugins.router().names(self._worker.instance)
        return self._registry

    def _dispatch(self, msg: _OneFrame) -> None:
        try:
            if isinstance(msg, AgentCall):
                self._call(msg)
            elif isinstance(msg, AgentReply):
                self._resolve(msg)
            elif isinstance(msg, SpawnAgent):
                self._spawn(msg)
            elif isinstance(msg, ListAgents):
                self._send_to(msg.reply_to, pack_reply(msg.call_id, True, self.stats()))
            else:
                self._stop(msg)
        except Exception:  # a bug here must not take the loop down
            log_event(
                _log, logging.ERROR, "agent_message_failed", kind=type(msg).__name__, exc_info=True
            )

    def _spawn(self, msg: SpawnAgent) -> None:
        try:
            cls = cast("type[Agent]", shipping.loads(msg.cls))
            args, kwargs = cast("_Args", shipping.loads(msg.args))
            if msg.persist:
                self._journal_of[msg.name] = self._journal()
            if msg.grants:  # before __init__, which may use them
                self._plugin_grants[msg.name] = {p: tuple(v) for p, v in msg.grants.items()}
            self.host.spawn(
                msg.name, cls, args, kwargs, restart=msg.restart, persist=msg.persist,
                mailbox_capacity=msg.mailbox or None,
                state=self._checkpoint_of(msg.name) if msg.persist else None,
            )  # fmt: skip
            if msg.tools:
                self._grants[msg.name] = cast("dict[str, ToolSpec]", shipping.loads(msg.tools))
            spec = AgentSpec(
                msg.cls, msg.args, msg.restart, msg.persist, msg.mailbox, msg.tools, msg.grants
            )
            self._specs().put(msg.name.encode(), encode_spec(spec))
        except Exception as exc:
            self._journal_of.pop(msg.name, None)
            self._plugin_grants.pop(msg.name, None)
            self.registry.release(msg.name, worker=self.index)
            if msg.call_id:
                self._send_to(msg.reply_to, pack_reply(msg.call_id, False, exc))
            else:  # a restart after a worker death: nobody waits
                log_event(
                    _log, logging.ERROR, "agent_restart_failed", agent=msg.name, error=repr(exc)
                )
            return
        if msg.call_id:
            self._send_to(msg.reply_to, pack_reply(msg.call_id, True, msg.name))

    def _call(self, msg: AgentCall, attempt: int = 0) -> None:
        host = self._host if self._host is not None else self.host
        if msg.topic:
            host.publish(msg.topic, shipping.loads(msg.args), sender=msg.sender)
            return
        agent_id = host.lookup(msg.target)
        if agent_id is None:
            # The sender's idea of where the agent lives is stale (it restarted elsewhere):
            # pass the message on to the worker the registry names.
            worker = self.registry.lookup(msg.target)
            if (
                worker >= 0
                and worker != self.index
                and self._worker.send_to_worker(worker, encode(msg))
            ):
                return
            if worker == self.index and attempt < RESTART_WAIT_TRIES:
                # Registered here, not started yet: the supervisor's SpawnAgent restarting it
                # (after its worker died) is on its way, on another lane of our ring.
                self._loop.call_later(RESTART_WAIT_S, self._call, msg, attempt + 1)
                return
            self._refuse(msg, AgentNotFoundError(f"no agent named {msg.target!r}"))
            return
        args: tuple[object, ...]
        kwargs: dict[str, object]
        try:
            if msg.refs:
                args, kwargs = shipping.loads_refs(msg.args, self._view)  # type: ignore[misc]
            else:  # pickle itself: shipping.loads, minus a call on every message's path
                args, kwargs = pickle.loads(msg.args)
        except shipping.ShippingError as exc:
            self._refuse(msg, exc)
            return
        except Exception as exc:
            self._refuse(msg, shipping.ShippingError(f"cannot unpickle the arguments: {exc!r}"))
            return
        reply_to = ReplyTo(msg.reply_to, msg.call_id) if msg.ask else None
        message = Message(msg.sender, msg.method, args, kwargs, reply_to, msg.msg_id)
        waiting = self._overflow.get(agent_id)
        if waiting is None:
            try:
                if host.post(agent_id, message, True):  # now: an idle agent runs it here
                    return
            except AgentError as exc:
                self._refuse(msg, exc)
                return
            waiting = self._overflow[agent_id] = collections.deque()
            self._loop.create_task(self._wait_for_room(agent_id, waiting))
        wait = msg.timeout_s or (ASK_WAIT_S if msg.ask else TELL_WAIT_S)
        waiting.append((message, msg, self._loop.time() + wait, wait))

    async def _wait_for_room(self, agent_id: str, waiting: _Overflow) -> None:
        """Backpressure: the messages for ``agent_id``'s full mailbox, in arrival order, each
        until its deadline. One task per full mailbox, not one per message (20,000 asks
        in flight to one agent made 19,000 tasks and timers)."""
        host = self.host
        try:
            while waiting:
                message, msg, deadline, wait_s = waiting[0]
                try:
                    if not host.post(agent_id, message):
                        left = deadline - self._loop.time()
                        if left <= 0:
                            raise TimeoutError
                        async with asyncio.timeout(left):
                            await host.put(agent_id, message)
                except TimeoutError:
                    full = MailboxFullError(
                        f"the mailbox of {agent_id!r} stayed full for {wait_s} s"
                    )
                    self._refuse(msg, full)
                except AgentError as exc:
                    while waiting:  # the agent left: none of these can be delivered
                        self._refuse(waiting.popleft()[1], exc)
                    break
                waiting.popleft()
        finally:
            if self._overflow.get(agent_id) is waiting:
                del self._overflow[agent_id]
            while waiting:  # cancelled at shutdown
                self._refuse(waiting.popleft()[1], AgentError("the worker is stopping"))

    def _view(self, ref: ArrayRef) -> object:
        """An array argument in the arena: a read-only view that holds this worker's hold
        (handed over by the sender) for as long as the agent keeps it."""
        arena = self._worker.arena
        if arena is None:
            raise shipping.ShippingError("an arena argument reached a worker without an arena")
        view = arena.view(ref)
        weakref.finalize(view, _release, arena, ref)
        return view

    def _refuse(self, msg: AgentCall, exc: BaseException) -> None:
        if msg.ask:
            self._send_to(msg.reply_to, pack_reply(msg.call_id, False, exc))
        else:
            log_event(_log, logging.WARNING, "tell_dropped", target=msg.target,
                      method=msg.method, reason=type(exc).__name__)  # fmt: skip

    def _resolve(self, msg: AgentReply) -> None:
        if msg.ok:
            value: object = shipping.loads(msg.payload)
        else:
            value = _rebuild(msg)
        self.host.resolve(msg.call_id, msg.ok, value)

    def _stop(self, msg: StopAgent) -> None:
        host = self.host
        agent_id = host.lookup(msg.target)
        if agent_id is None:
            exc = AgentNotFoundError(f"no agent {msg.target!r} on w{self.index:02d}")
            self._send_to(msg.reply_to, pack_reply(msg.call_id, False, exc))
            return
        if msg.kill:
            host.kill(agent_id)
            self._send_to(msg.reply_to, pack_reply(msg.call_id, True, None))
            return
        done = host.stop(agent_id)

        def stopped(f: asyncio.Future[None]) -> None:
            exc = f.exception()
            self._send_to(msg.reply_to, pack_reply(msg.call_id, exc is None, exc))

        done.add_done_callback(stopped)

    # ---- Sending ----

    def _send_to(self, origin: int, frame: bytes) -> None:
        if origin < 0:
            self._held_for(origin).append(frame)
            return
        worker = origin
        if not self._worker.send_to_worker(worker, frame):
            log_event(_log, logging.WARNING, "reply_lost", worker=f"w{worker:02d}")

    def _held_for(self, origin: int) -> list[bytes | AgentReply]:
        """The replies held for client ``origin`` (< 0). Replies wait for the end of the
        batch (``on_frames``) or of this loop iteration, to go one ring write per client."""
        held = self._held
        if held is None:  # on the loop thread: sent when the next iteration starts
            held = self._held = {}
            self._loop.call_soon(self._release_held)
        client = self._clients.get(origin)
        if client is None:
            if len(self._clients) >= 4096:  # clients come and go (a daemon's life)
                self._clients.clear()
            _, slot, generation = decode_origin(origin)
            client = self._clients[origin] = (slot, generation)
        items = held.get(client)
        if items is None:
            items = held[client] = []
        return items

    # ---- Outbox (kernel/actors.py) ----

    def reply(self, to: ReplyTo, ok: bool, payload: object) -> None:
        origin = to.origin
        if ok and origin < 0:  # the common case: held as a struct, encoded with the rest
            try:
                data = pickle.dumps(payload, protocol=5)
            except Exception:  # cloudpickle, or the error, through pack_reply
                pass
            else:
                if len(data) <= MAX_REPLY_BYTES:
                    held = self._held
                    client = self._clients.get(origin)
                    items = None if held is None or client is None else held.get(client)
                    if items is None:  # (_held_for, written out above for the common case)
                        items = self._held_for(origin)
                    items.append(AgentReply(to.call_id, True, data))
                    return
        self._send_to(origin, pack_reply(to.call_id, ok, payload))

    def deliver(self, target: str, msg: Message) -> None:
        worker = self.registry.lookup(target)
        if worker < 0 or worker == self.index:
            raise AgentNotFoundError(f"no agent named {target!r}")
        reply_to = msg.reply_to
        frame = encode(AgentCall(
            reply_to.origin if reply_to is not None else self.index,
            reply_to.call_id if reply_to is not None else 0,
            target, msg.method, shipping.dumps((msg.args, dict(msg.kwargs))), msg.sender,
            msg.msg_id, reply_to is not None,
        ))  # fmt: skip
        if not self._worker.send_to_worker(worker, frame):
            raise AgentNotFoundError(f"agent {target!r}: its worker w{worker:02d} is gone")

    def publish(self, sender: str, topic: str, payload: object) -> None:
        frame = encode(
            AgentCall(self.index, 0, "", "", shipping.dumps(payload), sender, 0, False, 0.0, topic)
        )
        for index in range(self._worker.workers):
            if index != self.index:
                self._worker.send_to_worker(index, frame)

    def spawn(self, parent: str, spec: SpawnSpec) -> str:
        self._names += 1
        name = spec.name or f"{spec.cls.__name__.lower()}-{self.index}.{os.getpid()}.{self._names}"
        self._check_grants(parent, spec.grants)
        if not self.registry.claim(name, self.index):
            raise AgentError(f"an agent named {name!r} already runs")
        try:
            if spec.persist:
                self._journal_of[name] = self._journal()
            if spec.grants:
                self._plugin_grants[name] = dict(spec.grants)
            self.host.spawn(
                name, spec.cls, spec.args, spec.kwargs, restart=spec.restart, persist=spec.persist
            )
            record = AgentSpec(
                shipping.function_key(spec.cls)[1],
                shipping.dumps((spec.args, dict(spec.kwargs))),
                str(spec.restart), spec.persist, 0, b"",
                {plugin: list(values) for plugin, values in spec.grants.items()},
            )  # fmt: skip
            self._specs().put(name.encode(), encode_spec(record))
        except BaseException:
            self._journal_of.pop(name, None)
            self._plugin_grants.pop(name, None)
            self.registry.release(name, worker=self.index)
            raise
        return name

    def _check_grants(self, parent: str, grants: Mapping[str, tuple[str, ...]]) -> None:
        """An agent passes on only what it holds: for each plugin, its own grants and its
        own name (its memory namespace). Raises ``CapabilityError``."""
        held = self._plugin_grants.get(parent, {})
        for plugin, values in grants.items():
            extra = set(values) - set(held.get(plugin, ())) - {parent}
            if extra:
                raise CapabilityError(
                    f"agent {parent!r} cannot grant {plugin} {sorted(extra)}: it holds "
                    f"{sorted(held.get(plugin, ()))} and its own {parent!r}"
                )

    # ---- Plugins (kernel/plugins.py): agent APIs and services ----

    def plugin_api(self, agent_id: str, name: str) -> object:
        """``self.plugin(name)`` of agent ``agent_id``: the plugin's agent API, made once per
        agent (any thread: agents may call from executor threads). Raises
        ``ServiceNotFoundError``."""
        apis = self._plugin_apis.get(agent_id)
        api = None if apis is None else apis.get(name)
        if api is None:
            host = plugins.current()
            if host is None:
                raise plugins.ServiceNotFoundError(f"no plugin {name!r}: this worker runs none")
            grants = self._plugin_grants.get(agent_id, {}).get(name, ())
            made = host.agent_api(name, plugins.AgentInfo(agent_id, self.index, grants))
            api = self._plugin_apis.setdefault(agent_id, {}).setdefault(name, made)
        return api

    def call_service(
        self, agent_id: str, name: str, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> asyncio.Future[object]:
        """An agent's ``self.service(name, ...)``: run here on an executor thread."""
        return self._loop.run_in_executor(
            None, functools.partial(plugins.call_service, name, args, kwargs)
        )

    def call_tool(
        self, agent_id: str, name: str, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> asyncio.Future[object]:
        """An agent's ``self.tool(name, ...)``: refused (``CapabilityError``, audited) unless
        granted at spawn; else run on an executor thread, so the agent's loop goes on."""
        data_dir = self._worker.state_path("")
        spec = self._grants.get(agent_id, {}).get(name)
        if spec is None:
            future: asyncio.Future[object] = self._loop.create_future()
            try:
                refuse(data_dir, agent_id, name, args)
            except CapabilityError as exc:
                future.set_exception(exc)
            return future
        return self._loop.run_in_executor(
            None, functools.partial(run_tool, spec, args, kwargs, agent=agent_id, data_dir=data_dir)
        )

    def agent_exited(self, agent_id: str, reason: ExitReason, error: BaseException | None) -> None:
        self._grants.pop(agent_id, None)
        self._plugin_grants.pop(agent_id, None)
        self._plugin_apis.pop(agent_id, None)
        self.registry.release(agent_id, worker=self.index)
        self._journal_of.pop(agent_id, None)
        self._specs().delete(agent_id.encode())
        log_event(_log, logging.INFO, "agent_exited", id=agent_id, reason=reason.name.lower(),
                  error=type(error).__name__ if error else "")  # fmt: skip

    # ---- Checkpointer (kernel/actors.py) ----

    def checkpoint(self, agent_id: str, data: bytes) -> None:
        if self._held:  # the Outbox contract: replies handed over before go out first
            held, self._held = self._held, {}
            self._send_held(held)
        journal = self._journal_of[agent_id]
        journal.table("agents").put(agent_id.encode(), data)

    def _checkpoint_of(self, name: str) -> bytes | None:
        return self._journal_of[name].table("agents").get(name.encode())

    def _journal(self) -> Journal:
        path = self._worker.state_path("agents")
        journal = self._journals.get(path)
        if journal is None:
            journal = self._journals[path] = Journal.open(path)
        return journal

    def _specs(self) -> Table:
        """The spawn specs of the live agents (what restarts them after a worker death)."""
        path = self._worker.state_path(RUNTIME_JOURNAL)
        journal = self._journals.get(path)
        if journal is None:
            journal = self._journals[path] = Journal.open(path, sync=False)
        return journal.table(SPECS_TABLE)

    def stats(self) -> list[tuple[str, str, int, int, str, int]]:
        """(name, class, mailbox, handled, state, restarts) of each agent here. Loop thread."""
        if self._host is None:
            return []
        return [
            (s.id, s.cls, s.mailbox, s.handled, s.state.name.lower(), s.restarts)
            for s in self._host.stats()
        ]


def _release(arena: Arena, ref: ArrayRef) -> None:
    with contextlib.suppress(IPCError):
        arena.release(ref)


def _rebuild(msg: AgentReply) -> BaseException:
    if msg.payload:
        with contextlib.suppress(Exception):
            exc = shipping.loads(msg.payload)
            if isinstance(exc, BaseException):
                return exc
    return AgentError(msg.message or "the call failed")
