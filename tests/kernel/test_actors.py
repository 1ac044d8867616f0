"""The in-worker agent runtime (kernel/actors.py): mailboxes, handling, supervision and
checkpoints, in one process on one asyncio loop."""

from __future__ import annotations

import asyncio
import functools
import gc
import threading
import time
import traceback
import tracemalloc
from typing import ClassVar

import pytest

from kernel.actors import (
    Agent,
    AgentCrashedError,
    AgentError,
    AgentHost,
    AgentNotFoundError,
    AgentState,
    DuplicateMessageError,
    ExitReason,
    JournalCheckpointer,
    Mailbox,
    MailboxFullError,
    Message,
    ReplyTo,
    UnknownMethodError,
    decode_checkpoint,
)
from kernel.journal import Journal
from kernel.topics import TopicError

# ---- Fakes and helpers ----


class FakeOutbox:
    """Records what the host sends out; spawns locally; knows no other host."""

    def __init__(self):
        self.host: AgentHost | None = None
        self.replies: list[tuple[ReplyTo, bool, object]] = []
        self.published: list[tuple[str, str, object]] = []
        self.exits: list[tuple[str, ExitReason, BaseException | None]] = []
        self.spawned = 0

    def reply(self, to, ok, payload):
        self.replies.append((to, ok, payload))

    def deliver(self, target, msg):
        raise AgentNotFoundError(f"no agent {target!r} anywhere")

    def publish(self, sender, topic, payload):
        self.published.append((sender, topic, payload))

    def spawn(self, parent, spec):
        self.spawned += 1
        agent_id = f"{parent}/{self.spawned}"
        self.host.spawn(
            agent_id,
            spec.cls,
            spec.args,
            spec.kwargs,
            name=spec.name,
            restart=spec.restart,
            persist=spec.persist,
        )
        return agent_id

    def agent_exited(self, agent_id, reason, error):
        self.exits.append((agent_id, reason, error))


class RecordingCheckpointer:
    def __init__(self):
        self.writes: list[tuple[str, bytes]] = []

    def checkpoint(self, agent_id, data):
        self.writes.append((agent_id, data))


def in_loop(fn):
    """Run an ``async def`` test in a fresh event loop."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def make_host(**kwargs) -> tuple[AgentHost, FakeOutbox]:
    outbox = FakeOutbox()
    host = AgentHost(outbox, origin=1, **kwargs)
    outbox.host = host
    return host, outbox


async def until(predicate, turns=10_000) -> None:
    """Let the loop run (no sleeping: one turn at a time) until ``predicate()`` holds."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not reached in {turns} loop turns: {predicate}")


async def settle(host: AgentHost) -> None:
    """Let every agent run until its mailbox is empty and no handler is running."""
    await until(lambda: all(row.state is AgentState.IDLE for row in host.stats()))


async def entered(host: AgentHost, agent_id: str, key: str) -> None:
    """Wait until Gate agent ``agent_id`` is inside ``wait(key)`` (its mailbox emptied)."""

    def inside():
        instance = host._agents[agent_id].instance
        return instance is not None and key in instance.seen

    await until(inside)


def waiters(host: AgentHost, agent_id: str) -> int:
    return len(host._agents[agent_id].mailbox._waiters or ())


class Counter(Agent):
    def __init__(self, start=0):
        self.total = start
        self.log = []

    def add(self, n, *, who=""):
        self.total += n
        self.log.append((who, n))
        return self.total

    def get(self):
        return self.total

    def history(self):
        return self.log

    def boom(self, text="boom"):
        raise ValueError(text)

    def add_then_fail(self, n):
        self.total += n
        raise RuntimeError("after adding")

    def leave(self):
        self.exit()

    def _secret(self):
        return "private"


class Napper(Agent):
    def __init__(self):
        self.events = []

    async def nap(self, seconds, tag=""):
        self.events.append(("enter", tag))
        await asyncio.sleep(seconds)
        self.events.append(("exit", tag))
        return tag

    def trace(self):
        return self.events


class Gate(Agent):
    """Handlers wait on events the test controls (through a module-level registry)."""

    gates: ClassVar[dict[str, asyncio.Event]] = {}

    def __init__(self):
        self.seen = []

    async def wait(self, key):
        self.seen.append(key)
        await Gate.gates[key].wait()
        return key

    def note(self, x):
        self.seen.append(x)
        return len(self.seen)

    def notes(self):
        return self.seen


# ---- Asks, tells, order ----


@in_loop
async def test_ask_returns_the_result_and_tell_is_one_way():
    host, _ = make_host()
    host.spawn("c", Counter, (10,))
    assert await host.ask("c", "add", (5,)) == 15
    host.tell("c", "add", (1,))
    assert await host.ask("c", "get") == 16
    assert await host.ask("c", "add", (), {"n": 4, "who": "kw"}) == 20
    await host.aclose()


@in_loop
async def test_messages_are_handled_in_the_order_each_sender_posted_them():
    host, _ = make_host()
    host.spawn("c", Counter)
    for i in range(50):
        for sender in ("a", "b", "c"):
            host.tell("c", "add", (i,), {"who": sender}, sender=sender)
    log = await host.ask("c", "history")
    for sender in ("a", "b", "c"):
        assert [n for who, n in log if who == sender] == list(range(50))
    assert len(log) == 150
    await host.aclose()


