"""Agent memory as a plugin service (astra/memory.py on kernel/plugins.py): key/value, logs
and vectors through a client's service calls and inside agents; access control by grants;
a worker SIGKILLed in the middle of a stream of writes; readers in two workers while another
process commits; memory that outlives its kernel. The storage engine's own tests are in
tests/kernel/test_memory.py."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import astra
from astra.errors import (
    CapabilityError,
    DimensionMismatchError,
    MemoryStoreError,
    WorkerCrashedError,
)
from kernel.memory import MemoryStore
from tests.helpers import wait_until

pytestmark = pytest.mark.multiprocess


# ---- Through the service, from a client ----


def test_key_value_through_the_service(kernel):
    m = kernel.memory("team")
    assert repr(m) == "<astra.Memory 'team' (remote)>"
    assert m.get("missing") is None
    assert m.get("missing", 7) == 7
    m.put("note:1", {"text": "hello", "n": 1})
    m.put("note:2", np.arange(4, dtype=np.int16))
    m.put("other", [1, 2])
    assert m.get("note:1") == {"text": "hello", "n": 1}
    arr = m.get("note:2")
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.int16
    assert arr.tolist() == [0, 1, 2, 3]
    assert [k for k, _ in m.scan("note:")] == ["note:1", "note:2"]
    assert m.get_many(["other", "nope"], default=0) == [[1, 2], 0]
    assert m.delete("other") is True
    assert m.delete("other") is False
    assert kernel.memory("elsewhere").get("note:1") is None  # namespaces are separate


def test_a_batch_commits_whole_or_not_at_all(kernel):
    m = kernel.memory("team")
    m.put("draft", 1)
    with m.batch() as b:
        b.put("a", 1)
        b.put("b", 2)
        b.delete("draft")
    assert m.scan() == [("a", 1), ("b", 2)]

    def changed_mind() -> None:
        with m.batch() as b:
            b.put("c", 3)
            raise RuntimeError("changed my mind")

    def unstorable() -> None:
        with m.batch() as b:
            b.put("d", 4)
            b.put("e", object())  # the whole batch fails in the worker

    with pytest.raises(RuntimeError):
        changed_mind()
    assert m.get("c") is None
    with pytest.raises(MemoryStoreError):
        unstorable()
    assert m.get("d") is None


def test_logs_through_the_service(kernel):
    m = kernel.memory("r1")
    t0 = time.time()
    assert [m.append("events", {"i": i}) for i in range(5)] == [0, 1, 2, 3, 4]
    assert m.append("other", "x") == 0
    assert m.range("events", 1, 3) == [(1, {"i": 1}), (2, {"i": 2})]
    assert [seq for seq, _ in m.range("events", since=3)] == [3, 4]
    assert [seq for seq, _ in m.range("events", since=t0, by="time")] == [0, 1, 2, 3, 4]
    assert m.tail("events", 2) == [{"i": 3}, {"i": 4}]
    assert m.range("never") == []


def test_vectors_through_the_service(kernel):
    m = kernel.memory("r1")
    m.add("cat", [1.0, 0.0, 0.0], {"kind": "animal"})
    m.add("dog", [0.9, 0.1, 0.0], {"kind": "animal"})
    m.add("car", [0.0, 0.0, 1.0], {"kind": "thing"})
    hits = m.search([1.0, 0.0, 0.0], k=2)
    assert [h.id for h in hits] == ["cat", "dog"]
    assert hits[0].score == pytest.approx(1.0)
    assert hits[0].meta == {"kind": "animal"}
    assert isinstance(hits[0], astra.memory.Hit)
    assert [h.id for h in m.search([1.0, 0.0, 0.0], where={"kind": "thing"})] == ["car"]
    with pytest.raises(DimensionMismatchError):
        m.search([1.0, 0.0])
    assert m.remove("cat") is True
    rows = np.eye(3, dtype=np.float32)
    m.add_many(["x", "y", "z"], rows, [{"n": 0}, {"n": 1}, {"n": 2}])
    assert m.search([0.0, 1.0, 0.0], k=1)[0].id == "y"


def test_bad_arguments_raise_the_stores_error(kernel):
    m = kernel.memory("team")
    with pytest.raises(MemoryStoreError, match="key"):
        m.put("", 1)
    with pytest.raises(MemoryStoreError):
        kernel.memory("").get("k")
    with pytest.raises(astra.errors.ServiceNotFoundError):
        kernel.call_service("memory.nope").result(timeout=30)


# ---- Inside agents: direct reads, grants ----


class Notes(astra.Agent):
    def remember(self, key, value):
        self.memory.put(key, value)
        return self.memory.get(key)

    def recall(self, key):
        return self.memory.get(key)

    def where(self):
        return repr(self.memory), os.getpid()

    def share(self, ns, key, value):
        self.shared_memory(ns).put(key, value)

    def read(self, ns, key):
        return self.shared_memory(ns).get(key)

    def vectors(self):
        m = self.memory
        m.add("a", [1.0, 0.0], {"t": 1})
        m.add("b", [0.0, 1.0], {"t": 2})
        seq = m.append("log", "added two")
        return [h.id for h in m.search([0.2, 1.0], k=2)], m.tail("log", 1), seq

    def helper(self, memory):
        return self.spawn(Notes, memory=memory)


def test_an_agent_uses_its_own_namespace_in_its_own_worker(kernel):
    ref = kernel.spawn(Notes, name="r1", worker=1)
    assert ref.ask("remember", "k", {"v": 1}).result(timeout=30) == {"v": 1}
    assert kernel.memory("r1").get("k") == {"v": 1}  # the client sees the agent's write
    kernel.memory("r1").put("from_client", 5)
    assert ref.ask("recall", "from_client").result(timeout=30) == 5
    view, pid = ref.ask("where").result(timeout=30)
    assert view == "<astra.Memory 'r1' (local)>"  # the worker's own map, no service call
    assert pid == kernel.worker_pids()[1]
    ids, tail, seq = ref.ask("vectors").result(timeout=30)
    assert (ids, tail, seq) == (["b", "a"], ["added two"], 0)


def test_a_shared_namespace_needs_a_grant(kernel):
    member = kernel.spawn(Notes, name="member", memory=["team"])
    outsider = kernel.spawn(Notes, name="outsider")
    member.ask("share", "team", "plan", "ship it").result(timeout=30)
    assert member.ask("read", "team", "plan").result(timeout=30) == "ship it"
    assert kernel.memory("team").get("plan") == "ship it"
    with pytest.raises(CapabilityError, match="not granted the memory namespace 'team'"):
        outsider.ask("read", "team", "plan").result(timeout=30)
    with pytest.raises(CapabilityError):  # another agent's own namespace
        outsider.ask("read", "member", "k").result(timeout=30)
    assert outsider.ask("read", "outsider", "k").result(timeout=30) is None  # its own
    with pytest.raises(TypeError):
        kernel.spawn(Notes, memory="team")


def test_an_agent_grants_only_what_it_holds(kernel):
    parent = kernel.spawn(Notes, name="parent", memory=["team"])
    kernel.memory("team").put("plan", 1)
    child = kernel.agent(parent.ask("helper", ["team", "parent"]).result(timeout=30))
    assert child.ask("read", "team", "plan").result(timeout=30) == 1
    with pytest.raises(CapabilityError, match="cannot grant memory \\['secret'\\]"):
        parent.ask("helper", ["secret"]).result(timeout=30)


@pytest.mark.slow
def test_grants_survive_a_restart_after_the_worker_dies(kernel):
    ref = kernel.spawn(Notes, name="survivor", worker=1, memory=["team"])
    ref.ask("share", "team", "k", 1).result(timeout=30)
    os.kill(kernel.worker_pids()[1], signal.SIGKILL)

    def answers() -> bool:
        try:
            return ref.ask("read", "team", "k").result(timeout=5) == 1
        except astra.errors.AgentError:
            return False

    wait_until(answers, timeout_s=30)


# ---- Durability and concurrency ----


@pytest.mark.slow
def test_a_worker_killed_mid_stream_keeps_every_committed_write(kernel1):
    """SIGKILL the worker during a stream of appends (service calls with no retries): the
    call in flight, if one was, fails with WorkerCrashedError and is never run twice; every
    acknowledged append is there, gap-free; the store opens cleanly in the new worker."""
    m = kernel1.memory("stream")
    acked: list[int] = []  # the values whose append returned
    failed: list[int] = []  # the values whose append failed with WorkerCrashedError
    stop = threading.Event()

    def writer() -> None:
        value = 0
        while not stop.is_set():
            try:
                m.append("log", value)
            except WorkerCrashedError:
                failed.append(value)
            else:
                acked.append(value)
            value += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_until(lambda: len(acked) >= 20, timeout_s=60)
        pid = kernel1.worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: kernel1.worker_pids()[0] != pid, timeout_s=30)
        n = len(acked)
        wait_until(lambda: len(acked) >= n + 20, timeout_s=60)  # the new worker serves
    finally:
        stop.set()
        thread.join(60)
    assert len(failed) <= 1  # at most the one in flight at the kill
    entries = m.range("log")
    assert [seq for seq, _ in entries] == list(range(len(entries)))  # gap-free numbering
    items = [item for _, item in entries]
    assert items == sorted(set(items))  # in order, each once: no call ran twice
    assert set(acked) <= set(items)  # every acknowledged append committed
    assert set(items) - set(acked) <= set(failed)  # only the failed one may have, unacked
    m.put("after", True)  # the environment opened cleanly in the new worker
    assert m.get("after") is True


class Watcher(astra.Agent):
    def watch(self, last: int, timeout_s: float) -> tuple[int, int, int, int]:
        """Read the pair until it reaches ``last``: (reads, values seen, torn reads,
        backwards steps). Says it started in its own namespace."""
        team = self.shared_memory("team")
        self.memory.put("started", True)
        reads = torn = backwards = 0
        seen: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while last not in seen and time.monotonic() < deadline:
            a, b = team.get_many(["a", "b"], default=-1)
            reads += 1
            torn += a != b
            backwards += a < max(seen, default=-1)
            seen.add(a)
        return reads, len(seen), torn, backwards


@pytest.mark.slow
def test_readers_in_two_workers_see_whole_commits_while_another_process_writes(kernel):
    watchers = [kernel.spawn(Watcher, name=f"watcher{w}", worker=w, memory=["team"])
                for w in (0, 1)]  # fmt: skip
    path = os.path.join(kernel.data_dir, "plugins.d", "memory")
    last = 200
    asks = [w.ask("watch", last, 60.0) for w in watchers]
    # The writer is this (client) process, on the same files. It asks nothing of the
    # workers while the watchers hold them: a plain handler that loops keeps its worker.
    with MemoryStore(path, sync=True) as store:
        for w in watchers:
            wait_until(lambda w=w: store.namespace(w.name).get("started"), timeout_s=30)
        team = store.namespace("team")
        for i in range(last + 1):
            with team.batch() as b:
                b.put("a", i)
                b.put("b", i)
    for ask in asks:
        reads, values, torn, backwards = ask.result(timeout=90)
        assert values >= 2  # it read while the commits went on
        assert reads >= values
        assert (torn, backwards) == (0, 0)


# ---- Where memory lives ----


@pytest.mark.slow
def test_memory_outlives_its_kernel_under_the_state_dir(tmp_path):
    with astra.Kernel(workers=1, state_dir=str(tmp_path)) as k:
        k.memory("r1").put("k", "kept")
        k.memory("r1").append("log", 1)
    store_dir = tmp_path / "plugins.d" / "memory"
    assert {p.name for p in store_dir.iterdir()} >= {"data.mdb", "lock.mdb"}
    assert all(p.stat().st_mode & 0o077 == 0 for p in store_dir.iterdir())
    with astra.Kernel(workers=1, state_dir=str(tmp_path)) as k:
        assert k.memory("r1").get("k") == "kept"
        assert k.memory("r1").append("log", 2) == 1
