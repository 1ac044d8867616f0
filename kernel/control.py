"""The control block: one small shared segment per kernel instance that clients, workers
and the supervisor read to find each other.

It holds the instance's state, a row per worker (pid, ring generation, core, counters) and a
row per client slot (owner pid and start time, claim generation, and the id of the instance
that holds the client's inbox ring). Registration (the handshake of ``astra.connect``) is a
slot claim under the segment's ``OFDLock``, which the kernel releases if the claimer dies
mid-claim; the supervisor frees the slots of clients that died.

Layout (little-endian u64 words, each aligned, so single-writer reads never tear; NOTES.md):

    offset        size  field          writer                     meaning
    0             8     magic          creator, once              b"ASTRACTL"
    8             8     version        creator, once              layout version (1)
    16            8     workers        creator, once              number of worker rows
    24            8     max_clients    creator, once              number of client rows
    32            8     state          supervisor                 a ``KernelState``
    40            8     sup_pid        supervisor, at start       the supervisor's pid
    48            8     sup_start      supervisor, at start       its start time (ticks)
    56            8     started_ns     creator, once              wall clock at creation
    64            64    reserved
    128           128*W worker rows    see ``_W_*``
    128+128*W     128*C client rows    under the lock             see ``_C_*``
    X             8*C*W cancel words   client c, word (c, w)      the task of c that worker w
                                                                  should stop (cooperative
                                                                  cancel); 0 = none

Beside it, ``create`` makes the instance's hot-path metrics table (segment ``metrics``,
``kernel/kmetrics.py``: a row per worker, one for the supervisor, a row per client slot,
each with one writer process); ``metrics`` maps it in a process that opened the block, and
``close`` unmaps both.

Worker row words: pid, start time, generation, core+1 (0 = unpinned) and restarts are
written by the supervisor when it forks the worker; tasks_done, queued, cur_client,
cur_task, idle, steals, steal_from and steal_seq by the worker itself (one writer each; a
replacement worker continues its predecessor's words). steal_from/steal_seq are a thief's
request, read by the victim after the thief posts the victim's steal bell
(kernel/scheduler.py). A client row is written only under the lock.
Memory ordering: readers use these words as hints and for display; anything a process acts
on (a new worker ring, a lost task) also arrives as a message through a ring, whose
semaphores order memory.
"""

from __future__ import annotations

__all__ = ["ClientRow", "ControlBlock", "KernelState", "WorkerRow"]

import contextlib
import dataclasses
import time
from enum import IntEnum
from typing import TYPE_CHECKING, Final

from ipc import OFDLock, SegmentError, is_alive, process_start_time

from .errors import RegistrationError
from .kmetrics import HOT_METRICS, METRICS_SEGMENT, metrics_rows
from .metrics import MetricsTable

if TYPE_CHECKING:
    from ipc import Instance, Segment

_MAGIC: Final = int.from_bytes(b"ASTRACTL", "little")
_VERSION: Final = 1
_HEADER_WORDS: Final = 16
_ROW_WORDS: Final = 16
_H_MAGIC, _H_VERSION, _H_WORKERS, _H_CLIENTS, _H_STATE, _H_SUP_PID, _H_SUP_START = range(7)
_H_STARTED_NS: Final = 7
# Worker row fields.
_W_PID, _W_START, _W_GEN, _W_CORE, _W_RESTARTS, _W_DONE, _W_QUEUED, _W_CUR_CLIENT = range(8)
_W_CUR_TASK, _W_IDLE, _W_STEALS, _W_STEAL_FROM, _W_STEAL_SEQ = range(8, 13)
# Client row fields; the instance id (ASCII, NUL-padded) fills words 8-15.
_C_STATE, _C_PID, _C_START, _C_GEN = range(4)
_C_ID_WORD: Final = 8
_ID_BYTES: Final = 64

#: Name of the control segment in its instance.
SEGMENT: Final = "control"


class KernelState(IntEnum):
    STARTING = 0  # workers are being forked; clients wait
    RUNNING = 1  # accepting tasks
    DRAINING = 2  # SIGTERM or stop(): no new tasks; queued ones finish
    STOPPED = 3  # workers gone; the supervisor is exiting


_RUNNING: Final = int(KernelState.RUNNING)  # a plain int: compared on every submit


