"""A thread about to spin for an agent's answer leaves the CPU that agent's worker is pinned
to (astra/_client.py, ``_step_aside``), and its affinity is as it was; a stream of messages
keeps the receiver thread on the sender's CPU (``Client._follow``)."""

from __future__ import annotations

import os
import threading

import pytest

from astra._client import _current_cpu, _step_aside

pytestmark = pytest.mark.skipif(
    _current_cpu() < 0 or len(os.sched_getaffinity(0)) < 2, reason="needs sched_getcpu, 2 CPUs"
)
multiprocess = pytest.mark.multiprocess


def _in_thread(fn):
    """Run ``fn`` on a fresh thread (affinity is per thread: the test runner's stays)."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_a_thread_on_the_workers_core_moves_and_keeps_its_affinity():
    def run():
        allowed = os.sched_getaffinity(0)
        core = min(allowed)
        os.sched_setaffinity(0, {core})  # now on `core` for sure
        os.sched_setaffinity(0, allowed)
        before = _current_cpu()
        _step_aside(core)
        return before, _current_cpu(), os.sched_getaffinity(0) == allowed, core

    before, after, same_mask, core = _in_thread(run)
    assert before == core
    assert after != core
    assert same_mask


def test_a_thread_elsewhere_or_pinned_alone_stays():
    def run():
        allowed = os.sched_getaffinity(0)
        core = min(allowed)
        os.sched_setaffinity(0, {core})
        _step_aside(core)  # only one CPU allowed: nowhere to go
        stayed = _current_cpu() == core
        _step_aside(core + 1)  # another core's worker: no reason to move
        os.sched_setaffinity(0, allowed)
        return stayed, _current_cpu() == core

    assert _in_thread(run) == (True, True)


@multiprocess
def test_a_stream_of_messages_keeps_the_receiver_thread_beside_its_sender(kernel):
    # The receiver shares the GIL with the sending thread: on the sender's core it costs
    # little; woken onto a worker's core, it takes turns with the worker.
    from tests.astra.agents import Counter, Slow

    def run():
        slow = kernel.spawn(Slow, worker=0)
        counter = kernel.spawn(Counter, 0, worker=1)
        allowed = os.sched_getaffinity(0)
        core = max(allowed)
        os.sched_setaffinity(0, {core})
        try:
            blocked = [slow.ask("block", 5) for _ in range(8)]  # later asks are held
            counter.ask("add", 1)  # begins a batch, from `core`
            return os.sched_getaffinity(kernel._receiver.native_id), core, blocked
        finally:
            os.sched_setaffinity(0, allowed)

    receiver_cpus, core, _ = _in_thread(run)
    assert receiver_cpus == {core}
