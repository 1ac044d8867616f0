"""Agents from a client: ``Client.spawn``, ``Client.agent``, ``AgentRef.ask``/``tell``,
``Client.publish``, ``Client.kill`` (the worker side is kernel/agentd.py).

A name is claimed in the kernel's shared registry before the spawn is sent (unique per
instance), so two clients cannot start two agents of one name. Asks and stops are calls
answered by ``AgentReply`` into this client's inbox; each waits in an ``astra.Future``. A
worker that dies fails the calls waiting on it with ``AgentCrashedError``. Messages from
this client carry one sender id and increasing message ids, so an agent handles them in
the order sent.
"""

from __future__ import annotations

__all__ = ["AGENT_HOLD_S", "AGENT_LOW_WATER", "SPAWN_TIMEOUT_S", "AgentRef", "Agents"]

import contextlib
import itertools
import os
import pickle
import threading
import time
import uuid
from typing import TYPE_CHECKING, Final

import numpy as np

from ipc import IPCError
from kernel import actors, function_key, shipping
from kernel.agentd import client_origin
from kernel.messages import AgentCall, AgentReply, ListAgents, SpawnAgent, StopAgent, encode
from kernel.registry import Registry
from kernel.worker import ARENA_THRESHOLD_BYTES

from . import _deps
from ._errors import (
    AgentCrashedError,
    AgentError,
    AgentNotFoundError,
    KernelNotRunningError,
    MailboxFullError,
    RemoteTraceback,
    SerializationError,
    UnknownMethodError,
)
from ._future import Future

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from ipc import ArrayRef

    from ._client import Client

#: Largest pickled arguments (or function) a task or an agent message may carry: frames stay
#: under the rings' 64 MiB frame limit. Large numpy arrays do not count: they travel through
#: the arena.
MAX_ARGS_BYTES: Final = 48 << 20
#: Room in a frame for what an ``AgentCall`` carries besides its arguments (names, ids).
FRAME_MARGIN: Final = 64 * 1024
#: Argument types sent with plain ``pickle`` (no walk for arrays to put in the arena).
_PLAIN: Final = frozenset({int, float, str, bytes, bool, type(None)})
#: How long ``spawn`` waits for the worker to build the agent.
SPAWN_TIMEOUT_S: Final = float(os.getenv("ASTRA_SPAWN_TIMEOUT_S", "30"))
#: Agent messages are batched like task submits (astra/_client.py, ``LOW_WATER``), by
#: their own count: while this many of the client's asks are unanswered (or, for a tell,
#: while the worker has not read the client's last ring slot), asks and tells gather per
#: worker into batches of ``SEND_BATCH``, one ``AgentCalls`` frame in one ring slot, sent
#: when full, when answers come back (by whichever thread takes them), when anyone waits
#: on a future, or at the latest about ``AGENT_HOLD_S`` later (the receiver thread).
#: Otherwise, and for spawns, stops and publishes always, a message goes at once.
AGENT_LOW_WATER: Final = 8
AGENT_HOLD_S: Final = 0.001

_TRANSLATE: Final[dict[type[BaseException], type[Exception]]] = {
    actors.AgentNotFoundError: AgentNotFoundError,
    actors.MailboxFullError: MailboxFullError,
    actors.AgentCrashedError: AgentCrashedError,
    actors.UnknownMethodError: UnknownMethodError,
    actors.AgentError: AgentError,
    shipping.ShippingError: SerializationError,  # an answer that would not pickle, too large
}


