"""Ring semantics: frames, batching, backpressure, timeouts, closing, dead peers, lanes."""

from __future__ import annotations

import os
import signal
import time

import pytest

from ipc.errors import FrameTooLargeError, IPCError, RingClosedError, RingEmpty, RingFull
from ipc.ring import RingReader, RingWriter, open_ring
from tests.helpers import fork_child, reap, wait_until


@pytest.fixture
def tiny(instance):
    """A 4-slot ring of 64-byte slots (56 B of payload each): wraps and fills quickly."""
    w, r = open_ring(instance, "a_to_b", slots=4, slot_bytes=64)
    yield w, r
    w.close()
    r.close()


def test_round_trip_in_one_process(tiny):
    w, r = tiny
    for frame in (b"", b"x", b"hello" * 10):
        w.send(frame)
        assert r.recv() == frame


def test_wraps_around_many_times(tiny):
    w, r = tiny
    for i in range(100):
        w.send(i.to_bytes(2, "little") * (i % 20))
        assert r.recv() == i.to_bytes(2, "little") * (i % 20)


def test_full_ring_is_backpressure_not_overwrite(tiny):
    w, r = tiny
    for i in range(4):
        w.send_nowait(bytes([i]))
    with pytest.raises(RingFull):
        w.send_nowait(b"overflow")
    t0 = time.monotonic()
    with pytest.raises(RingFull):
        w.send(b"overflow", timeout=0.05)
    assert time.monotonic() - t0 >= 0.04
    assert [r.recv() for _ in range(4)] == [b"\0", b"\1", b"\2", b"\3"]
    with pytest.raises(RingEmpty):
        r.recv_nowait()


def test_recv_timeout(tiny):
    _, r = tiny
    t0 = time.monotonic()
    with pytest.raises(RingEmpty):
        r.recv(timeout=0.05)
    assert 0.04 <= time.monotonic() - t0 < 1.0


def test_frames_larger_than_a_slot_are_chunked(instance):
    w, r = open_ring(instance, "big", slots=8, slot_bytes=64)
    frame = bytes(range(256)) * 1  # 256 B over 56 B payloads: 5 slots
    w.send_nowait(frame)
    assert r.statistics().depth == 5
    assert r.recv() == frame
    with pytest.raises(FrameTooLargeError):
        w.send_nowait(b"x" * 1000)  # could never fit in 8 slots at once
    w.close()
    r.close()


def test_max_frame_bytes(instance):
    w, r = open_ring(instance, "cap", slots=4, slot_bytes=64, max_frame_bytes=100)
    with pytest.raises(FrameTooLargeError):
        w.send(b"x" * 101)
    with pytest.raises(FrameTooLargeError):
        w.send_many([b"ok", b"x" * 101])
    w.close()
    r.close()


def test_send_many_packs_frames_and_recv_many_returns_them_in_order(instance):
    w, r = open_ring(instance, "batch", slots=4, slot_bytes=256)
    frames = [bytes([i]) * (i % 7) for i in range(30)]
    assert w.send_many(frames[:20], timeout=0) == 20
    assert r.statistics().depth < 20  # packed: far fewer slots than frames
    got = r.recv_many(max_frames=8)
    assert got == frames[:8]
    got += r.recv_many()
    assert got == frames[:20]
    w.close()
    r.close()


def test_send_many_partial_reports_how_many_were_sent(tiny):
    w, r = tiny
    frames = [b"y" * 50] * 10  # one per slot: 4 fit
    with pytest.raises(RingFull) as info:
        w.send_many(frames, timeout=0)
    assert info.value.sent == 4
    assert r.recv_many() == frames[:4]