@in_loop
async def test_an_agent_handles_one_message_at_a_time():
    host, _ = make_host()
    host.spawn("n", Napper)
    results = await asyncio.gather(*(host.ask("n", "nap", (0.01, t)) for t in "abc"))
    assert results == ["a", "b", "c"]
    trace = await host.ask("n", "trace")
    assert trace == [(e, t) for t in "abc" for e in ("enter", "exit")]
    await host.aclose()


@pytest.mark.slow
@in_loop
async def test_async_handlers_of_many_agents_overlap():
    host, _ = make_host()
    for i in range(100):
        host.spawn(f"n{i}", Napper)
    start = time.monotonic()
    results = await asyncio.gather(*(host.ask(f"n{i}", "nap", (0.5, i)) for i in range(100)))
    elapsed = time.monotonic() - start
    assert results == list(range(100))
    print(f"100 agents x sleep(0.5): {elapsed:.2f} s")
    assert elapsed < 3.0  # one after another would take 50 s
    await host.aclose()


@in_loop
async def test_names_resolve_and_ids_are_unique():
    host, _ = make_host()
    host.spawn("a1", Counter, name="alice")
    assert host.lookup("alice") == "a1"
    assert "alice" in host
    assert "a1" in host
    assert await host.ask("alice", "add", (2,)) == 2
    with pytest.raises(AgentError, match="already runs"):
        host.spawn("a1", Counter)
    with pytest.raises(AgentError, match="named 'alice'"):
        host.spawn("a2", Counter, name="alice")
    with pytest.raises(AgentError, match="already runs"):
        host.spawn("alice", Counter)
    with pytest.raises(TypeError, match="subclass"):
        host.spawn("x", object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sometimes"):
        host.spawn("y", Counter, restart="sometimes")
    await host.aclose()


@in_loop
async def test_init_errors_reach_the_spawner_and_leave_nothing():
    class Broken(Agent):
        def __init__(self):
            raise OSError("no")

    host, outbox = make_host()
    with pytest.raises(OSError, match="no"):
        host.spawn("b", Broken)
    assert "b" not in host
    assert outbox.exits == []
    await host.aclose()


# ---- Failures that are the caller's ----


@in_loop
async def test_unknown_methods_fail_the_ask_and_leave_the_agent_alone():
    host, _ = make_host()
    host.spawn("c", Counter)
    for method in ("nope", "_secret", "__init__", "tell", "on_start", "id", "total"):
        with pytest.raises(UnknownMethodError, match=repr(method)):
            await host.ask("c", method)
    host.tell("c", "nope")  # a tell is refused (logged) too
    assert await host.ask("c", "add", (1,)) == 1
    assert host.stats()[0].restarts == 0
    await host.aclose()


@in_loop
async def test_arguments_that_do_not_bind_fail_the_ask_only():
    host, _ = make_host()
    host.spawn("c", Counter)
    await host.ask("c", "add", (1,))
    with pytest.raises(TypeError):
        await host.ask("c", "add", (1, 2, 3))
    with pytest.raises(TypeError):
        await host.ask("c", "add", (), {"bogus": 1})
    assert await host.ask("c", "get") == 1  # same instance: not restarted
    assert host.stats()[0].restarts == 0
    await host.aclose()


@in_loop
async def test_asks_to_unknown_agents_fail():
    host, _ = make_host()
    with pytest.raises(AgentNotFoundError, match="anywhere"):
        await host.ask("ghost", "get")
    with pytest.raises(AgentNotFoundError):
        host.tell("ghost", "get")
    with pytest.raises(AgentNotFoundError):
        host.post("ghost", Message("s", "get"))
    await host.aclose()


# ---- Crashes and restarts ----


@in_loop
async def test_a_crash_fails_its_ask_with_the_exception_and_its_traceback():
    host, outbox = make_host()
    host.spawn("c", Counter)
    await host.ask("c", "add", (7,))
    with pytest.raises(ValueError, match="kaput") as info:
        await host.ask("c", "boom", ("kaput",))
    text = "".join(traceback.format_exception(info.value))
    assert "in boom" in text
    assert await host.ask("c", "get") == 0  # restarted: a fresh instance
    assert host.stats()[0].restarts == 1
    assert outbox.exits == []
    await host.aclose()


@in_loop
async def test_remote_asks_get_their_answer_through_the_outbox():
    host, outbox = make_host()
    host.spawn("c", Counter)
    host.post("c", Message("client", "add", (3,), reply_to=ReplyTo(origin=7, call_id=1)))
    host.post("c", Message("client", "boom", reply_to=ReplyTo(origin=7, call_id=2)))
    await settle(host)
    (to1, ok1, value1), (to2, ok2, value2) = outbox.replies
    assert (to1, ok1, value1) == (ReplyTo(7, 1), True, 3)
    assert (to2, ok2) == (ReplyTo(7, 2), False)
    assert isinstance(value2, ValueError)
    assert value2.__traceback__ is not None  # for the worker's pack_exception
    await host.aclose()


@in_loop
async def test_the_mailbox_survives_a_restart():
    host, _ = make_host()
    host.spawn("c", Counter)
    futures = [host.ask("c", "add", (1,)), host.ask("c", "boom"), host.ask("c", "add", (2,))]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] == 1
    assert isinstance(results[1], ValueError)
    assert results[2] == 2  # handled by the new instance, in order
    await host.aclose()


