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


def test_work_handed_over_earlier_runs_before_a_borrowers_work(shared: SharedLoop) -> None:
    """The borrower queues behind what is ready: a batch another thread handed over
    (call_soon_threadsafe) is not overtaken by one the borrower runs."""
    order: list[int] = []
    for trial in range(200):
        _wait_idle(shared)
        with shared.lock:  # the loop thread cannot take the first batch before we borrow
            shared.loop.call_soon_threadsafe(order.append, 2 * trial)
        with shared.borrow() as held:
            if held:
                shared.loop.call_soon(order.append, 2 * trial + 1)
                shared.run_ready()
        if not held:  # suspended (a slow borrow under load): hand it over, as agentd does
            shared.loop.call_soon_threadsafe(order.append, 2 * trial + 1)
        deadline = time.monotonic() + 5
        while len(order) < 2 * trial + 2 and time.monotonic() < deadline:
            time.sleep(0.0005)
    assert order == list(range(400))


def test_an_async_generator_started_by_the_borrower_is_finalized_by_the_loop(
    shared: SharedLoop,
) -> None:
    _wait_idle(shared)
    cleaned = threading.Event()

    async def numbers():  # type: ignore[no-untyped-def]
        try:
            for i in range(10):
                yield i
        finally:
            await asyncio.sleep(0)  # an await in cleanup needs aclose(), not a plain close
            cleaned.set()

    async def first_only() -> None:
        async for _ in numbers():
            break  # leaves the generator suspended: the loop's finalizer must aclose() it

    with shared.borrow() as held:
        assert held
        shared.loop.create_task(first_only())
        shared.run_ready()
    import gc

    gc.collect()
    assert cleaned.wait(5)


def test_a_loop_in_debug_mode_is_never_borrowed(shared: SharedLoop) -> None:
    _wait_idle(shared)
    shared.loop.set_debug(True)
    try:
        with shared.borrow() as held:
            assert not held
    finally:
        shared.loop.set_debug(False)


def test_a_slow_borrow_suspends_borrowing_for_a_while(
    shared: SharedLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kernel.sharedloop as mod

    monkeypatch.setattr(mod, "BORROW_BACKOFF_S", 0.3)
    _wait_idle(shared)
    with shared.borrow() as held:
        assert held
        time.sleep(mod.SLOW_BORROW_S * 2)  # a handler that blocks
    with shared.borrow() as held:
        assert not held  # the loop thread gets the work meanwhile
    time.sleep(0.35)
    _wait_idle(shared)
    with shared.borrow() as held:
        assert held
