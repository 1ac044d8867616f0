"""Agent messages batched by the client (astra/_agents.py, ``AGENT_LOW_WATER``): a held
message still goes out when nobody waits, a closing client sends what it holds, and
messages from many threads keep their ids in ring order."""

from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
import pytest

import astra
import astra._agents
import astra._client
from astra._agents import AGENT_LOW_WATER
from astra.errors import SerializationError
from ipc import RingWriter
from tests.astra.agents import Big, Counter, Slow
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


def test_answers_too_large_together_for_one_frame_all_arrive(kernel):
    # 70 answers of 1 MiB, held for one client, are more than a 64 MiB ring frame: the
    # worker sends them in several frames (kernel.encode_queue), not one that fails.
    big = kernel.spawn(Big, worker=0)
    futures = [big.ask("blob", 1 << 20) for _ in range(70)]
    assert all(len(f.result(timeout=60)) == 1 << 20 for f in futures)


def test_a_bad_message_fails_its_caller_at_once_and_sinks_no_batch(kernel):
    slow = kernel.spawn(Slow, worker=0)
    counter = kernel.spawn(Counter, 0, worker=1)
    _hold_back(kernel, slow)
    first = counter.ask("add", 1)  # held
    with pytest.raises(TypeError, match="method name"):
        counter.ask(7, 1)
    with pytest.raises(ValueError, match="soon"):
        counter.ask("add", 1, timeout="soon")
    numpy_timeout = counter.ask("add", 10, timeout=np.int64(5))  # a number: fine
    assert first.result(timeout=10) == 1
    assert numpy_timeout.result(timeout=10) == 11
    assert kernel._receiver.is_alive()


def test_arguments_too_large_fail_alone(kernel, monkeypatch):
    for link in kernel._links:  # (what MAX_ARGS_BYTES, or the ring's frame limit, allows)
        monkeypatch.setattr(link, "max_args", 1 << 20)
    slow = kernel.spawn(Slow, worker=0)
    counter = kernel.spawn(Counter, 0, worker=1)
    _hold_back(kernel, slow)
    held = [counter.ask("add", k) for k in (1, 2, 3)]
    with pytest.raises(SerializationError, match="arguments pickle to"):
        counter.ask("add", b"x" * (2 << 20))
    assert [f.result(timeout=10) for f in held] == [1, 3, 6]


def test_a_tell_held_while_the_receiver_is_parked_still_goes(kernel, monkeypatch):
    monkeypatch.setattr(astra._client, "LEAD_LINGER_S", 60.0)
    monkeypatch.setattr(astra._client, "RECV_SLICE_S", 60.0)
    counter = kernel.spawn(Counter, 0, worker=0)
    assert counter.ask("add", 1).result(timeout=10) == 1  # the receiver parks
    wait_until(lambda: kernel._rx_lead_parked, timeout_s=10)
    monkeypatch.setattr(RingWriter, "unread", lambda self: 1)  # "the worker is behind"
    counter.tell("add", 2)  # held; nobody waits: only the receiver thread may send it
    wait_until(lambda: not kernel._links[0].agent_unsent, timeout_s=10)
    monkeypatch.undo()
    assert counter.ask("history").result(timeout=10) == [1, 2]


def test_a_cancelled_ask_is_forgotten(kernel):
    slow = kernel.spawn(Slow)
    future = slow.ask("block", 5)
    assert future.cancel()
    assert -future.task_id not in kernel._agents._calls


def test_an_answer_over_the_reply_limit_fails_alone(monkeypatch):
    import kernel.agentd

    monkeypatch.setattr(kernel.agentd, "MAX_REPLY_BYTES", 1 << 20)  # before the fork
    with astra.Kernel(workers=1) as k:
        big = k.spawn(Big)
        small, huge, after = (big.ask("blob", n) for n in (10, 2 << 20, 20))
        with pytest.raises(SerializationError, match="over the 1048576 B a reply may carry"):
            huge.result(timeout=10)
        assert (len(small.result(timeout=10)), len(after.result(timeout=10))) == (10, 20)