@pytest.mark.parametrize(
    ("policy", "restarted"), [("permanent", True), ("on-failure", True), ("temporary", False)]
)
@in_loop
async def test_restart_policies_after_a_crash(policy, restarted):
    host, outbox = make_host()
    host.spawn("c", Counter, restart=policy)
    crash = host.ask("c", "boom")
    queued = host.ask("c", "get")
    with pytest.raises(ValueError, match="boom"):
        await crash
    if restarted:
        assert await queued == 0
        assert host.stats()[0].restarts == 1
        assert outbox.exits == []
    else:
        with pytest.raises(AgentCrashedError, match="crashed"):
            await queued
        with pytest.raises(AgentNotFoundError):
            await host.ask("c", "get")
        [(agent_id, reason, error)] = outbox.exits
        assert (agent_id, reason) == ("c", ExitReason.CRASHED)
        assert isinstance(error, ValueError)
    await host.aclose()


@pytest.mark.parametrize(
    ("policy", "restarted"), [("permanent", True), ("on-failure", False), ("temporary", False)]
)
@in_loop
async def test_restart_policies_after_a_normal_exit(policy, restarted):
    host, outbox = make_host()
    host.spawn("c", Counter, (5,), restart=policy)
    assert await host.ask("c", "leave") is None
    if restarted:
        assert await host.ask("c", "get") == 5
        assert host.stats()[0].restarts == 1
    else:
        with pytest.raises(AgentNotFoundError):
            await host.ask("c", "get")
        assert outbox.exits == [("c", ExitReason.EXITED, None)]
    await host.aclose()


@in_loop
async def test_restart_intensity_stops_the_agent_for_good():
    host, outbox = make_host(max_restarts=2, within_s=60.0)
    host.spawn("c", Counter, restart="permanent")
    for _ in range(2):
        with pytest.raises(ValueError, match="boom"):
            await host.ask("c", "boom")
    assert host.stats()[0].restarts == 2
    last = host.ask("c", "boom")
    queued = host.ask("c", "get")
    with pytest.raises(ValueError, match="boom"):
        await last
    with pytest.raises(AgentCrashedError, match="restart-limit"):
        await queued
    assert "c" not in host
    [(agent_id, reason, error)] = outbox.exits
    assert (agent_id, reason) == ("c", ExitReason.RESTART_LIMIT)
    assert isinstance(error, ValueError)
    await host.aclose()


@in_loop
async def test_restarts_outside_the_window_do_not_count():
    host, outbox = make_host(max_restarts=1, within_s=0.0)
    host.spawn("c", Counter)
    for _ in range(5):  # each restart is alone in its (empty) window
        with pytest.raises(ValueError, match="boom"):
            await host.ask("c", "boom")
    assert host.stats()[0].restarts == 5
    assert outbox.exits == []
    await host.aclose()


@in_loop
async def test_on_start_runs_first_and_a_failing_on_start_is_a_crash():
    class Starter(Agent):
        starts = 0

        def __init__(self, fail_first):
            self.fail_first = fail_first
            self.ready = False

        async def on_start(self):
            await asyncio.sleep(0)
            Starter.starts += 1
            if self.fail_first and Starter.starts == 1:
                raise RuntimeError("bad start")
            self.ready = True

        def is_ready(self):
            return self.ready

    host, _ = make_host()
    host.spawn("s", Starter, (False,))
    assert await host.ask("s", "is_ready") is True
    Starter.starts = 0
    host.spawn("t", Starter, (True,))
    assert await host.ask("t", "is_ready") is True
    assert host.stats()[1].restarts == 1
    await host.aclose()


@in_loop
async def test_a_crashing_async_handler_is_a_crash_too():
    class Flaky(Agent):
        async def fail(self):
            await asyncio.sleep(0)
            raise KeyError("late")

        def ping(self):
            return "pong"

    host, _ = make_host()
    host.spawn("f", Flaky)
    with pytest.raises(KeyError, match="late"):
        await host.ask("f", "fail")
    assert await host.ask("f", "ping") == "pong"
    assert host.stats()[0].restarts == 1
    await host.aclose()


# ---- Stop, kill, close ----


@in_loop
async def test_stop_drains_the_mailbox_runs_on_stop_and_never_restarts():
    stopped = []

    class Polite(Counter):
        async def on_stop(self):
            await asyncio.sleep(0)
            stopped.append(self.total)

    host, outbox = make_host()
    host.spawn("p", Polite, restart="permanent")
    pending = [host.ask("p", "add", (i,)) for i in range(1, 4)]
    done = host.stop("p")
    assert host.stop("p") is done  # idempotent while stopping
    with pytest.raises(AgentNotFoundError, match="stopping"):
        host.tell("p", "add", (100,))
    await done
    assert [f.result() for f in pending] == [1, 3, 6]
    assert stopped == [6]
    assert outbox.exits == [("p", ExitReason.STOPPED, None)]
    with pytest.raises(AgentNotFoundError):
        await host.ask("p", "get")
    with pytest.raises(AgentNotFoundError):
        host.stop("p")
    await host.aclose()