@pytest.mark.multiprocess
def test_frames_larger_than_the_ring_stream_across_processes(instance):
    w, r = open_ring(instance, "stream", slots=4, slot_bytes=64)
    frames = [os.urandom(n) for n in (1, 55, 56, 57, 1000, 70_000)]

    def producer():
        r.close()
        for f in frames:
            w.send(f)
        w.send_many(frames)
        w.close()

    pid = fork_child(producer)
    w.close()
    got = []
    with pytest.raises(RingClosedError):  # noqa: PT012 - read until closed
        while True:
            got.append(r.recv(timeout=30))
    assert got == frames + frames
    assert reap(pid) == 0
    r.close()


@pytest.mark.multiprocess
def test_writer_close_is_end_of_stream(tiny):
    w, r = tiny

    def producer():
        r.close()  # an inherited, unused handle: closing it only unmaps
        w.send(b"last words")
        w.close()

    pid = fork_child(producer)
    assert reap(pid) == 0
    assert r.recv(timeout=5) == b"last words"
    with pytest.raises(RingClosedError):
        r.recv(timeout=5)


def test_reader_close_fails_writers(instance):
    w, r = open_ring(instance, "rc", slots=2, slot_bytes=64)
    r.claim()
    r.close()
    with pytest.raises(RingClosedError):
        w.send(b"x")
    w.close()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_writer_mid_frame_never_yields_a_torn_frame(instance):
    """KillWriterMidFrame: the writer publishes whole frames, then starts a frame bigger than
    the ring and blocks part-way; it is killed there. The reader gets the whole frames, then
    RingClosedError, and never the partial one."""
    w, r = open_ring(instance, "torn", slots=4, slot_bytes=64)
    whole = [b"a" * 40, b"b" * 40]

    def producer():
        for f in whole:
            w.send(f)
        w.send(b"T" * 10_000)  # needs ~180 slots: fills the ring with chunks, then blocks

    pid = fork_child(producer)
    assert [r.recv(timeout=5), r.recv(timeout=5)] == whole
    wait_until(lambda: r.statistics().depth == 4)  # the ring is full of the big frame's chunks
    os.kill(pid, signal.SIGKILL)
    assert reap(pid) == -signal.SIGKILL
    with pytest.raises(RingClosedError):
        r.recv(timeout=5)
    assert r.statistics().torn_frames_dropped == 1
    w.close()
    r.close()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_reader_fails_a_blocked_writer(tiny):
    w, r = tiny
    rfd, wfd = os.pipe()

    def consumer():
        os.close(rfd)
        r.claim()
        os.write(wfd, b"ready")
        signal.pause()

    pid = fork_child(consumer)
    os.close(wfd)
    assert os.read(rfd, 5) == b"ready"
    os.close(rfd)
    for _ in range(4):
        w.send(b"fill")
    os.kill(pid, signal.SIGKILL)
    reap(pid)
    with pytest.raises(RingClosedError, match="reader pid"):
        w.send(b"blocked", timeout=10)


@pytest.mark.multiprocess
def test_lanes_keep_per_writer_order_and_are_fair(instance):
    w, r = open_ring(instance, "mpsc", lanes=3, slots=4, slot_bytes=64)

    def producer(tag):
        def body():
            r.close()
            for i in range(200):
                w.send(b"%c%d" % (tag, i))
            w.close()

        return body

    pids = [fork_child(producer(t)) for t in b"abc"]
    w.close()
    got: dict[int, list[int]] = {t: [] for t in b"abc"}
    for _ in range(600):
        frame = r.recv(timeout=30)
        got[frame[0]].append(int(frame[1:]))
    assert all(seq == list(range(200)) for seq in got.values())
    assert [reap(p) for p in pids] == [0, 0, 0]
    r.close()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_dead_writers_lane_is_reaped_and_reused(instance):
    w, r = open_ring(instance, "reuse", lanes=1, slots=4, slot_bytes=64, close_on_writer_exit=False)

    def producer(text):
        def body():
            w.send(text)
            os.kill(os.getpid(), signal.SIGKILL)  # dies holding the only lane

        return body

    pid = fork_child(producer(b"first"))
    assert reap(pid) == -signal.SIGKILL
    assert r.recv(timeout=5) == b"first"
    pid = fork_child(producer(b"second"))  # claims the lane once the reader freed it
    assert r.recv(timeout=5) == b"second"
    reap(pid)
    w.close()
    r.close()


