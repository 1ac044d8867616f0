"""Failure semantics with real processes: workers killed mid-task, poison tasks, restart
intensity, a dead supervisor (kernel/supervisor.py protocol 2, astra/_client.py)."""

from __future__ import annotations

import os
import signal

import pytest

import astra
from tests.astra import tasks
from tests.helpers import wait_until

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


class KillWorkerMidTask:
    """Fault injection: SIGKILL a worker once it is running one of our tasks."""

    def __init__(self, kernel: astra.Kernel, index: int = 0) -> None:
        self.kernel = kernel
        self.index = index

    def __call__(self) -> int:
        control = self.kernel._control
        wait_until(lambda: control.running(self.index)[1] > 0, timeout_s=10)
        pid = control.worker(self.index).pid
        os.kill(pid, signal.SIGKILL)
        return pid


def test_worker_killed_mid_task_every_task_completes_and_the_worker_returns(kernel):
    futures = [kernel.submit(tasks.sleep, 0.02) for _ in range(40)]
    dead = KillWorkerMidTask(kernel)()
    assert kernel.gather(futures, timeout=30) == [0.02] * 40
    wait_until(lambda: kernel._control.worker(0).pid != dead, timeout_s=1.0)
    back = kernel._control.worker(0)
    assert back.restarts == 1
    with open(f"/proc/{back.pid}/comm") as f:
        assert f.read().strip() == "astra-w00"
    assert kernel.map(tasks.square, range(10)) == [x * x for x in range(10)]


def test_worker_killed_with_batched_submits_waiting_every_task_completes(kernel):
    # 200 tasks: most wait in the client's batches (LOW_WATER) when the worker dies; those
    # count as the dead worker's in-flight tasks and are re-sent with the rest.
    futures = [kernel.submit(tasks.sleep, 0.002) for _ in range(200)]
    KillWorkerMidTask(kernel)()
    assert kernel.gather(futures, timeout=30) == [0.002] * 200
    assert kernel.statistics().pending == 0


def test_a_task_killed_once_is_rerun_elsewhere(kernel, tmp_path):
    assert kernel.submit(tasks.die_once, str(tmp_path / "m")).result(timeout=30) == "survived"


def test_a_poison_task_fails_with_worker_crashed_after_its_retries(kernel):
    future = kernel.submit(tasks.die, retries=2)
    with pytest.raises(astra.WorkerCrashedError):
        future.result(timeout=30)
    # 3 runs, each killing its worker (one more if a WorkerLost notice came too late to say
    # which task was running: the client's fallback then re-sends without charging it)
    assert sum(kernel._control.worker(i).restarts for i in range(2)) >= 3
    assert kernel.submit(tasks.square, 5).result(timeout=10) == 25


def test_retries_zero_fails_at_the_first_crash(kernel):
    bystanders = [kernel.submit(tasks.sleep, 0.01) for _ in range(10)]
    with pytest.raises(astra.WorkerCrashedError):
        kernel.submit(tasks.die, retries=0).result(timeout=30)
    assert kernel.gather(bystanders, timeout=30) == [0.01] * 10  # re-sent, not failed


def test_past_the_restart_intensity_the_kernel_stops_and_futures_fail():
    with astra.Kernel(workers=1, max_restarts=1, within_s=60) as k:
        future = k.submit(tasks.die, retries=5)
        with pytest.raises(astra.KernelNotRunningError):
            future.result(timeout=30)
        with pytest.raises(astra.KernelNotRunningError):
            k.submit(tasks.noop)


def test_a_supervisor_killed_with_sigkill_fails_pending_futures(kernel):
    future = kernel.submit(tasks.sleep, 30)
    os.kill(kernel.supervisor_pid, signal.SIGKILL)
    with pytest.raises(astra.KernelNotRunningError):
        future.result(timeout=10)
    with pytest.raises(astra.KernelNotRunningError):
        kernel.submit(tasks.noop)
