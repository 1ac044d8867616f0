"""Shared-memory ring buffers of variable-length frames between processes.

A ring has one reader and one or more *lanes*; each lane is a single-producer/single-consumer
queue of fixed-size slots owned by one writer process at a time. A ring with one lane is the
SPSC ring of the supervisor<->worker paths (``sup_to_w03``, ``w03_to_sup``); a ring with N
lanes is multi-producer (a worker's inbox that several clients and peers write to). Lanes
instead of one shared slot array because a shared array needs a producer lock, and a lock
held by a SIGKILLed producer is either stuck forever (semaphore) or released over a
half-written slot (OFD lock); with a lane per producer, a producer's death touches nothing but
its own lane, which the reader drains and recycles.

    writer A --lane 0 (slots, items0, spaces0)--.
    writer B --lane 1 (slots, items1, spaces1)---+--> bell --> reader
    writer C --lane 2 (slots, items2, spaces2)--'

Protocol (each step says what makes it correct):

1. *Publish.* A writer takes a slot with ``sem_wait(spaces_k)``, fills it, then
   ``sem_post(items_k)`` and ``sem_post(bell)``. POSIX semaphores synchronize memory (glibc
   uses release/acquire atomics), so the slot's bytes are visible to whoever acquires
   ``items_k``; on aarch64 as on x86-64. No index is shared: the writer's tail and the
   reader's heads are private to each side (NOTES.md: the pattern moved 500,000 frames clean).
2. *Consume.* The reader waits on ``bell`` (the doorbell: one post per published slot), then
   takes an item with ``sem_trywait(items_k)`` scanning lanes round-robin (fair between
   producers), copies the slot out, and only then posts ``spaces_k``: the copy happens-before
   the writer's next fill. A bell without an item (the reader took it earlier by scanning)
   is a harmless spurious wake.
3. *Frames.* A slot carries either a batch of whole frames (``FRAMES``: u32 length + bytes,
   repeated) or one chunk of a frame larger than a slot (``FIRST`` with the total length,
   then ``MORE``..., ``LAST``), so frames may be far larger than the ring. The reader
   reassembles per lane, so chunks never interleave across producers. A frame is whole
   only at its ``LAST``: a writer whose timeout passes mid-frame abandons it, and the reader
   discards the chunks it holds when that lane's next ``FIRST`` or ``FRAMES`` arrives (a
   frame that fits the ring never needs this: its slots are all taken before any is filled).
4. *Backpressure.* A full lane blocks its writer on ``spaces_k`` (or raises ``RingFull``);
   nothing is ever overwritten.
5. *Death and close.* Waits are cut into ``LIVENESS_INTERVAL_S`` slices; between slices the
   writer checks that the reader lives and the reader reaps lanes whose owner died or
   retired (a retired lane at once; a dead owner, found in /proc, at most every
   ``REAP_INTERVAL_S`` when a reader polls an empty ring in a loop). Reaping delivers every
   frame the owner had published, drops the chunks of a frame it never finished (the reader
   never returns a torn frame), restores the lane's ``spaces`` count (a writer killed
   between taking a slot and publishing it leaks that count), and frees the lane for a new
   writer. On a ring with ``close_on_writer_exit`` (the default for a
   single lane) the writer's exit closes the ring instead: the reader gets
   ``RingClosedError`` once it has drained it. ``close()`` on the reader closes the ring for
   writers, who get ``RingClosedError``.

Waiting: a waiter first spins, polling the semaphore's value, for a bounded time that each
handle adapts (``_Spinner``: a spin that catches the peer is kept, one that does not is
halved away, short blocked waits make it probe again), then blocks in ``sem_timedwait``.
Waking a process whose CPU went idle costs tens of microseconds here; a round trip between
two spinning ends costs about 5 us (NOTES.md, ``perf/bench_ipc.py``).

Lane claiming (slow path, once per writer process) is serialized by an ``OFDLock`` on the
segment, which the kernel releases if the claimer dies mid-claim.

Segment layout (all fields little-endian u64, read and written as aligned 8-byte words,
which do not tear; NOTES.md):

    offset  size  field           writer                         meaning
    0       8     magic           creator, once                  b"ASTRARNG"
    8       8     version         creator, once                  layout version (1)
    16      8     lanes           creator, once                  number of lanes
    24      8     slots           creator, once                  slots per lane
    32      8     slot_bytes      creator, once                  bytes per slot, header incl.
    40      8     max_frame       creator, once                  largest frame accepted
    48      8     flags           creator, once                  bit 0: close_on_writer_exit
    56      8     closed          any side; once set, never      ring is closed
                                  cleared
    64      8     reader_pid      the reader, at claim           0 until a reader claims
    72      8     reader_start    the reader, at claim           its start time (ticks)
    80      48    reserved
    128     32*L  lane table      under the claim lock           per lane: state, owner pid,
                                                                 owner start time, claims
    D       ...   slots           lane owner (fill) / reader     L*slots*slot_bytes, D aligned
                                  (read), ordered by semaphores  to 64
    slot:   u32 kind, u32 nbytes, then nbytes of payload

A handle acts for the process that claimed its role, by first use or ``claim()``: the first
process to send through a writer handle claims a lane, the first to receive claims the reader
role. Elsewhere (a fork child that inherited a handle it does not use) ``close()`` only unmaps.
A handle is safe to share between threads of its process. A reader's ``recv*`` hold the
handle's lock while they wait; ``wait_readable``/``spin_readable`` wait without it and hand a
doorbell count to ``recv_ready``, so that several threads of one process can take turns
receiving (the client's leading thread, ``astra/_client.py``); keeping the frames' order
across those turns is the caller's lock.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_SLOTS",
    "DEFAULT_SLOT_BYTES",
    "LIVENESS_INTERVAL_S",
    "RingReader",
    "RingStatistics",
    "RingWriter",
    "open_ring",
    "ring_depth",
    "unlink_ring",
]

import collections
import contextlib
import dataclasses
import os
import re
import struct
import threading
import time
from enum import IntEnum
from typing import TYPE_CHECKING, Final

import posix_ipc

from .errors import (
    FrameTooLargeError,
    IPCError,
    RingClosedError,
    RingEmpty,
    RingFull,
    SegmentError,
)
from .shm import (
    SHM_DIR,
    Instance,
    OFDLock,
    Segment,
    instance_objects,
    is_alive,
    process_start_time,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

#: Slots per lane unless the creator says otherwise.
DEFAULT_SLOTS: Final = int(os.getenv("ASTRA_RING_SLOTS", "64"))
#: Bytes per slot (8 of them are the slot header) unless the creator says otherwise.
DEFAULT_SLOT_BYTES: Final = int(os.getenv("ASTRA_RING_SLOT_BYTES", str(64 * 1024 + 64)))
#: Largest frame a ring accepts by default; bigger payloads belong in the arena.
DEFAULT_MAX_FRAME_BYTES: Final = int(os.getenv("ASTRA_RING_MAX_FRAME_BYTES", str(64 << 20)))
#: Longest a blocked send/recv sleeps before re-checking that its peer lives.
LIVENESS_INTERVAL_S: Final = float(os.getenv("ASTRA_RING_LIVENESS_INTERVAL_S", "0.2"))
#: At most this often, a reader polling an empty ring looks for dead writers (in /proc).
REAP_INTERVAL_S: Final = 0.02
#: Microseconds a waiter spins (polling the semaphore's value) before blocking in the kernel:
#: a number fixes it (0: never spin); None ("auto" in the environment) adapts it per handle
#: (see ``_Spinner``). Spinning pays only when both ends have a core of their own.
_SPIN_ENV = os.getenv("ASTRA_RING_SPIN_US", "auto")
DEFAULT_SPIN_US: Final[float | None] = None if _SPIN_ENV == "auto" else float(_SPIN_ENV)
#: The most an adaptive spin lasts, microseconds: about one wake-up of an idle CPU here.
ADAPTIVE_SPIN_MAX_US: Final = float(os.getenv("ASTRA_RING_ADAPTIVE_SPIN_MAX_US", "100"))

_MAGIC: Final = int.from_bytes(b"ASTRARNG", "little")
_VERSION: Final = 1
_HEADER_BYTES: Final = 128
_LANE_BYTES: Final = 32
_SLOT_HEADER: Final = struct.Struct("<II")  # kind, nbytes
_ONE_FRAME: Final = struct.Struct("<III")  # kind, nbytes, then the first frame's length
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_MIN_SLOT_BYTES: Final = 32
#: The semaphores of a ring, after ``<ring>.``: items and spaces per lane, bell, free.
_SEM_SUFFIX: Final = re.compile(r"[is]\d+|bell|free")

# Header word indices (u64).
_W_MAGIC, _W_VERSION, _W_LANES, _W_SLOTS, _W_SLOT_BYTES, _W_MAX_FRAME = 0, 1, 2, 3, 4, 5
_W_FLAGS, _W_CLOSED, _W_READER_PID, _W_READER_START = 6, 7, 8, 9
_FLAG_CLOSE_ON_WRITER_EXIT: Final = 1
# Lane word offsets, relative to the lane's first word.
_L_STATE, _L_PID, _L_START, _L_CLAIMS = 0, 1, 2, 3


class _Kind(IntEnum):
    FRAMES = 1  # whole frames, each a u32 length then the bytes
    FIRST = 2  # first chunk of a large frame: u64 total length, then bytes
    MORE = 3  # a middle chunk
    LAST = 4  # the final chunk


class LaneState(IntEnum):
    FREE = 0  # no owner; any writer may claim it
    CLAIMED = 1  # owned by the writer in owner pid/start; it alone fills the lane's slots
    RETIRED = 2  # its writer closed; the reader drains and frees it


@dataclasses.dataclass(frozen=True, slots=True)
class RingStatistics:
    """A snapshot of one ring handle's counters (this process's view)."""

    name: str
    lanes: int
    slots: int
    slot_bytes: int
    frames: int  # frames sent (writer) or returned (reader) through this handle
    slots_moved: int  # slots published (writer) or consumed (reader)
    depth: int  # slots published and not yet consumed, over all lanes
    torn_frames_dropped: int  # reader: partial frames of dead or timed-out writers discarded
    closed: bool


# os.getpid() is a system call; the hot paths compare against this copy instead.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


# ---- The shared mapping, common to both ends ----


class _RingMap:
    """The segment and semaphores of one ring, as mapped in this process."""

    def __init__(self, instance: Instance, name: str, segment: Segment, created: bool) -> None:
        self.instance = instance
        self.name = name
        self.segment = segment
        self.words = segment.buf.cast("Q")
        w = self.words
        if w[_W_MAGIC] != _MAGIC or w[_W_VERSION] != _VERSION:
            self.close()
            raise SegmentError(f"{segment.name} is not an Astra ring")
        self.lanes, self.slots, self.slot_bytes = w[_W_LANES], w[_W_SLOTS], w[_W_SLOT_BYTES]
        self.max_frame = w[_W_MAX_FRAME]
        self.close_on_writer_exit = bool(w[_W_FLAGS] & _FLAG_CLOSE_ON_WRITER_EXIT)
        self.data_offset = _data_offset(self.lanes)
        self.payload_cap = self.slot_bytes - _SLOT_HEADER.size

        def sem(obj: str, value: int) -> posix_ipc.Semaphore:
            if created:
                return instance.create_semaphore(obj, value)
            return instance.open_semaphore(obj)

        self.items = [sem(f"{name}.i{k}", 0) for k in range(self.lanes)]
        self.spaces = [sem(f"{name}.s{k}", self.slots) for k in range(self.lanes)]
        self.bell = sem(f"{name}.bell", 0)
        # A hint, not the truth: posted when the reader frees a lane, so a writer waiting for
        # one blocks instead of polling. The lane table (under the claim lock) decides.
        self.lanes_free = sem(f"{name}.free", self.lanes)
        self.claim_lock = OFDLock(segment.path)

    @classmethod
    def create(
        cls,
        instance: Instance,
        name: str,
        *,
        lanes: int,
        slots: int,
        slot_bytes: int,
        max_frame_bytes: int,
        close_on_writer_exit: bool,
    ) -> _RingMap:
        if lanes < 1 or slots < 1:
            raise ValueError("a ring needs at least one lane and one slot")
        if slot_bytes < _MIN_SLOT_BYTES or slot_bytes % 8:
            raise ValueError(f"slot_bytes must be a multiple of 8, at least {_MIN_SLOT_BYTES}")
        size = _data_offset(lanes) + lanes * slots * slot_bytes
        segment = instance.create_segment(name, size)
        w = segment.buf.cast("Q")
        w[_W_LANES], w[_W_SLOTS], w[_W_SLOT_BYTES] = lanes, slots, slot_bytes
        w[_W_MAX_FRAME] = max_frame_bytes
        w[_W_FLAGS] = _FLAG_CLOSE_ON_WRITER_EXIT if close_on_writer_exit else 0
        w[_W_VERSION] = _VERSION
        w[_W_MAGIC] = _MAGIC  # last: an opener never sees a half-initialized header
        w.release()
        try:
            return cls(instance, name, segment, created=True)
        except BaseException:
            segment.close()
            segment.unlink()
            raise

    @classmethod
    def open(cls, instance: Instance, name: str) -> _RingMap:
        return cls(instance, name, instance.open_segment(name), created=False)

    # -- shared fields --

    @property
    def closed(self) -> bool:
        return bool(self.words[_W_CLOSED])

    def mark_closed(self) -> None:
        self.words[_W_CLOSED] = 1

    def lane_word(self, lane: int, field: int) -> int:
        return int(self.words[(_HEADER_BYTES + lane * _LANE_BYTES) // 8 + field])

    def set_lane_word(self, lane: int, field: int, value: int) -> None:
        self.words[(_HEADER_BYTES + lane * _LANE_BYTES) // 8 + field] = value

    def lane_owner_alive(self, lane: int) -> bool:
        return is_alive(self.lane_word(lane, _L_PID), self.lane_word(lane, _L_START))

    def slot_offset(self, lane: int, index: int) -> int:
        return self.data_offset + (lane * self.slots + index) * self.slot_bytes

    def slots_needed(self, n: int) -> int:
        """How many slots a frame of n bytes occupies on its own."""
        if n + _U32.size <= self.payload_cap:
            return 1
        first = self.payload_cap - _U64.size
        return 1 + -(-(n - first) // self.payload_cap)

    def depth(self) -> int:
        return sum(sem.value for sem in self.items)

    def close(self) -> None:
        for sem in (*getattr(self, "items", ()), *getattr(self, "spaces", ())):
            sem.close()
        if hasattr(self, "lanes_free"):
            self.bell.close()
            self.lanes_free.close()
            self.claim_lock.close()
        self.words.release()
        self.segment.close()


def _data_offset(lanes: int) -> int:
    return (_HEADER_BYTES + lanes * _LANE_BYTES + 63) // 64 * 64


class _Spinner:
    """How long one handle spins before blocking, fixed or adaptive.

    Waking a blocked process costs tens of microseconds when its CPU went idle (NOTES.md);
    a peer that answers within that time is caught cheaper by spinning. But a spin on the
    CPU the peer needs only delays it. The adaptive policy (glibc's adaptive mutexes, in
    spirit) learns which case holds: a spin that succeeds keeps the budget (at least twice
    what it took); a spin that fails halves it (a failed probe drops it to zero). At zero,
    a waiter that blocked only briefly (so a spin could have caught the peer) probes again
    with the full budget after ``_PROBE_AFTER`` such waits, twice as many after each failed
    probe. An idle handle (long waits) never spins; the spin is bounded in every case.
    """

    __slots__ = ("_adaptive", "_failed_probes", "_max", "_probing", "_short_waits", "budget")

    _PROBE_AFTER: Final = 8
    # At most 8 << 4 = 128 short waits between probes: a slow spell (say, agents being
    # built) must not turn spinning off for thousands of waits once the peer is fast
    # again (an agent's sync ask stayed at 40 us instead of 23 that way); a failed probe
    # costs at most ADAPTIVE_SPIN_MAX_US, under 1 us a wait at this spacing.
    _MAX_BACKOFF: Final = 4
    _MIN_S: Final = 5e-6

    def __init__(self, spin_us: float | None) -> None:
        self._adaptive = spin_us is None
        if spin_us is None:
            self._max = ADAPTIVE_SPIN_MAX_US / 1e6 if (os.cpu_count() or 1) > 1 else 0.0
        else:
            self._max = spin_us / 1e6
        self.budget = self._max
        self._short_waits = 0
        self._failed_probes = 0
        self._probing = False

    def wait(
        self, sem: posix_ipc.Semaphore, deadline: float | None, check: Callable[[], None]
    ) -> bool:
        """Take one count of ``sem``: spin up to the budget, then block in liveness slices,
        calling ``check()`` (which raises to abort) after each empty slice. False if the
        deadline passed. ``check`` runs only after a slice, never on the fast path: it reads
        /proc."""
        if self.budget > 0:
            if self.spin(sem, deadline):
                return True
            return _block(sem, deadline, check)
        t0 = time.monotonic()
        got = _block(sem, deadline, check)
        self.note_blocked(time.monotonic() - t0)
        return got

    def spin(self, sem: posix_ipc.Semaphore, deadline: float | None = None) -> bool:
        """Spin up to the budget for one count of ``sem``, never blocking; adapts the budget
        to the outcome (not to a spin the deadline cut short). False if the spin (or the
        deadline) ran out, or the budget is 0."""
        budget = self.budget
        if budget <= 0:
            return False
        clock = time.monotonic
        t0 = clock()
        full = t0 + budget
        end = full if deadline is None or deadline >= full else deadline
        while clock() < end:
            if sem.value > 0:
                try:
                    sem.acquire(0)
                except posix_ipc.BusyError:
                    continue
                if self._adaptive:  # caught by spinning: keep (or grow) the budget
                    self.budget = min(self._max, max(budget, 2 * (clock() - t0)))
                    self._probing, self._failed_probes = False, 0
                return True
        # Only a spin that ran its whole budget says the peer is slow: one cut short by the
        # deadline (a zero-timeout poll of an empty ring, every time a worker goes idle)
        # says nothing, and halving the budget for it turned spinning off for good.
        if self._adaptive and end == full:
            if self._probing:
                self.budget, self._probing = 0.0, False
                self._failed_probes = min(self._failed_probes + 1, self._MAX_BACKOFF)
            else:
                half = budget / 2
                self.budget = half if half >= self._MIN_S else 0.0
        return False

    def note_blocked(self, waited: float) -> None:
        """Tell an idle spinner (budget 0) how long a wait took without it (for probing)."""
        if self._adaptive and self._max > 0 and self.budget <= 0:
            self._after_block(waited)

    def _after_block(self, waited: float) -> None:
        if waited >= self._max:
            self._short_waits = 0  # the peer is slow (or idle): spinning would not help
            return
        self._short_waits += 1
        if self._short_waits >= self._PROBE_AFTER << self._failed_probes:
            self._short_waits = 0
            self.budget, self._probing = self._max, True


def _block(sem: posix_ipc.Semaphore, deadline: float | None, check: Callable[[], None]) -> bool:
    """Block for one count of ``sem`` in liveness slices (see ``_Spinner.wait``)."""
    while True:
        if deadline is None:
            slice_s = LIVENESS_INTERVAL_S
        else:
            slice_s = min(deadline - time.monotonic(), LIVENESS_INTERVAL_S)
            if slice_s <= 0:
                try:
                    sem.acquire(0)
                    return True
                except posix_ipc.BusyError:
                    return False
        try:
            sem.acquire(slice_s)
            return True
        except posix_ipc.BusyError:
            check()


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


# ---- Writer ----


class RingWriter:
    """The sending end of a ring: only the process that claimed a lane fills that lane.

    Created by ``open_ring`` (then typically handed to a forked child) or by
    ``RingWriter.attach`` in an unrelated process. The first send (or ``claim()``) claims a
    lane for the calling process.
    """

    def __init__(self, ring: _RingMap, spin_us: float | None = DEFAULT_SPIN_US) -> None:
        self._ring = ring
        self._spinner = _Spinner(spin_us)
        self._lock = threading.Lock()
        self._pid = -1  # the process that owns self._lane
        self._lane = -1
        self._tail = 0  # next slot index to fill in our lane; private to the owner
        self._frames = 0
        self._slots_moved = 0
        # Hot-path copies of what the lane claim decides (set by _claimed_lane).
        self._buf = ring.segment.buf
        self._words = ring.words
        self._spaces = ring.spaces[0]
        self._items = ring.items[0]
        self._base = 0
        #: Largest frame that fits one slot on its own (the single-slot fast path).
        self._small = min(ring.payload_cap - _U32.size, ring.max_frame)

    @classmethod
    def attach(
        cls, instance: Instance, name: str, spin_us: float | None = DEFAULT_SPIN_US
    ) -> RingWriter:
        """Open ring ``name`` of ``instance`` for writing from this process."""
        return cls(_RingMap.open(instance, name), spin_us)

    @property
    def name(self) -> str:
        return self._ring.name

    # -- claiming a lane --

    def claim(self, timeout: float | None = None) -> int:
        """Claim a lane for this process now (sends do it lazily). Returns the lane index.

        Blocks while every lane has a live writer (or one the reader has yet to reap).
        Raises ``RingFull`` if ``timeout`` passes first, ``RingClosedError`` if the ring is
        closed.
        """
        with self._lock:
            return self._claimed_lane(_deadline(timeout))

    def _claimed_lane(self, deadline: float | None) -> int:
        pid = _pid
        if self._pid == pid:
            return self._lane
        ring = self._ring
        if ring.segment._mmap is None or ring.closed:
            raise RingClosedError(f"ring {ring.name} is closed")
        while (lane := self._try_claim(pid)) < 0:
            if not _block(ring.lanes_free, deadline, self._check_writable):
                raise RingFull(f"ring {ring.name}: all {ring.lanes} lanes have live writers")
        self._lane, self._tail = lane, 0
        self._spaces, self._items = ring.spaces[lane], ring.items[lane]
        self._base = ring.slot_offset(lane, 0)
        self._pid = pid  # last: the fast paths trust the copies above once this matches
        return lane

    def _try_claim(self, pid: int) -> int:
        """Claim a free lane under the lock; -1 if none (after nudging the reader to reap)."""
        ring = self._ring
        start = process_start_time(pid)
        assert start is not None
        reapable = False
        with ring.claim_lock.held():
            for lane in range(ring.lanes):
                state = ring.lane_word(lane, _L_STATE)
                if state == LaneState.FREE:
                    ring.set_lane_word(lane, _L_PID, pid)
                    ring.set_lane_word(lane, _L_START, start)
                    ring.set_lane_word(lane, _L_CLAIMS, ring.lane_word(lane, _L_CLAIMS) + 1)
                    ring.set_lane_word(lane, _L_STATE, LaneState.CLAIMED)
                    with contextlib.suppress(posix_ipc.BusyError):
                        ring.lanes_free.acquire(0)  # keep the hint near the free count
                    return lane
                reapable |= state == LaneState.RETIRED or not ring.lane_owner_alive(lane)
        if reapable:
            ring.bell.release()  # a spurious wake makes the reader reap (protocol step 5)
        return -1

    # -- sending --

    def send(self, frame: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one frame, blocking while the ring is full.

        Raises ``RingFull`` if ``timeout`` seconds pass first (the frame is then not
        delivered: one that fits the ring takes all its slots or none; a larger one streams
        and is abandoned part-way, which the reader discards), ``FrameTooLargeError``, and
        ``RingClosedError`` if the ring is closed or its reader died.
        """
        n = len(frame)
        if n > self._small:
            self._send_large(frame, n, timeout)
            return
        with self._lock:
            if self._pid != _pid:
                self._claimed_lane(_deadline(timeout))
            if self._words[_W_CLOSED]:
                raise RingClosedError(f"ring {self._ring.name} is closed")
            try:  # the hot path: no context manager
                self._spaces.acquire(0)
            except posix_ipc.BusyError:
                if not self._wait_slot(_deadline(timeout)):
                    raise RingFull(f"ring {self._ring.name} stayed full for {timeout} s") from None
            # Inline _fill of a one-frame slot (protocol step 1).
            off = self._base + self._tail * self._ring.slot_bytes
            _ONE_FRAME.pack_into(self._buf, off, _Kind.FRAMES, n + _U32.size, n)
            start = off + _ONE_FRAME.size
            self._buf[start : start + n] = frame
            self._tail = (self._tail + 1) % self._ring.slots
            self._slots_moved += 1
            self._frames += 1
            self._items.release()  # publishes the slot (release ordering)
            self._ring.bell.release()

    def _send_large(
        self, frame: bytes | bytearray | memoryview, n: int, timeout: float | None
    ) -> None:
        self._check_size(n)
        deadline = _deadline(timeout)
        with self._lock:
            lane = self._claimed_lane(deadline)
            self._send_chunked(lane, frame, deadline)
            self._frames += 1

    def send_nowait(self, frame: bytes | bytearray | memoryview) -> None:
        """Send one frame without waiting: all its slots are taken at once, or none.

        Raises ``RingFull`` if the ring lacks room now, ``FrameTooLargeError`` if the frame
        could never fit at once, ``RingClosedError``.
        """
        n = len(frame)
        self._check_size(n)
        ring = self._ring
        need = ring.slots_needed(n)
        if need > ring.slots:
            raise FrameTooLargeError(f"{n} B needs {need} slots; ring has {ring.slots}")
        with self._lock:
            lane = self._claimed_lane(time.monotonic())
            if not self._take_slots(need, 0.0):
                raise RingFull(f"ring {ring.name} is full")
            if need == 1:
                self._fill(lane, _Kind.FRAMES, (_U32.pack(n), frame), n + _U32.size)
            else:
                self._send_chunked(lane, frame, None, pretaken=need)
            self._frames += 1

    def send_many(
        self, frames: Iterable[bytes | bytearray | memoryview], timeout: float | None = None
    ) -> int:
        """Send frames in order, packing small ones many to a slot (one semaphore round per
        slot, not per frame). Blocks while the ring is full. Returns the number sent.

        Raises ``RingFull`` (with ``.sent``, the frames already published) if ``timeout`` runs
        out first, ``FrameTooLargeError`` before sending anything past the offender,
        ``RingClosedError``. Each frame is published whole or not at all, as with ``send``.
        """
        deadline = _deadline(timeout)
        cap = self._ring.payload_cap
        sent = 0
        with self._lock:
            lane = self._claimed_lane(deadline)
            parts: list[bytes | bytearray | memoryview] = []
            size = 0
            batched = 0
            for frame in frames:
                n = len(frame)
                self._check_size(n)
                if size + n + _U32.size > cap and parts:
                    self._flush(lane, parts, size, deadline, sent)
                    sent += batched
                    parts, size, batched = [], 0, 0
                if n + _U32.size > cap:
                    self._send_chunked(lane, frame, deadline, sent=sent)
                    sent += 1
                    continue
                parts += (_U32.pack(n), frame)
                size += n + _U32.size
                batched += 1
            if parts:
                self._flush(lane, parts, size, deadline, sent)
                sent += batched
            self._frames += sent
        return sent

    def _flush(
        self,
        lane: int,
        parts: list[bytes | bytearray | memoryview],
        size: int,
        deadline: float | None,
        sent: int,
    ) -> None:
        if not self._take_slots(1, deadline):
            raise RingFull(f"ring {self._ring.name} stayed full", sent=sent)
        self._fill(lane, _Kind.FRAMES, parts, size)

    def _send_chunked(
        self,
        lane: int,
        frame: bytes | bytearray | memoryview,
        deadline: float | None,
        *,
        pretaken: int = 0,
        sent: int = 0,
    ) -> None:
        # A frame that fits the ring takes all its slots before writing any (all or none,
        # within the deadline). A larger one streams as the reader frees slots; if the
        # deadline passes mid-way the frame is abandoned: the reader discards the chunks it
        # holds when the lane's next frame starts (protocol step 3).
        ring = self._ring
        view = memoryview(frame).cast("B")
        n = len(view)
        if not pretaken:
            pretaken = min(ring.slots_needed(n), ring.slots)
            if not self._take_slots(pretaken, deadline):
                raise RingFull(f"ring {ring.name} stayed full", sent=sent)
        first = ring.payload_cap - _U64.size
        pos = 0
        while pos < n or pos == 0:
            if pretaken:
                pretaken -= 1
            elif not self._take_slots(1, deadline):
                raise RingFull(f"ring {ring.name} stayed full mid-frame; abandoned", sent=sent)
            if pos == 0:
                self._fill(lane, _Kind.FIRST, (_U64.pack(n), view[:first]), first + _U64.size)
                pos = first
            else:
                chunk = view[pos : pos + ring.payload_cap]
                pos += len(chunk)
                self._fill(lane, _Kind.LAST if pos >= n else _Kind.MORE, (chunk,), len(chunk))

    def _take_slots(self, count: int, deadline: float | None) -> bool:
        """Take ``count`` slots of our lane before the deadline, or none (False)."""
        taken = 0
        try:
            while taken < count:
                if self._words[_W_CLOSED]:
                    raise RingClosedError(f"ring {self._ring.name} is closed")
                try:
                    self._spaces.acquire(0)
                except posix_ipc.BusyError:
                    if not self._wait_slot(deadline):
                        break
                taken += 1
        except BaseException:
            self._give_back(taken)
            raise
        if taken < count:
            self._give_back(taken)  # nothing was written into them
            return False
        return True

    def _give_back(self, taken: int) -> None:
        for _ in range(taken):
            self._spaces.release()

    def _wait_slot(self, deadline: float | None) -> bool:
        """Block for one slot of our lane (the fast try already failed)."""
        if not self._spinner.wait(self._spaces, deadline, self._check_writable):
            return False
        if self._words[_W_CLOSED]:  # woken by the reader's close(), not by a freed slot
            self._spaces.release()
            raise RingClosedError(f"ring {self._ring.name} is closed")
        return True

    def _fill(
        self,
        lane: int,
        kind: _Kind,
        parts: Sequence[bytes | bytearray | memoryview],
        nbytes: int,
    ) -> None:
        """Write one slot and publish it (protocol step 1)."""
        ring = self._ring
        off = self._base + self._tail * ring.slot_bytes
        buf = self._buf
        _SLOT_HEADER.pack_into(buf, off, kind, nbytes)
        pos = off + _SLOT_HEADER.size
        # One copy into the slot, not one per part (64 frames make 128 parts).
        buf[pos : pos + nbytes] = parts[0] if len(parts) == 1 else b"".join(parts)
        self._tail = (self._tail + 1) % ring.slots
        self._slots_moved += 1
        self._items.release()  # publishes the slot (release ordering)
        ring.bell.release()

    def _check_size(self, n: int) -> None:
        if n > self._ring.max_frame:
            raise FrameTooLargeError(
                f"frame of {n} B exceeds ring {self._ring.name}'s {self._ring.max_frame} B"
            )

    def _check_writable(self) -> None:
        ring = self._ring
        if ring.closed:
            raise RingClosedError(f"ring {ring.name} is closed")
        pid = ring.words[_W_READER_PID]
        if pid and not is_alive(pid, ring.words[_W_READER_START]):
            ring.mark_closed()
            raise RingClosedError(f"ring {ring.name}: reader pid {pid} died")

    # -- lifecycle --

    def depth(self) -> int:
        """Slots published and not yet read, over every lane (a hint: one semaphore value
        read per lane)."""
        return self._ring.depth()

    @property
    def max_frame(self) -> int:
        """The largest frame this ring accepts (``FrameTooLargeError`` past it)."""
        return int(self._ring.max_frame)

    def unread(self) -> int:
        """Slots this process published in its lane that the reader has not taken yet (a
        hint, one semaphore read: the reader is behind when it is not 0)."""
        return self._items.value if self._lane >= 0 and self._pid == _pid else 0

    def statistics(self) -> RingStatistics:
        r = self._ring
        return RingStatistics(
            r.name, r.lanes, r.slots, r.slot_bytes, self._frames, self._slots_moved,
            r.depth(), 0, r.closed,
        )  # fmt: skip

    def close(self) -> None:
        """Retire this process's lane, if it claimed one (its published frames are still
        delivered; on a ``close_on_writer_exit`` ring, the reader then sees end-of-stream),
        and unmap. In a process that never sent through this handle, only unmaps."""
        ring = self._ring
        if ring.segment._mmap is None:
            return
        if self._pid == _pid:
            with ring.claim_lock.held():
                if ring.lane_word(self._lane, _L_PID) == self._pid:
                    ring.set_lane_word(self._lane, _L_STATE, LaneState.RETIRED)
            ring.bell.release()  # wake the reader so it reaps now, not a slice later
            self._pid = -1
        ring.close()

    def __enter__(self) -> RingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RingWriter {self._ring.name} lane={self._lane}>"


