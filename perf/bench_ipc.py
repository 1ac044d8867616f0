"""Astra's shared-memory ring and payload arena beside multiprocessing, faster-fifo and Ray,
in one run on one machine.

Run ``python -m perf.bench_ipc`` (about 2 minutes), ``--quick`` (under 20 s), ``--json-only``
(JSON lines only), ``--only small,large,rtt,handoff`` (a subset of the workload groups).

Workloads (the parent produces, a forked child consumes):

- ``64B``, ``64B_batched`` (msgs/s): 64-byte messages one at a time (Astra ``send``/``recv``,
  ``mp.Queue`` ``put``/``get``, ``mp.Pipe`` ``send_bytes``/``recv_bytes``, faster-fifo
  ``put``/``get``) and in batches of ``BATCH`` (Astra ``send_many``/``recv_many``, faster-fifo
  ``put_many``/``get_many``).
- ``64KiB`` (MB/s, 10^6 bytes): 64 KiB messages one at a time. Astra runs every slot size of
  ``LARGE_RING_CONFIGS`` (all 4 MiB rings); the best is the ``astra`` figure, printed with its
  configuration, the others are listed beside it.
- ``rtt_p50``, ``rtt_p99`` (us): ping-pong of a 64-byte message, the child echoing each one on
  a second channel. Astra with its default adaptive spin (``spin_us=None``: each handle learns
  whether spinning before blocking catches its peer) and with ``spin_us=0`` (block in the
  kernel at once). Every other Astra figure uses the default. Parent and child are pinned
  to two different CPUs (``--no-pin`` to leave placement to the scheduler), as Astra pins
  its workers: left
  unpinned, the scheduler now and then puts both ends of a Pipe on one CPU (a pipe write is a
  "sync" wake-up that pulls the woken reader over), and the Pipe figure jumps from about
  45 us to about 8 us from one run to the next.
- ``100MB_handoff``, ``100MB_end_to_end`` (ms): a 100 MB float64 array goes to the child,
  which sums it and sends the sum back. *Handoff* ends when the child holds the array,
  *end to end* when the parent has the sum. Astra allocates in the arena, fills in place (the
  fill is not timed), adds a hold for the child and sends the ``ArrayRef`` through a ring; the
  child opens a read-only view. Also Astra ``arena.put`` (one copy in, like the peers that
  copy). Peers: the array pickled through a Pipe; ``multiprocessing.shared_memory`` with a
  copy in and its name sent through a Pipe; ``ray.put`` handed to a Ray actor.

Method:

1. *Ready before timing.* Every child sets up (claims its ring end, attaches, maps) and
   says so on a control pipe before the parent starts the clock.
2. *One clock.* Times are ``time.perf_counter()``, which is CLOCK_MONOTONIC on Linux, one
   clock for every process of the machine: a child stamps the moment it received the last
   message (or holds the array), so no reply latency pollutes a throughput figure.
3. *Same capacity.* Astra's rings and faster-fifo's buffer hold 4 MiB each; Pipes are
   one-way ``os.pipe()``s (``duplex=False``, the fast kind); faster-fifo and mp.Queue pickle
   as they do by default.
4. *Medians.* Throughput and handoff figures are medians of ``reps`` runs (handoffs after
   ``HANDOFF_WARMUP`` dropped ones: every system in its steady state); latencies are
   percentiles of every round trip after ``RTT_WARMUP`` warm-up rounds. Sums are checked.
5. *Clean up.* Children are forked (``fork`` context), always joined or killed
   (``perf._harness.Children``); every Astra ``Instance`` is closed in a ``finally``, which
   removes its segments and semaphores, so nothing is left in ``/dev/shm``.
"""

from __future__ import annotations

__all__ = ["FULL", "QUICK", "Plan", "main", "run"]

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import multiprocessing
import os
import platform
import sys
import time
from typing import TYPE_CHECKING, Final, NamedTuple