@in_loop
async def test_kill_fails_the_running_and_queued_asks():
    stopped = []

    class Doomed(Gate):
        def on_stop(self):
            stopped.append(True)

    Gate.gates["k"] = asyncio.Event()
    host, outbox = make_host()
    host.spawn("g", Doomed, restart="permanent")
    running = host.ask("g", "wait", ("k",))
    queued = host.ask("g", "note", (1,))
    await entered(host, "g", "k")
    assert host.stats()[0].state is AgentState.WAITING
    host.kill("g")
    for future in (running, queued):
        with pytest.raises(AgentCrashedError, match="killed"):
            await future
    assert stopped == []
    assert outbox.exits == [("g", ExitReason.KILLED, None)]
    assert "g" not in host
    with pytest.raises(AgentNotFoundError):
        host.kill("g")
    await host.aclose()


@in_loop
async def test_aclose_removes_everything_and_fails_waiting_asks():
    Gate.gates["close"] = asyncio.Event()
    host, outbox = make_host()
    host.spawn("g", Gate)
    host.spawn("c", Counter)
    waiting = host.ask("g", "wait", ("close",))
    await asyncio.sleep(0)  # one turn: the handler's task exists but has not started yet
    await host.aclose()
    with pytest.raises(AgentCrashedError, match="closed"):
        await waiting
    assert len(host) == 0
    assert {(a, r) for a, r, _ in outbox.exits} == {
        ("g", ExitReason.CLOSED),
        ("c", ExitReason.CLOSED),
    }
    with pytest.raises(AgentError, match="closed"):
        host.spawn("late", Counter)
    assert len(asyncio.all_tasks()) == 1  # only this test's own task is left


# ---- Backpressure ----


def test_mailbox_is_bounded():
    box = Mailbox(2)
    assert box.offer(Message("s", "a"))
    assert box.offer(Message("s", "b"))
    assert not box.offer(Message("s", "c"))
    assert len(box) == 2
    assert box.take().method == "a"
    assert box.offer(Message("s", "c"))
    assert [box.take().method for _ in range(2)] == ["b", "c"]
    assert box.take() is None
    assert box._items is None  # an empty mailbox holds no deque


@in_loop
async def test_a_full_mailbox_refuses_posts_and_put_waits_in_order():
    Gate.gates["full"] = asyncio.Event()
    host, _ = make_host()
    host.spawn("g", Gate, mailbox_capacity=4)
    blocker = host.ask("g", "wait", ("full",))
    await entered(host, "g", "full")  # the agent waits inside `wait`; its mailbox is empty
    assert all(host.post("g", Message("s", "note", (i,))) for i in range(4))
    assert host.post("g", Message("s", "note", (99,))) is False
    with pytest.raises(MailboxFullError, match="full"):
        host.tell("g", "note", (99,))
    with pytest.raises(MailboxFullError):
        await host.ask("g", "note", (99,))
    putters = [asyncio.ensure_future(host.put("g", Message("s", "note", (i,)))) for i in (4, 5)]
    await until(lambda: waiters(host, "g") == 2)
    assert not any(p.done() for p in putters)
    assert host.post("g", Message("s", "note", (99,))) is False  # the waiters came first
    assert host.stats()[0].mailbox == 4
    Gate.gates["full"].set()
    await asyncio.gather(*putters)
    assert await blocker == "full"
    assert await host.ask("g", "notes") == ["full", 0, 1, 2, 3, 4, 5]
    await host.aclose()


@in_loop
async def test_put_to_an_agent_that_goes_away_raises():
    Gate.gates["away"] = asyncio.Event()
    host, _ = make_host()
    host.spawn("g", Gate, mailbox_capacity=1)
    host.ask("g", "wait", ("away",))
    await entered(host, "g", "away")
    assert host.post("g", Message("s", "note", (1,)))
    putter = asyncio.ensure_future(host.put("g", Message("s", "note", (2,))))
    await until(lambda: waiters(host, "g") == 1)
    host.kill("g")
    with pytest.raises(AgentNotFoundError, match="killed"):
        await putter
    await host.aclose()


# ---- Agents talking to agents ----


class Caller(Agent):
    async def relay(self, target, method, *args):
        return await self.ask(target, method, *args)

    def shout(self, target, n):
        self.tell(target, "add", n)
        return "sent"

    async def slow_ask(self, target, timeout):
        return await self.ask(target, "wait", "never", timeout=timeout)

    def make_child(self, start):
        return self.spawn(Counter, start, name="child")

    def whoami(self):
        return (self.id, self.name)

    async def ask_myself(self):
        return await self.ask(self.id, "whoami")


class Keeper(Agent):
    def __init__(self):
        self.items = []

    def keep(self, items):
        self.items.append(items)
        items.append("mutated by keeper")
        return self.items

    def kept(self):
        return self.items


