"""The receiver thread parks while a thread waits synchronously (astra/_client.py,
``Client._park_for_lead``), and is woken whenever an answer must come in without that
thread: a future watched by a callback, ``await``, ``concurrent.futures.wait`` or ``done()``,
a synchronous wait that stops spinning, asks that pile up unwatched.

Each test stretches the linger (how long the receiver stays parked after a synchronous call)
and the receiver's periodic look to a minute, so only the wake-up under test can bring the
answer in time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

import astra
import astra._client
from astra._agents import AGENT_LOW_WATER
from tests.astra.agents import Counter, Slow
from tests.helpers import wait_until

pytestmark = pytest.mark.multiprocess


@pytest.fixture
def parked(kernel, monkeypatch):
    """A kernel whose receiver thread has just parked after a synchronous ask."""
    monkeypatch.setattr(astra._client, "LEAD_LINGER_S", 60.0)
    monkeypatch.setattr(astra._client, "RECV_SLICE_S", 60.0)  # nor a periodic look
    counter = kernel.spawn(Counter, 0)
    assert counter.ask("add", 1).result(timeout=10) == 1  # a lead: the receiver parks
    wait_until(lambda: kernel._rx_lead_parked, timeout_s=10)
    return kernel, counter


def test_a_callback_wakes_the_parked_receiver(parked):
    _, counter = parked
    got = threading.Event()
    counter.ask("add", 2).add_done_callback(lambda f: got.set())
    assert got.wait(10)


def test_concurrent_futures_wait_wakes_it(parked):
    _, counter = parked
    future = counter.ask("add", 2)
    done, _ = concurrent.futures.wait([future], timeout=10)
    assert future in done


def test_await_wakes_it(parked):
    _, counter = parked

    async def main() -> object:
        return await asyncio.wait_for(asyncio.wrap_future(counter.ask("add", 2)), 10)

    assert asyncio.run(main()) == 3


def test_polling_done_wakes_it(parked):
    _, counter = parked
    future = counter.ask("add", 2)
    deadline = time.monotonic() + 10
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert future.done()


def test_a_synchronous_wait_that_stops_spinning_hands_over(parked):
    kernel, _ = parked
    slow = kernel.spawn(Slow)  # (a synchronous spawn: the receiver parks again)
    wait_until(lambda: kernel._rx_lead_parked, timeout_s=10)
    # 0.3 s is far past any spin: the waiting thread gives up, the receiver must take it.
    assert slow.ask("block", 0.3).result(timeout=10) == 0.3


def test_unwatched_asks_that_pile_up_wake_it(parked):
    kernel, counter = parked
    futures = [counter.ask("add", 1) for _ in range(AGENT_LOW_WATER + 1)]
    # Nobody calls result(), done() or a callback: _state is read directly.
    wait_until(lambda: all(f._state == "FINISHED" for f in futures), timeout_s=10)
    assert not kernel._agents._calls


def test_unwatched_tasks_that_pile_up_wake_it(parked):
    kernel, _ = parked
    futures = [kernel.submit(abs, -i) for i in range(astra._client.LOW_WATER + 1)]
    wait_until(lambda: all(f._state == "FINISHED" for f in futures), timeout_s=10)
    assert [f.result() for f in futures] == list(range(astra._client.LOW_WATER + 1))