# ---- Reader ----


class RingReader:
    """The receiving end of a ring: exactly one process reads a ring.

    Frames from one writer arrive in the order sent; frames from different writers
    interleave fairly (round-robin over lanes).
    """

    def __init__(self, ring: _RingMap, spin_us: float | None = DEFAULT_SPIN_US) -> None:
        self._ring = ring
        self._spinner = _Spinner(spin_us)
        self._lock = threading.Lock()
        self._pid = -1
        self._heads = [0] * ring.lanes  # next slot to read per lane; private to the reader
        self._partial: dict[int, tuple[bytearray, int]] = {}  # lane -> (frame, bytes filled)
        self._pending: collections.deque[bytes] = collections.deque()
        self._next_lane = 0
        self._frames = 0
        self._slots_moved = 0
        self._torn = 0
        self._buf = ring.segment.buf
        self._lead_spinner = _Spinner(spin_us)  # spin_readable's: one leading thread
        self._reaped_at = 0.0  # when _check_readable last reaped writers

    @classmethod
    def attach(
        cls, instance: Instance, name: str, spin_us: float | None = DEFAULT_SPIN_US
    ) -> RingReader:
        """Open ring ``name`` of ``instance`` for reading from this process."""
        return cls(_RingMap.open(instance, name), spin_us)

    @property
    def name(self) -> str:
        return self._ring.name

    def claim(self) -> None:
        """Record this process as the reader now (the first recv does it lazily), so writers
        can tell when it dies. Raises ``IPCError`` if another live process reads the ring."""
        with self._lock:
            self._claim()

    def _claim(self) -> None:
        pid = _pid
        if self._pid == pid:
            return
        ring, w = self._ring, self._ring.words
        with ring.claim_lock.held():
            other = w[_W_READER_PID]
            if other and other != pid and is_alive(other, w[_W_READER_START]):
                raise IPCError(f"ring {ring.name} already has a live reader (pid {other})")
            start = process_start_time(pid)
            assert start is not None
            w[_W_READER_START] = start
            w[_W_READER_PID] = pid
        self._pid = pid

    # -- receiving --

    def recv(self, timeout: float | None = None) -> bytes:
        """Return the next frame, blocking until one arrives.

        Raises ``RingEmpty`` if ``timeout`` seconds pass first, and ``RingClosedError`` once
        the ring is closed (or its single writer exited) and every frame has been returned.
        """
        with self._lock:
            if not self._pending:
                if self._pid != _pid:
                    self._claim()
                self._fill_pending(_deadline(timeout), blocking=True)
            self._frames += 1
            return self._pending.popleft()

    def recv_nowait(self) -> bytes:
        """Return the next frame if one is ready. Raises ``RingEmpty`` or ``RingClosedError``."""
        with self._lock:
            if not self._pending:
                self._claim()
                self._fill_pending(None, blocking=False)
            self._frames += 1
            return self._pending.popleft()

    def recv_many(self, max_frames: int = 1024, timeout: float | None = None) -> list[bytes]:
        """Return 1 to ``max_frames`` frames: blocks for the first, then takes whatever else
        is ready without waiting. Raises like ``recv``."""
        with self._lock:
            if not self._pending:
                self._claim()
                self._fill_pending(_deadline(timeout), blocking=True)
            while len(self._pending) < max_frames:
                lane = self._scan()
                if lane < 0:
                    break
                self._consume(lane)
            return self._take_pending(max_frames)

    # -- receiving from several threads: wait without the lock, then take what is ready --

    def wait_readable(self, timeout: float | None = None, *, spin: bool = True) -> bool:
        """Block until the ring may hold a frame, holding no lock meanwhile, so that another
        thread of this process may receive (``spin_readable``, ``recv_ready``) in the
        meantime. Takes one doorbell count: pass ``rung=True`` to the ``recv_ready`` that
        follows. Returns False if ``timeout`` passed. ``spin=False`` blocks at once: for a
        background thread, whose spin would hold the GIL the process's other threads need.
        Raises ``RingClosedError`` once the ring is closed and drained (checked between
        liveness slices)."""
        with self._lock:
            if self._pid != _pid:
                self._claim()
        if not spin:
            return _block(self._ring.bell, _deadline(timeout), self._check_locked)
        return self._spinner.wait(self._ring.bell, _deadline(timeout), self._check_locked)

    def spin_readable(self) -> bool:
        """Like ``wait_readable`` but never blocks: spins for a doorbell count within a
        budget of its own (adapted as in ``wait_readable``), for a thread that would rather
        catch a reply at once than sleep. False when the spin ran out."""
        with self._lock:
            if self._pid != _pid:
                self._claim()
        return self._lead_spinner.spin(self._ring.bell)

    def note_blocked(self, waited_s: float) -> None:
        """Tell ``spin_readable``'s spinner how long its caller then waited by other means,
        so that a spinner turned off learns when to try again."""
        self._lead_spinner.note_blocked(waited_s)

    def recv_ready(self, max_frames: int = 1024, *, rung: bool = False) -> list[bytes]:
        """Return up to ``max_frames`` frames that are ready, perhaps none; never blocks.
        ``rung``: the caller holds a doorbell count (from ``wait_readable``). Raises
        ``RingClosedError`` once the ring is closed and drained."""
        ring = self._ring
        with self._lock:
            if self._pid != _pid:
                self._claim()
            while len(self._pending) < max_frames:
                lane = self._scan()
                if lane < 0:
                    break
                if not rung:
                    try:  # noqa: SIM105 -- keep bell ~= items, as _fill_pending does
                        ring.bell.acquire(0)
                    except posix_ipc.BusyError:
                        pass
                rung = False
                self._consume(lane)
            if not self._pending:
                self._check_readable()  # reaps dead writers; raises once closed and drained
            return self._take_pending(max_frames)

    def _take_pending(self, max_frames: int) -> list[bytes]:
        pending = self._pending
        if len(pending) <= max_frames:
            out = list(pending)
            pending.clear()
        else:
            out = [pending.popleft() for _ in range(max_frames)]
        self._frames += len(out)
        return out

    def _check_locked(self) -> None:
        with self._lock:
            self._check_readable()

    def _fill_pending(self, deadline: float | None, blocking: bool) -> None:
        """Consume slots until at least one whole frame is pending (protocol step 2)."""
        ring = self._ring
        rung = False  # whether we hold a bell count for the item we are about to find
        while not self._pending:
            lane = self._scan()
            if lane >= 0:
                if not rung:
                    # keep bell ~= items; a miss is a spurious wake. (try/except, not
                    # contextlib.suppress: this is the hot path.)
                    try:  # noqa: SIM105
                        ring.bell.acquire(0)
                    except posix_ipc.BusyError:
                        pass
                rung = False
                self._consume(lane)
                continue
            if rung or not blocking:
                # Woken without an item (a writer retired, the ring closed, or a spurious
                # bell), or about to report empty: look at the lanes before going on.
                self._check_readable()
            if not blocking:
                raise RingEmpty(f"ring {ring.name} is empty")
            rung = self._spinner.wait(ring.bell, deadline, self._check_readable)
            if not rung:
                raise RingEmpty(f"ring {ring.name}: no frame within the timeout")

    def _scan(self) -> int:
        """Take one item from the next lane that has one (round-robin); -1 if none."""
        items = self._ring.items
        lanes = len(items)
        start = self._next_lane
        for i in range(lanes):
            lane = (start + i) % lanes
            sem = items[lane]
            if sem.value > 0:
                try:
                    sem.acquire(0)  # acquire ordering: the slot's bytes are visible now
                except posix_ipc.BusyError:
                    continue
                self._next_lane = (lane + 1) % lanes
                return lane
        return -1

    def _consume(self, lane: int) -> None:
        """Copy the lane's head slot out, release it, and turn it into frames."""
        ring = self._ring
        buf = self._buf
        off = ring.slot_offset(lane, self._heads[lane])
        kind, nbytes, first = _ONE_FRAME.unpack_from(buf, off)
        self._heads[lane] = (self._heads[lane] + 1) % ring.slots
        self._slots_moved += 1
        start = off + _SLOT_HEADER.size
        if self._partial and kind in (_Kind.FRAMES, _Kind.FIRST) and lane in self._partial:
            del self._partial[lane]  # its writer abandoned that frame (protocol step 3)
            self._torn += 1
        if kind == _Kind.FRAMES and nbytes == first + _U32.size <= ring.payload_cap:
            # One frame in the slot (the common case of send()): copy it out directly.
            self._pending.append(bytes(buf[start + _U32.size : start + nbytes]))
            ring.spaces[lane].release()  # after the copy: the writer may refill the slot now
            return
        data = bytes(buf[start : start + min(nbytes, ring.payload_cap)])
        ring.spaces[lane].release()  # after the copy: the writer may refill the slot now
        if kind == _Kind.FRAMES:
            self._unpack_frames(data)
        elif kind == _Kind.FIRST:
            total = _U64.unpack_from(data)[0]
            frame = bytearray(total)
            chunk = memoryview(data)[_U64.size :]
            frame[: len(chunk)] = chunk
            self._partial[lane] = (frame, len(chunk))
        elif lane in self._partial:
            frame, filled = self._partial[lane]
            end = filled + len(data)
            frame[filled:end] = data
            if kind == _Kind.LAST:
                del self._partial[lane]
                if end == len(frame):
                    self._pending.append(bytes(frame))
                else:
                    self._torn += 1
            else:
                self._partial[lane] = (frame, end)
        else:
            self._torn += 1  # a continuation without its start

    def _unpack_frames(self, data: bytes) -> None:
        pending = self._pending
        unpack = _U32.unpack_from
        pos, end = 0, len(data)
        while pos < end:
            (n,) = unpack(data, pos)
            pos += 4
            pending.append(data[pos : pos + n])
            pos += n

    # -- liveness and reaping (protocol step 5) --

    def _check_readable(self) -> None:
        """Between wait slices: reap dead or retired writers; raise once closed and drained.
        The reap (the claim lock, and /proc for each claimed lane's owner: tens of
        microseconds on a ring with many lanes) runs at most every ``REAP_INTERVAL_S``: a
        reader that polls an empty ring in a loop must not pay it on each poll. Retired
        lanes (a writer that closed) are reaped at every call: that is a word read each."""
        ring = self._ring
        if not self._pending:
            now = time.monotonic()
            due = now - self._reaped_at >= REAP_INTERVAL_S
            if due:
                self._reaped_at = now
            self._reap(check_alive=due or ring.closed)
        if ring.closed and not self._pending and ring.depth() == 0:
            raise RingClosedError(f"ring {ring.name} is closed")

    def _reap(self, *, check_alive: bool = True) -> None:
        """Free the lanes of retired writers and (``check_alive``) of dead ones."""
        ring = self._ring
        if not check_alive and not any(
            ring.lane_word(lane, _L_STATE) == LaneState.RETIRED for lane in range(ring.lanes)
        ):
            return  # a lock-free look first (aligned words: a hint); the lock only to act
        with ring.claim_lock.held():  # lane words are written under it; read them likewise
            ended = [
                lane
                for lane in range(ring.lanes)
                if (state := ring.lane_word(lane, _L_STATE)) == LaneState.RETIRED
                or (check_alive and state == LaneState.CLAIMED and not ring.lane_owner_alive(lane))
            ]
        for lane in ended:
            # The owner retired or died: nothing more will be posted to this lane.
            while ring.items[lane].value > 0:
                ring.items[lane].acquire(0)
                self._consume(lane)
            if self._partial.pop(lane, None) is not None:
                self._torn += 1
            if ring.close_on_writer_exit:
                ring.mark_closed()
            self._free_lane(lane)

    def _free_lane(self, lane: int) -> None:
        ring = self._ring
        spaces = ring.spaces[lane]
        for _ in range(ring.slots - spaces.value):
            spaces.release()  # counts a killed writer took without publishing
        self._heads[lane] = 0
        with ring.claim_lock.held():
            ring.set_lane_word(lane, _L_PID, 0)
            ring.set_lane_word(lane, _L_START, 0)
            ring.set_lane_word(lane, _L_STATE, LaneState.FREE)
        ring.lanes_free.release()  # wake a writer waiting for a lane

    # -- lifecycle --

    def statistics(self) -> RingStatistics:
        r = self._ring
        return RingStatistics(
            r.name, r.lanes, r.slots, r.slot_bytes, self._frames, self._slots_moved,
            r.depth(), self._torn, r.closed,
        )  # fmt: skip

    def close(self) -> None:
        """Close the ring, if this process is its reader (writers get ``RingClosedError``
        from then on), and unmap. In a process that never read through this handle (say,
        a fork child that inherited it), only unmaps."""
        ring = self._ring
        if ring.segment._mmap is None:
            return
        if self._pid == _pid:
            ring.mark_closed()
            for spaces in ring.spaces:
                spaces.release()  # wake blocked writers; they see the flag
        ring.close()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RingReader {self._ring.name}>"