class AgentRef:
    """A handle on a running agent, by name: cheap, picklable, valid in any client of the
    kernel (``k.agent(name)`` gives one back)."""

    __slots__ = ("_agents", "name")

    def __init__(self, agents: Agents, name: str) -> None:
        self._agents = agents
        self.name = name

    def ask(
        self, method: str, /, *args: object, timeout: float | None = None, **kwargs: object
    ) -> Future[object]:
        """Call ``method(*args, **kwargs)`` on the agent; a ``Future`` of its answer. A full
        mailbox holds the message back up to ``timeout`` (default 30 s), then the future
        fails with ``MailboxFullError``. Other failures: the handler's exception,
        ``UnknownMethodError``, ``AgentNotFoundError``, ``AgentCrashedError``."""
        return self._agents.call(self.name, method, args, kwargs, True, timeout)  # type: ignore[return-value]  # an ask's is never None

    def tell(self, method: str, /, *args: object, **kwargs: object) -> None:
        """Send ``method(*args, **kwargs)`` without waiting; handled in the order sent.
        Raises ``AgentNotFoundError`` at once if no agent has the name."""
        self._agents.call(self.name, method, args, kwargs, False, None)

    def stop(self, timeout: float | None = SPAWN_TIMEOUT_S) -> None:
        """Stop the agent after the messages already in its mailbox; waits."""
        self._agents.stop(self.name, kill=False, timeout=timeout)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AgentRef) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"<astra.AgentRef {self.name!r}>"