@in_loop
async def test_agents_ask_and_tell_each_other():
    host, _ = make_host()
    host.spawn("caller", Caller, name="Cal")
    host.spawn("c", Counter)
    assert await host.ask("caller", "relay", ("c", "add", 5)) == 5
    assert await host.ask("caller", "shout", ("c", 2)) == "sent"
    assert await host.ask("c", "get") == 7
    log = await host.ask("c", "history")
    assert log == [("", 5), ("", 2)]
    assert await host.ask("caller", "whoami") == ("caller", "Cal")
    with pytest.raises(AgentNotFoundError):
        await host.ask("caller", "relay", ("nobody", "get"))
    with pytest.raises(AgentError, match="cannot ask itself"):
        await host.ask("caller", "ask_myself")
    await host.aclose()


@in_loop
async def test_values_between_agents_are_copied():
    host, _ = make_host()
    host.spawn("k", Keeper)
    mine = ["a"]
    kept = await host.ask("k", "keep", (mine,))
    assert mine == ["a"]  # the keeper mutated its own copy
    assert kept == [["a", "mutated by keeper"]]
    kept.append("mutated by me")
    assert await host.ask("k", "kept") == [["a", "mutated by keeper"]]  # and ours is ours
    with pytest.raises(Exception, match="pickle"):
        await host.ask("k", "keep", (threading.Lock(),))
    await host.aclose()


@in_loop
async def test_an_ask_times_out():
    Gate.gates["never"] = asyncio.Event()
    host, _ = make_host()
    host.spawn("caller", Caller)
    host.spawn("g", Gate)
    with pytest.raises(TimeoutError):
        await host.ask("caller", "slow_ask", ("g", 0.05))
    await host.aclose()


@in_loop
async def test_agents_spawn_agents_through_the_outbox():
    host, _ = make_host()
    host.spawn("parent", Caller)
    child = await host.ask("parent", "make_child", (3,))
    assert child == "parent/1"
    assert await host.ask("child", "add", (1,)) == 4
    await host.aclose()


# ---- Publish / subscribe ----


class Listener(Agent):
    subscriptions = ("papers.*",)

    def __init__(self):
        self.got = []

    def on_message(self, topic, msg):
        self.got.append((topic, msg))

    def received(self):
        return self.got

    def follow(self, pattern):
        return self.subscribe(pattern)

    def unfollow(self, pattern):
        return self.unsubscribe(pattern)

    def announce(self, topic, msg):
        self.publish(topic, msg)


@in_loop
async def test_publish_reaches_matching_subscribers_once():
    host, outbox = make_host()
    host.spawn("l1", Listener)
    host.spawn("l2", Listener)
    host.spawn("c", Counter)
    payload = {"id": 1}
    assert host.publish("papers.new", payload) == 2
    assert host.publish("papers.new.deep", {"id": 2}) == 0
    assert host.publish("other", 3) == 0
    got = await host.ask("l1", "received")
    assert got == [("papers.new", {"id": 1})]
    assert await host.ask("l1", "follow", ("alerts.#",)) is True
    assert await host.ask("l1", "follow", ("alerts.#",)) is False
    assert host.subscriptions("l1") == {"papers.*", "alerts.#"}
    await host.ask("l2", "announce", ("alerts.fire", "hot"))
    assert outbox.published == [("l2", "alerts.fire", "hot")]  # forwarded to other hosts
    assert await host.ask("l1", "received") == [("papers.new", {"id": 1}), ("alerts.fire", "hot")]
    assert await host.ask("l1", "unfollow", ("alerts.#",)) is True
    assert host.publish("alerts.fire", 1) == 0
    with pytest.raises(TopicError):
        host.publish("bad topic", 1)
    await host.aclose()


@in_loop
async def test_each_subscriber_gets_its_own_copy():
    class Mutator(Listener):
        def on_message(self, topic, msg):
            msg.append(self.id)
            self.got.append(msg)

    host, _ = make_host()
    host.spawn("m1", Mutator)
    host.spawn("m2", Mutator)
    payload = ["x"]
    host.publish("papers.new", payload)
    assert payload == ["x"]
    assert await host.ask("m1", "received") == [["x", "m1"]]
    assert await host.ask("m2", "received") == [["x", "m2"]]
    await host.aclose()


@in_loop
async def test_a_full_subscriber_drops_events_and_counts_them():
    Gate.gates["sub"] = asyncio.Event()

    class Busy(Gate):
        subscriptions = ("#",)

        def on_message(self, topic, msg):
            self.seen.append(msg)

    host, _ = make_host()
    host.spawn("b", Busy, mailbox_capacity=2)
    host.ask("b", "wait", ("sub",))
    await entered(host, "b", "sub")
    delivered = [host.publish("t", i) for i in range(4)]
    assert delivered == [1, 1, 0, 0]
    assert host.stats()[0].dropped == 2
    Gate.gates["sub"].set()
    await settle(host)
    assert await host.ask("b", "notes") == ["sub", 0, 1]
    await host.aclose()


@in_loop
async def test_subscriptions_need_on_message_and_valid_patterns():
    class Deaf(Agent):
        subscriptions = ("a.*",)

    class BadPattern(Listener):
        subscriptions = ("a..b",)

    host, _ = make_host()
    with pytest.raises(TypeError, match="on_message"):
        host.spawn("d", Deaf)
    with pytest.raises(TopicError):
        host.spawn("b", BadPattern)
    host.spawn("c", Caller)
    assert "d" not in host
    assert "b" not in host
    await host.aclose()