def open_ring(
    instance: Instance,
    name: str,
    *,
    lanes: int = 1,
    slots: int = DEFAULT_SLOTS,
    slot_bytes: int = DEFAULT_SLOT_BYTES,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    close_on_writer_exit: bool | None = None,
    spin_us: float | None = DEFAULT_SPIN_US,
) -> tuple[RingWriter, RingReader]:
    """Create ring ``name`` (``<from>_to_<to>``) in ``instance`` and return its two ends.

    Data flows left to right: hand the writer to the producing process (fork, or
    ``RingWriter.attach`` by name) and keep the reader, or the other way round. Capacities
    are arguments so tests can use tiny rings. ``close_on_writer_exit`` defaults to True for
    one lane (the writer's exit is end-of-stream) and False for several (writers come and go).
    """
    if close_on_writer_exit is None:
        close_on_writer_exit = lanes == 1
    ring = _RingMap.create(
        instance,
        name,
        lanes=lanes,
        slots=slots,
        slot_bytes=slot_bytes,
        max_frame_bytes=max_frame_bytes,
        close_on_writer_exit=close_on_writer_exit,
    )
    reader_map = _RingMap.open(instance, name)
    return RingWriter(ring, spin_us), RingReader(reader_map, spin_us)


def ring_depth(instance: Instance, name: str) -> int:
    """Slots written to ring ``name`` and not yet read, over every lane, read from outside
    (a monitor): maps the ring without taking a role, reads one semaphore value per lane,
    unmaps. A hint, like ``RingReader.depth``. Raises ``SegmentError`` if there is no ring."""
    ring = _RingMap.open(instance, name)
    try:
        return ring.depth()
    finally:
        ring.close()


def unlink_ring(instance: Instance, name: str) -> list[str]:
    """Remove the names of ring ``name`` of ``instance``: its segment and every semaphore.
    Handles that already claimed their role stay usable until closed (POSIX unlink
    semantics); nothing can attach or claim any more. The caller decides when the ring is
    dead (say, its reader process died). Returns what was removed.

    The instance's owner removes every ring at ``Instance.close()``; this is for rings that
    die before their instance does (a restarted worker's old inbox).
    """
    prefix = f"astra-{instance.id}-{name}"
    removed = []
    for entry in instance_objects(instance.id).get(instance.id, []):
        obj = entry.removeprefix("sem.")
        if obj == prefix or (
            obj.startswith(prefix + ".") and _SEM_SUFFIX.fullmatch(obj[len(prefix) + 1 :])
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, entry))
                removed.append(entry)
    return removed