import msgspec
import numpy as np

from ipc.arena import Arena
from ipc.messages import ArrayRef
from ipc.ring import open_ring
from ipc.shm import Instance

from ._harness import (
    Children,
    Report,
    Target,
    median,
    parse_options,
    percentile,
    pinned,
    run_and_report,
    two_cpus,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator
    from multiprocessing.connection import Connection

#: Bytes of a small message.
SMALL_BYTES: Final = 64
#: Bytes of a large message.
LARGE_BYTES: Final = 64 * 1024
#: Messages per send_many/put_many call in the batched workload (the same for every system).
BATCH: Final = 256
#: Capacity of every bounded channel (Astra rings, faster-fifo buffers), bytes.
CAPACITY_BYTES: Final = 4 << 20
#: Astra ring shapes tried for 64 KiB messages: (slots, slot_bytes). A slot loses 8 bytes to
#: its header and a frame 4 to its length, so a 64 KiB frame takes two 64 KiB slots.
LARGE_RING_CONFIGS: Final = ((64, 64 * 1024), (32, 128 * 1024 + 64), (16, 256 * 1024 + 64))
#: Ring shape for small messages: the default 64 KiB slots, 64 of them.
SMALL_RING: Final = (64, 64 * 1024)
#: Round trips dropped before the latency samples start.
RTT_WARMUP: Final = 200
#: The array of the handoff workload: 100 MB of float64.
HANDOFF_ELEMENTS: Final = 100_000_000 // 8
#: Handoffs run and dropped before the timed ones. Ray's object store faults in fresh pages
#: for its first few 100 MB puts (about 180 ms each here, against 5 ms once it recycles), so
#: every system gets the same generous warm-up and is compared in its steady state.
HANDOFF_WARMUP: Final = 5
#: Arena size for the handoff: one 100 MB block at a time, with room to spare.
ARENA_BYTES: Final = 256 << 20
#: The workload groups ``--only`` accepts.
GROUPS: Final = ("small", "large", "rtt", "handoff")


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """How much work each measurement does, and how the ping-pong is placed."""

    small_msgs: int  # 64 B messages per throughput run (a multiple of BATCH)
    large_msgs: int  # 64 KiB messages per throughput run
    reps: int  # throughput runs per system; the median is reported
    rtt_rounds: int  # round trips timed per system, after RTT_WARMUP
    handoff_reps: int  # timed 100 MB handoffs per system, after HANDOFF_WARMUP
    pin_rtt: bool = True  # ping-pong with each end pinned to its own CPU


QUICK: Final = Plan(small_msgs=20_480, large_msgs=2_000, reps=3, rtt_rounds=2_000, handoff_reps=3)
FULL: Final = Plan(small_msgs=409_600, large_msgs=40_000, reps=5, rtt_rounds=50_000, handoff_reps=9)


_SUMMARY: Final = "Astra's ring and arena beside multiprocessing, faster-fifo and Ray."


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---- Astra instances: every one is closed at exit, whatever happens ----

_instances: list[Instance] = []


@contextlib.contextmanager
def _astra_instance() -> Iterator[Instance]:
    """A fresh Astra instance for one measurement, removed from /dev/shm afterwards. Only
    the creating process removes it (a fork child inherits the object, not the ownership)."""
    inst = Instance.create()
    _instances.append(inst)
    creator = os.getpid()
    try:
        yield inst
    finally:
        if os.getpid() == creator:
            inst.close()


def _close_all_instances() -> None:
    for inst in _instances:
        inst.close()  # idempotent
    _instances.clear()


# ---- Links: one direction of one system, made before fork ----


class _Sender(NamedTuple):
    one: Callable[[bytes], object]
    many: Callable[[list[bytes]], object] | None  # None: the system has no batch send


class _Receiver(NamedTuple):
    one: Callable[[], bytes]
    many: Callable[[], list[bytes]] | None


class _Link:
    """A one-way channel created in the parent; after fork, one process calls ``sender()``
    (which drops the receiving end there), the other ``receiver()``; both ``close()``."""

    def sender(self) -> _Sender:
        raise NotImplementedError

    def receiver(self) -> _Receiver:
        raise NotImplementedError

    def close(self, *, flush: bool = True) -> None:
        """Release this process's ends. ``flush=False`` where the peer has already confirmed
        receipt of everything (or is gone): nothing is left to flush, and flushing towards a
        dead peer could block forever."""


class _AstraLink(_Link):
    def __init__(
        self, inst: Instance, name: str, slots: int, slot_bytes: int, spin_us: float | None
    ) -> None:
        self.w, self.r = open_ring(inst, name, slots=slots, slot_bytes=slot_bytes, spin_us=spin_us)

    def sender(self) -> _Sender:
        self.r.close()  # never read here: only unmaps
        self.w.claim()  # the lane claim is a slow path: keep it out of the timing
        return _Sender(self.w.send, self.w.send_many)

    def receiver(self) -> _Receiver:
        self.w.close()  # never written here: only unmaps
        self.r.claim()
        return _Receiver(self.r.recv, self.r.recv_many)

    def close(self, *, flush: bool = True) -> None:
        self.w.close()
        self.r.close()


class _PipeLink(_Link):
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self.r, self.w = ctx.Pipe(duplex=False)

    def sender(self) -> _Sender:
        self.r.close()
        return _Sender(self.w.send_bytes, None)

    def receiver(self) -> _Receiver:
        self.w.close()
        return _Receiver(self.r.recv_bytes, None)

    def close(self, *, flush: bool = True) -> None:
        self.w.close()
        self.r.close()


class _QueueLink(_Link):
    def __init__(self) -> None:
        self.q = multiprocessing.get_context("fork").Queue()
        self._sending = False

    def sender(self) -> _Sender:
        self._sending = True
        return _Sender(self.q.put, None)

    def receiver(self) -> _Receiver:
        return _Receiver(self.q.get, None)

    def close(self, *, flush: bool = True) -> None:
        if not flush:
            self.q.cancel_join_thread()
        self.q.close()
        if self._sending and flush:
            self.q.join_thread()  # the feeder thread flushes what put() buffered


class _FasterFifoLink(_Link):
    def __init__(self) -> None:
        import faster_fifo

        self.q = faster_fifo.Queue(max_size_bytes=CAPACITY_BYTES)

    def sender(self) -> _Sender:
        return _Sender(self.q.put, self.q.put_many)

    def receiver(self) -> _Receiver:
        return _Receiver(self.q.get, functools.partial(self.q.get_many, max_messages_to_get=1024))


#: Peers of the message workloads: system key, table label, link factory, module needed.
_PEERS: Final[tuple[tuple[str, str, Callable[[], _Link], str], ...]] = (
    ("mp_queue", "mp.Queue put/get", _QueueLink, "multiprocessing"),
    ("mp_pipe", "mp.Pipe send_bytes/recv_bytes", _PipeLink, "multiprocessing"),
    ("faster_fifo", "faster-fifo put/get", _FasterFifoLink, "faster_fifo"),
)


# ---- Throughput: the parent sends n messages, the child stamps the last arrival ----


def _drain_child(ctl: Connection, link: _Link, n: int, nbytes: int, reps: int, many: bool) -> None:
    """Child: receive ``n`` messages per run, reporting the arrival time of the last."""
    recv = link.receiver()
    try:
        for _ in range(reps):
            ctl.send("ready")
            if many:
                assert recv.many is not None
                recv_many, got, last = recv.many, 0, b""
                while got < n:
                    batch = recv_many()
                    got += len(batch)
                    last = batch[-1]
            else:
                recv_one = recv.one  # bound once: the loop times the channel, not lookups
                for _ in range(n):
                    last = recv_one()
            ctl.send(time.perf_counter())
            assert len(last) == nbytes, f"got a {len(last)} B message, sent {nbytes} B"
    finally:
        link.close()


def _throughput(make: Callable[[], _Link], nbytes: int, n: int, reps: int, many: bool) -> float:
    """Median messages per second of ``reps`` runs of ``n`` messages of ``nbytes``."""
    payload = b"x" * nbytes
    batch = [payload] * BATCH
    rates: list[float] = []
    with Children() as kids:
        link = make()
        child = kids.start(_drain_child, link, n, nbytes, reps, many)
        try:
            send = link.sender()
            for _ in range(reps):
                child.recv()  # ready
                t0 = time.perf_counter()
                if many:
                    assert send.many is not None
                    send_many = send.many
                    for _ in range(n // BATCH):
                        send_many(batch)
                else:
                    send_one = send.one
                    for _ in range(n):
                        send_one(payload)
                t_last = child.recv()
                assert isinstance(t_last, float)
                rates.append(n / (t_last - t0))
        finally:
            link.close(flush=False)  # the child confirmed every message, or failed
    return median(rates)


def _bench_small(report: Report, plan: Plan) -> None:
    """64 B messages, one at a time and batched."""
    n, reps = plan.small_msgs, plan.reps
    slots, slot_bytes = SMALL_RING
    with _astra_instance() as inst:
        astra = functools.partial(_AstraLink, inst, "p_to_c", slots, slot_bytes, None)
        config = f"ring {slots} slots x {slot_bytes} B"
        rate = _throughput(astra, SMALL_BYTES, n, reps, many=False)
        report.add("64B", "astra", rate, "msgs/s", label="astra send/recv", config=config)
    for system, label, make, module in _PEERS:
        if not _installed(module):
            report.skip("64B", system, "msgs/s", "not installed", label=label)
            continue
        report.add("64B", system, _throughput(make, SMALL_BYTES, n, reps, False), "msgs/s",
                   label=label)  # fmt: skip
    with _astra_instance() as inst:
        astra = functools.partial(_AstraLink, inst, "p_to_c", slots, slot_bytes, None)
        rate = _throughput(astra, SMALL_BYTES, n, reps, many=True)
        report.add("64B_batched", "astra", rate, "msgs/s",
                   label=f"astra send_many/recv_many ({BATCH}/call)", config=config)  # fmt: skip
    label = f"faster-fifo put_many/get_many ({BATCH}/call)"
    if not _installed("faster_fifo"):
        report.skip("64B_batched", "faster_fifo", "msgs/s", "not installed", label=label)
        return
    rate = _throughput(_FasterFifoLink, SMALL_BYTES, n, reps, many=True)
    report.add("64B_batched", "faster_fifo", rate, "msgs/s", label=label)


def _bench_large(report: Report, plan: Plan) -> None:
    """64 KiB messages: every Astra ring shape, the best one as the headline figure."""
    n, reps = plan.large_msgs, plan.reps
    to_mb = LARGE_BYTES / 1e6
    tried: list[tuple[float, str, str]] = []  # (MB/s, system key, configuration)
    for slots, slot_bytes in LARGE_RING_CONFIGS:
        with _astra_instance() as inst:
            astra = functools.partial(_AstraLink, inst, "p_to_c", slots, slot_bytes, None)
            rate = _throughput(astra, LARGE_BYTES, n, reps, many=False)
        config = f"ring {slots} slots x {slot_bytes} B"
        tried.append((rate * to_mb, f"astra_{slots}x{slot_bytes}", config))
    best = max(tried)
    report.add("64KiB", "astra", best[0], "MB/s", label="astra send/recv (best ring)",
               config=best[2])  # fmt: skip
    for value, system, config in tried:
        if system != best[1]:  # the others, for the record: no ratio columns
            report.add("64KiB", system, value, "MB/s", label=f"astra, {config}",
                       config=config, compare=False)  # fmt: skip
    for system, label, make, module in _PEERS:
        if not _installed(module):
            report.skip("64KiB", system, "MB/s", "not installed", label=label)
            continue
        rate = _throughput(make, LARGE_BYTES, n, reps, many=False)
        report.add("64KiB", system, rate * to_mb, "MB/s", label=label)


# ---- Round trips: the child echoes each message back ----


def _echo_child(ctl: Connection, down: _Link, up: _Link, rounds: int, cpu: int | None) -> None:
    """Child: send back every message received, ``rounds`` times (pinned to ``cpu``)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    recv, send = down.receiver().one, up.sender().one
    try:
        ctl.send("ready")
        for _ in range(rounds):
            send(recv())
    finally:
        down.close()
        up.close()


def _round_trips(
    make: Callable[[str], _Link], rounds: int, cpus: tuple[int, int] | None
) -> tuple[float, float]:
    """(p50, p99) round trip in microseconds over ``rounds`` timed round trips, the parent
    on ``cpus[0]`` and the child on ``cpus[1]`` (unpinned for None)."""
    payload = b"x" * SMALL_BYTES
    samples: list[float] = []
    with pinned(cpus[0] if cpus else None), Children() as kids:
        down, up = make("p_to_c"), make("c_to_p")
        child = kids.start(_echo_child, down, up, RTT_WARMUP + rounds, cpus[1] if cpus else None)
        try:
            send, recv = down.sender().one, up.receiver().one
            child.recv()  # ready
            clock = time.perf_counter
            for i in range(RTT_WARMUP + rounds):
                t0 = clock()
                send(payload)
                reply = recv()
                if i >= RTT_WARMUP:
                    samples.append(clock() - t0)
            assert reply == payload
        finally:
            down.close(flush=False)  # every message came back, or the child failed
            up.close()
    return percentile(samples, 50) * 1e6, percentile(samples, 99) * 1e6


def _bench_rtt(report: Report, plan: Plan) -> None:
    """Ping-pong p50/p99: Astra (adaptive spin, then never spinning), then the peers."""
    slots, slot_bytes = SMALL_RING
    cpus = two_cpus() if plan.pin_rtt else None
    spins: tuple[tuple[str, float | None, str], ...] = (
        ("astra", None, "adaptive spin (default)"),
        ("astra_nospin", 0.0, "spin_us=0"),
    )
    for system, spin, config in spins:
        with _astra_instance() as inst:
            make = functools.partial(_ring_link, inst, slots, slot_bytes, spin)
            p50, p99 = _round_trips(make, plan.rtt_rounds, cpus)
        label = f"astra send/recv, {config}"
        report.add("rtt_p50", system, p50, "us", label=label, config=config)
        report.add("rtt_p99", system, p99, "us", label=label, config=config)
    for system, label, factory, module in _PEERS:
        if not _installed(module):
            report.skip("rtt_p50", system, "us", "not installed", label=label)
            report.skip("rtt_p99", system, "us", "not installed", label=label)
            continue
        p50, p99 = _round_trips(functools.partial(_unnamed, factory), plan.rtt_rounds, cpus)
        report.add("rtt_p50", system, p50, "us", label=label)
        report.add("rtt_p99", system, p99, "us", label=label)


def _ring_link(inst: Instance, slots: int, slot_bytes: int, spin: float | None, name: str) -> _Link:
    return _AstraLink(inst, name, slots, slot_bytes, spin)


def _unnamed(factory: Callable[[], _Link], name: str) -> _Link:
    """Peers' channels need no name (a ring does): adapt a factory to ``make(name)``."""
    return factory()


# ---- 100 MB handoff: the child sums the array and replies ----


class _Handoff(NamedTuple):
    handoff_s: float  # until the child holds the array (fill excluded)
    end_to_end_s: float  # until the parent holds the sum


def _source_array() -> tuple[np.ndarray, float]:
    """The array to hand over, and its exact sum (small integers: float64 sums are exact)."""
    src = (np.arange(HANDOFF_ELEMENTS) % 251).astype(np.float64)
    return src, float(src.sum())


def _record_handoff(
    report: Report, system: str, label: str, runs: list[_Handoff], config: str = ""
) -> None:
    for workload, values in (
        ("100MB_handoff", [r.handoff_s for r in runs]),
        ("100MB_end_to_end", [r.end_to_end_s for r in runs]),
    ):
        report.add(workload, system, median(values) * 1e3, "ms", label=label, config=config)


def _skip_handoff(report: Report, system: str, label: str, reason: str) -> None:
    for workload in ("100MB_handoff", "100MB_end_to_end"):
        report.skip(workload, system, "ms", reason, label=label)


def _check_sum(got: float, expected: float) -> None:
    assert got == expected, f"child summed {got}, expected {expected}"


# -- Astra: arena block, descriptor through a ring, read-only view --


def _arena_child(ctl: Connection, arena: Arena, down: _Link, up: _Link, runs: int) -> None:
    """Child: open each descriptor as a view, sum it, release the hold, reply (t_have, sum)."""
    recv, send = down.receiver(), up.sender()
    try:
        ctl.send("ready")
        for _ in range(runs):
            ref = msgspec.msgpack.decode(recv.one(), type=ArrayRef)
            view = arena.view(ref)
            t_have = time.perf_counter()
            total = float(view.sum())
            del view  # before release: a view must not outlive the hold
            arena.release(ref)
            send.one(msgspec.msgpack.encode((t_have, total)))
    finally:
        down.close()
        up.close()


def _astra_handoff(src: np.ndarray, expected: float, runs: int, copy_in: bool) -> list[_Handoff]:
    """Hand ``src`` over ``runs`` times through the arena; in place (``arena.empty``, fill not
    timed) or with ``arena.put`` (the copy in timed). Returns one record per run."""
    with _astra_instance() as inst, Children() as kids:
        arena = Arena.create(inst, "arena", size=ARENA_BYTES)
        down = _AstraLink(inst, "p_to_c", 8, 4096, None)
        up = _AstraLink(inst, "c_to_p", 8, 4096, None)
        child = kids.start(_arena_child, arena, down, up, runs)
        try:
            send, recv = down.sender(), up.receiver()
            child.recv()  # ready
            return [
                _astra_handoff_once(arena, src, expected, child.pid, send, recv, copy_in)
                for _ in range(runs)
            ]
        finally:
            down.close()
            up.close()
            arena.close()


def _astra_handoff_once(
    arena: Arena,
    src: np.ndarray,
    expected: float,
    pid: int,
    send: _Sender,
    recv: _Receiver,
    copy_in: bool,
) -> _Handoff:
    """One handoff: allocate (or copy in), add the child's hold, send the descriptor, await
    (t_have, sum); then drop the parent's hold, which frees the block for the next run."""
    t0 = time.perf_counter()
    if copy_in:
        ref = arena.put(src)
        t_alloc = 0.0
        t_send = t0
    else:
        ref, arr = arena.empty(src.shape, src.dtype)
        t_alloc = time.perf_counter() - t0
        arr[...] = src  # the fill: not part of the handoff
        del arr
        t_send = time.perf_counter()
    arena.hand_to(ref, pid)
    send.one(msgspec.msgpack.encode(ref))
    t_have, total = msgspec.msgpack.decode(recv.one())
    t_done = time.perf_counter()
    arena.release(ref)
    _check_sum(total, expected)
    return _Handoff(t_alloc + t_have - t_send, t_alloc + t_done - t_send)


# -- multiprocessing: pickled through a Pipe; shared_memory with a copy in --


def _pipe_child(ctl: Connection, down: Connection, up: Connection, runs: int, shm: bool) -> None:
    """Child: take each array (unpickled, or attached by shared-memory name), sum, reply."""
    from multiprocessing import shared_memory

    try:
        ctl.send("ready")
        for _ in range(runs):
            if shm:
                name, shape = down.recv()
                seg = shared_memory.SharedMemory(name=name)
                arr = np.ndarray(shape, np.float64, seg.buf)
            else:
                arr = down.recv()
            t_have = time.perf_counter()
            total = float(arr.sum())
            del arr
            if shm:
                seg.close()
            up.send((t_have, total))
    finally:
        down.close()
        up.close()


def _mp_handoff(src: np.ndarray, expected: float, runs: int, shm: bool) -> list[_Handoff]:
    """Hand ``src`` over ``runs`` times pickled through a Pipe, or through a new
    ``multiprocessing.shared_memory`` segment per run (copy in, name through the Pipe)."""
    from multiprocessing import resource_tracker

    # The tracker must run before fork, or the child starts its own, which unlinks the
    # parent's segments when the child exits (NOTES.md: the tracker pitfall before 3.13).
    resource_tracker.ensure_running()
    ctx = multiprocessing.get_context("fork")
    with Children() as kids:
        down_r, down_w = ctx.Pipe(duplex=False)
        up_r, up_w = ctx.Pipe(duplex=False)
        child = kids.start(_pipe_child, down_r, up_w, runs, shm)
        down_r.close()
        up_w.close()
        try:
            child.recv()  # ready
            return [_mp_handoff_once(src, expected, down_w, up_r, shm) for _ in range(runs)]
        finally:
            down_w.close()
            up_r.close()


def _mp_handoff_once(
    src: np.ndarray, expected: float, down: Connection, up: Connection, shm: bool
) -> _Handoff:
    """One handoff the multiprocessing way: what a user writes without Astra."""
    from multiprocessing import shared_memory

    t0 = time.perf_counter()
    if shm:
        seg = shared_memory.SharedMemory(create=True, size=src.nbytes)
        dst = np.ndarray(src.shape, src.dtype, seg.buf)
        dst[...] = src
        down.send((seg.name, src.shape))
    else:
        down.send(src)
    t_have, total = up.recv()
    t_done = time.perf_counter()
    if shm:
        del dst
        seg.close()
        seg.unlink()
    _check_sum(total, expected)
    return _Handoff(t_have - t0, t_done - t0)


# -- Ray: ray.put, then an actor method that gets the array (zero copy from the store) --


def _ray_handoff(src: np.ndarray, expected: float, runs: int) -> list[_Handoff]:
    """Hand ``src`` to a Ray actor ``runs`` times via ``ray.put``. Starts and stops Ray."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:

        @ray.remote
        class Summer:
            def total(self, arr: np.ndarray) -> tuple[float, float]:
                t_have = time.perf_counter()
                return t_have, float(arr.sum())

        actor = Summer.remote()  # type: ignore[attr-defined]
        ray.get(actor.total.remote(np.zeros(1)))  # ready: the actor's process is up
        out: list[_Handoff] = []
        for _ in range(runs):
            t0 = time.perf_counter()
            ref = ray.put(src)
            t_have, total = ray.get(actor.total.remote(ref))
            t_done = time.perf_counter()
            del ref
            _check_sum(total, expected)
            out.append(_Handoff(t_have - t0, t_done - t0))
        return out
    finally:
        ray.shutdown()


def _bench_handoff(report: Report, plan: Plan) -> None:
    """100 MB to another process, summed there. Ray runs last: after ray.init, no more forks."""
    src, expected = _source_array()
    runs = HANDOFF_WARMUP + plan.handoff_reps  # warm-ups first: page faults, lazy set-up
    for system, label, copy_in in (
        ("astra", "astra arena.empty + ArrayRef via ring", False),
        ("astra_copy_in", "astra arena.put (copy in) + ArrayRef", True),
    ):
        measured = _astra_handoff(src, expected, runs, copy_in)[HANDOFF_WARMUP:]
        _record_handoff(report, system, label, measured, config=f"arena {ARENA_BYTES >> 20} MiB")
    for system, label, shm in (
        ("mp_pipe", "mp.Pipe send (pickle)", False),
        ("mp_shared_memory", "mp shared_memory (copy in), name via Pipe", True),
    ):
        measured = _mp_handoff(src, expected, runs, shm)[HANDOFF_WARMUP:]
        _record_handoff(report, system, label, measured)
    label = "ray.put + actor"
    if not _installed("ray"):
        _skip_handoff(report, "ray", label, "not installed")
        return
    try:
        measured = _ray_handoff(src, expected, runs)[HANDOFF_WARMUP:]
    except Exception as exc:  # a broken Ray install is a skipped peer, not a failed benchmark
        _skip_handoff(report, "ray", label, f"ray failed: {type(exc).__name__}: {exc}"[:120])
        return
    _record_handoff(report, "ray", label, measured)


# ---- Targets from the issue: what this machine must show ----


_TARGETS: Final = (
    Target("64 B batched >= 2x mp.Pipe send_bytes", ("64B_batched", "astra"),
            ("64B", "mp_pipe"), 2.0),
    Target("64 B batched >= 3x faster-fifo batched", ("64B_batched", "astra"),
            ("64B_batched", "faster_fifo"), 3.0),
    Target("64 KiB >= faster-fifo", ("64KiB", "astra"), ("64KiB", "faster_fifo"), 1.0),
    Target("round trip p50 <= mp.Pipe (default, adaptive spin)", ("rtt_p50", "astra"),
            ("rtt_p50", "mp_pipe"), 1.0),
    Target("100 MB handoff < 1 ms", ("100MB_handoff", "astra"), None, 1.0),
)  # fmt: skip


# ---- Entry point ----


def run(plan: Plan, groups: tuple[str, ...] = GROUPS, *, progress: bool = True) -> Report:
    """Run the chosen workload groups and return the report (nothing printed but progress)."""
    report = Report("ipc", progress=sys.stderr if progress else None)
    report.section("64 B messages, one way", "64B", "64B_batched")
    report.section("64 KiB messages, one way", "64KiB")
    cpus = two_cpus() if plan.pin_rtt else None
    where = f"ends pinned to CPUs {cpus[0]} and {cpus[1]}" if cpus else "unpinned"
    report.section(f"round trip, 64 B, p50, {where}", "rtt_p50")
    report.section(f"round trip, 64 B, p99, {where}", "rtt_p99")
    report.section("100 MB array to another process: handoff", "100MB_handoff")
    report.section("100 MB array to another process, summed there: end to end", "100MB_end_to_end")
    benches: dict[str, Callable[[Report, Plan], None]] = {
        "small": _bench_small, "large": _bench_large, "rtt": _bench_rtt, "handoff": _bench_handoff,
    }  # fmt: skip
    try:
        for group in GROUPS:  # handoff last: it may start Ray, after which nothing forks
            if group in groups:
                benches[group](report, plan)
    finally:
        _close_all_instances()
    return report


def _parse(argv: list[str] | None) -> argparse.Namespace:
    def no_pin(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--no-pin", action="store_true", help="ping-pong without pinning")

    return parse_options(
        argv, prog="python -m perf.bench_ipc", description=_SUMMARY, choices=GROUPS,
        dest="groups", quick_help="fewer messages: under ~20 s", extra=no_pin,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command line entry: run, then print the tables, the targets and the JSON lines."""
    args = _parse(argv)
    plan = dataclasses.replace(QUICK if args.quick else FULL, pin_rtt=not args.no_pin)
    return run_and_report(
        args,
        lambda progress: run(plan, args.groups, progress=progress),
        title="Astra IPC benchmark",
        facts=lambda: (
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}"
        ),
        interrupted="children reaped, shared memory removed",
        targets=_TARGETS,
    )


if __name__ == "__main__":
    sys.exit(main())
