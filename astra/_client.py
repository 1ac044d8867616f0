"""``astra.Client``: tasks and futures over a kernel's shared-memory rings.

Both ``astra.Kernel`` (an embedded kernel owned by this process) and ``astra.connect()`` (a
client of a running ``astrad``) are ``Client``s. A client registers in the kernel's control
block (a slot claim under an OFD lock), owns one inbox ring ``to_c<slot>`` that every worker
and the supervisor write to, and writes ``RunTask``s into each worker's inbox ring: at once
while the worker has little to do, else gathered into batches that share one ring slot
(``LOW_WATER``), sent by whichever thread next takes replies. A receiver thread turns
replies into futures; a dispatcher thread re-sends tasks on behalf of the receiver, which
must never block on a full ring (it is what drains the replies that would unblock it).

Agent messages travel the same links (astra/_agents.py builds them; ``_put_agent_frame``
batches them). A thread waiting in ``Future.result()`` takes replies itself (``_lead``) while
the receiver thread parks (``_park_for_lead``).

Size: about 1,600 lines, past the 800 mark. The sending side and the receiving side share
each worker link's state and one lock order (the client lock, a link's ``agent_lock``, its
``cond``; ``_park`` last), which one class keeps in view. XX: the receiving side (the
receiver thread, ``_lead``, parking, ``_handle_batch`` and what it calls, about 450 lines)
would move to a module of its own as a mixin over the same state; not done yet.
"""

from __future__ import annotations

__all__ = ["DEFAULT_RETRIES", "Client", "cancelled"]

import atexit
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import itertools
import logging
import os
import pickle
import queue
import threading
import time
import weakref
from typing import TYPE_CHECKING, Final, TypeVar

import numpy as np

from ipc import (
    IPCError,
    RingClosedError,
    RingEmpty,
    RingFull,
    RingWriter,
    SegmentError,
    open_ring,
)
from kernel import (
    AgentCall,
    AgentReplies,
    AgentReply,
    CancelRun,
    ErrorKind,
    RunTask,
    ShippingError,
    TaskDone,
    TaskError,
    TasksMoved,
    Wake,
    WorkerLost,
    cancel_requested,
    decode_frames,
    encode,
    encode_queue,
    function_key,
    shipping,
    worker_ring,
)
from kernel.daemon import default_state_dir
from kernel.journal import Journal, JournalError
from kernel.kmetrics import client_row
from kernel.logs import log_event
from kernel.messages import BATCH_FRAME_BYTES, AgentCalls
from kernel.plugins import PluginInfo, call_service, read_plugins
from kernel.tools import AuditEntry, CapabilityError, ToolSpec, read_audit, tool_task
from kernel.worker import ARENA_THRESHOLD_BYTES

from . import _deps
from ._agents import (
    AGENT_HOLD_S,
    FRAME_MARGIN,
    MAX_ARGS_BYTES,
    AgentRef,
    Agents,
    _check_args_size,
)
from ._errors import (
    KernelNotRunningError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    TaskTimeoutError,
    UpstreamError,
    WorkerCrashedError,
)
from ._future import _DONE as _FUTURE_DONE, Future
from ._graph import META_KEY, load_graph, run_graph, save_graph
from ._tools import resolve as resolve_tool

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    from ipc import Arena, ArrayRef, Instance
    from kernel import ControlBlock
    from kernel.actors import Agent
    from kernel.journal import Table

    from ._graph import Graph, Node
    from .memory import Memory

T = TypeVar("T")
_log = logging.getLogger("astra.client")

#: Re-runs a task gets, by default, after its worker died under it. An exception raised by
#: the task itself is never retried.
DEFAULT_RETRIES: Final = int(os.getenv("ASTRA_DEFAULT_RETRIES", "3"))
#: Longest the receiver thread sleeps before checking that the kernel is alive.
RECV_SLICE_S: Final = 0.25
#: How long after a synchronous call (``Client._lead``) the receiver thread stays parked
#: while nothing is awaited, for the next one: it then waits on the reply doorbell again.
LEAD_LINGER_S: Final = 0.05
#: Slots and bytes per slot of each lane of a client's inbox ring.
INBOX_SLOTS: Final = 64
INBOX_SLOT_BYTES: Final = 16 * 1024
#: Frames a worker's outbox holds (while its ring is full) before submitters wait.
OUTBOX_MAX: Final = 4096
#: Tasks sent to a worker and not yet finished below which a submit goes out at once; at or
#: above it (the worker has a queue to chew on) submits gather into batches of
#: ``SEND_BATCH``, many frames to one ring slot, sent when full, when the worker's queue
#: falls below this mark (seen by whichever thread takes replies), or when anyone waits.
LOW_WATER: Final = 32
SEND_BATCH: Final = 64
#: Bytes of arguments past which a batch of agent messages goes without waiting to be full.
AGENT_BATCH_BYTES: Final = 256 * 1024


@dataclasses.dataclass(slots=True, eq=False)
class _Task:
    """The client's record of one task until its future completes."""

    id: int
    future: Future[object]
    fn_key: bytes
    args: bytes
    priority: int
    timeout_s: float
    retries_left: int
    worker: int = -1  # the worker it was last sent to; -1 before
    deferred: bool = False  # waits for dependencies; sent by their last callback
    generation: int = 0  # that worker's generation when it was sent
    unsent: bool = False  # in its link's ``unsent`` batch, not yet in the ring
    pin: int = -1  # the worker asked for with ``worker=``; -1 lets the client choose
    # Arguments in the arena (``args`` holds references): blocks we put there, to release,
    # and arrays (views of results) to keep alive, both until the task is finished.
    refs: bool = False
    holds: list[ArrayRef] | None = None
    keep: list[object] | None = None


@dataclasses.dataclass(slots=True, eq=False)
class _WorkerLink:
    """This client's view of one worker: its current inbox ring and what is in flight."""

    index: int
    generation: int
    writer: RingWriter
    core: int | None = None  # the CPU the worker is pinned to
    sent_keys: set[bytes] = dataclasses.field(default_factory=set)
    inflight: set[int] = dataclasses.field(default_factory=set)  # includes ``unsent``
    unsent: list[_Task] = dataclasses.field(default_factory=list)  # guarded by the client lock
    stale_seen: bool = False  # the control block showed a newer generation last check
    # Frames not yet in the ring, in order; guarded by ``cond``. Invariant: non-empty only
    # while ``flushing`` (the dispatcher owns sending them; submitters only append).
    outbox: list[bytes] = dataclasses.field(default_factory=list)
    flushing: bool = False  # the dispatcher is sending the outbox (blocking)
    # Agent messages held back (astra/_agents.py, ``AGENT_LOW_WATER``), in order, and the
    # lock that orders them (taken before ``cond``).
    # Calls are kept as structs, to go many to one AgentCalls frame (kernel.encode_queue).
    agent_unsent: list[bytes | AgentCall] = dataclasses.field(default_factory=list)
    agent_bytes: int = 0  # about how many bytes agent_unsent holds
    # The largest arguments an agent message may carry: it goes in one frame of the ring
    # (alone, if large: a frame too large would be refused after the held ones went out).
    max_args: int = 0
    agent_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    cond: threading.Condition = dataclasses.field(default_factory=threading.Condition)