@in_loop
async def test_a_restart_resets_subscriptions_to_the_class_ones():
    class Fickle(Listener):
        def boom(self):
            raise ValueError("x")

    host, _ = make_host()
    host.spawn("f", Fickle)
    await host.ask("f", "follow", ("extra.*",))
    with pytest.raises(ValueError, match="x"):
        await host.ask("f", "boom")
    assert host.subscriptions("f") == {"papers.*"}
    await host.aclose()


# ---- Statistics ----


@in_loop
async def test_stats_rows_show_state_depth_and_counts():
    Gate.gates["stats"] = asyncio.Event()
    host, _ = make_host()
    host.spawn("g", Gate)
    host.spawn("c", Counter, name="counter")
    host.ask("g", "wait", ("stats",))
    await entered(host, "g", "stats")
    host.tell("g", "note", (1,))
    host.tell("c", "add", (1,))
    rows = {row.id: row for row in host.stats()}
    assert rows["g"].state is AgentState.WAITING
    assert rows["g"].mailbox == 1
    assert rows["c"].state is AgentState.RUNNING  # scheduled, not yet run
    assert (rows["c"].name, rows["c"].cls) == ("counter", "Counter")
    Gate.gates["stats"].set()
    await settle(host)
    rows = {row.id: row for row in host.stats()}
    assert rows["c"].state is AgentState.IDLE
    assert (rows["g"].handled, rows["c"].handled) == (2, 1)
    assert (rows["g"].mailbox, rows["g"].restarts, rows["g"].persist) == (0, 0, False)
    await host.aclose()


@pytest.mark.slow
@in_loop
async def test_ten_thousand_idle_agents_are_cheap():
    class Idle(Agent):
        def __init__(self, n):
            self.n = n

        def get(self):
            return self.n

    host, _ = make_host()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(10_000):
            host.spawn(f"agent-{i:05d}", Idle, (i,))
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_agent = (after - before) / 10_000
    print(f"memory per idle agent: {per_agent:.0f} B (tracemalloc)")
    assert per_agent < 4096
    assert len(asyncio.all_tasks()) == 1  # no task per idle agent
    assert all(row.state is AgentState.IDLE for row in host.stats())
    assert await host.ask("agent-09999", "get") == 9999
    await host.aclose()


# ---- Persistence ----


class Notebook(Agent):
    def __init__(self, owner):
        self.owner = owner
        self.notes = []

    def add(self, note):
        self.notes.append(note)
        return len(self.notes)

    def read(self):
        return self.notes

    def add_then_fail(self, note):
        self.notes.append(note)
        raise RuntimeError("failed after adding")

    def grab_lock(self):
        self.lock = threading.Lock()  # will not pickle
        return "grabbed"

    async def think(self, key):
        await Gate.gates[key].wait()
        return len(self.notes)


@in_loop
async def test_persisted_state_survives_a_new_host_through_the_journal(tmp_path):
    with Journal.open(tmp_path / "journal") as journal:
        checkpointer = JournalCheckpointer(journal)
        host, _ = make_host(checkpointer=checkpointer)
        host.spawn("nb", Notebook, ("ann",), persist=True)
        for note in ("a", "b", "c"):
            await host.ask("nb", "add", (note,), sender="client-1")
        checkpoint = checkpointer.load_checkpoint("nb")
        assert checkpoint is not None
        assert checkpoint.handled == 3
        assert checkpoint.seq == 3
        assert set(checkpoint.seen) == {"client-1"}
        assert checkpointer.agent_ids() == ["nb"]
        await host.aclose()  # the worker "dies"

    with Journal.open(tmp_path / "journal") as journal:  # a new worker, a new journal handle
        checkpointer = JournalCheckpointer(journal)
        host, _ = make_host(checkpointer=checkpointer)
        state = checkpointer.load("nb")
        host.spawn("nb", Notebook, ("ignored",), persist=True, state=state)
        assert await host.ask("nb", "read") == ["a", "b", "c"]
        assert host.stats()[0].handled == 4  # three restored, then `read`
        assert checkpointer.discard("nb") is True
        assert checkpointer.load("nb") is None
        await host.aclose()


@in_loop
async def test_re_sent_messages_are_deduplicated_after_a_restore(tmp_path):
    def asked(n, msg_id, note):
        reply_to = ReplyTo(origin=9, call_id=n)
        return Message("client-1", "add", (note,), reply_to=reply_to, msg_id=msg_id)

    with Journal.open(tmp_path / "journal") as journal:
        checkpointer = JournalCheckpointer(journal)
        host, outbox = make_host(checkpointer=checkpointer)
        host.spawn("nb", Notebook, ("ann",), persist=True, checkpoint_every=10)
        for n, msg_id, note in ((1, 100, "a"), (2, 101, "b")):
            host.post("nb", asked(n, msg_id, note))
        host.post("nb", Message("client-1", "add", ("tell",), msg_id=102))
        await settle(host)  # one checkpoint when the mailbox emptied, then the replies
        assert [(to.call_id, ok, v) for to, ok, v in outbox.replies] == [(1, True, 1), (2, True, 2)]
        data = checkpointer.load("nb")
        assert decode_checkpoint(data).seq == 1
        assert len(decode_checkpoint(data).replies) == 2
        await host.aclose()

        # The worker died before the client saw the replies: it re-sends everything.
        host, outbox = make_host(checkpointer=checkpointer)
        host.spawn("nb", Notebook, ("ann",), persist=True, state=checkpointer.load("nb"))
        for n, msg_id, note in ((1, 100, "a"), (2, 101, "b")):
            host.post("nb", asked(n, msg_id, note))
        host.post("nb", Message("client-1", "add", ("tell",), msg_id=102))  # dropped
        host.post("nb", asked(3, 103, "c"))  # new: handled
        host.post("nb", asked(4, 100, "a"))  # a second duplicate: no cached reply left
        await settle(host)
        results = {to.call_id: (ok, v) for to, ok, v in outbox.replies}
        assert results[1] == (True, 1)  # the cached replies, not handled again
        assert results[2] == (True, 2)
        assert results[3] == (True, 4)
        assert results[4][0] is False
        assert isinstance(results[4][1], DuplicateMessageError)
        assert await host.ask("nb", "read") == ["a", "b", "tell", "c"]
        await host.aclose()


