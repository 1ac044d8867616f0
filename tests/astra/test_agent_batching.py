"""Agent messages batched by the client (astra/_agents.py, ``AGENT_LOW_WATER``): a held
message still goes out when nobody waits, a closing client sends what it holds, and
messages from many threads keep their ids in ring order."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

import astra
import astra._client
from astra._agents import AGENT_LOW_WATER
from tests.astra.agents import Counter, Slow
from tests.helpers import wait_until

pytestmark = pytest.mark.multiprocess


def _hold_back(client: astra.Client, slow: astra.AgentRef) -> list[astra.Future[object]]:
    """Leave AGENT_LOW_WATER asks unanswered, so that the client's next message is held."""
    return [slow.ask("block", 10) for _ in range(AGENT_LOW_WATER)]


def test_a_held_message_goes_out_while_nobody_waits_for_it(kernel, monkeypatch):
    # No periodic backstop: only the receiver thread's short wait may send the batch.
    monkeypatch.setattr(astra._client, "RECV_SLICE_S", 60.0)
    slow = kernel.spawn(Slow, worker=0)
    counter = kernel.spawn(Counter, 0, worker=0)
    blocked = _hold_back(kernel, slow)
    future = counter.ask("add", 7)
    # concurrent.futures.wait does not call result(), so nothing flushes on its behalf.
    done, _ = concurrent.futures.wait([future], timeout=10)
    assert future in done
    assert future.result() == 7
    assert not any(f.done() for f in blocked)


def test_a_closing_client_sends_the_tells_it_holds(astrad, monkeypatch):
    monkeypatch.setattr(astra._client, "RECV_SLICE_S", 60.0)
    monkeypatch.setattr(astra._client, "AGENT_HOLD_S", 60.0)  # held until close()
    with astrad.connect() as a:
        slow = a.spawn(Slow, worker=0)
        tally = a.spawn(Counter, 0, name="tally", worker=0)
        _hold_back(a, slow)
        for k in (1, 2, 3, 4, 5):
            tally.tell("add", k)
        assert a._links[0].agent_unsent  # held, not in the ring yet
    with astrad.connect() as b:
        assert b.agent("tally").ask("history").result(timeout=10) == [1, 2, 3, 4, 5]


def test_messages_from_many_threads_reach_a_persisted_agent_once_each(kernel):
    # A persisted agent drops a message whose id is not above the last one it handled from
    # that sender as a duplicate: ids must reach the ring in order though threads race.
    counter = kernel.spawn(Counter, 0, persist=True)
    slow = kernel.spawn(Slow)
    blocked = _hold_back(kernel, slow)  # batching on from the start
    errors: list[BaseException] = []

    def send() -> None:
        try:
            asks = []
            for i in range(60):
                if i % 6 == 0:
                    asks.append(counter.ask("add", 1))
                else:
                    counter.tell("add", 1)
            for f in asks:
                f.result(timeout=60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    wait_until(lambda: counter.ask("value").result(timeout=60) == 240, timeout_s=30)
    assert len(counter.ask("history").result(timeout=10)) == 240
    assert not any(f.done() for f in blocked)
