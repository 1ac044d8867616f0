"""The embedded kernel's task API: submit/map/gather/as_completed, futures, shipping,
options, arena results (astra/_client.py, astra/_kernel.py, kernel/worker.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import subprocess
import sys
import threading

import psutil
import pytest

import astra
from ipc import cleanup_stale
from tests.astra import tasks
from tests.helpers import fork_child, reap, wait_until

pytestmark = pytest.mark.multiprocess


def test_submit_returns_the_result(kernel):
    assert kernel.submit(tasks.add, 2, 3).result(timeout=10) == 5
    assert kernel.submit(tasks.add, a=1, b=2).result(timeout=10) == 3


def test_map_and_gather_keep_order(kernel):
    assert kernel.map(tasks.square, range(100)) == [x * x for x in range(100)]
    futures = [kernel.submit(tasks.add, i, 1) for i in range(50)]
    assert kernel.gather(futures) == list(range(1, 51))


def test_as_completed_yields_every_future(kernel):
    futures = [kernel.submit(tasks.square, i) for i in range(20)]
    done = list(kernel.as_completed(futures, timeout=10))
    assert sorted(f.result() for f in done) == sorted(i * i for i in range(20))
    # astra futures are concurrent.futures futures: the stdlib helpers accept them
    assert not concurrent.futures.wait(futures, timeout=10).not_done


def test_future_is_awaitable_in_asyncio(kernel):
    async def main():
        one = await kernel.submit(tasks.square, 7)
        many = await asyncio.gather(*(kernel.submit(tasks.square, i) for i in range(5)))
        return one, many

    assert asyncio.run(main()) == (49, [0, 1, 4, 9, 16])


def test_remote_exception_carries_its_traceback_as_cause(kernel):
    future = kernel.submit(tasks.boom, "bad input")
    with pytest.raises(ValueError, match="bad input") as info:
        future.result(timeout=10)
    cause = info.value.__cause__
    assert isinstance(cause, astra.errors.RemoteTraceback)
    assert "in boom" in str(cause)
    assert "ValueError: bad input" in str(cause)


def test_an_exception_that_cannot_cross_becomes_remote_error(kernel):
    with pytest.raises(astra.RemoteError, match="Unpicklable"):
        kernel.submit(tasks.raise_unpicklable).result(timeout=10)


def test_a_failing_task_fails_only_its_future(kernel):
    bad = kernel.submit(tasks.boom, "x")
    good = [kernel.submit(tasks.square, i) for i in range(10)]
    assert kernel.gather(good) == [i * i for i in range(10)]
    assert isinstance(bad.exception(timeout=10), ValueError)


def test_closures_and_lambdas_ship_by_value(kernel):
    k = 5
    assert kernel.submit(lambda x: x + k, 1).result(timeout=10) == 6

    def local(x):
        return x * k

    assert kernel.map(local, [1, 2]) == [5, 10]


def test_unpicklable_argument_raises_at_submit(kernel):
    with pytest.raises(astra.SerializationError):
        kernel.submit(tasks.square, threading.Lock())
    assert kernel.submit(tasks.square, 3).result(timeout=10) == 9  # nothing broke


def test_unpicklable_result_fails_the_future_and_spares_the_worker(kernel):
    pids = kernel.worker_pids()
    with pytest.raises(astra.SerializationError, match="lock"):
        kernel.submit(tasks.return_lock).result(timeout=10)
    assert kernel.submit(tasks.square, 4).result(timeout=10) == 16
    assert kernel.worker_pids() == pids


@pytest.mark.slow
def test_timeout_interrupts_a_running_task(kernel1):
    future = kernel1.submit(tasks.sleep_forever_ignoring_errors, timeout=0.1)
    with pytest.raises(astra.TaskTimeoutError):
        future.result(timeout=10)
    assert isinstance(future.exception().__cause__, astra.errors.RemoteTraceback)
    assert kernel1.submit(tasks.square, 2).result(timeout=10) == 4


def test_async_timeout(kernel1):
    with pytest.raises(astra.TaskTimeoutError):
        kernel1.submit(tasks.asleep, 30, timeout=0.05).result(timeout=10)


def test_async_task_awaiting_does_not_block_the_worker(kernel1):
    # One worker: if the awaiting task blocked it, set_flag could never run.
    waiting = kernel1.submit(tasks.await_flag)
    assert kernel1.submit(tasks.set_flag).result(timeout=10) == "set"
    assert waiting.result(timeout=10) == "flag seen"


def test_async_tasks_interleave(kernel1):
    futures = [kernel1.submit(tasks.aecho, i, 0.01) for i in range(50)]
    assert kernel1.gather(futures, timeout=10) == list(range(50))


@pytest.mark.slow
def test_priority_orders_queued_tasks(kernel1):
    blocker = kernel1.submit(tasks.sleep, 0.3, priority=100)
    low = [kernel1.submit(tasks.sequence, priority=0) for _ in range(5)]
    high = [kernel1.submit(tasks.sequence, priority=10) for _ in range(5)]
    blocker.result(timeout=10)
    assert max(kernel1.gather(high)) < min(kernel1.gather(low))


@pytest.mark.slow
def test_cancel_before_start_drops_the_task(kernel1, tmp_path):
    blocker = kernel1.submit(tasks.sleep, 0.3)
    marker = tmp_path / "ran"
    queued = kernel1.submit(tasks.touch, str(marker))
    assert queued.cancel()
    assert queued.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result()
    blocker.result(timeout=10)
    kernel1.submit(tasks.noop).result(timeout=10)  # after the cancelled one, in order
    assert not marker.exists()


def test_cancel_a_running_async_task(kernel1):
    future = kernel1.submit(tasks.asleep, 30)
    kernel1.submit(tasks.noop).result(timeout=10)  # the async task has started by now
    assert future.cancel()
    assert kernel1.submit(tasks.square, 3).result(timeout=10) == 9


def test_cancel_after_done_is_refused(kernel):
    future = kernel.submit(tasks.square, 2)
    future.result(timeout=10)
    assert not future.cancel()


def test_a_future_argument_is_a_dependency(kernel):
    a = kernel.submit(tasks.square, 3)
    b = kernel.submit(tasks.add, a, 1)
    c = kernel.submit(tasks.add, a, b=b)
    assert c.result(timeout=10) == 19
    root = kernel.submit(tasks.boom, "dep")
    failed = kernel.submit(tasks.add, root, 1)
    further = kernel.submit(tasks.add, [1, {"x": failed}], 1)
    for f in (failed, further):
        with pytest.raises(astra.errors.UpstreamError, match="boom") as info:
            f.result(timeout=10)
        assert isinstance(info.value.root, ValueError)
        assert info.value.__cause__ is info.value.root
        assert info.value.root_task == f"task {root.task_id} (boom)"


@pytest.mark.slow
def test_ten_thousand_futures_in_flight(kernel):
    futures = [kernel.submit(tasks.add, i, i) for i in range(10_000)]
    assert kernel.gather(futures, timeout=60) == [2 * i for i in range(10_000)]
    assert kernel.statistics().pending == 0


def test_batched_submits_complete_with_nobody_waiting(kernel1):
    # Past LOW_WATER tasks in flight, submits wait in a batch; the thread taking replies
    # sends it. Only callbacks here (no result() call), so nothing else would send it.
    from astra._client import LOW_WATER

    blocker = kernel1.submit(tasks.sleep, 0.2)
    futures = [kernel1.submit(tasks.add, i, 1) for i in range(LOW_WATER + 10)]
    assert kernel1._links[0].unsent, "the tail of the burst should wait in a batch"
    done = threading.Event()
    left = [len(futures)]

    def on_done(_):
        left[0] -= 1
        if not left[0]:
            done.set()

    for f in futures:
        f.add_done_callback(on_done)
    assert done.wait(10)
    assert [f.result() for f in futures] == [i + 1 for i in range(LOW_WATER + 10)]
    blocker.result(timeout=10)


def test_cancelling_a_batched_task_means_it_never_runs(kernel1, tmp_path):
    from astra._client import LOW_WATER

    blocker = kernel1.submit(tasks.sleep, 0.2)
    filler = [kernel1.submit(tasks.noop) for _ in range(LOW_WATER)]
    marker = tmp_path / "ran"
    batched = kernel1.submit(tasks.touch, str(marker))
    assert batched.cancel()
    after = kernel1.submit(tasks.noop)
    after.result(timeout=10)  # sends the batch; runs after the cancelled task's place
    assert not marker.exists()
    kernel1.gather([blocker, *filler], timeout=10)
    assert kernel1.statistics().pending == 0


@pytest.mark.slow
def test_a_prioritised_task_is_not_held_in_a_batch(kernel1):
    from astra._client import LOW_WATER

    blocker = kernel1.submit(tasks.sleep, 0.3)
    low = [kernel1.submit(tasks.sequence) for _ in range(LOW_WATER + 5)]
    high = kernel1.submit(tasks.sequence, priority=5)
    assert not kernel1._links[0].unsent  # the priority task took the batch with it
    blocker.result(timeout=10)
    assert high.result(timeout=10) < min(kernel1.gather(low, timeout=10))


@pytest.mark.slow
def test_large_numpy_result_comes_back_as_a_zero_copy_view(kernel):
    arena = kernel._arena
    arr = kernel.submit(tasks.ones, 1 << 18).result(timeout=10)  # 2 MiB
    assert arr.shape == (1 << 18,)
    assert arr.sum() == 1 << 18
    assert not arr.flags.writeable
    assert not arr.flags.owndata
    part = arr[10:20]
    del arr
    gc.collect()
    assert arena.statistics().blocks_used == 1  # the slice keeps the block held
    del part
    gc.collect()
    assert arena.statistics().blocks_used == 0


def test_workers_are_named_and_pinned(kernel):
    allowed = sorted(os.sched_getaffinity(0))
    for i, pid in enumerate(kernel.worker_pids()):
        assert os.sched_getaffinity(pid) == {allowed[i % len(allowed)]}  # pinned at fork
        wait_until(lambda pid=pid, i=i: _comm(pid) == f"astra-w{i:02d}")  # names itself
    assert _comm(kernel.supervisor_pid) == "astra-sup"


def _comm(pid):
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_submit_after_close_raises():
    k = astra.Kernel(workers=1)
    k.close()
    k.close()  # twice is fine
    with pytest.raises(astra.KernelNotRunningError):
        k.submit(tasks.noop)


def test_leaving_the_with_block_drains_queued_tasks():
    with astra.Kernel(workers=1) as k:
        futures = [k.submit(tasks.square, i) for i in range(200)]
    assert [f.result(timeout=0) for f in futures] == [i * i for i in range(200)]


@pytest.mark.slow
def test_process_exit_without_close_stops_and_cleans_up():
    code = "import astra\nk = astra.Kernel(workers=2)\nprint(k.submit(abs, -3).result(10))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "3"
    assert cleanup_stale(os.environ["ASTRA_SHM_LABEL"]) == []  # nothing stale was left


@pytest.mark.slow
def test_oversized_arguments_raise_serialization_error(kernel):
    with pytest.raises(astra.SerializationError, match="over"):
        kernel.submit(tasks.square, b"x" * (49 << 20))
    assert kernel.submit(tasks.square, 3).result(timeout=10) == 9


def test_cancel_a_running_plain_task_cooperatively(kernel1, tmp_path):
    marker = tmp_path / "stopped"
    future = kernel1.submit(tasks.until_cancelled, str(marker))
    wait_until(lambda: kernel1._control.running(0)[1] == future.task_id)
    assert future.cancel()
    wait_until(marker.exists)
    assert kernel1.submit(tasks.square, 3).result(timeout=10) == 9
    assert not astra.cancelled()  # outside a task


def test_a_forked_child_cannot_use_its_parents_client(kernel, tmp_path):
    out = tmp_path / "out"

    def child():
        try:
            kernel.submit(tasks.noop)
        except astra.KernelNotRunningError as exc:
            out.write_text(str(exc))

    assert reap(fork_child(child)) == 0
    assert "connect again after fork" in out.read_text()
    assert kernel.submit(tasks.square, 2).result(timeout=10) == 4


@pytest.mark.slow
def test_close_from_a_done_callback():
    k = astra.Kernel(workers=1)
    closed = threading.Event()

    def on_done(_):
        k.close()
        closed.set()

    k.submit(tasks.square, 2).add_done_callback(on_done)
    assert closed.wait(10)
    k.close()
    with pytest.raises(astra.KernelNotRunningError):
        k.submit(tasks.noop)


@pytest.mark.slow
def test_an_embedding_process_killed_with_sigkill_leaves_nothing_running(tmp_path):
    code = (
        "import astra, sys, time\n"
        "k = astra.Kernel(workers=2)\n"
        "print(k.supervisor_pid, *k.worker_pids(), flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    # The supervisor dies with its parent (PR_SET_PDEATHSIG), the workers with it.
    wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), timeout_s=10)
    removed = cleanup_stale(os.environ["ASTRA_SHM_LABEL"])  # what the next start does
    assert any(f"astra-{proc.pid}" in entry for entry in removed)


@pytest.mark.slow
def test_synchronous_results_from_several_threads_at_once(kernel):
    """One thread at a time takes replies itself (Client._lead); the others wait on the
    Condition and the receiver thread serves them: every result arrives, to its caller."""
    errors = []

    def caller(base: int) -> None:
        try:
            for i in range(200):
                assert kernel.submit(tasks.square, base + i).result(timeout=30) == (base + i) ** 2
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
