"""A worker process (``astra-wNN``): reads its inbox ring, runs tasks, replies to clients.

Data flow (each arrow a shared-memory ring; the worker reads one, writes one per client):

    client c0 --lane--.                                 .--> to_c0 (client c0's inbox)
    client c1 --lane---+--> to_wNN.<gen> --> worker ----+--> to_c1
    supervisor -lane--'      (inbox)          |  heap   '
                                              '--> asyncio loop thread (async def tasks,
                                                   agents; borrowed by the main thread
                                                   when idle: kernel/sharedloop.py)

Protocol:

1. *Receive.* The main thread blocks on the inbox (a semaphore wait: an idle worker burns no
   CPU) and moves ``RunTask``s into a heap ordered by (priority, arrival). While the heap is
   not empty it polls the inbox without blocking at most once a millisecond, so a
   higher-priority task overtakes queued ones within about a millisecond.
2. *Run.* Before a task runs, the worker checks that its client still holds the slot it
   submitted from (one word of the control block; the supervisor frees the slots of dead
   clients) and publishes (client, task) in its control row, so that the supervisor can say
   which task was running if the worker dies. A ``timeout_s`` arms ``ITIMER_REAL``; the
   handler raises ``TaskTimeout`` in the task. A task sent with ``once`` (no retries left)
   stays published as running until its reply is in the client's ring, so a death after it
   ran and before its reply fails it rather than re-running it (sync tasks only: an
   ``async def`` task is never published as running). ``async def`` tasks go to an asyncio loop on a
   second thread, so a task awaiting I/O never blocks the others.
3. *Reply.* Results are batched per client and flushed when the heap empties, every 64
   results, or every millisecond. A numpy result of ``ARENA_THRESHOLD_BYTES`` or more goes
   into the arena: the worker hands a hold to the client's pid before sending the
   descriptor, then drops its own (ipc/arena.py protocol), so the client gets a zero-copy view.
4. *Stop.* ``StopWorker(drain=True)`` finishes the heap, the inbox and running async tasks
   first; ``drain=False`` exits after the current task. A dead supervisor kills the worker
   (``PR_SET_PDEATHSIG``); a dead client's ring raises ``RingClosedError`` and its results
   are dropped.

Plugins (kernel/plugins.py) see steps 1-3 as ``task_submitted`` (not again for a stolen
task), ``task_started`` and ``task_finished``/``task_failed`` (before the reply leaves);
each is behind its flag in ``plugins.events``, so nothing is built when nobody listens.
"""

from __future__ import annotations

__all__ = ["ARENA_THRESHOLD_BYTES", "Worker", "cancel_requested"]

import asyncio
import contextlib
import heapq
import inspect
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Final, cast

import msgspec
import numpy as np
import posix_ipc

from ipc import (
    CodecError,
    FrameTooLargeError,
    Instance,
    IPCError,
    RingClosedError,
    RingEmpty,
    RingFull,
    RingWriter,
    SegmentError,
)

from .agentd import AgentFrame, AgentService
from .errors import TaskTimeout
from .logs import log_event
from .messages import (
    MAX_REPLY_BYTES,
    AgentCall,
    AgentCalls,
    AgentReply,
    CancelRun,
    ErrorKind,
    ListAgents,
    RunTask,
    SpawnAgent,
    StealReply,
    StopAgent,
    StopWorker,
    TaskDone,
    TaskError,
    TasksMoved,
    Wake,
    decode_frames,
    encode,
)
from .plugins import emit, events
from .scheduler import (
    STEAL_DELAY_S,
    STEAL_WAIT_S,
    pick_victim,
    split_for_thief,
    steal_bell,
    worker_ring,
)
from .sharedloop import SharedLoop
from .shipping import (
    ShippingError,
    TaskFunction,
    dumps,
    load_function,
    loads,
    loads_refs,
    pack_exception,
)
from .tools import set_data_dir, set_metrics

if TYPE_CHECKING:
    import concurrent.futures
    from collections.abc import Coroutine

    from ipc import Arena, ArrayRef, RingReader

    from .control import ControlBlock
    from .metrics import MetricsRow