class Client:
    """Submit tasks to a kernel and get ``astra.Future``s back.

    Obtained from ``astra.Kernel(...)`` or ``astra.connect(...)``; use it as a context
    manager or call ``close()``. Safe to use from several threads.
    """

    def __init__(
        self,
        kernel_instance: Instance,
        control: ControlBlock,
        arena: Arena | None,
        own_instance: Instance,
    ) -> None:
        self._kinst = kernel_instance
        self._control = control
        self._arena = arena
        self._inst = own_instance
        self._pid = os.getpid()
        #: Where durable graphs are journaled (``<state_dir>/graphs``); None: the default.
        self.state_dir: str | None = None
        #: The kernel's data dir (agents' checkpoints, the audit log), as its workers see it.
        self.data_dir: str | None = None
        self._lock = threading.Lock()
        # taking frames from the reply ring and handling them (re-entered by _on_worker_lost)
        self._rx_lock = threading.RLock()
        self._lead_lock = threading.Lock()  # held by the one thread in _lead
        self._future_cond = threading.Condition()  # shared by this client's futures
        self._tasks: dict[int, _Task] = {}
        self._ids = itertools.count(1)
        self._fn_cache: weakref.WeakKeyDictionary[object, tuple[bytes, bytes]] = (
            weakref.WeakKeyDictionary()
        )
        self._fn_data: dict[bytes, bytes] = {}
        self._views: dict[int, ArrayRef] = {}  # id of a result array in the arena -> its ref
        self._plugin_cache: list[PluginInfo] | None = None  # the kernel's, read once
        self._closed = False
        self._closing = False
        # False once closing, broken or forked: the hot paths test this one flag (and the
        # kernel's state) and call _check_usable, which names the reason, only when it is.
        self._usable = True
        self._broken: BaseException | None = None
        self._graveyard: list[RingWriter] = []
        self._rr = 0
        self._last_check = time.monotonic()
        self._rx_cpu = -1  # the CPU the receiver thread is kept on (_follow); -1: any
        self._fed = -1  # the worker the last batch of agent messages began for (_follow)
        self._rx_sleeping = False  # the receiver thread waits with no agent batch held
        # While a thread leads (_lead), the receiver thread waits on _park, not on the
        # reply doorbell: as a second waiter it was woken by every answer the leader took,
        # and then wanted the GIL while the leader ran, which cost a synchronous ask 10 us
        # one run in two and doubled its p99 (_park_for_lead says when). It is woken
        # (_unpark) when it is needed: a lead ends with answers still awaited, a future is
        # watched by other means than result() (a callback, await, done(),
        # concurrent.futures.wait), or unanswered calls pile up; else when the linger ends.
        self._park = threading.Condition(threading.Lock())
        self._leading = False
        self._lead_end = 0.0  # when the last lead ended (monotonic)
        self._rx_lead_parked = False
        self._rx_on_bell = False  # the receiver thread waits on the reply doorbell
        self._slot, self._gen = control.register(own_instance.id, self._pid)
        # This client's row of the hot-path metrics (kernel/kmetrics.py), under self._lock.
        table = control.metrics
        self._metrics = (
            table.row(client_row(control.workers, self._slot)) if table is not None else None
        )
        self._links: list[_WorkerLink] = []
        try:
            # Lanes: every worker, a replacement for each (a restarted worker claims a lane
            # before the reader has reaped its predecessor's), the supervisor, ourselves.
            self._wake, self._reader = open_ring(
                own_instance,
                f"to_c{self._slot}",
                lanes=2 * control.workers + 2,
                slots=INBOX_SLOTS,
                slot_bytes=INBOX_SLOT_BYTES,
            )
            self._reader.claim()
            for i in range(control.workers):
                self._links.append(self._attach(i))
        except BaseException:
            if hasattr(self, "_reader"):
                self._release_rings()
            control.unregister(self._slot, self._gen)
            raise
        self._agents = Agents(self)
        self._dispatch_q: queue.SimpleQueue[list[_Task] | _WorkerLink | None] = queue.SimpleQueue()
        self._dispatcher: threading.Thread | None = None
        self._receiver = threading.Thread(
            target=self._receive, name=f"astra-client-c{self._slot}", daemon=True
        )
        self._receiver.start()
        _clients.add(self)
        atexit.register(self.close)

    def _attach(self, index: int) -> _WorkerLink:
        gen = self._control.worker_generation(index)
        return self._link_for(index, gen, RingWriter.attach(self._kinst, worker_ring(index, gen)))

    def _link_for(self, index: int, generation: int, writer: RingWriter) -> _WorkerLink:
        link = _WorkerLink(index, generation, writer, core=self._control.worker(index).core)
        link.max_args = min(MAX_ARGS_BYTES, writer.max_frame - FRAME_MARGIN)
        return link

    # ---- Submitting ----

    def submit(
        self,
        fn: Callable[..., T],
        /,
        *args: object,
        retries: int = DEFAULT_RETRIES,
        timeout: float | None = None,
        priority: int = 0,
        worker: int | None = None,
        **kwargs: object,
    ) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on a worker; returns its future at once.

        A ``Future`` among the arguments is a dependency: the task is sent when it has
        completed, with its result in its place (its failure fails this task too).
        ``retries`` (default ``DEFAULT_RETRIES``): re-runs allowed after the worker died
        under the task; an exception the task raises is never retried. ``timeout``: wall
        seconds for one run, then ``TaskTimeoutError``. ``priority``: higher runs first
        among a worker's queued tasks. ``worker``: queue it on that worker (by index) rather
        than the less loaded of two; an idle worker may still steal it (kernel/scheduler.py).

        While the chosen worker already has ``LOW_WATER`` tasks to do, the task waits in a
        batch (see ``LOW_WATER``) instead of taking a ring slot of its own. Blocks only
        while ``OUTBOX_MAX`` tasks already wait for room in the chosen worker's ring
        (backpressure). Raises ``SerializationError`` if ``fn`` or an argument cannot
        be pickled and ``KernelNotRunningError`` if the kernel is closed or gone.
        """
        if worker is not None and not 0 <= worker < len(self._links):
            raise ValueError(f"worker={worker}: this kernel has workers 0-{len(self._links) - 1}")
        task = self._new_task(fn, args, kwargs, retries, timeout, priority)
        if worker is not None:
            task.pin = worker
        if not task.deferred:
            self._send([task])
        return task.future  # type: ignore[return-value]

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[object],
        retries: int = DEFAULT_RETRIES,
        timeout: float | None = None,
        priority: int = 0,
    ) -> list[T]:
        """``[fn(*xs) for xs in zip(*iterables)]`` run in parallel; blocks for the results, in
        order. Raises the first failed task's exception."""
        futures = self.map_async(
            fn, *iterables, retries=retries, timeout=timeout, priority=priority
        )
        return self.gather(futures)

    def map_async(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[object],
        retries: int = DEFAULT_RETRIES,
        timeout: float | None = None,
        priority: int = 0,
    ) -> list[Future[T]]:
        """Like ``map`` but returns the futures at once (sent in batches, many per slot)."""
        tasks = [
            self._new_task(fn, xs, {}, retries, timeout, priority)
            for xs in zip(*iterables, strict=False)
        ]
        self._send([t for t in tasks if not t.deferred], now=True)
        return [t.future for t in tasks]  # type: ignore[misc]

    @staticmethod
    def gather(futures: Iterable[Future[T]], timeout: float | None = None) -> list[T]:
        """The results of ``futures``, in order; blocks. Raises the first failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for f in futures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out.append(f.result(left))
        return out

    @staticmethod
    def as_completed(
        futures: Iterable[Future[T]], timeout: float | None = None
    ) -> Iterator[Future[T]]:
        """Yield ``futures`` as they complete (``concurrent.futures.as_completed``)."""
        done = concurrent.futures.as_completed(futures, timeout)
        return done  # type: ignore[return-value]

    def _new_task(
        self,
        fn: Callable[..., object],
        args: tuple[object, ...],
        kwargs: dict[str, object],
        retries: int,
        timeout: float | None,
        priority: int,
    ) -> _Task:
        self._check_usable()
        key = self._function(fn)
        tid = next(self._ids)
        fut: Future[object] = Future(self, tid, self._future_cond)
        fut.label = getattr(fn, "__qualname__", "") or type(fn).__qualname__
        deps = _futures_in(args, kwargs)
        task = _Task(tid, fut, key, b"", priority, timeout or 0.0, retries, deferred=bool(deps))
        if not deps:
            self._pack_into(task, args, kwargs)
        with self._lock:
            self._tasks[tid] = task
            if self._metrics is not None:
                self._metrics.inc("tasks_submitted")
        if deps:
            self._after(task, deps, args, kwargs)
        return task

    def _function(self, fn: Callable[..., object]) -> bytes:
        try:
            cached = self._fn_cache.get(fn)
        except TypeError:  # not weak-referenceable: ship it without caching the pickle
            cached = None
        if cached is None:
            try:
                cached = function_key(fn)
            except ShippingError as exc:
                raise SerializationError(str(exc)) from exc.__cause__
            if len(cached[1]) > MAX_ARGS_BYTES:
                raise SerializationError(f"function {fn!r} pickles to {len(cached[1])} B")
            with contextlib.suppress(TypeError):
                self._fn_cache[fn] = cached
            self._fn_data.setdefault(*cached)
        return cached[0]

    def _pack_into(self, task: _Task, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        """Pickle the arguments into ``task.args``. Numpy arrays of ``ARENA_THRESHOLD_BYTES``
        or more travel through the arena by reference: a result of an earlier task that
        came back through the arena is passed as it is (no copy); any other array is copied
        into the arena once. The task holds them until it is finished."""
        arena = self._arena
        if arena is not None and any(
            a.nbytes >= ARENA_THRESHOLD_BYTES  # type: ignore[attr-defined]
            for a in _deps.find(args, kwargs, np.ndarray)
        ):
            self._pack_refs(task, arena, args, kwargs)
            return
        try:
            data = pickle.dumps((args, kwargs), protocol=5)
        except Exception:  # what plain pickle cannot reach (lambdas): cloudpickle's turn
            try:
                data = shipping.dumps((args, kwargs))
            except ShippingError as exc:
                raise SerializationError(str(exc)) from exc.__cause__
        task.args = _check_args_size(data)

    def _pack_refs(
        self, task: _Task, arena: Arena, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> None:
        holds: list[ArrayRef] = []
        keep: list[object] = []

        def to_ref(obj: object) -> ArrayRef | None:
            if not isinstance(obj, np.ndarray) or obj.nbytes < ARENA_THRESHOLD_BYTES:
                return None
            ref = self._views.get(id(obj))
            if ref is not None:
                keep.append(obj)  # our view's hold lives as long as the array
                return ref
            try:
                ref = arena.put(obj)
            except IPCError:
                return None  # the arena is full: the array is pickled inline instead
            holds.append(ref)
            return ref

        try:
            data = shipping.dumps_refs((args, kwargs), to_ref)
        except ShippingError as exc:
            for ref in holds:
                with contextlib.suppress(IPCError):
                    arena.release(ref)
            raise SerializationError(str(exc)) from exc.__cause__
        self._drop_holds(task)  # a re-pack (a dependency resolved) replaces earlier ones
        task.args = _check_args_size(data)
        task.refs = bool(holds or keep)
        task.holds = holds or None
        task.keep = keep or None

    def _drop_holds(self, task: _Task) -> None:
        holds, task.holds, task.keep = task.holds, None, None
        if holds and self._arena is not None and os.getpid() == self._pid:
            for ref in holds:
                with contextlib.suppress(IPCError):
                    self._arena.release(ref)

    def _after(
        self,
        task: _Task,
        deps: list[concurrent.futures.Future[object]],
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> None:
        """Send ``task`` once every dependency is done (a client-side DAG edge), to the
        worker that produced the first of them unless that one is busy (locality). A failed
        dependency fails it with ``UpstreamError``; a cancelled one cancels it."""
        remaining = [len(deps)]
        lock = threading.Lock()
        future_cls = concurrent.futures.Future

        def resolve(v: object) -> object:
            return v.result()  # type: ignore[attr-defined]

        def on_done(_: concurrent.futures.Future[object]) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            if any(d.cancelled() for d in deps):
                task.future.cancel()  # the subgraph below a cancelled task goes with it
                return
            failed = next((d for d in deps if d.exception() is not None), None)
            if failed is not None:
                self._finish(task.id, exc=_upstream(failed))
                return
            try:
                self._pack_into(
                    task,
                    tuple(_deps.substitute(a, future_cls, resolve) for a in args),
                    {k: _deps.substitute(v, future_cls, resolve) for k, v in kwargs.items()},
                )
            except SerializationError as exc:
                self._finish(task.id, exc=exc)
                return
            near = getattr(deps[0], "worker", -1)
            if task.pin < 0 and near >= 0:
                link = self._links[near]
                if len(link.inflight) < LOW_WATER:
                    task.pin = near
            self._queue_send([task])

        for dep in deps:
            dep.add_done_callback(on_done)

    # ---- Agents (astra/_agents.py) ----

    def spawn(
        self,
        cls: type[Agent],
        /,
        *args: object,
        name: str | None = None,
        restart: str = "on-failure",
        persist: bool = False,
        worker: int | None = None,
        mailbox: int = 0,
        tools: Iterable[str] = (),
        memory: Iterable[str] = (),
        grants: Mapping[str, Iterable[str]] | None = None,
        **kwargs: object,
    ) -> AgentRef:
        """Start ``cls(*args, **kwargs)`` as an agent on a worker (round robin, or
        ``worker``); returns its ``AgentRef`` once it is built (``__init__``'s exception
        is raised here). ``name`` is unique in the kernel (default: generated).
        ``restart``: "permanent", "on-failure" or "temporary" (kernel/actors.py).
        ``persist``: checkpoint its state after each message; a restart resumes from it.
        ``mailbox``: capacity (default 1024 messages). ``tools``: the tools it may call
        (``self.tool``); others raise ``CapabilityError``. ``memory``: the shared memory
        namespaces it may use besides its own (``self.shared_memory(name)``); ``grants``:
        what it may use of other plugins (``{"plugin": [...]}``, kernel/plugins.py). Raises
        ``AgentError`` if the name is taken, ``SerializationError`` if the class or arguments
        will not pickle, ``CapabilityError`` for an unknown tool."""
        return self._agents.spawn(
            cls, [(args, kwargs)], names=[name], restart=restart, persist=persist,
            worker=worker, mailbox=mailbox, tools=tools, grants=_grants(memory, grants),
        )[0]  # fmt: skip

    def spawn_many(
        self,
        cls: type[Agent],
        args: Iterable[tuple[object, ...]],
        /,
        *,
        names: Iterable[str | None] | None = None,
        restart: str = "on-failure",
        persist: bool = False,
        worker: int | None = None,
        mailbox: int = 0,
        memory: Iterable[str] = (),
        grants: Mapping[str, Iterable[str]] | None = None,
    ) -> list[AgentRef]:
        """``[spawn(cls, *a, ...) for a in args]`` in one go: every spawn is sent before
        any answer is awaited (10,000 agents in a fraction of a second). All or nothing:
        if one fails, the others are killed and its error is raised."""
        argses: list[tuple[tuple[object, ...], dict[str, object]]] = [(tuple(a), {}) for a in args]
        name_list: list[str | None] = list(names) if names is not None else [None] * len(argses)
        if len(name_list) != len(argses):
            raise ValueError(f"{len(name_list)} names for {len(argses)} agents")
        return self._agents.spawn(
            cls, argses, names=name_list, restart=restart, persist=persist, worker=worker,
            mailbox=mailbox, grants=_grants(memory, grants),
        )  # fmt: skip

    def call_tool(self, name: str, /, *args: object, **kwargs: object) -> Future[object]:
        """Run tool ``name`` (``@astra.tool``, a plugin's, or the built-in
        ``python``/``shell``) in a sandboxed child on a worker; its ``Future`` fails with the
        sandbox's typed error (``SandboxTimeout``, ``SandboxMemoryError``,
        ``SandboxViolation``, ``SandboxCrashed``) while the worker carries on. Raises
        ``CapabilityError`` for an unknown tool. The call is audited (``audit()``,
        ``astra audit``)."""
        spec = self._resolve_tool(name)
        return self.submit(tool_task, spec, args, kwargs, retries=0)

    def _resolve_tool(self, name: str) -> ToolSpec:
        """The spec of tool ``name``: registered in this process, built in, or offered by
        one of the kernel's plugins (then the worker supplies the function and policy).
        Raises ``CapabilityError``."""
        try:
            return resolve_tool(name)
        except CapabilityError:
            if any(name in row.tools for row in self._plugin_rows()):
                return ToolSpec(name, b"", {})
            raise

    # ---- Plugins and their services (kernel/plugins.py) ----

    def call_service(self, name: str, /, *args: object, **kwargs: object) -> Future[object]:
        """Call ``name`` (``"plugin.operation"``), a service a plugin registered, with
        ``args`` and ``kwargs``; returns its ``Future`` at once. It runs as a task on a
        worker, never retried (a service need not be idempotent): the future fails with
        ``ServiceNotFoundError`` if no enabled plugin there offers ``name``, with what the
        service raised, or with ``WorkerCrashedError``."""
        return self.submit(call_service, name, args, kwargs, retries=0)

    def memory(self, namespace: str) -> Memory:
        """The memory namespace ``namespace`` (an agent's name, or a shared one such as
        ``"team"``): key/value pairs, logs and vectors (``astra.Memory``). A client is
        trusted with every namespace; each call is a service call to a worker and blocks
        for its answer. Raises nothing until used."""
        from .memory import Memory, _RemoteNamespace

        return Memory(namespace, _RemoteNamespace(self, namespace))

    def plugins(self) -> list[PluginInfo]:
        """The kernel's plugins, as its supervisor loaded them: name, state ("enabled" or
        "disabled" with its error), source, services, tools, events listened to, and the
        failures any of its processes reported (what ``astra plugins`` prints)."""
        return self._plugin_rows(fresh=True)

    def _plugin_rows(self, *, fresh: bool = False) -> list[PluginInfo]:
        if fresh or self._plugin_cache is None:
            try:
                self._plugin_cache = read_plugins(self._data_dir())
            except (JournalError, OSError):
                self._plugin_cache = []
        return self._plugin_cache

    def audit(self, tail: int | None = None) -> list[AuditEntry]:
        """The tool calls of this kernel, oldest first (``kernel.tools.AuditEntry``)."""
        return read_audit(self._data_dir(), tail=tail)

    def _data_dir(self) -> str:
        return self.data_dir or default_state_dir()

    def agent(self, name: str) -> AgentRef:
        """The running agent called ``name``. Raises ``AgentNotFoundError``."""
        return self._agents.lookup(name)

    def publish(self, topic: str, msg: object) -> None:
        """Deliver ``msg`` to every agent subscribed to a pattern matching ``topic``
        (``papers.*``: one segment, ``papers.#``: any), once each."""
        self._agents.publish(topic, msg)

    def agents(self, timeout: float | None = 10.0) -> list[dict[str, object]]:
        """A row per running agent (name, class, worker, mailbox, handled, state,
        restarts), as ``astra ps`` prints them."""
        return self._agents.rows(timeout)

    def kill(self, name: str, timeout: float | None = 30.0) -> None:
        """Stop agent ``name`` now, dropping its mailbox. Raises ``AgentNotFoundError``."""
        self._agents.stop(name, kill=True, timeout=timeout)

    # ---- Graphs ----

    def run(
        self,
        graph: Graph,
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
        durable: bool = False,
        name: str | None = None,
        state_dir: str | None = None,
    ) -> dict[Node, object]:
        """Run every node of ``graph``; returns ``{node: result}``. Blocks.

        A failing node fails the nodes below it with ``UpstreamError``; the other branches
        run to the end, then the first root failure is raised, or, with
        ``return_exceptions``, every failed node maps to its exception. Raises
        ``CycleError`` before running anything if the graph has a cycle, ``TimeoutError``
        after ``timeout`` seconds.

        ``durable=True`` (with ``name``) journals each result in LMDB under
        ``<state_dir>/graphs``; a later ``run`` of the same named graph, or
        ``resume(name)``, runs only the nodes without a journaled result (astra/_graph.py).
        """
        if not durable:
            return run_graph(
                self, graph, timeout=timeout, return_exceptions=return_exceptions,
                journal=None, jenv=None,
            )  # fmt: skip
        if not name:
            raise ValueError("a durable graph needs a name=")
        graph._check_durable()
        jenv, table = self._graph_journal(name, state_dir)
        try:
            table.put(META_KEY, save_graph(graph))
            return run_graph(
                self, graph, timeout=timeout, return_exceptions=return_exceptions,
                journal=table, jenv=jenv,
            )  # fmt: skip
        finally:
            jenv.close()

    def resume(
        self,
        name: str,
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
        state_dir: str | None = None,
    ) -> dict[Node, object]:
        """Finish the durable graph ``name`` (saved by an earlier ``run(..., durable=True)``):
        only nodes without a journaled result run. Raises ``KeyError`` if there is none."""
        jenv, table = self._graph_journal(name, state_dir)
        try:
            data = table.get(META_KEY)
            if data is None:
                raise KeyError(f"no durable graph named {name!r}")
            graph = load_graph(data)
            return run_graph(
                self, graph, timeout=timeout, return_exceptions=return_exceptions,
                journal=table, jenv=jenv,
            )  # fmt: skip
        finally:
            jenv.close()

    def forget(self, name: str, *, state_dir: str | None = None) -> bool:
        """Drop the journal of durable graph ``name``; False if there was none."""
        jenv, table = self._graph_journal(name, state_dir)
        try:
            keys = [k for k, _ in table.scan()]
            with jenv.batch() as b:
                for key in keys:
                    b.delete(table, key)
            return bool(keys)
        finally:
            jenv.close()

    def _graph_journal(self, name: str, state_dir: str | None) -> tuple[Journal, Table]:
        root = state_dir or self.state_dir or default_state_dir()
        jenv = Journal.open(os.path.join(root, "graphs"))
        return jenv, jenv.table(f"graph:{name}")

    # ---- Sending ----

    def _send(self, tasks: list[_Task], *, now: bool = False) -> None:
        """Assign tasks to workers (each to the less loaded of two) and send them, or leave
        them in their link's batch while the worker is busy (``LOW_WATER``) unless ``now``.
        Blocks only while a worker's outbox is over ``OUTBOX_MAX`` frames."""
        pinned = False
        if self._rx_lead_parked and len(self._tasks) >= LOW_WATER:
            self._unpark()  # tasks pile up unwatched: the receiver must take their results
        with self._lock:
            touched: dict[int, _WorkerLink] = {}
            for task in tasks:
                if task.id not in self._tasks:
                    continue  # cancelled meanwhile
                if task.pin < 0:
                    link = self._choose()
                else:
                    link, pinned = self._links[task.pin], True
                task.worker, task.generation = link.index, link.generation
                task.unsent = True
                link.inflight.add(task.id)
                link.unsent.append(task)
                touched[link.index] = link
                now = now or task.priority != 0  # overtaking needs the worker to see it
            ready = [
                (link, self._take_unsent(link))
                for link in touched.values()
                if now
                or len(link.unsent) >= SEND_BATCH
                or len(link.inflight) - len(link.unsent) < LOW_WATER
            ]
        for link, frames in ready:
            if frames:
                self._push(link, frames)
                if len(link.inflight) >= 2:
                    self._hint_idle(link, pinned=pinned)

    def _hint_idle(self, busy: _WorkerLink, *, pinned: bool) -> None:
        """``busy`` has a queue: wake the worker with the least of our tasks, so that it
        steals (kernel/scheduler.py, protocol step 4), if it has none, or (``pinned``: the
        queue was placed with ``worker=``) fewer by two. A worker sees tasks still unread
        in a busy worker's ring only through its ring depth at the moment it goes idle;
        this covers the tasks that arrive after that."""
        others = [link for link in self._links if link is not busy]
        if not others:
            return
        least = min(others, key=lambda link: len(link.inflight))
        if not least.inflight or (pinned and len(least.inflight) + 1 < len(busy.inflight)):
            with contextlib.suppress(IPCError):
                least.writer.send_nowait(encode(Wake()))

    def _take_unsent(self, link: _WorkerLink) -> list[bytes]:
        """Encode ``link``'s batch and empty it (client lock held)."""
        frames = []
        tasks = self._tasks
        for task in link.unsent:
            task.unsent = False
            if task.id not in tasks:
                continue  # cancelled while it waited
            fn = None
            if task.fn_key not in link.sent_keys:
                link.sent_keys.add(task.fn_key)
                fn = self._fn_data[task.fn_key]
            msg = RunTask(
                self._slot, self._gen, task.id, task.fn_key, fn, task.args,
                task.priority, task.timeout_s, task.refs, once=task.retries_left <= 0,
            )  # fmt: skip
            frames.append(encode(msg))
        link.unsent = []
        return frames

    def _send_unsent(self, *, every: bool = True) -> None:
        """Send the waiting batches: all of them, or (``every=False``, after replies were
        taken) those of workers whose queue fell below ``LOW_WATER``. Never blocks."""
        if self._pid != _pid:
            return  # a forked child: the batches are the parent's, sent by the parent
        links = self._links
        for link in links:
            if link.agent_unsent:
                self._send_agent_unsent(wait=False)
                break
        if not any(link.unsent for link in links):
            return
        with self._lock:
            ready = [
                (link, self._take_unsent(link))
                for link in self._links
                if link.unsent and (every or len(link.inflight) - len(link.unsent) < LOW_WATER)
            ]
        for link, frames in ready:
            if frames:
                self._push(link, frames)

    def _push(self, link: _WorkerLink, frames: list[bytes]) -> None:
        """Put ``frames`` into ``link``'s ring without blocking; if the ring is full, the
        dispatcher sends the rest (blocking) while later frames queue behind them, to go
        many to a slot. A dead worker's ring drops them: its ``WorkerLost`` re-sends.

        Lock order: the client lock, then a link's ``cond``. The receiver thread takes a
        ``cond`` only to send held agent messages, never waiting in it, so a send blocked
        here cannot stop replies from being drained.
        """
        with link.cond:
            handoff = self._push_locked(link, frames)
        if handoff:
            self._hand_over(link)

    def _push_locked(self, link: _WorkerLink, frames: list[bytes], *, wait: bool = True) -> bool:
        """``_push`` with ``link.cond`` held; True: call ``_hand_over(link)`` once it is
        released. ``wait=False``: never wait for the outbox to shrink (the receiver)."""
        if link.flushing:
            link.outbox += frames
            if wait:
                self._backpressure(link)
            return False
        try:
            link.writer.send_many(frames, timeout=0)
            return False
        except RingFull as exc:
            link.outbox = frames[exc.sent :]
            link.flushing = True
            return True
        except RingClosedError:
            return False

    def _hand_over(self, link: _WorkerLink) -> None:
        self._start_dispatcher()
        self._dispatch_q.put(link)

    def _put_agent_frame(
        self, link: _WorkerLink, frame: bytes | AgentCall, hold: bool, size: int = 0
    ) -> bool:
        """With ``link.agent_lock`` held: send ``frame`` (of about ``size`` bytes, if a
        struct) after the agent messages held for ``link``, or (``hold``) hold it with
        them until the batch is full. True: call ``_hand_over(link)`` once the lock is
        released."""
        unsent = link.agent_unsent
        unsent.append(frame)
        link.agent_bytes += size
        if hold and len(unsent) < SEND_BATCH and link.agent_bytes < AGENT_BATCH_BYTES:
            if len(unsent) == 1:
                self._follow(link)
                # The receiver thread sleeps for RECV_SLICE_S, or is parked: make it take
                # the short wait that bounds how long this batch is held (see _receive).
                if self._rx_sleeping:
                    self._rx_sleeping = False
                    with contextlib.suppress(IPCError):
                        self._wake.send_nowait(encode(Wake()))
                elif self._rx_lead_parked:
                    self._unpark()
            return False
        size, link.agent_unsent, link.agent_bytes = link.agent_bytes, [], 0
        return self._push_unsent(link, unsent, size, wait=True)

    def _follow(self, link: _WorkerLink) -> None:
        """A batch of messages to ``link``'s worker begins (from this thread). If the last
        one went to that worker too (a stream to one worker), keep this thread off its
        core (``_step_aside``; batches that alternate between workers would hop each
        time). And keep the receiver thread on this thread's core: the two share the GIL,
        so they lose little by sharing a core, and woken by a worker's answer the receiver
        thread otherwise lands on that worker's core and takes turns with it (asks in
        flight to one agent: about 270,000 a second that way here, 330,000 to 380,000
        with both)."""
        if link.index == self._fed:
            _step_aside(link.core)
        self._fed = link.index
        cpu = _current_cpu()
        if cpu >= 0 and cpu != self._rx_cpu:
            self._rx_cpu = cpu
            tid = self._receiver.native_id
            if tid is not None:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, {cpu})

    def _push_unsent(
        self, link: _WorkerLink, items: list[bytes | AgentCall], size: int, *, wait: bool
    ) -> bool:
        """Send a link's held agent messages, ``size`` bytes of arguments (``agent_lock``
        held); if that fails, their asks fail (nothing else would answer them) and the
        error is raised."""
        try:
            if size <= BATCH_FRAME_BYTES and all(type(item) is AgentCall for item in items):
                # Calls only (a stream's batch), small enough for one frame: no sorting.
                one = AgentCalls(items) if len(items) > 1 else items[0]  # type: ignore[arg-type]
                frames = [encode(one)]
            else:
                frames = encode_queue(items)
            with link.cond:
                return self._push_locked(link, frames, wait=wait)
        except BaseException as exc:
            self._agents.fail_unsent(items, exc)
            raise

    def _send_agent_unsent(self, *, wait: bool = True) -> None:
        """Send the agent messages every link holds. ``wait=False`` (the receiver thread,
        or a thread in ``_lead``): never wait, skipping a link whose lock another thread
        holds (it may be waiting for room in the ring that only drained replies make; a
        batch skipped goes with the next replies or ``AGENT_HOLD_S`` later)."""
        for link in self._links:
            if not link.agent_unsent or not link.agent_lock.acquire(blocking=wait):
                continue
            try:
                items, size = link.agent_unsent, link.agent_bytes
                link.agent_unsent, link.agent_bytes = [], 0
                handoff = bool(items) and self._push_unsent(link, items, size, wait=wait)
            except Exception:  # its asks failed; the other links' messages still go
                handoff = False
            finally:
                link.agent_lock.release()
            if handoff:
                self._hand_over(link)

    def _backpressure(self, link: _WorkerLink) -> None:
        # Called holding link.cond. Bounds the outbox: the submitter waits for the ring.
        while link.flushing and len(link.outbox) > OUTBOX_MAX and not self._closing:
            link.cond.wait(RECV_SLICE_S)

    def _wait_sent(self, timeout: float) -> None:
        """Send every batch and wait (up to ``timeout``) until every outbox is in its ring."""
        self._send_unsent()
        deadline = time.monotonic() + timeout
        for link in list(self._links):
            with link.cond:
                while link.flushing and (left := deadline - time.monotonic()) > 0:
                    link.cond.wait(left)

    def _flush(self, link: _WorkerLink) -> None:
        """Dispatcher: send ``link``'s outbox, blocking while the ring is full."""
        while True:
            with link.cond:
                frames, link.outbox = link.outbox, []
                if not frames:
                    link.flushing = False
                    link.cond.notify_all()
                    return
                link.cond.notify_all()
            try:
                link.writer.send_many(frames, timeout=RECV_SLICE_S)
            except RingFull as exc:
                if not self._closing:  # a full ring: keep the rest first in line, retry
                    with link.cond:
                        link.outbox[:0] = frames[exc.sent :]
            except RingClosedError:
                pass  # the worker died: its WorkerLost re-sends these tasks

    def _choose(self) -> _WorkerLink:
        """The less loaded of two workers (the next two round-robin). If both are idle, one
        *not* pinned to the CPU this thread runs on: in a synchronous round trip both ends
        then spin on cores of their own (the worker for its next task, this thread in
        ``_lead`` for the reply), so neither pays a wake-up, which costs tens of
        microseconds in a VM (an inter-processor interrupt). On our own core, this thread's
        spin would keep the worker from running at all."""
        links = self._links
        n = len(links)
        self._rr = (self._rr + 1) % n
        a, b = links[self._rr], links[(self._rr + 1) % n]
        la, lb = len(a.inflight), len(b.inflight)
        if la == lb == 0 and a.core is not None and a.core == _current_cpu():
            return b  # both idle: a synchronous round trip, where the core matters
        return b if lb < la else a

    def _queue_send(self, tasks: list[_Task]) -> None:
        """Send from the receiver thread, which must not block: a dispatcher thread does."""
        self._start_dispatcher()
        self._dispatch_q.put(tasks)

    def _start_dispatcher(self) -> None:
        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(
                    target=self._dispatch_loop, name=f"astra-dispatch-c{self._slot}", daemon=True
                )
                self._dispatcher.start()

    def _dispatch_loop(self) -> None:
        while (item := self._dispatch_q.get()) is not None:
            try:
                if isinstance(item, _WorkerLink):
                    self._flush(item)
                else:
                    self._send(item, now=True)
            except IPCError as exc:
                tasks = [] if isinstance(item, _WorkerLink) else item
                for task in tasks:
                    self._finish(task.id, exc=KernelNotRunningError(str(exc)))

    def _cancel_task(self, task_id: int) -> None:
        if task_id < 0:  # an agent's ask: its answer, when it comes, is dropped
            self._agents._calls.pop(-task_id, None)
            return
        with self._lock:
            task = self._tasks.pop(task_id, None)
            if task is None:
                return
            if task.refs and (task.unsent or task.worker < 0):
                self._drop_holds(task)  # never sent: nobody reads the blocks
            if task.worker < 0:
                return
            link = self._links[task.worker]
            link.inflight.discard(task_id)
            if task.unsent:
                return  # still in its batch: never sent, the batch skips it
            writer = link.writer if link.generation == task.generation else None
            if writer is not None:
                # Running: the task may poll astra.cancelled(); queued: the worker drops it.
                self._control.request_cancel(self._slot, task.worker, task_id)
        if writer is not None:
            with contextlib.suppress(IPCError):
                writer.send_nowait(encode(CancelRun(self._slot, task_id)))

    # ---- Receiving (the receiver thread) ----

    def _receive(self) -> None:
        # Waits without holding the reader, so a thread in Future.result() may take the
        # replies itself (_lead); frames are taken and handled under _rx_lock, in ring order.
        reader = self._reader
        while True:
            try:
                if self._park_for_lead():
                    self._park_receiver()
                    rung = False  # then take what is ready, without waiting
                else:
                    # Held agent messages bound the wait: they go at the latest AGENT_HOLD_S
                    # from now. Set the flag first: a batch begun after the check wakes us.
                    self._rx_sleeping = True
                    held = any(link.agent_unsent for link in self._links)
                    if held:
                        self._rx_sleeping = False
                    self._rx_on_bell = True
                    try:
                        timeout = AGENT_HOLD_S if held else RECV_SLICE_S
                        rung = reader.wait_readable(timeout, spin=False)
                    finally:
                        self._rx_sleeping = self._rx_on_bell = False
                with self._rx_lock:
                    self._handle_batch(decode_frames(reader.recv_ready(4096, rung=rung)))
                self._send_unsent(every=False)
            except (RingClosedError, SegmentError):
                return
            except Exception as exc:  # this thread must live: it answers every future
                self._broken_send(exc)
            if self._closed:
                return  # a done-callback on this thread closed the client: rings are gone
            if self._closing:
                self._drain_ready()  # replies already published still complete their futures
                return
            now = time.monotonic()
            if now - self._last_check >= RECV_SLICE_S:
                self._last_check = now
                self._check_kernel()
                self._send_unsent()  # a backstop: batches normally go with the replies

    def _park_for_lead(self) -> bool:
        """Whether the receiver thread should keep off the reply doorbell: a thread leads
        for the one answer awaited, or none is awaited and a thread led lately (the next
        synchronous call is likely near). Else (also while agent messages are held, which
        it sends within AGENT_HOLD_S) it waits on the doorbell."""
        if self._closing or any(link.agent_unsent for link in self._links):
            return False
        awaited = len(self._tasks) + len(self._agents._calls)
        if self._leading:
            return awaited <= 1
        return awaited == 0 and time.monotonic() - self._lead_end < LEAD_LINGER_S

    def _park_receiver(self) -> None:
        """Wait on ``_park`` until ``_unpark``, or at most until the linger ends."""
        with self._park:
            # The flag before the second look: a lead that ends between the two sees the
            # flag and notifies (under this lock, so once we wait).
            self._rx_lead_parked = True
            try:
                if self._park_for_lead():
                    left = self._lead_end + LEAD_LINGER_S - time.monotonic()
                    self._park.wait(min(RECV_SLICE_S, max(left, 0.001)))
            finally:
                self._rx_lead_parked = False

    def _lead(self, future: Future[object], deadline: float | None) -> None:
        """Receive in the calling thread, blocked in ``future.result()``, while spinning on
        the reply ring catches replies: a synchronous round trip then costs no wake-up of
        the receiver thread and none of this thread (the receiver thread, blocked in the
        kernel, needs no GIL meanwhile). Returns when ``future`` is done, at the deadline,
        or as soon as a spin comes back empty: the caller then waits on the Condition, and
        the receiver thread does the work. One leading thread at a time."""
        if self._pid != _pid:
            return  # a forked child (a future inherited): the rings are the parent's
        self._send_unsent()  # someone waits: nothing may sit in a batch
        if threading.current_thread() is self._receiver:
            return  # a done-callback on the receiver thread: it holds _rx_lock
        if not self._lead_lock.acquire(blocking=False):
            return
        reader = self._reader
        if future.worker >= 0 and future.task_id < 0:  # an agent's answer, from that worker
            _step_aside(self._links[future.worker].core)
        self._leading = True
        if self._rx_on_bell and len(self._tasks) + len(self._agents._calls) <= 1:
            # A lone synchronous call: get the receiver off the doorbell (a Wake frame),
            # where every answer would wake it; it parks until the calls stop.
            with contextlib.suppress(IPCError):
                self._wake.send_nowait(encode(Wake()))
        try:
            while future._state not in _FUTURE_DONE:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                if not reader.spin_readable():
                    return
                with self._rx_lock:
                    self._handle_batch(decode_frames(reader.recv_ready(4096, rung=True)))
                self._send_unsent(every=False)
        except (RingClosedError, SegmentError):
            return  # closing or gone: the receiver thread reports it
        finally:
            self._leading = False
            self._lead_end = time.monotonic()
            self._lead_lock.release()
            if self._rx_lead_parked and (
                future._state not in _FUTURE_DONE or self._tasks or self._agents._calls
            ):
                self._unpark()  # answers are still awaited, and nobody leads

    def _unpark(self) -> None:
        """Wake the receiver thread if it is parked while no thread leads."""
        if self._rx_lead_parked and not self._leading:
            with self._park:
                self._park.notify()

    def _note_blocked(self, waited_s: float) -> None:
        self._reader.note_blocked(waited_s)

    def _handle_batch(self, msgs: Sequence[object]) -> None:
        """Plain results complete under one lock round per batch (the common case);
        everything else goes through ``_handle`` in order."""
        done: list[tuple[int, object]] = []
        answers: list[tuple[Future[object], object]] = []  # agents' answers to our asks
        calls = self._agents._calls
        for msg in msgs:
            kind = type(msg)
            if kind is TaskDone and msg.ref is None:  # type: ignore[attr-defined]
                try:
                    done.append((msg.task_id, pickle.loads(msg.result)))  # type: ignore[attr-defined]
                    continue
                except Exception:
                    pass  # _on_done turns it into a SerializationError
            elif kind is AgentReplies:  # a worker's answers to our asks, many to a frame
                for reply in msg.replies:  # type: ignore[attr-defined]
                    if reply.ok and (future := calls.get(reply.call_id)) is not None:
                        try:
                            answers.append((future, pickle.loads(reply.payload)))
                            del calls[reply.call_id]
                            continue
                        except Exception:
                            pass  # on_reply turns it into a SerializationError
                    self._agents.on_reply(reply)  # (an error reply: rare)
                continue
            if done:
                self._finish_many(done)
                done = []
            if answers:
                Future._set_results(self._future_cond, answers)
                answers = []
            self._handle(msg)
        if done:
            self._finish_many(done)
        if answers:
            Future._set_results(self._future_cond, answers)

    def _finish_many(self, done: list[tuple[int, object]]) -> None:
        tasks = self._tasks
        links = self._links
        finished = []
        with self._lock:
            for task_id, value in done:
                task = tasks.pop(task_id, None)
                if task is not None:
                    if task.worker >= 0:
                        links[task.worker].inflight.discard(task_id)
                    task.future.worker = task.worker
                    if task.refs:
                        self._drop_holds(task)
                    finished.append((task.future, value))
        Future._set_results(self._future_cond, finished)

    def _handle(self, msg: object) -> None:
        if isinstance(msg, TaskDone):
            self._on_done(msg)
        elif isinstance(msg, TaskError):
            self._on_error(msg)
        elif isinstance(msg, WorkerLost):
            self._on_worker_lost(msg.worker, msg.generation, msg.running_task)
        elif isinstance(msg, TasksMoved):
            self._on_moved(msg)
        elif isinstance(msg, AgentReply):
            self._agents.on_reply(msg)
        # Wake: only makes the loop look at _closing; CodecError: nothing to do

    def _on_moved(self, msg: TasksMoved) -> None:
        """A worker gave our queued tasks to a thief: they are in flight there now. If that
        thief has been replaced meanwhile, they died with it: send them again."""
        lost = []
        with self._lock:
            link = self._links[msg.worker]
            for task_id in msg.task_ids:
                task = self._tasks.get(task_id)
                if task is None or task.worker < 0:
                    continue  # finished already, or already queued for re-sending
                self._links[task.worker].inflight.discard(task_id)
                if msg.generation < link.generation:
                    task.worker = -1
                    lost.append(task)
                else:
                    task.worker, task.generation = msg.worker, msg.generation
                    link.inflight.add(task_id)
        if lost:
            self._queue_send(lost)

    def _on_done(self, msg: TaskDone) -> None:
        if msg.ref is not None:
            self._on_done_ref(msg.task_id, msg.ref)
            return
        assert msg.result is not None
        try:
            value = pickle.loads(msg.result)
        except Exception as exc:
            err = SerializationError(f"cannot unpickle the result: {exc!r}")
            err.__cause__ = exc
            self._finish(msg.task_id, exc=err)
            return
        self._finish(msg.task_id, value=value)

    def _on_done_ref(self, task_id: int, ref: ArrayRef) -> None:
        arena = self._arena
        assert arena is not None
        with self._lock:
            wanted = task_id in self._tasks
        if not wanted:
            with contextlib.suppress(IPCError):
                arena.release(ref)
            return
        arr = arena.view(ref)
        # Every view of arr keeps arr alive (numpy collapses bases to it), so the hold goes
        # when the last view does. While it lives, passing arr to another task sends ref.
        self._views[id(arr)] = ref
        weakref.finalize(arr, self._release_ref, ref, id(arr))
        self._finish(task_id, value=arr)

    def _release_ref(self, ref: ArrayRef, key: int) -> None:
        self._views.pop(key, None)
        if self._arena is not None and not self._closed and os.getpid() == self._pid:
            with contextlib.suppress(IPCError):
                self._arena.release(ref)

    def _on_error(self, msg: TaskError) -> None:
        kind = ErrorKind(msg.kind)
        if kind is ErrorKind.UNKNOWN_FUNCTION:
            with self._lock:
                task = self._tasks.get(msg.task_id)
                if task is not None:
                    self._links[task.worker].sent_keys.discard(task.fn_key)
            if task is not None:
                self._queue_send([task])
            return
        exc: BaseException
        if kind is ErrorKind.TIMEOUT:
            exc = TaskTimeoutError(f"task {msg.task_id} ran past its timeout")
        elif kind is ErrorKind.SERIALIZATION:
            exc = SerializationError(msg.message)
        else:
            exc = _rebuild(msg)
        exc.__cause__ = RemoteTraceback(msg.traceback)
        self._finish(msg.task_id, exc=exc)

    def _finish(self, task_id: int, value: object = None, exc: BaseException | None = None) -> None:
        with self._lock:
            task = self._tasks.pop(task_id, None)
            if task is not None and task.worker >= 0:
                self._links[task.worker].inflight.discard(task_id)
                task.future.worker = task.worker
        if task is None:
            return  # cancelled, or a duplicate after a re-run
        if task.refs:
            self._drop_holds(task)
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if exc is None:
                task.future.set_result(value)
            else:
                task.future.set_exception(exc)

    # ---- Workers lost, kernel gone ----

    def _on_worker_lost(self, index: int, generation: int, running_task: int) -> None:
        """Re-send the tasks the lost worker held; the running one uses up a retry."""
        self._drain_ready()  # replies the worker published before dying count
        self._agents.on_worker_lost(index)
        with self._lock:
            link = self._links[index]
            if generation <= link.generation:
                return  # already handled
            try:
                writer = RingWriter.attach(self._kinst, worker_ring(index, generation))
            except (SegmentError, OSError):
                return  # replaced again already; the next notice or check handles it
            self._graveyard.append(link.writer)  # another thread may be sending through it
            lost = [self._tasks[t] for t in link.inflight if t in self._tasks]
            self._links[index] = self._link_for(index, generation, writer)
            crashed = []
            for task in lost:
                task.worker = -1
                if task.id == running_task:
                    task.retries_left -= 1
                    if task.retries_left < 0:
                        crashed.append(task)
            if self._metrics is not None:
                self._metrics.inc("tasks_retried", len(lost) - len(crashed))
        for task in crashed:
            self._finish(task.id, exc=WorkerCrashedError(f"worker w{index:02d} died"))
        resend = [t for t in lost if t not in crashed]
        if resend:
            self._queue_send(resend)

    def _drain_ready(self) -> None:
        with self._rx_lock:
            try:
                frames = self._reader.recv_many(4096, timeout=0)
            except (RingEmpty, RingClosedError):
                return
            self._handle_batch(decode_frames(frames))

    def _broken_send(self, exc: Exception) -> None:
        """A send on the receiver thread failed unexpectedly (its agent asks were failed):
        log it and go on."""
        log_event(_log, logging.ERROR, "client_send_failed", client=self._slot, error=repr(exc))

    def _check_kernel(self) -> None:
        """Between slices: is the supervisor alive; did a worker change without notice?"""
        if not self._control.supervisor_alive():
            self._break(KernelNotRunningError("the kernel's supervisor is gone"))
            return
        for link in list(self._links):
            gen = self._control.worker_generation(link.index)
            if gen > link.generation:
                if link.stale_seen:  # two checks in a row: the notice is not coming
                    self._on_worker_lost(link.index, gen, -1)
                link.stale_seen = True

    def _break(self, exc: BaseException) -> None:
        """Fail every pending future with ``exc``; later submits raise it."""
        if self._broken is None:
            self._broken = exc
        self._usable = False
        self._agents.fail_all(exc)
        with self._lock:
            ids = list(self._tasks)
        for tid in ids:
            self._finish(tid, exc=exc)

    def _check_usable(self) -> None:
        if self._pid != _pid:
            raise KernelNotRunningError(
                f"this client belongs to process {self._pid}: connect again after fork"
            )
        if self._closed or self._closing:
            raise KernelNotRunningError("this client is closed")
        if self._broken is not None:
            raise KernelNotRunningError(str(self._broken))
        if not self._control.running_now:
            raise KernelNotRunningError(f"the kernel is {self._control.state.name.lower()}")

    # ---- Lifecycle ----

    def statistics(self) -> ClientStatistics:
        """Counts of this client's pending tasks, per worker."""
        with self._lock:
            return ClientStatistics(
                slot=self._slot,
                pending=len(self._tasks),
                inflight=tuple(len(link.inflight) for link in self._links),
            )

    @property
    def workers(self) -> int:
        """Number of workers of the kernel."""
        return self._control.workers

    def close(self) -> None:
        """Detach from the kernel: pending futures fail with ``KernelNotRunningError``, the
        slot is freed and this client's segments removed. Safe to call twice."""
        if self._closed or os.getpid() != self._pid:
            return
        with contextlib.suppress(IPCError):
            # Held tells go out: they were sent as far as callers know. Without waiting: a
            # worker stuck on a long task must not hold close() up.
            self._send_agent_unsent(wait=False)
        self._stop_threads()
        self._closed = True
        atexit.unregister(self.close)
        self._break(KernelNotRunningError("the client was closed"))
        self._agents.close()
        self._release_rings()
        self._control.unregister(self._slot, self._gen)
        self._close_shared()

    def _stop_threads(self) -> None:
        self._closing = True
        self._usable = False
        with self._park:
            self._park.notify()
        with contextlib.suppress(IPCError):
            self._wake.send(encode(Wake()), timeout=1.0)
        me = threading.current_thread()
        if me is not self._receiver:  # close() from a done-callback: it exits on return
            self._receiver.join()
        if self._dispatcher is not None:
            self._dispatch_q.put(None)
            if me is not self._dispatcher:
                self._dispatcher.join()

    def _release_rings(self) -> None:
        for writer in (*self._graveyard, *(link.writer for link in self._links), self._wake):
            with contextlib.suppress(IPCError, OSError):
                writer.close()
        self._reader.close()

    def _close_shared(self) -> None:
        if self._arena is not None:
            self._arena.close()
        self._control.close()
        self._inst.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"slot={self._slot}"
        return f"<astra.Client {self._kinst.id} {state}>"