@in_loop
async def test_a_crash_rolls_the_state_back_to_the_last_checkpoint():
    checkpointer = RecordingCheckpointer()
    host, _ = make_host(checkpointer=checkpointer)
    host.spawn("nb", Notebook, ("ann",), persist=True)
    assert await host.ask("nb", "add", ("kept",)) == 1
    with pytest.raises(RuntimeError, match="after adding"):
        await host.ask("nb", "add_then_fail", ("lost",))
    assert await host.ask("nb", "read") == ["kept"]
    assert host.stats()[0].restarts == 1
    await host.aclose()


@in_loop
async def test_replies_wait_for_their_checkpoint_and_fail_if_it_never_comes():
    checkpointer = RecordingCheckpointer()
    host, _ = make_host(checkpointer=checkpointer)
    host.spawn("nb", Notebook, ("ann",), persist=True, checkpoint_every=100)
    first = host.ask("nb", "add", ("a",))
    second = host.ask("nb", "add", ("b",))
    crash = host.ask("nb", "add_then_fail", ("c",))
    results = await asyncio.gather(first, second, crash, return_exceptions=True)
    assert isinstance(results[0], AgentCrashedError)  # handled, but never checkpointed
    assert isinstance(results[0].__cause__, RuntimeError)
    assert isinstance(results[1], AgentCrashedError)
    assert isinstance(results[2], RuntimeError)
    assert checkpointer.writes == []
    assert await host.ask("nb", "read") == []  # rolled back to the (empty) start
    await host.aclose()


@in_loop
async def test_checkpoints_batch_while_busy_and_happen_when_idle():
    checkpointer = RecordingCheckpointer()
    host, _ = make_host(checkpointer=checkpointer)
    host.spawn("nb", Notebook, ("ann",), persist=True, checkpoint_every=4)
    futures = [host.ask("nb", "add", (i,), sender="s") for i in range(10)]
    assert await asyncio.gather(*futures) == list(range(1, 11))
    seqs = [decode_checkpoint(data).seq for _, data in checkpointer.writes]
    assert seqs == [1, 2, 3]  # after 4, after 8, and when the mailbox emptied
    assert decode_checkpoint(checkpointer.writes[-1][1]).handled == 10
    await host.aclose()


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@in_loop
async def test_checkpoint_ms_bounds_the_age_of_unsaved_work():
    clock = FakeClock()

    class Ticking(Notebook):
        def add(self, note):
            clock.now += 0.010  # each message takes 10 ms of fake time
            return super().add(note)

    checkpointer = RecordingCheckpointer()
    host, _ = make_host(checkpointer=checkpointer, clock=clock)
    host.spawn("t", Ticking, ("ann",), persist=True, checkpoint_every=1000, checkpoint_ms=25)
    futures = [host.ask("t", "add", (i,)) for i in range(8)]
    await asyncio.gather(*futures)
    handled = [decode_checkpoint(data).handled for _, data in checkpointer.writes]
    assert handled == [4, 8]  # 30 ms after the first unsaved message, 4 messages on
    await host.aclose()


@in_loop
async def test_restart_intensity_follows_the_clock():
    clock = FakeClock()
    host, outbox = make_host(max_restarts=2, within_s=5.0, clock=clock)
    host.spawn("c", Counter)
    for _ in range(6):  # two crashes per 5 s window: always within the intensity
        for _ in range(2):
            with pytest.raises(ValueError, match="boom"):
                await host.ask("c", "boom")
        clock.now += 5.1
    assert host.stats()[0].restarts == 12
    for _ in range(3):
        await asyncio.gather(host.ask("c", "boom"), return_exceptions=True)
    assert outbox.exits[0][:2] == ("c", ExitReason.RESTART_LIMIT)
    await host.aclose()


@in_loop
async def test_exit_from_an_async_handler():
    class Leaver(Agent):
        async def go(self):
            await asyncio.sleep(0)
            self.exit()

    host, outbox = make_host()
    host.spawn("l", Leaver)
    assert await host.ask("l", "go") is None
    assert outbox.exits == [("l", ExitReason.EXITED, None)]
    await host.aclose()