#: Results at least this large (numpy arrays) travel through the arena, not the ring.
ARENA_THRESHOLD_BYTES: Final = int(os.getenv("ASTRA_ARENA_THRESHOLD_BYTES", str(1 << 20)))
#: Longest a task waits in the heap before the worker polls its inbox again.
POLL_INTERVAL_S: Final = float(os.getenv("ASTRA_WORKER_POLL_INTERVAL_S", "0.001"))
#: Results buffered per flush at most.
FLUSH_EVERY: Final = 64

_Key = tuple[int, int]  # (client slot, task id)
#: The frames the agent service takes (kernel/agentd.py).
_AGENT_FRAMES: Final = frozenset(
    {AgentCall, AgentCalls, AgentReply, SpawnAgent, StopAgent, ListAgents}
)

# The plain (not async) task this process is running: (control, client, worker, task id).
_current: tuple[ControlBlock, int, int, int] | None = None


def cancel_requested() -> bool:
    """Inside a running task: whether its client cancelled it. A plain function cannot be
    interrupted safely, so a long one polls this and returns early (cooperative
    cancellation); an ``async def`` task is cancelled outright. False outside a task."""
    current = _current
    if current is None:
        return False
    control, client, index, task_id = current
    return control.cancel_requested(client, index, task_id)


class _Link:
    """A worker's writer into one client's inbox ring."""

    def __init__(self, generation: int, pid: int, writer: RingWriter) -> None:
        self.generation = generation
        self.pid = pid
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(OSError, IPCError):  # the client's segments may be gone
            self.writer.close()


