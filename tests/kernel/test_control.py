"""The control block: layout, registration and worker rows (kernel/control.py)."""

from __future__ import annotations

import os
import signal

import pytest

from ipc import SegmentError
from kernel import ControlBlock, KernelState, RegistrationError
from tests.helpers import fork_child, reap


@pytest.fixture
def control(instance):
    block = ControlBlock.create(instance, workers=2, max_clients=2)
    block.set_state(KernelState.RUNNING)
    try:
        yield block
    finally:
        block.close()


def test_a_second_mapping_sees_the_same_block(instance, control):
    other = ControlBlock.open(instance)
    try:
        assert (other.workers, other.max_clients) == (2, 2)
        control.set_worker(1, os.getpid(), generation=3, core=1)
        row = other.worker(1)
        assert (row.pid, row.generation, row.core, row.restarts) == (os.getpid(), 3, 1, 0)
        assert other.state is KernelState.RUNNING
        assert other.running_now
    finally:
        other.close()


def test_opening_something_else_is_refused(instance):
    seg = instance.create_segment("control", 4096)
    seg.close()
    with pytest.raises(SegmentError):
        ControlBlock.open(instance)


def test_register_claims_distinct_slots_until_full(control):
    a = control.register("inst-a", os.getpid())
    b = control.register("inst-b", os.getpid())
    assert {a[0], b[0]} == {0, 1}
    with pytest.raises(RegistrationError, match="slots"):
        control.register("inst-c", os.getpid())
    assert [row.instance_id for row in control.clients()] == ["inst-a", "inst-b"]
    assert control.slot_current(*a)
    assert control.unregister(*a)
    assert not control.slot_current(*a)
    assert not control.unregister(*a)  # a stale generation frees nothing twice
    c = control.register("inst-c", os.getpid())
    assert c[0] == a[0]
    assert c[1] == a[1] + 1


@pytest.mark.multiprocess
def test_the_slot_of_a_dead_client_is_taken_over(control):
    def claim_and_die():
        control.register("doomed", os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)

    assert reap(fork_child(claim_and_die)) == -signal.SIGKILL
    control.register("live", os.getpid())
    control.register("live2", os.getpid())  # the dead one's slot was reusable
    assert sorted(r.instance_id for r in control.clients()) == ["live", "live2"]


def test_registration_is_refused_while_draining(control):
    control.set_state(KernelState.DRAINING)
    with pytest.raises(RegistrationError, match="draining"):
        control.register("late", os.getpid())


def test_workers_publish_what_they_run(control):
    control.set_running(0, client=1, task_id=42)
    assert control.running(0) == (1, 42)
    control.set_running(0, client=-1, task_id=0)
    assert control.running(0) == (-1, -1)
    control.count_done(0, 5, queued=3)
    assert (control.worker(0).tasks_done, control.worker(0).queued) == (5, 3)


def test_cancel_words_belong_to_one_claim(control):
    slot, gen = control.register("a", os.getpid())
    control.request_cancel(slot, 1, task_id=7)
    assert control.cancel_requested(slot, 1, 7)
    assert not control.cancel_requested(slot, 0, 7)
    control.unregister(slot, gen)
    again, _ = control.register("b", os.getpid())
    assert again == slot
    assert not control.cancel_requested(slot, 1, 7)  # a new client's task 7 is not cancelled