@in_loop
async def test_a_checkpoint_comes_before_an_async_handler_starts():
    Gate.gates["think"] = asyncio.Event()
    checkpointer = RecordingCheckpointer()
    host, _ = make_host(checkpointer=checkpointer)
    host.spawn("nb", Notebook, ("ann",), persist=True, checkpoint_every=100)
    added = host.ask("nb", "add", ("a",))
    thinking = host.ask("nb", "think", ("think",))
    assert await added == 1  # released before `think` finished
    assert len(checkpointer.writes) == 1
    Gate.gates["think"].set()
    assert await thinking == 1
    await host.aclose()


@in_loop
async def test_a_failing_checkpoint_is_a_crash():
    checkpointer = RecordingCheckpointer()
    host, _ = make_host(checkpointer=checkpointer)
    host.spawn("nb", Notebook, ("ann",), persist=True)
    await host.ask("nb", "add", ("a",))
    with pytest.raises(AgentCrashedError) as info:
        await host.ask("nb", "grab_lock")
    assert "pickle" in str(info.value.__cause__)
    assert await host.ask("nb", "read") == ["a"]  # restored from the last good checkpoint
    assert host.stats()[0].restarts == 1
    await host.aclose()


@in_loop
async def test_stop_writes_a_final_checkpoint():
    checkpointer = RecordingCheckpointer()
    host, _ = make_host(checkpointer=checkpointer)
    host.spawn("nb", Notebook, ("ann",), persist=True, checkpoint_every=100)
    host.tell("nb", "add", ("a",))
    host.tell("nb", "add", ("b",))
    await host.stop("nb")
    [(agent_id, data)] = checkpointer.writes
    assert agent_id == "nb"
    assert decode_checkpoint(data).handled == 2
    await host.aclose()


@in_loop
async def test_getstate_and_setstate_define_what_is_persisted():
    class Custom(Agent):
        def __init__(self):
            self.keep = []
            self.cache = {"derived": True}

        def add(self, x):
            self.keep.append(x)
            self.cache[x] = x

        def state(self):
            return (self.keep, self.cache)

        def boom(self):
            raise ValueError("x")

        def __getstate__(self):
            return {"keep": self.keep}

        def __setstate__(self, state):
            self.keep = state["keep"]
            self.cache = {"rebuilt": True}

    checkpointer = RecordingCheckpointer()
    host, _ = make_host(checkpointer=checkpointer)
    host.spawn("c", Custom, persist=True)
    await host.ask("c", "add", (1,))
    with pytest.raises(ValueError, match="x"):
        await host.ask("c", "boom")
    assert await host.ask("c", "state") == ([1], {"rebuilt": True})
    await host.aclose()


@in_loop
async def test_persist_needs_a_checkpointer():
    host, _ = make_host()
    with pytest.raises(AgentError, match="checkpointer"):
        host.spawn("nb", Notebook, ("ann",), persist=True)
    await host.aclose()


def test_agent_hooks_outside_a_host_raise():
    counter = Counter()
    with pytest.raises(AgentError, match="not running in an agent host"):
        counter.tell("x", "y")
    with pytest.raises(AgentError, match="not running"):
        _ = counter.id


# ---- post(now=True): an idle agent handles a message on the poster's stack ----


class SelfTeller(Agent):
    def __init__(self):
        self.log = []

    def first(self):
        self.log.append("first")
        self.tell(self.id, "second")  # queued while this handler runs: handled after it
        return "ok"

    def second(self):
        self.log.append("second")

    def history(self):
        return self.log


@in_loop
async def test_post_now_runs_an_idle_agents_handler_at_once_and_queues_otherwise():
    Gate.gates["now"] = asyncio.Event()
    host, outbox = make_host()
    host.spawn("c", Counter)
    await settle(host)
    to = ReplyTo(origin=9, call_id=1)
    assert host.post("c", Message("s", "add", (5,), reply_to=to), now=True)
    assert outbox.replies == [(to, True, 5)]  # answered before post returned
    assert host.stats()[0].state is AgentState.IDLE
    assert host.stats()[0].handled == 1
    # Busy (inside an async handler): queued in order, as without now.
    host.spawn("g", Gate)
    await settle(host)
    blocker = host.ask("g", "wait", ("now",))
    await entered(host, "g", "now")
    assert host.post("g", Message("s", "note", ("later",)), now=True)
    assert host._agents["g"].instance.seen == ["now"]
    Gate.gates["now"].set()
    assert await blocker == "now"
    assert await host.ask("g", "notes") == ["now", "later"]
    # A message the handler sends itself runs after it, not inside it.
    host.spawn("t", SelfTeller)
    await settle(host)
    assert host.post("t", Message("s", "first", reply_to=ReplyTo(9, 2)), now=True)
    await settle(host)
    assert await host.ask("t", "history") == ["first", "second"]
    # A crash inside an inline call is a crash like any other: the ask fails, it restarts.
    assert host.post("c", Message("s", "boom", reply_to=ReplyTo(9, 3)), now=True)
    assert outbox.replies[-1][0] == ReplyTo(9, 3)
    assert outbox.replies[-1][1] is False
    await settle(host)
    assert await host.ask("c", "get") == 0
    assert host.stats()[0].restarts == 1
    await host.aclose()
