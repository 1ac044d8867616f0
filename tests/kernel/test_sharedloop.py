"""kernel/sharedloop.py: the loop thread's loop, borrowed by another thread between iterations."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING

import pytest

from kernel.sharedloop import SharedLoop

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def shared() -> Iterator[SharedLoop]:
    s = SharedLoop(name="test-loop")
    try:
        yield s
    finally:
        s.stop()
        s.loop.close()


def _wait_idle(s: SharedLoop) -> None:
    """Until the loop thread sits in select (the lock is free)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if s.lock.acquire(blocking=False):
            s.lock.release()
            return
        time.sleep(0.001)
    raise AssertionError("the loop thread never went idle")


def test_a_borrowed_loop_runs_callbacks_on_the_borrowing_thread(shared: SharedLoop) -> None:
    _wait_idle(shared)
    ran_on: list[int] = []
    with shared.borrow() as held:
        assert held
        assert asyncio.get_running_loop() is shared.loop
        shared.loop.call_soon(lambda: ran_on.append(threading.get_ident()))
        shared.run_ready()
    assert ran_on == [threading.get_ident()]
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # unset again


def test_a_task_started_by_the_borrower_finishes_on_the_loop_thread(shared: SharedLoop) -> None:
    """The task's first step runs here; its timer (an earlier one than the loop thread was
    waiting for) wakes the loop thread, which runs the rest."""
    _wait_idle(shared)
    threads: list[str] = []
    done = threading.Event()

    async def job() -> None:
        threads.append(threading.current_thread().name)
        await asyncio.sleep(0.01)
        threads.append(threading.current_thread().name)
        done.set()

    with shared.borrow() as held:
        assert held
        shared.loop.create_task(job())
        shared.run_ready()
    assert done.wait(5), "the loop thread was not woken for the timer"
    assert threads == [threading.current_thread().name, "test-loop"]


def test_borrow_fails_at_once_while_the_loop_runs_a_callback(shared: SharedLoop) -> None:
    inside, release = threading.Event(), threading.Event()
    shared.loop.call_soon_threadsafe(lambda: (inside.set(), release.wait(5)))
    assert inside.wait(5)
    t0 = time.monotonic()
    with shared.borrow() as held:
        assert not held
    assert time.monotonic() - t0 < 0.5
    release.set()


def test_callbacks_left_over_by_the_borrower_run_on_the_loop_thread(shared: SharedLoop) -> None:
    _wait_idle(shared)
    ran = threading.Event()
    with shared.borrow() as held:
        assert held
        shared.loop.call_soon(ran.set)  # not run here: no run_ready
    assert ran.wait(5)


def test_threadsafe_calls_still_reach_the_loop_thread(shared: SharedLoop) -> None:
    fut = asyncio.run_coroutine_threadsafe(asyncio.sleep(0.001, result=7), shared.loop)
    assert fut.result(5) == 7
