"""Property tests of the ring's invariants: any interleaving of sends and receives, in any
mix of single, batched, blocking-with-zero-timeout and non-blocking calls, on rings small
enough to wrap and fill constantly.

The model is the FIFO of frames the ring accepted. Invariants checked after every step:
frames come out in the order they went in, none lost, none duplicated; a send is refused
(``RingFull``) only when the free slots are fewer than the frame needs; a receive finds a
frame exactly when the model holds one; the ring's depth never exceeds its capacity.
"""

from __future__ import annotations

import collections

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ipc.errors import FrameTooLargeError, RingEmpty, RingFull
from ipc.ring import open_ring
from ipc.shm import Instance

frames = st.binary(min_size=0, max_size=300)


class RingMachine(RuleBasedStateMachine):
    @initialize(
        slots=st.integers(min_value=1, max_value=6),
        slot_bytes=st.sampled_from([32, 40, 64, 128]),
    )
    def setup(self, slots, slot_bytes):
        self.inst = Instance.create()
        self.w, self.r = open_ring(self.inst, "prop", slots=slots, slot_bytes=slot_bytes)
        self.model: collections.deque[bytes] = collections.deque()
        self.capacity = slots

    def teardown(self):
        if hasattr(self, "inst"):
            self.w.close()
            self.r.close()
            self.inst.close()

    def _depth(self) -> int:
        return self.r.statistics().depth

    @rule(frame=frames)
    def send_nowait(self, frame):
        need = self.w._ring.slots_needed(len(frame))
        free = self.capacity - self._depth()
        try:
            self.w.send_nowait(frame)
        except FrameTooLargeError:
            assert need > self.capacity
            return
        except RingFull:
            assert need > free, (need, free)
            return
        assert need <= free
        self.model.append(frame)

    @rule(batch=st.lists(frames, max_size=8))
    def send_many_zero_timeout(self, batch):
        try:
            sent = self.w.send_many(batch, timeout=0)
        except RingFull as full:
            sent = full.sent
            assert sent < len(batch)
        self.model.extend(batch[:sent])

    @rule()
    def recv_nowait(self):
        try:
            got = self.r.recv_nowait()
        except RingEmpty:
            assert not self.model
            return
        assert got == self.model.popleft()

    @precondition(lambda self: bool(getattr(self, "model", None)))
    @rule(n=st.integers(min_value=1, max_value=10))
    def recv_many(self, n):
        got = self.r.recv_many(max_frames=n, timeout=0)
        assert 1 <= len(got) <= n
        assert got == [self.model.popleft() for _ in got]

    @invariant()
    def depth_within_capacity(self):
        if hasattr(self, "inst"):
            assert 0 <= self._depth() <= self.capacity


RingMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRingProperties = RingMachine.TestCase


def test_drained_ring_returns_everything_in_order():
    """A direct statement of the main property, independent of the state machine."""
    inst = Instance.create()
    w, r = open_ring(inst, "order", slots=3, slot_bytes=48)
    sent, got = [], []
    for i in range(200):
        frame = bytes([i % 256]) * (i % 90)
        try:
            w.send_nowait(frame)
            sent.append(frame)
        except RingFull:
            got += r.recv_many(timeout=0)
            w.send_nowait(frame)
            sent.append(frame)
    while True:
        try:
            got += r.recv_many(timeout=0)
        except RingEmpty:
            break
    assert got == sent
    w.close()
    r.close()
    inst.close()