class SlotState(IntEnum):
    FREE = 0  # no client
    ACTIVE = 1  # claimed by the client in pid/start


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerRow:
    """A snapshot of one worker row."""

    index: int
    pid: int
    start: int
    generation: int
    core: int | None
    restarts: int
    tasks_done: int
    queued: int
    steals: int = 0  # tasks this worker took from others' queues
    idle: bool = False  # blocked on its inbox with nothing to do


@dataclasses.dataclass(frozen=True, slots=True)
class ClientRow:
    """A snapshot of one client row."""

    slot: int
    pid: int
    start: int
    generation: int
    instance_id: str


class ControlBlock:
    """One process's mapping of an instance's control segment."""

    def __init__(self, segment: Segment, instance: Instance | None = None) -> None:
        self._segment = segment
        self._instance = instance
        self._metrics: MetricsTable | None = None
        self._words = segment.buf.cast("Q")
        w = self._words
        if w[_H_MAGIC] != _MAGIC or w[_H_VERSION] != _VERSION:
            w.release()
            segment.close()
            raise SegmentError(f"{segment.name} is not an Astra control block")
        self.workers = int(w[_H_WORKERS])
        self.max_clients = int(w[_H_CLIENTS])
        self._lock = OFDLock(segment.path)

    @classmethod
    def create(cls, instance: Instance, workers: int, max_clients: int) -> ControlBlock:
        """Create the control segment of ``instance`` (state ``STARTING``)."""
        if workers < 1 or max_clients < 1:
            raise ValueError("a kernel needs at least one worker and one client slot")
        size = 8 * (_HEADER_WORDS + _ROW_WORDS * (workers + max_clients) + max_clients * workers)
        segment = instance.create_segment(SEGMENT, size)
        w = segment.buf.cast("Q")
        w[_H_WORKERS], w[_H_CLIENTS] = workers, max_clients
        w[_H_STARTED_NS] = time.time_ns()
        w[_H_VERSION] = _VERSION
        w[_H_MAGIC] = _MAGIC  # last: an opener never sees a half-made header
        w.release()
        block = cls(segment, instance)
        # The hot-path metrics beside it: one row per worker, the supervisor, each client slot.
        block._metrics = MetricsTable.create(
            instance, HOT_METRICS, metrics_rows(workers, max_clients), name=METRICS_SEGMENT
        )
        return block

    @classmethod
    def open(cls, instance: Instance) -> ControlBlock:
        """Map the control segment of an existing instance. Raises ``SegmentError``."""
        return cls(instance.open_segment(SEGMENT), instance)

    @property
    def instance(self) -> Instance | None:
        """The instance this block was created or opened in."""
        return self._instance

    @property
    def metrics(self) -> MetricsTable | None:
        """The instance's hot-path metrics table (``kernel/kmetrics.py``: ``worker_row``,
        ``client_row``), mapped on first use; None if this block was opened without its
        instance or the table is gone."""
        if self._metrics is None and self._instance is not None:
            with contextlib.suppress(SegmentError, ValueError):
                self._metrics = MetricsTable.attach(
                    self._instance,
                    HOT_METRICS,
                    metrics_rows(self.workers, self.max_clients),
                    name=METRICS_SEGMENT,
                )
        return self._metrics

    # ---- Header ----

    @property
    def state(self) -> KernelState:
        return KernelState(int(self._words[_H_STATE]))

    @property
    def running_now(self) -> bool:
        """Whether the state is ``RUNNING`` (the submit fast path: no enum built)."""
        return self._words[_H_STATE] == _RUNNING

    def set_state(self, state: KernelState) -> None:
        """Supervisor only."""
        self._words[_H_STATE] = state

    def set_supervisor(self, pid: int, start: int) -> None:
        """Supervisor only, at start."""
        self._words[_H_SUP_START] = start
        self._words[_H_SUP_PID] = pid

    @property
    def supervisor(self) -> tuple[int, int]:
        return int(self._words[_H_SUP_PID]), int(self._words[_H_SUP_START])

    def supervisor_alive(self) -> bool:
        pid, start = self.supervisor
        return is_alive(pid, start)

    @property
    def started_ns(self) -> int:
        return int(self._words[_H_STARTED_NS])

    # ---- Worker rows ----

    def _w(self, index: int, field: int) -> int:
        assert 0 <= index < self.workers
        return _HEADER_WORDS + index * _ROW_WORDS + field

    def set_worker(self, index: int, pid: int, generation: int, core: int | None) -> None:
        """Supervisor only: record a freshly forked worker."""
        w = self._words
        w[self._w(index, _W_PID)] = pid
        w[self._w(index, _W_START)] = process_start_time(pid) or 0
        w[self._w(index, _W_CORE)] = 0 if core is None else core + 1
        w[self._w(index, _W_GEN)] = generation

    def add_restart(self, index: int) -> None:
        """Supervisor only."""
        self._words[self._w(index, _W_RESTARTS)] += 1

    def worker_generation(self, index: int) -> int:
        # On every agent message's path: one call, not two (see _w).
        assert 0 <= index < self.workers
        return self._words[_HEADER_WORDS + index * _ROW_WORDS + _W_GEN]

    def worker(self, index: int) -> WorkerRow:
        w = self._words
        core = int(w[self._w(index, _W_CORE)])
        return WorkerRow(
            index=index,
            pid=int(w[self._w(index, _W_PID)]),
            start=int(w[self._w(index, _W_START)]),
            generation=int(w[self._w(index, _W_GEN)]),
            core=core - 1 if core else None,
            restarts=int(w[self._w(index, _W_RESTARTS)]),
            tasks_done=int(w[self._w(index, _W_DONE)]),
            queued=int(w[self._w(index, _W_QUEUED)]),
            steals=int(w[self._w(index, _W_STEALS)]),
            idle=bool(w[self._w(index, _W_IDLE)]),
        )

    # ---- Work stealing (kernel/scheduler.py) ----

    def queued(self, index: int) -> int:
        """Worker ``index``'s last published queue depth (a hint)."""
        return int(self._words[self._w(index, _W_QUEUED)])

    def set_queued(self, index: int, queued: int) -> None:
        """The worker only."""
        self._words[self._w(index, _W_QUEUED)] = queued

    def busy(self, index: int) -> bool:
        """Whether worker ``index`` is running a task now (a hint)."""
        return bool(self._words[self._w(index, _W_CUR_CLIENT)])

    def idle(self, index: int) -> bool:
        """Whether worker ``index`` is blocked with nothing to do (a hint)."""
        return bool(self._words[self._w(index, _W_IDLE)])

    def set_idle(self, index: int, idle: bool) -> None:
        """The worker only."""
        self._words[self._w(index, _W_IDLE)] = int(idle)

    def add_steals(self, index: int, n: int) -> None:
        """The worker only: count tasks it stole."""
        self._words[self._w(index, _W_STEALS)] += n

    def request_steal(self, thief: int, victim: int) -> int:
        """The thief only: publish a request to ``victim``; returns its sequence number.
        The caller then posts the victim's steal bell, which orders these writes."""
        w = self._words
        seq = int(w[self._w(thief, _W_STEAL_SEQ)]) + 1
        w[self._w(thief, _W_STEAL_FROM)] = victim + 1
        w[self._w(thief, _W_STEAL_SEQ)] = seq
        return seq

    def steal_request(self, thief: int) -> tuple[int, int]:
        """(victim, sequence) of worker ``thief``'s latest request; victim -1 if none."""
        w = self._words
        return int(w[self._w(thief, _W_STEAL_FROM)]) - 1, int(w[self._w(thief, _W_STEAL_SEQ)])

    def count_done(self, index: int, n: int, queued: int) -> None:
        """The worker only: add ``n`` finished tasks and publish its queue depth."""
        w = self._words
        w[self._w(index, _W_DONE)] += n
        w[self._w(index, _W_QUEUED)] = queued

    def set_running(self, index: int, client: int, task_id: int) -> None:
        """The worker only: the (client, task) it runs now; client -1 when idle."""
        w = self._words
        w[self._w(index, _W_CUR_TASK)] = task_id
        w[self._w(index, _W_CUR_CLIENT)] = client + 1

    def running(self, index: int) -> tuple[int, int]:
        """The (client slot, task id) worker ``index`` was running; (-1, -1) if idle. Read
        by the supervisor after the worker exited, so the words are final."""
        w = self._words
        client = int(w[self._w(index, _W_CUR_CLIENT)]) - 1
        return (client, int(w[self._w(index, _W_CUR_TASK)])) if client >= 0 else (-1, -1)

    # ---- Client rows (registration) ----

    def _c(self, slot: int, field: int) -> int:
        assert 0 <= slot < self.max_clients
        return _HEADER_WORDS + (self.workers + slot) * _ROW_WORDS + field

    def register(self, instance_id: str, pid: int) -> tuple[int, int]:
        """Claim a free client slot for process ``pid`` whose inbox ring lives in instance
        ``instance_id``. Returns (slot, generation).

        Raises ``RegistrationError`` if the kernel is not running or every slot is taken
        by a live client.
        """
        raw = instance_id.encode("ascii")
        if len(raw) > _ID_BYTES:
            raise ValueError(f"instance id too long: {instance_id!r}")
        start = process_start_time(pid)
        assert start is not None
        w = self._words
        with self._lock.held():
            if self.state not in (KernelState.STARTING, KernelState.RUNNING):
                raise RegistrationError(f"kernel is {self.state.name.lower()}")
            for slot in range(self.max_clients):
                if w[self._c(slot, _C_STATE)] == SlotState.ACTIVE and is_alive(
                    int(w[self._c(slot, _C_PID)]), int(w[self._c(slot, _C_START)])
                ):
                    continue
                gen = int(w[self._c(slot, _C_GEN)]) + 1
                w[self._c(slot, _C_PID)], w[self._c(slot, _C_START)] = pid, start
                base = self._c(slot, _C_ID_WORD) * 8
                self._segment.buf[base : base + _ID_BYTES] = raw.ljust(_ID_BYTES, b"\0")
                for index in range(self.workers):  # task ids restart with the new client
                    w[self._cancel_word(slot, index)] = 0
                w[self._c(slot, _C_GEN)] = gen
                w[self._c(slot, _C_STATE)] = SlotState.ACTIVE
                return slot, gen
        raise RegistrationError(f"all {self.max_clients} client slots are taken")

    def unregister(self, slot: int, generation: int) -> bool:
        """Free ``slot`` if it still holds claim ``generation``. True if freed."""
        w = self._words
        with self._lock.held():
            if (
                w[self._c(slot, _C_GEN)] != generation
                or w[self._c(slot, _C_STATE)] != SlotState.ACTIVE
            ):
                return False
            w[self._c(slot, _C_STATE)] = SlotState.FREE
            return True

    def slot_current(self, slot: int, generation: int) -> bool:
        """Whether ``slot`` is still claimed with ``generation`` (a lock-free hint: one
        aligned word each, read by workers before running a task)."""
        w = self._words
        return bool(
            w[self._c(slot, _C_STATE)] == SlotState.ACTIVE
            and w[self._c(slot, _C_GEN)] == generation
        )

    # ---- Cooperative cancellation of running tasks ----

    def _cancel_word(self, slot: int, index: int) -> int:
        assert 0 <= slot < self.max_clients
        assert 0 <= index < self.workers
        return (
            _HEADER_WORDS
            + (self.workers + self.max_clients) * _ROW_WORDS
            + (slot * self.workers + index)
        )

    def request_cancel(self, slot: int, index: int, task_id: int) -> None:
        """Client ``slot`` only: ask worker ``index`` to stop task ``task_id`` if it is
        running it. One aligned word with one writer; the task polls it."""
        self._words[self._cancel_word(slot, index)] = task_id

    def cancel_requested(self, slot: int, index: int, task_id: int) -> bool:
        """Worker ``index``: whether client ``slot`` asked it to stop ``task_id``."""
        return bool(self._words[self._cancel_word(slot, index)] == task_id)

    def client(self, slot: int) -> ClientRow | None:
        """The client in ``slot``, or None if the slot is free."""
        w = self._words
        with self._lock.held():
            if w[self._c(slot, _C_STATE)] != SlotState.ACTIVE:
                return None
            base = self._c(slot, _C_ID_WORD) * 8
            raw = bytes(self._segment.buf[base : base + _ID_BYTES]).rstrip(b"\0")
            return ClientRow(
                slot,
                int(w[self._c(slot, _C_PID)]),
                int(w[self._c(slot, _C_START)]),
                int(w[self._c(slot, _C_GEN)]),
                raw.decode("ascii"),
            )

    def clients(self) -> list[ClientRow]:
        """Every claimed slot."""
        return [row for slot in range(self.max_clients) if (row := self.client(slot))]

    def close(self) -> None:
        """Unmap (the instance's owner removes the segments)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        self._lock.close()
        self._words.release()
        self._segment.close()