@dataclasses.dataclass(frozen=True, slots=True)
class ClientStatistics:
    """A snapshot of one client's pending work."""

    slot: int
    pending: int
    inflight: tuple[int, ...]


# os.getpid() is a system call; the submit path compares against this copy instead.
_pid = os.getpid()


def _grants(
    memory: Iterable[str], grants: Mapping[str, Iterable[str]] | None
) -> dict[str, list[str]]:
    """A spawn's plugin grants: ``grants`` with ``memory`` added under "memory"."""
    out = {plugin: list(values) for plugin, values in (grants or {}).items()}
    if isinstance(memory, str):
        raise TypeError(f"memory= takes a list of namespaces, not the string {memory!r}")
    if memory:
        out["memory"] = out.get("memory", []) + list(memory)
    return out


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()
    for client in _clients:  # the parent's: unusable here
        client._usable = False


#: Every client of this process (weakly): a fork makes them all unusable in the child.
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


os.register_at_fork(after_in_child=_refresh_pid)


def _load_sched_getcpu() -> Callable[[], int] | None:
    try:
        fn: Callable[[], int] = ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    return fn


_sched_getcpu = _load_sched_getcpu()


def _current_cpu() -> int:
    """The CPU this thread runs on now (vDSO, tens of nanoseconds); -1 if unknown."""
    return int(_sched_getcpu()) if _sched_getcpu is not None else -1


