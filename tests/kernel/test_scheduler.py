"""The work-stealing helpers (kernel/scheduler.py), without processes."""

from __future__ import annotations

import heapq
import random

from kernel.scheduler import split_for_thief, steal_bell, worker_ring


def _heap(entries):
    heap = list(entries)
    heapq.heapify(heap)
    return heap


def test_a_thief_takes_every_other_task_in_run_order_from_the_first():
    # (-priority, arrival, task): priority 5 runs before 0; among equals, the oldest first.
    # Run order: hi, hi2, a, b, c. The thief takes the 1st, 3rd and 5th (half, rounded up).
    heap = _heap([(0, 1, "a"), (0, 2, "b"), (-5, 3, "hi"), (0, 4, "c"), (-5, 5, "hi2")])
    taken = split_for_thief(heap)
    assert [t[2] for t in taken] == ["hi", "a", "c"]
    assert [heapq.heappop(heap)[2] for _ in range(len(heap))] == ["hi2", "b"]


def test_a_single_queued_task_goes_to_the_thief():
    heap = _heap([(0, 1, "only")])
    assert split_for_thief(heap) == [(0, 1, "only")]
    assert heap == []
    assert split_for_thief(heap) == []


def test_what_stays_is_a_valid_heap():
    rng = random.Random(7)
    for n in range(1, 60):
        entries = [(-rng.randrange(3), i, i) for i in range(n)]
        heap = _heap(entries)
        taken = split_for_thief(heap)
        assert len(taken) == (n + 1) // 2
        rest = [heapq.heappop(heap) for _ in range(len(heap))]
        assert taken == sorted(entries)[0::2]
        assert rest == sorted(entries)[1::2]


def test_names():
    assert worker_ring(3, 2) == "to_w03.2"
    assert steal_bell(3, 2) == "steal_w03.2"
