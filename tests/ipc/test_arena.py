"""The shared payload arena: zero-copy handoff, holds, reclaim after SIGKILL, full and stale."""

from __future__ import annotations

import os
import signal
import struct

import msgspec
import numpy as np
import pytest

from ipc.arena import Arena
from ipc.errors import ArenaFullError, StaleBlockError
from ipc.messages import ArrayRef
from ipc.ring import open_ring
from tests.helpers import fork_child, reap

MB = 1 << 20


@pytest.fixture
def arena(instance):
    a = Arena.create(instance, size=8 * MB, page_bytes=64 * 1024, max_blocks=16, max_holds=32)
    yield a
    a.close()


def test_put_view_release_frees_the_block(arena):
    ref = arena.put(np.arange(1000, dtype=np.int32))
    view = arena.view(ref)
    assert view.dtype == np.int32
    assert view.shape == (1000,)
    assert int(view.sum()) == 499500
    assert not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1
    assert arena.statistics().blocks_used == 1
    del view
    arena.release(ref)
    stats = arena.statistics()
    assert (stats.blocks_used, stats.pages_used, stats.holds_used) == (0, 0, 0)


def test_bytes_blocks_and_descriptors_cross_the_wire(arena):
    ref = arena.put_bytes(b"payload")
    wire = msgspec.msgpack.encode(ref)
    back = msgspec.msgpack.decode(wire, type=ArrayRef)
    assert bytes(arena.view(back)) == b"payload"
    arena.release(back)


def test_last_hold_frees(arena):
    ref = arena.put(np.ones(10))
    arena.hold(ref)  # a second hold of this process
    arena.release(ref)
    assert arena.statistics().blocks_used == 1
    arena.release(ref)
    assert arena.statistics().blocks_used == 0
    with pytest.raises(StaleBlockError):
        arena.release(ref)


def test_stale_descriptor_after_reuse(arena):
    old = arena.put(np.zeros(10))
    arena.release(old)
    new = arena.put(np.ones(10))  # very likely the same block entry and pages
    with pytest.raises(StaleBlockError):
        arena.view(old)
    with pytest.raises(StaleBlockError):
        arena.hold(old)
    arena.release(new)


def test_full_arena_is_a_typed_error(arena):
    refs = [arena.alloc(2 * MB) for _ in range(4)]
    with pytest.raises(ArenaFullError, match="no free run"):
        arena.alloc(1)
    arena.release(refs[1])
    arena.release(refs[2])
    big = arena.alloc(4 * MB)  # the two freed neighbours form one run
    for ref in (refs[0], refs[3], big):
        arena.release(ref)


def test_block_table_full_is_a_typed_error(arena):
    refs = [arena.alloc(1) for _ in range(16)]
    with pytest.raises(ArenaFullError, match="block table"):
        arena.alloc(1)
    for ref in refs:
        arena.release(ref)


def test_hand_to_a_dead_process_is_refused(arena):
    pid = fork_child(lambda: None)
    reap(pid)
    ref = arena.put(np.ones(3))
    with pytest.raises(ProcessLookupError):
        arena.hand_to(ref, pid)
    arena.release(ref)


def _mapping_of(address: int) -> str:
    with open("/proc/self/maps") as f:
        for line in f:
            span, *rest = line.split()
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return rest[-1] if len(rest) >= 5 else ""
    return ""


def _pfn(address: int) -> int:
    """Physical frame of a virtual page (0 when the kernel hides it: needs CAP_SYS_ADMIN)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // os.sysconf("SC_PAGE_SIZE") * 8)
        (entry,) = struct.unpack("<Q", f.read(8))
    return entry & ((1 << 55) - 1) if entry >> 63 else 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_100mb_array_reaches_another_process_without_a_copy(instance):
    arena = Arena.create(instance, size=128 * MB)
    to_child, from_parent = open_ring(instance, "p_to_c", slots=4, slot_bytes=256)
    to_parent, from_child = open_ring(instance, "c_to_p", slots=4, slot_bytes=256)

    def receiver():
        ref = msgspec.msgpack.decode(from_parent.recv(timeout=30), type=ArrayRef)
        view = arena.view(ref)
        addr = view.__array_interface__["data"][0]
        report = (float(view.sum()), _mapping_of(addr), _pfn(addr), view.flags.owndata)
        to_parent.send(msgspec.msgpack.encode(report))
        # The parent now writes into the block: a copy would not see it.
        from_parent.recv(timeout=30)
        to_parent.send(msgspec.msgpack.encode(float(view[0])))
        del view
        arena.release(ref)
        to_parent.close()

    pid = fork_child(receiver)
    ref, array = arena.empty(100_000_000 // 8, np.float64)
    array[:] = 1.0
    arena.hand_to(ref, pid)
    to_child.send(msgspec.msgpack.encode(ref))
    arena.release(ref)  # the receiver's hold keeps the block alive
    total, mapping, child_pfn, owndata = msgspec.msgpack.decode(from_child.recv(timeout=60))
    assert total == 12_500_000.0
    assert f"astra-{instance.id}-arena" in mapping
    assert not owndata
    parent_pfn = _pfn(array.__array_interface__["data"][0])
    if parent_pfn and child_pfn:  # visible to root: the very same physical page
        assert parent_pfn == child_pfn
    array[0] = 42.0
    to_child.send(b"look again")
    assert msgspec.msgpack.decode(from_child.recv(timeout=30)) == 42.0
    assert reap(pid) == 0
    del array
    assert arena.statistics().blocks_used == 0  # freed after the last release
    for end in (to_child, from_parent, to_parent, from_child, arena):
        end.close()


@pytest.mark.multiprocess
def test_blocks_of_a_killed_holder_are_reclaimed(arena):
    rfd, wfd = os.pipe()

    def holder():
        os.close(rfd)
        for _ in range(3):
            arena.alloc(2 * MB)
        os.write(wfd, b"held")
        signal.pause()

    pid = fork_child(holder)
    os.close(wfd)
    assert os.read(rfd, 4) == b"held"
    os.close(rfd)
    assert arena.statistics().blocks_used == 3
    os.kill(pid, signal.SIGKILL)
    assert reap(pid) == -signal.SIGKILL
    big = arena.alloc(8 * MB)  # only fits once the dead holder's 6 MB are reclaimed
    arena.release(big)
    assert arena.reclaim() == 0
    assert arena.statistics().pages_used == 0


@pytest.mark.multiprocess
def test_reclaim_keeps_blocks_handed_to_live_processes(arena):
    rfd, wfd = os.pipe()

    def sender():
        os.close(rfd)
        ref = arena.put(np.full(4, 7.0))
        arena.hand_to(ref, os.getppid())
        os.write(wfd, msgspec.msgpack.encode(ref))
        os.kill(os.getpid(), signal.SIGKILL)  # dies without releasing its own hold

    pid = fork_child(sender)
    os.close(wfd)
    ref = msgspec.msgpack.decode(os.read(rfd, 200), type=ArrayRef)
    os.close(rfd)
    reap(pid)
    assert arena.reclaim() == 0  # our hold keeps it
    assert arena.view(ref).tolist() == [7.0] * 4
    arena.release(ref)
    assert arena.statistics().blocks_used == 0