def test_a_writer_waits_for_a_lane_while_all_are_taken(instance):
    w, r = open_ring(instance, "busy", lanes=1, slots=2, slot_bytes=64)
    w.claim()
    other = RingWriter.attach(instance, "busy")
    with pytest.raises(RingFull, match="live writers"):
        other.send(b"x", timeout=0.05)
    with pytest.raises(RingFull, match="live writers"):
        other.send_nowait(b"x")
    other.close()
    w.close()
    r.close()


@pytest.mark.multiprocess
def test_second_live_reader_is_refused(instance):
    w, r = open_ring(instance, "tworeaders", slots=2, slot_bytes=64)
    r.claim()

    def other_reader():
        reader = RingReader.attach(instance, "tworeaders")
        try:
            reader.claim()
        except IPCError:
            os._exit(0)
        finally:
            reader.close()
        os._exit(3)

    assert reap(fork_child(other_reader)) == 0
    w.close()
    r.close()


def test_statistics_count_frames(tiny):
    w, r = tiny
    w.send_many([b"a", b"b", b"c"])
    assert r.recv_many() == [b"a", b"b", b"c"]
    ws, rs = w.statistics(), r.statistics()
    assert (ws.frames, rs.frames, rs.depth, rs.closed) == (3, 3, 0, False)


def test_a_timed_out_frame_larger_than_the_ring_is_abandoned_whole(instance):
    """A frame bigger than the whole ring streams; if its timeout passes mid-way the writer
    gets RingFull and the reader discards the chunks, then carries on with the next frame."""
    w, r = open_ring(instance, "abandon", slots=4, slot_bytes=64)
    with pytest.raises(RingFull) as full:
        w.send(b"T" * 1000, timeout=0.01)
    assert full.value.sent == 0
    with pytest.raises(RingEmpty):
        r.recv_nowait()  # drains the chunks: no frame among them
    w.send(b"next")
    assert r.recv(timeout=5) == b"next"
    assert r.statistics().torn_frames_dropped == 1
    w.close()
    r.close()


def test_unlink_ring_removes_only_that_ring(instance):
    from ipc import instance_objects, unlink_ring

    def entries():
        return sorted(instance_objects(instance.id)[instance.id])

    keep_w, keep_r = open_ring(instance, "to_w01.1", lanes=2, slots=2, slot_bytes=64)
    before = entries()
    w, r = open_ring(instance, "to_w01", lanes=3, slots=2, slot_bytes=64)
    r.claim()
    w.send(b"still mapped")
    removed = unlink_ring(instance, "to_w01")
    assert len(removed) == 1 + 3 * 2 + 2  # segment, items/spaces per lane, bell, free
    assert entries() == before  # "to_w01.1" is another ring and stays
    assert r.recv(timeout=5) == b"still mapped"  # claimed handles keep working
    for h in (w, r, keep_w, keep_r):
        h.close()


def test_waiting_without_the_lock_then_taking_what_is_ready(tiny):
    """wait_readable holds no lock, so another thread may take the frames meanwhile; the
    doorbell count it took is handed to recv_ready (rung=True) and counts stay balanced."""
    import threading

    w, r = tiny
    assert not r.wait_readable(timeout=0.01)
    assert r.recv_ready() == []
    w.send(b"a")
    w.send(b"b")
    assert r.spin_readable() or r.wait_readable(timeout=5)
    assert r.recv_ready(rung=True) == [b"a", b"b"]
    got = []
    waiter = threading.Thread(target=lambda: got.append(r.wait_readable(timeout=5)))
    waiter.start()
    w.send(b"c")
    waiter.join()
    assert got == [True]
    assert r.recv_ready(rung=True) == [b"c"]
    assert r.recv_ready() == []
    w.close()
    with pytest.raises(RingClosedError):
        r.recv_ready()  # the single writer left and everything was read
