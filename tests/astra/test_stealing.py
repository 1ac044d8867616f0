"""Work stealing across worker processes (kernel/scheduler.py): an idle worker takes half
of a busy worker's queue; lost thieves and victims lose no task."""

from __future__ import annotations

import collections
import os
import signal

import pytest

from tests.astra import tasks
from tests.helpers import wait_until

pytestmark = pytest.mark.multiprocess


def _work_per_worker(kernel, durations):
    futures = [kernel.submit(tasks.sleep_pid, d, worker=0) for d in durations]
    pids = kernel.gather(futures, timeout=60)
    work = collections.Counter()
    for pid, d in zip(pids, durations, strict=True):
        work[pid] += d
    return work


@pytest.mark.slow
def test_an_idle_worker_steals_half_of_a_pinned_queue(kernel):
    # The imbalanced workload: 8 tasks of 200 ms and 56 of 10 ms, all queued on w00.
    # Makespan is timed in perf/bench_dag.py; here, without timing, the work each worker
    # did must be within 10% of the ideal split (total / workers).
    kernel.map(tasks.square, range(4))  # both workers up and idle
    durations = [0.2] * 8 + [0.01] * 56
    work = _work_per_worker(kernel, durations)
    ideal = sum(durations) / 2
    assert len(work) == 2, work
    assert max(work.values()) <= 1.10 * ideal, (work, ideal)
    rows = [kernel._control.worker(i) for i in range(2)]
    assert rows[1].steals > 0


def test_a_high_priority_task_is_stolen_first(kernel):
    kernel.map(tasks.square, range(4))
    w1_busy = kernel.submit(tasks.sleep_pid, 0.15, worker=1)  # no stealing until it ends
    blocker = kernel.submit(tasks.sleep_pid, 0.5, worker=0)
    wait_until(lambda: kernel._control.busy(0) and kernel._control.busy(1), timeout_s=10)
    low = [kernel.submit(tasks.sleep_pid, 0.0, worker=0) for _ in range(3)]
    high = kernel.submit(tasks.sleep_pid, 0.0, worker=0, priority=9)
    w1 = w1_busy.result(timeout=10)
    # w01 goes idle with all four queued on w00 (unread in its ring, while w00 sleeps) and
    # takes every other one in run order (high, low0, low1, low2): high and low1.
    assert high.result(timeout=10) == w1
    assert low[1].result(timeout=10) == w1
    assert blocker.result(timeout=10) != w1
    kernel.gather(low, timeout=10)


def test_a_bad_worker_index_is_refused(kernel):
    with pytest.raises(ValueError, match="workers 0-1"):
        kernel.submit(tasks.square, 2, worker=2)
    assert kernel.statistics().pending == 0


@pytest.mark.slow
def test_a_thief_killed_while_running_stolen_tasks_loses_nothing(kernel):
    kernel.map(tasks.square, range(4))
    futures = [kernel.submit(tasks.sleep_pid, 0.02, worker=0) for _ in range(60)]
    control = kernel._control
    wait_until(lambda: control.worker(1).steals > 0 and control.busy(1), timeout_s=10)
    os.kill(control.worker(1).pid, signal.SIGKILL)
    pids = kernel.gather(futures, timeout=60)
    assert len(pids) == 60
    assert kernel.statistics().pending == 0


@pytest.mark.slow
def test_a_victim_killed_after_giving_loses_nothing(kernel):
    kernel.map(tasks.square, range(4))
    futures = [kernel.submit(tasks.sleep_pid, 0.02, worker=0) for _ in range(60)]
    control = kernel._control
    wait_until(lambda: control.worker(1).steals > 0, timeout_s=10)
    os.kill(control.worker(0).pid, signal.SIGKILL)
    assert len(kernel.gather(futures, timeout=60)) == 60
    assert kernel.statistics().pending == 0