def _step_aside(core: int | None) -> None:
    """Before spinning for an answer from the worker pinned to ``core``: if this thread
    runs on that core, move it to another it may use (its affinity is set without
    ``core`` and at once set back, which moves it and leaves it where it lands). A spin
    on the worker's own core keeps the worker from running: an agent's synchronous ask
    took 85-110 us that way here, 23-38 us from another core. Tasks avoid this by choosing
    their worker (``Client._choose``); an agent's worker is fixed. Where it does not apply
    (no pinning, one CPU allowed), nothing happens."""
    if core is None or core != _current_cpu():
        return
    try:
        allowed = os.sched_getaffinity(0)
        if len(allowed) < 2 or core not in allowed:
            return
        os.sched_setaffinity(0, allowed - {core})
        os.sched_setaffinity(0, allowed)
    except OSError:
        pass  # a container may forbid it: only the latency suffers


def cancelled() -> bool:
    """Inside a task: whether its future was cancelled while it runs.

    ``Future.cancel()`` drops a task that has not started and cancels a running ``async
    def`` task outright; a running plain function cannot be interrupted safely, so a long
    one polls ``astra.cancelled()`` and returns early (its result is discarded). Outside a
    task, False. Cheap: one word of shared memory.
    """
    return cancel_requested()


def _futures_in(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> list[concurrent.futures.Future[object]]:
    """The distinct futures among the arguments, at any depth (dependency edges)."""
    found = _deps.find(args, kwargs, concurrent.futures.Future)
    if len(found) < 2:
        return found  # type: ignore[return-value]
    return list({id(f): f for f in found}.values())  # type: ignore[arg-type]


def _upstream(dep: concurrent.futures.Future[object]) -> UpstreamError:
    """The error of a task whose dependency ``dep`` failed: names the root failure."""
    exc = dep.exception()
    assert exc is not None
    if isinstance(exc, UpstreamError):
        err = UpstreamError(str(exc), exc.root, exc.root_task)
    else:
        label = getattr(dep, "label", "") or "?"
        root_task = f"task {getattr(dep, 'task_id', '?')} ({label})"
        err = UpstreamError(
            f"upstream {root_task} failed: {type(exc).__name__}: {exc}", exc, root_task
        )
    err.__cause__ = err.root
    return err


def _rebuild(msg: TaskError) -> BaseException:
    if msg.error:
        try:
            exc = pickle.loads(msg.error)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            return exc
    return RemoteError(msg.message)