class Agents:
    """A client's side of agents (one per ``Client``)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._registry: Registry | None = None
        self._lock = threading.Lock()
        # call id -> its future, whose ``worker`` is where the call went. Changed by several
        # threads without a lock: each change is one dict operation (atomic in CPython).
        self._calls: dict[int, Future[object]] = {}
        self._ids = itertools.count(1)
        # Message ids increase per sender (kernel/actors.py); a client is a new sender each
        # time it registers (its slot's generation is in the name), so a counter will do.
        self._msg_ids = itertools.count(time.time_ns())
        self._origin = client_origin(client._slot, client._gen)
        self._sender = f"c{client._slot}.{client._gen}"
        self._rr = 0
        # name -> (worker, that worker's generation), as last seen in the registry: a hint,
        # dropped when the worker was replaced since. A worker that no longer hosts the agent
        # forwards the message to the one the registry names (kernel/agentd.py).
        self._where: dict[str, tuple[int, int]] = {}

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry.open(self._client._kinst)
        return self._registry

    # ---- Calls ----

    def _new_call(self, worker: int) -> tuple[int, Future[object]]:
        call_id = next(self._ids)
        future: Future[object] = Future(self._client, -call_id, self._client._future_cond)
        future.worker = worker
        self._calls[call_id] = future
        return call_id, future

    def _send(self, worker: int, frame: bytes) -> None:
        """Send a frame now, after the agent messages held for ``worker``."""
        client = self._client
        client._check_usable()
        link = client._links[worker]
        with link.agent_lock:
            handoff = client._put_agent_frame(link, frame, hold=False)
        if handoff:
            client._hand_over(link)

    def spawn(
        self,
        cls: type[actors.Agent],
        argses: list[tuple[tuple[object, ...], dict[str, object]]],
        *,
        names: list[str | None],
        restart: str,
        persist: bool,
        worker: int | None,
        mailbox: int,
        tools: Iterable[str] = (),
        grants: Mapping[str, Iterable[str]] | None = None,
    ) -> list[AgentRef]:
        """Start ``len(argses)`` agents of ``cls``: every name claimed and every
        ``SpawnAgent`` sent before waiting for any answer. All or nothing: if one fails,
        the others are killed and its error is raised. ``grants``: plugin -> what each
        agent is granted for it (kernel/plugins.py)."""
        if not (isinstance(cls, type) and issubclass(cls, actors.Agent)):
            raise TypeError(f"agents subclass astra.Agent; got {cls!r}")
        if restart not in ("permanent", "on-failure", "temporary"):
            raise ValueError(f"restart: 'permanent', 'on-failure' or 'temporary'; {restart!r}")
        workers = self._client.workers
        if worker is not None and not 0 <= worker < workers:
            raise ValueError(f"worker={worker}: this kernel has workers 0-{workers - 1}")
        tool_specs = {name: self._client._resolve_tool(name) for name in tools}  # or raise
        plugin_grants = {plugin: list(values) for plugin, values in (grants or {}).items()}
        try:
            _, cls_data = function_key(cls)
            tools_data = shipping.dumps(tool_specs) if tool_specs else b""
            datas = [shipping.dumps(a) for a in argses]
        except shipping.ShippingError as exc:
            raise SerializationError(str(exc)) from exc.__cause__
        origin = self._origin
        started: list[tuple[str, int, Future[object]]] = []
        frames: dict[int, list[bytes]] = {}
        try:
            for data, name in zip(datas, names, strict=True):
                place = worker if worker is not None else self._next_worker(workers)
                name = name or f"{cls.__name__.lower()}-{uuid.uuid4().hex[:10]}"
                try:
                    claimed = self.registry.claim(name, place)
                except ValueError as exc:
                    raise AgentError(str(exc)) from None
                if not claimed:
                    raise AgentError(f"an agent named {name!r} already runs")
                call_id, future = self._new_call(place)
                started.append((name, place, future))
                msg = SpawnAgent(
                    origin, call_id, name, cls_data, data, restart, persist, mailbox, tools_data,
                    plugin_grants,
                )  # fmt: skip
                frames.setdefault(place, []).append(encode(msg))
            client = self._client
            client._check_usable()
            for place, batch in frames.items():
                link = client._links[place]
                handoff = False
                with link.agent_lock:
                    for i, frame in enumerate(batch, 1):
                        handoff |= client._put_agent_frame(link, frame, hold=i < len(batch))
                if handoff:
                    client._hand_over(link)
            deadline = time.monotonic() + SPAWN_TIMEOUT_S
            for _, _, future in started:
                future.exception(max(0.0, deadline - time.monotonic()))
            failed = next((f for _, _, f in started if f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()  # type: ignore[misc]
        except BaseException:
            self._undo(started)
            raise
        return [AgentRef(self, name) for name, _, _ in started]

    def _next_worker(self, workers: int) -> int:
        with self._lock:
            self._rr = (self._rr + 1) % workers
            return self._rr

    def _undo(self, started: list[tuple[str, int, Future[object]]]) -> None:
        """After a failed spawn: kill what did start, free every name claimed."""
        for name, place, future in started:
            ok = future.done() and not future.cancelled() and future.exception() is None
            if ok:
                with contextlib.suppress(AgentError):
                    self.stop(name, kill=True, timeout=SPAWN_TIMEOUT_S)
            self.registry.release(name, worker=place)

    def lookup(self, name: str) -> AgentRef:
        try:
            worker = self.registry.lookup(name)
        except ValueError:
            worker = -1
        if worker < 0:
            raise AgentNotFoundError(f"no agent named {name!r}")
        return AgentRef(self, name)

    def _locate(self, name: str) -> int:
        control = self._client._control
        hint = self._where.get(name)
        if hint is not None and control.worker_generation(hint[0]) == hint[1]:
            return hint[0]
        worker = self.registry.lookup(name)
        if worker >= 0:
            self._where[name] = (worker, control.worker_generation(worker))
        return worker

    def call(
        self,
        name: str,
        method: str,
        args: tuple[object, ...],
        kwargs: dict[str, object],
        ask: bool,
        timeout: float | None,
    ) -> Future[object] | None:
        """Send a message; an ask's future, or None for a tell (which raises at once if no
        agent has the name)."""
        # The hot path of every ask and tell: about 1.5 us of this process's time matter
        # (bench_agents' async asks), so the common case is written out flat. What goes
        # into the AgentCall is checked here: it may be encoded later, in a batch, on
        # another thread, where a bad field would sink the batch (and not reach its caller).
        if type(method) is not str:
            raise TypeError(f"a method name is a string, not {method!r}")
        timeout_s = float(timeout) if timeout else 0.0  # what float() refuses raises here
        client = self._client
        hint = self._where.get(name)
        if hint is not None and client._control.worker_generation(hint[0]) == hint[1]:
            worker = hint[0]
        else:
            worker = self._locate(name)
            if worker < 0:
                exc = AgentNotFoundError(f"no agent named {name!r}")
                if not ask:
                    raise exc
                failed: Future[object] = Future()
                failed.set_exception(exc)
                return failed
        plain = not kwargs
        for a in args:  # a loop, not any(): no generator to allocate
            if type(a) not in _PLAIN:
                plain = False
                break
        if plain:
            data, refs = pickle.dumps((args, kwargs), protocol=5), False
        else:
            data, refs = self._pack(worker, args, kwargs)
        link = client._links[worker]
        if len(data) > link.max_args:  # within one ring frame (astra/_client.py, max_args)
            _check_args_size(data, link.max_args)  # raises
        calls = self._calls
        future: Future[object] | None = None  # a tell has none
        call_id = 0
        if ask:
            call_id = next(self._ids)
            future = Future(client, -call_id, client._future_cond)
            future.worker = worker
            calls[call_id] = future  # before the check: a close() from now on fails it
            if client._rx_lead_parked and len(calls) >= AGENT_LOW_WATER:
                client._unpark()  # asks pile up unwatched: the receiver must take answers
        try:
            if not (client._usable and client._control.running_now):
                client._check_usable()  # raises
            # While asks of ours are unanswered, this message may wait for company
            # (AGENT_LOW_WATER); a tell also while the worker has not read our last ring
            # slot (it would wait in the ring anyway; the same bound, AGENT_HOLD_S,
            # applies). Numbered and queued under the link's lock, so that message ids
            # reach the ring in increasing order (a persisted agent takes a message whose
            # id is not above the last one it handled for a duplicate).
            hold = len(calls) >= AGENT_LOW_WATER or (not ask and link.writer.unread() > 0)
            with link.agent_lock:
                call = AgentCall(
                    self._origin, call_id, name, method, data, self._sender,
                    next(self._msg_ids), ask, timeout_s, "", refs,
                )  # fmt: skip
                handoff = client._put_agent_frame(link, call, hold, len(data))
        except BaseException:
            calls.pop(call_id, None)
            raise
        if handoff:
            client._hand_over(link)
        return future

    def _pack(
        self, worker: int, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> tuple[bytes, bool]:
        """Pickle a message's arguments. Numpy arrays of ``ARENA_THRESHOLD_BYTES`` or more
        go into the arena once, by reference, with the hold handed to the agent's worker
        (it drops it when the agent lets go of the array); (data, refs used)."""
        client = self._client
        arena = client._arena
        big = arena is not None and any(
            a.nbytes >= ARENA_THRESHOLD_BYTES  # type: ignore[attr-defined]
            for a in _deps.find(args, kwargs, np.ndarray)
        )
        try:
            if not big:
                return shipping.dumps((args, kwargs)), False
            assert arena is not None
            pid = client._control.worker(worker).pid
            refs: list[ArrayRef] = []

            def to_ref(obj: object) -> ArrayRef | None:
                if not isinstance(obj, np.ndarray) or obj.nbytes < ARENA_THRESHOLD_BYTES:
                    return None
                ref = arena.put(obj)
                refs.append(ref)
                try:
                    arena.hand_to(ref, pid)  # the worker's hold, before it sees the ref
                finally:
                    arena.release(ref)
                return ref

            return shipping.dumps_refs((args, kwargs), to_ref), True
        except shipping.ShippingError as exc:
            raise SerializationError(str(exc)) from exc.__cause__
        except (IPCError, ProcessLookupError) as exc:
            raise AgentCrashedError(f"cannot hand arrays to worker w{worker:02d}: {exc}") from exc

    def publish(self, topic: str, payload: object) -> None:
        try:
            data = shipping.dumps(payload)
        except shipping.ShippingError as exc:
            raise SerializationError(str(exc)) from exc.__cause__
        frame = encode(AgentCall(self._origin, 0, "", "", data, self._sender, 0, False, 0.0, topic))
        for worker in range(self._client.workers):
            self._send(worker, frame)

    def stop(self, name: str, *, kill: bool, timeout: float | None) -> None:
        self._where.pop(name, None)
        worker = self.registry.lookup(name)
        if worker < 0:
            raise AgentNotFoundError(f"no agent named {name!r}")
        call_id, future = self._new_call(worker)
        self._send(worker, encode(StopAgent(self._origin, call_id, name, kill)))
        future.result(timeout)

    def rows(self, timeout: float | None) -> list[dict[str, object]]:
        """One dict per running agent: name, class, worker, mailbox, handled, state,
        restarts (asked of every worker)."""
        asks = []
        for worker in range(self._client.workers):
            call_id, future = self._new_call(worker)
            self._send(worker, encode(ListAgents(self._origin, call_id)))
            asks.append((worker, future))
        rows: list[dict[str, object]] = []
        for worker, future in asks:
            for name, cls, mailbox, handled, state, restarts in future.result(timeout):  # type: ignore[attr-defined]
                rows.append({
                    "name": name, "class": cls, "worker": worker, "mailbox": mailbox,
                    "handled": handled, "state": state, "restarts": restarts,
                })  # fmt: skip
        return sorted(rows, key=lambda r: str(r["name"]))

    def fail_unsent(self, items: list[bytes | AgentCall], exc: BaseException) -> None:
        """Messages taken from a link's held batch could not be sent: fail their asks."""
        for item in items:
            if type(item) is AgentCall and item.call_id:
                future = self._calls.pop(item.call_id, None)
                if future is not None:
                    future.set_exception(AgentError(f"the message was not sent: {exc!r}"))

    def _forget(self, call_id: int) -> None:
        self._calls.pop(call_id, None)

    # ---- Replies (the client's receiving thread) ----

    def on_reply(self, msg: AgentReply) -> None:
        future = self._calls.pop(msg.call_id, None)
        if future is None:
            return
        if msg.ok:
            try:
                value = shipping.loads(msg.payload)
            except shipping.ShippingError as exc:
                future.set_exception(SerializationError(str(exc)))
                return
            future.set_result(value)
            return
        future.set_exception(_translate(msg))

    def on_worker_lost(self, index: int) -> None:
        for name in [n for n, (w, _) in self._where.items() if w == index]:
            self._where.pop(name, None)
        # _calls changes under other threads without a lock (single dict operations are
        # atomic): copy it in one operation, then pop each entry (a reply may win).
        calls = self._calls
        for call_id, future in list(calls.items()):
            if future.worker == index and calls.pop(call_id, None) is not None:
                future.set_exception(AgentCrashedError(f"worker w{index:02d} died"))

    def fail_all(self, exc: BaseException) -> None:
        calls = self._calls
        while calls:
            try:
                future = calls.popitem()[1]
            except KeyError:  # emptied by another thread meanwhile
                break
            if not future.done():
                future.set_exception(exc)

    def close(self) -> None:
        self.fail_all(KernelNotRunningError("the client was closed"))
        if self._registry is not None:
            self._registry.close()
            self._registry = None


def _check_args_size(data: bytes, limit: int | None = None) -> bytes:
    """``data``, or ``SerializationError`` if it is over ``limit`` (``MAX_ARGS_BYTES``; also
    for tasks: astra/_client.py)."""
    limit = MAX_ARGS_BYTES if limit is None else limit
    if len(data) > limit:
        raise SerializationError(
            f"arguments pickle to {len(data)} B, over {limit} B: pass large data as "
            "numpy arrays (they travel through the arena) or through files"
        )
    return data


def _translate(msg: AgentReply) -> BaseException:
    exc: BaseException | None = None
    if msg.payload:
        try:
            loaded = shipping.loads(msg.payload)
        except shipping.ShippingError:
            loaded = None
        if isinstance(loaded, BaseException):
            exc = loaded
    if exc is None:
        exc = AgentError(msg.message or "the call failed")
    for kernel_cls, astra_cls in _TRANSLATE.items():
        if type(exc) is kernel_cls:
            translated = astra_cls(str(exc))
            translated.__cause__ = RemoteTraceback(msg.traceback) if msg.traceback else exc
            return translated
    if msg.traceback:
        exc.__cause__ = RemoteTraceback(msg.traceback)
    return exc
