"""Agents through a kernel: spawn, ask/tell, names, pub/sub, backpressure, supervision,
persistence, worker deaths (astra/_agents.py, kernel/agentd.py, kernel/actors.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest

import astra
from astra.errors import (
    AgentCrashedError,
    AgentError,
    AgentNotFoundError,
    MailboxFullError,
    UnknownMethodError,
)
from tests.astra.agents import Boom, Counter, Keeper, Listener, Relay, Sleeper, Slow
from tests.helpers import wait_until

pytestmark = pytest.mark.multiprocess


def test_ask_and_tell_keep_the_order_of_one_sender(kernel):
    c = kernel.spawn(Counter, 0)
    for k in range(1, 101):
        c.tell("add", k)
    assert c.ask("history").result(timeout=10) == list(range(1, 101))
    assert c.ask("add", 1).result(timeout=10) == sum(range(1, 101)) + 1


@pytest.mark.slow
def test_async_handlers_overlap_their_waits(kernel):
    sleepers = [kernel.spawn(Sleeper) for _ in range(100)]
    t0 = time.monotonic()
    futures = [s.ask("nap", 0.5) for s in sleepers]
    assert [f.result(timeout=30) for f in futures] == [0.5] * 100
    assert time.monotonic() - t0 < 4.5  # serially: 50 s; the issue asks for well under 5 s


def test_an_agent_asks_another_on_a_different_worker(kernel):
    kernel.spawn(Counter, 100, name="target", worker=0)
    relay = kernel.spawn(Relay, "target", worker=1)
    assert relay.ask("via", 5).result(timeout=10) == 105
    assert kernel.agent("target").ask("value").result(timeout=10) == 105


def test_publish_reaches_each_matching_subscriber_once(kernel):
    listeners = [kernel.spawn(Listener, worker=i % 2) for i in range(4)]
    kernel.publish("papers.new", {"id": 1})
    kernel.publish("papers.new.extra", {"id": 2})  # "papers.*" is one segment only
    kernel.publish("other.new", {"id": 3})
    for listener in listeners:
        wait_until(lambda ref=listener: ref.ask("received").result(timeout=10), timeout_s=10)
        assert listener.ask("received").result(timeout=10) == [("papers.new", {"id": 1})]


def test_names_are_unique_and_freed_at_stop(kernel):
    first = kernel.spawn(Counter, 1, name="r1")
    with pytest.raises(AgentError, match="already runs"):
        kernel.spawn(Counter, 2, name="r1")
    assert kernel.agent("r1") == first
    first.stop()
    with pytest.raises(AgentNotFoundError):
        kernel.agent("r1")
    again = kernel.spawn(Counter, 3, name="r1")
    assert again.ask("value").result(timeout=10) == 3


def test_unknown_agents_and_methods_get_typed_errors(kernel):
    with pytest.raises(AgentNotFoundError):
        kernel.agent("nobody")
    ref = kernel.spawn(Counter)
    with pytest.raises(UnknownMethodError):
        ref.ask("no_such_handler").result(timeout=10)
    ref.stop()
    with pytest.raises(AgentNotFoundError):
        ref.ask("value").result(timeout=10)
    with pytest.raises(AgentNotFoundError):
        ref.tell("add", 1)
    with pytest.raises(TypeError):
        kernel.spawn(object)


@pytest.mark.slow
def test_messages_held_back_by_a_full_mailbox_keep_their_order(kernel):
    """Far more asks and tells in flight than the mailbox holds: every one is handled, in
    the order sent (they wait in the worker, first come first served)."""
    c = kernel.spawn(Counter, mailbox=4)
    futures = []
    for i in range(1, 301):
        if i % 3:
            futures.append(c.ask("add", 1))
        else:
            c.tell("add", 1)
    values = [f.result(timeout=30) for f in futures]
    assert values == sorted(values)
    assert len(set(values)) == len(values)
    assert c.ask("value").result(timeout=30) == 300
    assert c.ask("history").result(timeout=30) == [1] * 300


def test_a_full_mailbox_is_backpressure_then_mailbox_full_error(kernel):
    slow = kernel.spawn(Slow, mailbox=2)
    busy = slow.ask("block", 0.6)
    queued = [slow.ask("block", 0.0) for _ in range(2)]  # fills the mailbox
    with pytest.raises(MailboxFullError):
        slow.ask("block", 0.0, timeout=0.1).result(timeout=10)
    waited = slow.ask("block", 0.0, timeout=5.0)  # waits for room instead
    assert busy.result(timeout=10) == 0.6
    assert [f.result(timeout=10) for f in queued] == [0.0, 0.0]
    assert waited.result(timeout=10) == 0.0


@pytest.mark.parametrize(
    ("policy", "restarted"), [("on-failure", True), ("permanent", True), ("temporary", False)]
)
def test_a_handler_exception_fails_the_ask_and_the_policy_decides(kernel, policy, restarted):
    ref = kernel.spawn(Boom, restart=policy)
    assert ref.ask("hit").result(timeout=10) == 1
    with pytest.raises(RuntimeError, match="boom"):
        ref.ask("explode").result(timeout=10)
    if restarted:
        assert ref.ask("hit").result(timeout=10) == 1  # a fresh instance
    else:
        wait_until(lambda: _gone(kernel, ref.name), timeout_s=10)
        with pytest.raises(AgentNotFoundError):
            ref.ask("hit").result(timeout=10)


def _gone(kernel, name):
    try:
        kernel.agent(name)
    except AgentNotFoundError:
        return True
    return False


def test_a_persisted_agent_restarts_from_its_last_checkpoint(kernel):
    ref = kernel.spawn(Counter, 10, persist=True)
    assert ref.ask("add", 5).result(timeout=10) == 15
    with pytest.raises(ValueError, match="on purpose"):
        ref.ask("fail", "on purpose").result(timeout=10)
    assert ref.ask("value").result(timeout=10) == 15  # restored, not __init__'s 10
    plain = kernel.spawn(Counter, 10)
    plain.ask("add", 5).result(timeout=10)
    with pytest.raises(ValueError, match="again"):
        plain.ask("fail", "again").result(timeout=10)
    assert plain.ask("value").result(timeout=10) == 10  # no persistence: a fresh start


def test_kill_drops_the_agent_and_frees_its_name(kernel):
    kernel.spawn(Counter, name="doomed")
    kernel.kill("doomed")
    with pytest.raises(AgentNotFoundError):
        kernel.agent("doomed")
    with pytest.raises(AgentNotFoundError):
        kernel.kill("doomed")


@pytest.mark.slow
def test_a_worker_killed_fails_its_pending_asks_and_its_agents_restart_elsewhere(kernel):
    slow = kernel.spawn(Slow, name="victim", worker=1)
    gone = kernel.spawn(Slow, name="temp", worker=1, restart="temporary")
    other = kernel.spawn(Counter, name="survivor", worker=0)
    pending = slow.ask("block", 5.0)
    time.sleep(0.1)
    os.kill(kernel._control.worker(1).pid, signal.SIGKILL)
    with pytest.raises(AgentCrashedError):
        pending.result(timeout=10)
    registry = kernel._agents.registry
    wait_until(lambda: registry.lookup("victim") == 0, timeout_s=10)
    assert slow.ask("block", 0.0).result(timeout=10) == 0.0  # restarted on w00
    wait_until(lambda: _gone(kernel, gone.name), timeout_s=10)  # temporary: not restarted
    assert other.ask("add", 1).result(timeout=10) == 1


@pytest.mark.slow
def test_a_worker_killed_with_100_persisted_agents_they_resume_elsewhere(kernel):
    refs = [kernel.spawn(Counter, i, persist=True, worker=1) for i in range(100)]
    assert [r.ask("add", 1000).result(timeout=10) for r in refs] == [i + 1000 for i in range(100)]
    os.kill(kernel._control.worker(1).pid, signal.SIGKILL)
    registry = kernel._agents.registry
    wait_until(lambda: all(registry.lookup(r.name) == 0 for r in refs), timeout_s=10)
    # Each replied after its checkpoint was written: nothing acknowledged is lost.
    assert [r.ask("value").result(timeout=10) for r in refs] == [i + 1000 for i in range(100)]
    assert refs[0].ask("pid").result(timeout=10) == kernel._control.worker(0).pid


def test_spawn_many_is_all_or_nothing(kernel):
    refs = kernel.spawn_many(Counter, [(i,) for i in range(50)], names=[f"m{i}" for i in range(50)])
    assert [r.ask("value").result(timeout=10) for r in refs] == list(range(50))
    with pytest.raises(AgentError, match="already runs"):
        kernel.spawn_many(Counter, [(1,), (2,), (3,)], names=["fresh1", "m7", "fresh2"])
    with pytest.raises(TypeError):  # __init__ fails in the worker for one of them
        kernel.spawn_many(Counter, [(1,), (1, 2, 3)], names=["ok1", "bad"])
    names = {a["name"] for a in kernel.agents()}
    assert names == {f"m{i}" for i in range(50)}  # nothing of the failed batches is left


@pytest.mark.slow
def test_ten_thousand_agents_each_asked_once(kernel):
    refs = kernel.spawn_many(Counter, [(i,) for i in range(10_000)])
    futures = [r.ask("value") for r in refs]
    assert [f.result(timeout=60) for f in futures] == list(range(10_000))
    assert isinstance(refs[0], astra.AgentRef)


def test_large_numpy_arguments_ride_the_arena_and_live_as_long_as_the_agent_keeps_them(kernel):
    import gc

    import numpy as np

    keeper = kernel.spawn(Keeper)
    arr = np.ones(1 << 18)  # 2 MiB
    assert keeper.ask("keep", arr).result(timeout=10) == (float(1 << 18), False)  # a view
    del arr
    gc.collect()
    blocks = kernel._arena.statistics
    assert blocks().blocks_used == 1  # the agent still holds it
    assert keeper.ask("total").result(timeout=10) == float(1 << 18)
    keeper.ask("drop").result(timeout=10)
    wait_until(lambda: blocks().blocks_used == 0, timeout_s=10)