class Worker:
    """The main loop of one worker process. Built and run in the forked child only."""

    def __init__(
        self,
        index: int,
        instance: Instance,
        control: ControlBlock,
        inbox: RingReader,
        arena: Arena | None,
        generation: int = 0,
        data_dir: str | None = None,
    ) -> None:
        self.index = index
        self.generation = generation
        self._data_dir = data_dir  # where persisted agents' checkpoints live
        set_data_dir(self.state_path(""))  # tool calls' audit log
        self._log = logging.getLogger(f"astra.worker.w{index:02d}")
        self._instance = instance
        self._control = control
        self._inbox = inbox
        self._arena = arena
        self._fns: dict[bytes, TaskFunction] = {}
        self._fn_bytes: dict[bytes, bytes] = {}  # shipped, not yet unpickled
        self._heap: list[tuple[int, int, RunTask]] = []
        self._seq = 0
        self._queued: set[_Key] = set()  # the tasks in the heap
        self._cancelled: set[_Key] = set()  # subset of _queued: drop when popped
        self._is_async: dict[bytes, bool] = {}  # fn key -> is an async def
        self._links: dict[int, _Link] = {}
        self._links_lock = threading.Lock()  # the loop thread sends too
        self._retired: list[_Link] = []  # links to departed clients, to close when safe
        # (client slot, generation) -> reply frames; main thread only
        self._out: dict[tuple[int, int], list[bytes]] = {}
        self._out_n = 0
        self._last_flush = time.monotonic()
        self._last_poll = 0.0
        self._draining = False
        self._stop_now = False
        self._timing = False  # a sync task with a timeout is running
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shared: SharedLoop | None = None
        self._main_ident = threading.get_ident()  # run() sets it again, in the thread it runs
        self._async: dict[_Key, concurrent.futures.Future[None]] = {}
        self._count_lock = threading.Lock()
        # Work stealing (kernel/scheduler.py). The heap and its sets are shared with the
        # responder thread under _heap_lock; the inbox is read under _inbox_lock.
        self._heap_lock = threading.Lock()
        self._inbox_lock = threading.Lock()
        self._fn_src: dict[bytes, bytes] = {}  # every function shipped here, for thieves
        self._peers: dict[int, tuple[int, RingWriter]] = {}  # worker -> (generation, writer)
        self._peer_lock = threading.Lock()
        self._bells: dict[tuple[int, int], posix_ipc.Semaphore] = {}  # victims' bells
        self._served: dict[int, int] = {}  # thief -> last request sequence served
        self._steal_pending: tuple[int, int] | None = None  # (victim, seq) asked, unanswered
        self._steal_dry = False  # the last answer gave nothing: wait for a hint
        self._hinted = False  # a Wake arrived: work waits somewhere
        self._hint_at: dict[int, float] = {}  # idle worker -> when we last woke it
        self._responder: threading.Thread | None = None
        self._bell: posix_ipc.Semaphore | None = None
        self._responder_stop = False
        self._agent_service: AgentService | None = None
        # Hot-path metrics (kernel/kmetrics.py): this worker's row, written by the main
        # thread and the loop thread (async tasks, agents) under metrics_lock.
        table = control.metrics
        self.metrics: MetricsRow | None = table.row(index) if table is not None else None
        self.metrics_lock = threading.Lock()
        set_metrics(self.metrics, self.metrics_lock)  # tool calls by outcome

    # ---- Main loop (protocol steps 1 and 4) ----

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        signal.signal(signal.SIGALRM, self._on_alarm)
        self._main_ident = threading.get_ident()
        self._start_responder()
        try:
            while not self._stop_now:
                frames = self._next_frames()
                if frames is None:
                    break
                self._handle(frames)
                if self._heap and not self._stop_now:
                    self._run_one()
        finally:
            self._shutdown()
        return 0

    def _next_frames(self) -> list[bytes] | None:
        """Frames to handle now; [] if none are ready and tasks wait; None to exit."""
        now = time.monotonic()
        if self._heap:
            if now - self._last_poll < POLL_INTERVAL_S:
                return []
            self._last_poll = now
            return self._recv(timeout=0.0)
        self._flush()
        self._close_retired()
        if self._draining:
            frames = self._recv(timeout=0.0)
            if frames is None or frames:
                return frames
            self._wait_async()
            return None
        return self._idle_frames()

    def _idle_frames(self) -> list[bytes] | None:
        """Nothing queued: steal from a busy worker, or block until a frame comes."""
        frames = self._recv(timeout=0.0)
        if frames is None or frames:
            return frames
        control = self._control
        stealing = control.workers > 1
        if stealing and not self._steal_dry:
            # Our own clients first: one may be between batches. Stealing at once made two
            # busy workers trade tiny tasks back and forth (thousands of steals a second).
            frames = self._recv(timeout=STEAL_DELAY_S)
            if frames is None or frames:
                return frames
            hinted, self._hinted = self._hinted, False
            victim = pick_victim(control, self.index, busy_too=hinted, backlog=self._backlog)
            if victim >= 0 and self._ask(victim):
                return self._recv(timeout=STEAL_WAIT_S)  # its tasks, then its reply
        self._steal_dry = False
        control.set_idle(self.index, True)
        try:
            if stealing and pick_victim(control, self.index, backlog=self._backlog) >= 0:
                return []  # work appeared as we went idle: go round and ask
            return self._recv(timeout=None)
        finally:
            control.set_idle(self.index, False)

    def _recv(self, timeout: float | None) -> list[bytes] | None:
        with self._inbox_lock:
            try:
                return self._inbox.recv_many(1024, timeout=timeout)
            except RingEmpty:
                return []
            except RingClosedError:
                return None

    def _handle(self, frames: list[bytes]) -> None:
        """Handle inbox frames (main thread, or the responder draining before it gives)."""
        agent_msgs: list[AgentFrame] = []
        submitted: list[RunTask] = []  # for the plugins' task_submitted listeners, if any
        with self._heap_lock:
            for msg in decode_frames(frames):
                if type(msg) in _AGENT_FRAMES:  # first: agent messages come by the thousand
                    agent_msgs.append(msg)  # type: ignore[arg-type]
                elif isinstance(msg, RunTask):
                    if msg.fn is not None:
                        self._fn_src[msg.fn_key] = msg.fn
                        if msg.fn_key not in self._fns:
                            # Learn the function on arrival: a task queued ahead may need it.
                            self._fn_bytes[msg.fn_key] = msg.fn
                    self._seq += 1
                    heapq.heappush(self._heap, (-msg.priority, self._seq, msg))
                    self._queued.add((msg.client, msg.task_id))
                    if events.task_submitted and not msg.stolen:
                        submitted.append(msg)
                elif isinstance(msg, CancelRun):
                    self._cancel((msg.client, msg.task_id))
                elif isinstance(msg, StealReply):
                    self._on_steal_reply(msg)
                elif isinstance(msg, Wake):
                    self._hinted = True
                elif isinstance(msg, StopWorker):
                    self._draining = True
                    self._stop_now |= not msg.drain
                elif isinstance(msg, CodecError):
                    log_event(self._log, logging.ERROR, "bad_frame_dropped", error=str(msg))
                else:
                    log_event(
                        self._log, logging.ERROR, "unexpected_message", kind=type(msg).__name__
                    )
            depth = len(self._heap)
            self._control.set_queued(self.index, depth)
        for msg in submitted:  # outside the heap lock: listeners may take their time
            emit("task_submitted", task=msg.task_id, client=msg.client, name=self._fn_name(msg))
        if agent_msgs:
            self._agents().on_frames(agent_msgs, here=threading.get_ident() == self._main_ident)
        if depth >= 2:
            self._hint_idle()

    def _cancel(self, key: _Key) -> None:
        cfut = self._async.get(key)
        if cfut is not None:
            cfut.cancel()  # thread-safe: cancels the asyncio task on the loop thread
        elif key in self._queued:
            self._cancelled.add(key)
        # else it ran already (or its RunTask is still on the way): the client drops the
        # result of a cancelled future

    # ---- Work stealing (kernel/scheduler.py) ----

    def _start_responder(self) -> None:
        if self._control.workers < 2:
            return
        try:
            self._bell = self._instance.open_semaphore(steal_bell(self.index, self.generation))
        except (SegmentError, PermissionError):
            log_event(self._log, logging.WARNING, "no_steal_bell")
            return
        self._responder = threading.Thread(
            target=self._respond_loop, name="astra-steal", daemon=True
        )
        self._responder.start()

    def _respond_loop(self) -> None:
        """The responder thread: blocks on our bell; serves the thieves that rang it."""
        bell = self._bell
        assert bell is not None
        while True:
            bell.acquire()
            if self._responder_stop:
                return
            for thief in range(self._control.workers):
                if thief == self.index:
                    continue
                victim, seq = self._control.steal_request(thief)
                if victim == self.index and seq > self._served.get(thief, 0):
                    self._served[thief] = seq
                    try:
                        self._give(thief, seq)
                    except Exception:  # a bug here must not stop the worker
                        log_event(
                            self._log,
                            logging.ERROR,
                            "steal_failed",
                            thief=f"w{thief:02d}",
                            exc_info=True,
                        )

    def _give(self, thief: int, seq: int) -> None:
        """Forward the first half of our queue to ``thief`` (protocol step 3)."""
        if self._inbox_lock.acquire(blocking=False):  # else the main thread reads: idle
            try:
                frames = self._inbox.recv_many(1024, timeout=0)
                if frames:
                    # Handled before the lock goes: agent frames must be queued on the loop
                    # before the main thread can read (and run) a sender's next ones.
                    self._handle(frames)
            except (RingEmpty, RingClosedError):
                pass
            finally:
                self._inbox_lock.release()
        with self._heap_lock:
            taken = [] if self._draining else split_for_thief(self._heap)
            msgs = []
            for _, _, msg in taken:
                key = (msg.client, msg.task_id)
                self._queued.discard(key)
                if key in self._cancelled:
                    self._cancelled.discard(key)
                else:
                    msgs.append(msg)
            self._control.set_queued(self.index, len(self._heap))
        generation = self._control.worker_generation(thief)
        frames = []
        with_fn: set[bytes] = set()
        for msg in msgs:
            fn = None
            if msg.fn_key not in with_fn:
                with_fn.add(msg.fn_key)
                fn = self._fn_src.get(msg.fn_key)
            frames.append(encode(msgspec.structs.replace(msg, fn=fn, stolen=True)))
        frames.append(encode(StealReply(self.index, seq, len(msgs))))
        sent = 0
        writer = self._peer(thief, generation)
        if writer is not None:
            try:
                sent = min(writer.send_many(frames, timeout=STEAL_WAIT_S), len(msgs))
            except RingFull as exc:
                sent = min(exc.sent, len(msgs))
            except RingClosedError:
                sent = 0  # the thief is gone; whatever reached it is re-run via WorkerLost
        if sent < len(msgs):
            self._take_back(msgs[sent:])
        moved: dict[tuple[int, int], list[int]] = {}
        for msg in msgs[:sent]:
            moved.setdefault((msg.client, msg.client_gen), []).append(msg.task_id)
        for (client, client_gen), ids in moved.items():
            self._send(client, client_gen, [encode(TasksMoved(thief, generation, ids))])

    def _take_back(self, msgs: list[RunTask]) -> None:
        with self._heap_lock:
            for msg in msgs:
                self._seq += 1
                heapq.heappush(self._heap, (-msg.priority, self._seq, msg))
                self._queued.add((msg.client, msg.task_id))
            self._control.set_queued(self.index, len(self._heap))

    def _peer(self, index: int, generation: int) -> RingWriter | None:
        """Our writer into worker ``index``'s inbox (its current generation)."""
        with self._peer_lock:
            held = self._peers.get(index)
            if held is not None and held[0] == generation:
                return held[1]
            if held is not None:
                with contextlib.suppress(IPCError, OSError):
                    held[1].close()
                del self._peers[index]
            try:
                writer = RingWriter.attach(self._instance, worker_ring(index, generation))
            except (IPCError, OSError):
                return None
            self._peers[index] = (generation, writer)
            return writer

    def _backlog(self, index: int) -> int:
        """Slots unread in worker ``index``'s inbox (0 if we cannot attach to it)."""
        writer = self._peer(index, self._control.worker_generation(index))
        return 0 if writer is None else writer.depth()

    def _ask(self, victim: int) -> bool:
        """Ring ``victim``'s bell with a request in our row (protocol step 2)."""
        generation = self._control.worker_generation(victim)
        bell = self._bells.get((victim, generation))
        if bell is None:
            for key in [k for k in self._bells if k[0] == victim]:
                self._bells.pop(key).close()
            try:
                bell = self._instance.open_semaphore(steal_bell(victim, generation))
            except (SegmentError, PermissionError):
                return False
            self._bells[(victim, generation)] = bell
        seq = self._control.request_steal(self.index, victim)
        self._steal_pending = (victim, seq)
        bell.release()
        return True

    def _on_steal_reply(self, msg: StealReply) -> None:
        if self._steal_pending == (msg.victim, msg.seq):
            self._steal_pending = None
        if msg.count:
            self._control.add_steals(self.index, msg.count)
        self._steal_dry = msg.count == 0

    def _hint_idle(self) -> None:
        """Two or more queued here: wake an idle worker so it steals (protocol step 4)."""
        control = self._control
        now = time.monotonic()
        for index in range(control.workers):
            if index == self.index or not control.idle(index):
                continue
            if now - self._hint_at.get(index, 0.0) < POLL_INTERVAL_S:
                continue
            self._hint_at[index] = now
            writer = self._peer(index, control.worker_generation(index))
            if writer is not None:
                with contextlib.suppress(IPCError):
                    writer.send_nowait(encode(Wake()))
            return  # one thief per hint; it takes half, and hints again if need be

    # ---- Running one task (protocol step 2) ----

    def _run_one(self) -> None:
        with self._heap_lock:
            if not self._heap:
                return  # a thief took the rest
            _, _, msg = heapq.heappop(self._heap)
            key = (msg.client, msg.task_id)
            self._queued.discard(key)
            self._control.set_queued(self.index, len(self._heap))
            if key in self._cancelled:
                self._cancelled.discard(key)
                return
        if not self._control.slot_current(msg.client, msg.client_gen):
            return  # the client left or died: nobody wants the result
        self._metric("tasks_started")
        prepared = self._prepare(msg)
        if isinstance(prepared, TaskError):
            self._emit_done(msg, prepared)
            self._queue_reply(msg, prepared)
            return
        fn, args, kwargs = prepared
        if events.task_started:
            emit("task_started", task=msg.task_id, client=msg.client, name=_qualname(fn))
        is_async = self._is_async.get(msg.fn_key)
        if is_async is None:
            is_async = self._is_async[msg.fn_key] = inspect.iscoroutinefunction(fn)
        if is_async:
            self._start_async(msg, fn, args, kwargs)
            return
        reply = self._call(msg, fn, args, kwargs)
        self._emit_done(msg, reply)
        self._queue_reply(msg, reply)
        if msg.once:  # shown running until its reply is out: it must not run twice
            self._flush()
            self._control.set_running(self.index, -1, 0)

    # ---- Lifecycle events for plugins (kernel/plugins.py), behind their flags ----

    def _emit_done(self, msg: RunTask, reply: TaskDone | TaskError) -> None:
        """task_finished or task_failed, before the reply leaves (so a client that has
        its result finds the listeners' effects)."""
        if isinstance(reply, TaskError):
            if events.task_failed:
                detail = reply.message.partition(":")[0]
                emit("task_failed", task=msg.task_id, client=msg.client,
                     name=self._fn_name(msg), detail=detail)  # fmt: skip
        elif events.task_finished:
            emit("task_finished", task=msg.task_id, client=msg.client, name=self._fn_name(msg))

    def _fn_name(self, msg: RunTask) -> str:
        """The task's function name, loading the function if it only arrived as bytes
        (which stay: ``_prepare``, maybe on another thread, pops them)."""
        fn = self._fns.get(msg.fn_key)
        data = self._fn_bytes.get(msg.fn_key)
        if fn is None and data is not None:
            with contextlib.suppress(ShippingError):
                fn = self._fns[msg.fn_key] = load_function(data)
        return "" if fn is None else _qualname(fn)

    def _prepare(
        self, msg: RunTask
    ) -> TaskError | tuple[TaskFunction, tuple[object, ...], dict[str, object]]:
        fn = self._fns.get(msg.fn_key)
        try:
            if fn is None:
                data = self._fn_bytes.pop(msg.fn_key, None)
                if data is None:
                    return TaskError(msg.task_id, ErrorKind.UNKNOWN_FUNCTION, b"", "", "")
                fn = self._fns[msg.fn_key] = load_function(data)
            # (args, kwargs), by the client's contract; large arrays may stay in the arena
            # (refs), held by the client until the reply
            payload = loads_refs(msg.args, self._arena_view) if msg.refs else loads(msg.args)
            args, kwargs = cast("tuple[tuple[object, ...], dict[str, object]]", payload)
        except ShippingError as exc:
            return self._error(msg, ErrorKind.SERIALIZATION, exc)
        return fn, args, kwargs

    def _call(
        self,
        msg: RunTask,
        fn: TaskFunction,
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> TaskDone | TaskError:
        global _current
        _current = (self._control, msg.client, self.index, msg.task_id)
        self._control.set_running(self.index, msg.client, msg.task_id)
        t0 = time.perf_counter()
        try:
            if msg.timeout_s > 0:
                self._timing = True
                signal.setitimer(signal.ITIMER_REAL, msg.timeout_s)
            result = fn(*args, **kwargs)
            self._timing = False
        except TaskTimeout as exc:
            return self._error(msg, ErrorKind.TIMEOUT, exc)
        except BaseException as exc:  # a task's failure is its future's, never the worker's
            self._timing = False
            return self._error(msg, ErrorKind.RAISED, exc)
        finally:
            if msg.timeout_s > 0:
                self._timing = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            if not msg.once:
                self._control.set_running(self.index, -1, 0)
            _current = None
            self._observe(time.perf_counter() - t0)
        return self._done(msg, result)

    def _metric(self, name: str, amount: float = 1.0) -> None:
        if self.metrics is not None:
            with self.metrics_lock:
                self.metrics.inc(name, amount)

    def _observe(self, seconds: float) -> None:
        if self.metrics is not None:
            with self.metrics_lock:
                self.metrics.observe("task_seconds", seconds)

    def _on_alarm(self, signum: int, frame: object) -> None:
        if self._timing:
            self._timing = False
            raise TaskTimeout("task timed out")

    def _arena_view(self, ref: ArrayRef) -> object:
        """An argument in the arena: a read-only view, valid while its task runs (the
        submitting client holds the block until the task's reply)."""
        if self._arena is None:
            raise ShippingError("an arena argument reached a worker without an arena")
        try:
            return self._arena.view(ref)
        except IPCError as exc:
            raise ShippingError(f"arena argument gone: {exc}") from exc

    def _error(self, msg: RunTask, kind: ErrorKind, exc: BaseException) -> TaskError:
        data, tb, text = pack_exception(exc)
        return TaskError(msg.task_id, kind, data, tb, text)

    def _done(self, msg: RunTask, result: object) -> TaskDone | TaskError:
        arena = self._arena
        if (
            arena is not None
            and isinstance(result, np.ndarray)
            and result.nbytes >= ARENA_THRESHOLD_BYTES
        ):
            link = self._link(msg.client, msg.client_gen)
            if link is None:
                return TaskDone(msg.task_id, None)  # the client is gone; nobody reads it
            try:
                ref = arena.put(result)
                arena.hand_to(ref, link.pid)  # the client's hold, before it sees the ref
                arena.release(ref)
            except (IPCError, ProcessLookupError) as exc:
                return self._error(msg, ErrorKind.SERIALIZATION, exc)
            return TaskDone(msg.task_id, None, ref)
        try:
            data = dumps(result)
        except ShippingError as exc:
            return self._error(msg, ErrorKind.SERIALIZATION, exc)
        if len(data) > MAX_REPLY_BYTES:
            err = ShippingError(f"result of {len(data)} B is too large to send inline")
            return self._error(msg, ErrorKind.SERIALIZATION, err)
        return TaskDone(msg.task_id, data)

    # ---- Agents (kernel/agentd.py) and the services they use ----

    def _agents(self) -> AgentService:
        if self._agent_service is None:
            self._agent_service = AgentService(self, self._ensure_shared())
        return self._agent_service

    @property
    def instance(self) -> Instance:
        return self._instance

    @property
    def workers(self) -> int:
        return self._control.workers

    @property
    def arena(self) -> Arena | None:
        return self._arena

    def state_path(self, name: str) -> str:
        """A path under this kernel's data directory (persisted agent state)."""
        from .daemon import default_state_dir  # a cycle at import: daemon imports us

        return os.path.join(self._data_dir or default_state_dir(), name)

    def send_to_client(self, client: int, generation: int, frames: list[bytes]) -> None:
        """Send frames to a client's inbox (any thread); dropped if the client is gone."""
        self._send(client, generation, frames)

    def send_to_worker(self, index: int, frame: bytes) -> bool:
        """Send a frame to worker ``index``'s inbox (any thread); False if it is gone."""
        writer = self._peer(index, self._control.worker_generation(index))
        if writer is None:
            return False
        try:
            writer.send_many([frame], timeout=1.0)
        except (RingClosedError, RingFull):
            return False
        return True

    # ---- Async tasks: an asyncio loop on a second thread ----

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        return self._ensure_shared().loop

    def _ensure_shared(self) -> SharedLoop:
        """The loop thread, which the main thread may borrow (``kernel/sharedloop.py``)."""
        if self._shared is None:
            self._shared = SharedLoop()
            self._loop = self._shared.loop
        return self._shared

    def _start_async(
        self,
        msg: RunTask,
        fn: TaskFunction,
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> None:
        loop = self._ensure_loop()
        key = (msg.client, msg.task_id)
        coro = self._run_async(msg, fn, args, kwargs)
        self._async[key] = asyncio.run_coroutine_threadsafe(coro, loop)

    async def _run_async(
        self,
        msg: RunTask,
        fn: TaskFunction,
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> None:
        key = (msg.client, msg.task_id)
        reply: TaskDone | TaskError | None = None
        scope: asyncio.Timeout | None = None
        t0 = time.perf_counter()
        try:
            coro: Coroutine[object, object, object] = fn(*args, **kwargs)  # type: ignore[assignment]
            async with asyncio.timeout(msg.timeout_s or None) as scope:
                result = await coro
            reply = self._done(msg, result)
        except asyncio.CancelledError:
            reply = None  # the client cancelled: it expects no reply
        except TimeoutError as exc:
            expired = scope is not None and scope.expired()
            kind = ErrorKind.TIMEOUT if expired else ErrorKind.RAISED
            reply = self._error(msg, kind, exc)
        except BaseException as exc:  # the task's failure is its future's
            reply = self._error(msg, ErrorKind.RAISED, exc)
        finally:
            self._async.pop(key, None)
            self._observe(time.perf_counter() - t0)
        if reply is not None:
            if isinstance(reply, TaskError):
                self._metric("tasks_failed")
            self._emit_done(msg, reply)
            self._send(msg.client, msg.client_gen, [encode(reply)])
            self._count(1)

    def _wait_async(self) -> None:
        import concurrent.futures

        pending = list(self._async.values())
        if pending:
            concurrent.futures.wait(pending)

    # ---- Replies (protocol step 3) ----

    def _queue_reply(self, msg: RunTask, reply: TaskDone | TaskError) -> None:
        if isinstance(reply, TaskError):
            self._metric("tasks_failed")
        slot = (msg.client, msg.client_gen)  # a re-claimed slot is another client
        out = self._out.get(slot)
        if out is None:
            out = self._out[slot] = []
        out.append(encode(reply))
        self._out_n += 1
        now = time.monotonic()
        if not self._heap or self._out_n >= FLUSH_EVERY or now - self._last_flush > POLL_INTERVAL_S:
            self._flush()

    def _flush(self) -> None:
        if self._out_n:
            for (client, generation), frames in self._out.items():
                self._send(client, generation, frames)
            self._count(self._out_n)
            self._out.clear()
            self._out_n = 0
        self._last_flush = time.monotonic()

    def _count(self, n: int) -> None:
        with self._count_lock:
            self._control.count_done(self.index, n, len(self._heap))

    def _send(self, client: int, generation: int, frames: list[bytes]) -> None:
        link = self._link(client, generation)
        if link is None:
            return
        try:
            link.writer.send_many(frames)
        except RingClosedError:  # the client closed or died: its results have no reader
            self._drop_link(client)
        except FrameTooLargeError:  # pragma: no cover - _done bounds every reply
            log_event(self._log, logging.ERROR, "reply_too_large", client=client, exc_info=True)

    def _link(self, client: int, generation: int) -> _Link | None:
        with self._links_lock:
            link = self._links.get(client)
            if link is not None and link.generation == generation:
                return link
            if link is not None:
                self._retired.append(self._links.pop(client))
            row = self._control.client(client)
            if row is None or row.generation != generation:
                return None
            try:
                inst = (
                    self._instance
                    if row.instance_id == self._instance.id
                    else Instance.attach(row.instance_id)
                )
                writer = RingWriter.attach(inst, f"to_c{client}")
            except (IPCError, OSError):
                return None  # the client is leaving; its slot will be freed
            link = self._links[client] = _Link(generation, row.pid, writer)
            return link

    def _drop_link(self, client: int) -> None:
        with self._links_lock:
            link = self._links.pop(client, None)
            if link is not None:
                self._retired.append(link)

    def _close_retired(self) -> None:
        """Unmap the rings of departed clients (their pages stay allocated while mapped).
        Main thread, with no async task running: the loop thread may be mid-send."""
        if self._retired and not self._async:
            with self._links_lock:
                retired, self._retired = self._retired, []
            for link in retired:
                link.close()

    def _shutdown(self) -> None:
        if self._responder is not None and self._bell is not None:
            self._responder_stop = True
            self._bell.release()
            self._responder.join(timeout=1.0)
        with self._peer_lock:
            for _, writer in self._peers.values():
                with contextlib.suppress(IPCError, OSError):
                    writer.close()
            self._peers.clear()
        for bell in (*self._bells.values(), *([self._bell] if self._bell else [])):
            with contextlib.suppress(posix_ipc.Error):
                bell.close()
        with contextlib.suppress(Exception):
            self._flush()
        if self._loop is not None:
            for cfut in list(self._async.values()):
                cfut.cancel()
            if self._shared is not None:
                self._shared.stop()
        if self._agent_service is not None:
            with contextlib.suppress(Exception):
                self._agent_service.close()
        with self._links_lock:
            for link in (*self._links.values(), *self._retired):
                link.close()
            self._links.clear()
            self._retired.clear()
        self._inbox.close()


def _qualname(fn: object) -> str:
    return str(getattr(fn, "__qualname__", "") or type(fn).__qualname__)
