"""Task graphs: futures as edges (any depth), ``astra.Graph`` and ``run``, failure and
cancellation through the graph, worker deaths, durable graphs (astra/_graph.py)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import tracemalloc

import pytest

import astra
from kernel.journal import Journal
from tests.astra import tasks
from tests.astra.conftest import Astrad
from tests.helpers import wait_until

pytestmark = pytest.mark.multiprocess


def test_diamond(kernel):
    g = astra.Graph()
    top = g.add(tasks.square, 3)
    left = g.add(tasks.add, top, 1)
    right = g.add(tasks.add, top, 2)
    bottom = g.add(tasks.total, left, right)
    assert k_run(kernel, g) == {top: 9, left: 10, right: 11, bottom: 21}


def k_run(kernel, g, **kw):
    kw.setdefault("timeout", 60)
    return kernel.run(g, **kw)


def test_wide_fan_out_and_fan_in(kernel):
    g = astra.Graph()
    root = g.add(tasks.square, 2)
    leaves = [g.add(tasks.add, root, i) for i in range(1000)]
    sink = g.add(tasks.total, *leaves)
    out = k_run(kernel, g)
    assert out[sink] == sum(4 + i for i in range(1000))


@pytest.mark.slow
def test_a_deep_chain_of_100000_nodes(kernel):
    g = astra.Graph()
    node = g.add(tasks.add, 0, 1)
    for _ in range(99_999):
        node = g.add(tasks.add, node, 1)
    assert k_run(kernel, g, timeout=600)[node] == 100_000


def test_nodes_and_futures_nested_at_any_depth(kernel):
    g = astra.Graph()
    a = g.add(tasks.square, 2, name="a")
    b = g.add(tasks.identity, {"xs": [a, (a, {"deep": [a]})], "n": 1})
    assert k_run(kernel, g)[b] == {"xs": [4, (4, {"deep": [4]})], "n": 1}
    f = kernel.submit(tasks.square, 5)
    assert kernel.submit(tasks.identity, [{"k": (f,)}]).result(timeout=10) == [{"k": (25,)}]


def test_forward_references_and_a_cycle_named(kernel):
    g = astra.Graph()
    x = g.add(tasks.add, g.ref("z"), 1, name="x")
    g.add(tasks.add, x, 1, name="y")
    g.add(tasks.add, g.ref("y"), 1, name="z")
    with pytest.raises(
        astra.CycleError, match=r"cycle: (x|y|z) -> (x|y|z) -> (x|y|z) -> \1$"
    ) as info:
        k_run(kernel, g)
    assert {n.name for n in info.value.cycle} == {"x", "y", "z"}
    dangling = astra.Graph()
    dangling.add(tasks.add, dangling.ref("nowhere"), 1)
    with pytest.raises(ValueError, match="never added"):
        k_run(kernel, dangling)
    with pytest.raises(ValueError, match="already"):
        g.add(tasks.add, 1, 1, name="x")


def test_a_failure_fails_what_is_below_it_and_other_branches_finish(kernel):
    g = astra.Graph()
    bad = g.add(tasks.boom, "root cause", name="bad")
    below = g.add(tasks.add, bad, 1, name="below")
    further = g.add(tasks.add, below, 1, name="further")
    fine = g.add(tasks.square, 7, name="fine")
    with pytest.raises(ValueError, match="root cause"):
        k_run(kernel, g)
    out = k_run(kernel, g, return_exceptions=True)
    assert out[fine] == 49
    assert isinstance(out[bad], ValueError)
    for node in (below, further):
        assert isinstance(out[node], astra.UpstreamError)
        assert isinstance(out[node].root, ValueError)
        assert out[node].root_task == "node bad"


def test_cancelling_a_future_cancels_its_subgraph_only(kernel):
    slow = kernel.submit(tasks.sleep, 0.5)
    below = kernel.submit(tasks.add, slow, 1)
    further = kernel.submit(tasks.add, [below], 1)
    other = kernel.submit(tasks.square, 3)
    assert slow.cancel() or slow.done()
    if slow.cancelled():
        wait_until(lambda: below.cancelled() and further.cancelled(), timeout_s=5)
    assert other.result(timeout=10) == 9


@pytest.mark.slow
def test_a_worker_killed_in_a_10000_node_graph(kernel):
    g = astra.Graph()
    layer = [g.add(tasks.square, i) for i in range(100)]
    for _ in range(98):
        layer = [g.add(tasks.add, layer[i], layer[(i + 1) % 100]) for i in range(100)]
    sink = g.add(tasks.total, *layer)
    expected = _expected_sink()
    killer = concurrent.futures.ThreadPoolExecutor(1)
    control = kernel._control

    def kill_once():
        wait_until(lambda: control.worker(1).tasks_done > 2000, timeout_s=30)
        os.kill(control.worker(1).pid, signal.SIGKILL)

    done = killer.submit(kill_once)
    try:
        assert k_run(kernel, g, timeout=120)[sink] == expected
    finally:
        done.result(timeout=60)
        killer.shutdown()
    assert control.worker(1).restarts == 1


def _expected_sink():
    layer = [i * i for i in range(100)]
    for _ in range(98):
        layer = [layer[i] + layer[(i + 1) % 100] for i in range(100)]
    return sum(layer)


def test_scheduler_memory_per_pending_node_is_under_1_kib():
    # The graph's own bookkeeping (Node, spec, in-degree, edges) for 100,000 nodes of a
    # wide graph, as run() holds them before submitting (arguments are small ints).
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        g = astra.Graph()
        for i in range(100_000):
            g.add(tasks.square, i)
        structure = g._structure()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    per_node = used / 100_000
    print(f"scheduler bytes per pending node: {per_node:.0f}")
    assert per_node < 1024
    assert len(structure[0]) == 100_000


def test_a_durable_graph_refuses_functions_not_importable(kernel, tmp_path):
    g = astra.Graph()
    g.add(lambda: 1)
    with pytest.raises(astra.SerializationError, match="importable"):
        kernel.run(g, durable=True, name="n", state_dir=str(tmp_path))
    with pytest.raises(ValueError, match="name"):
        kernel.run(astra.Graph(), durable=True)


def _durable_graph(marks: str) -> tuple[astra.Graph, astra.Node]:
    g = astra.Graph()
    firsts = [g.add(tasks.record, marks, f"a{i}", i, 0.01, name=f"a{i}") for i in range(40)]
    seconds = [
        g.add(tasks.record, marks, f"b{i}", firsts[i], 0.01, name=f"b{i}") for i in range(40)
    ]
    sink = g.add(tasks.total, *seconds, name="sink")
    return g, sink


def _runs(marks) -> dict[str, int]:
    return {p.name: len(p.read_text().splitlines()) for p in marks.iterdir()}


def test_durable_rerun_skips_journaled_nodes(kernel, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    g, sink = _durable_graph(str(marks))
    state = str(tmp_path / "state")
    assert kernel.run(g, durable=True, name="nightly", state_dir=state)[sink] == sum(range(40))
    again = kernel.run(g, durable=True, name="nightly", state_dir=state)
    assert again[sink] == sum(range(40))
    assert set(_runs(marks).values()) == {1}  # nothing ran twice
    assert kernel.resume("nightly", state_dir=state)[g["sink"]] == sum(range(40))
    assert kernel.forget("nightly", state_dir=state)
    with pytest.raises(KeyError):
        kernel.resume("nightly", state_dir=state)


@pytest.mark.slow
def test_durable_resume_after_astrad_is_killed(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    state = str(tmp_path / "state")
    daemon = Astrad(state).start()
    g, _ = _durable_graph(str(marks))
    client = daemon.connect()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        running = pool.submit(client.run, g, durable=True, name="nightly", timeout=60)
        wait_until(lambda: len(list(marks.iterdir())) >= 30, timeout_s=30)
        daemon.stop(signal.SIGKILL)
        with pytest.raises(astra.KernelNotRunningError):
            running.result(timeout=30)
    finally:
        client.close()
        pool.shutdown()
    with Journal.open(os.path.join(state, "graphs")) as journal:
        committed = {k.decode() for k, _ in journal.table("graph:nightly").scan()}
    committed.discard("\x00graph")
    assert committed, "some nodes finished before the kill"
    daemon = Astrad(state).start()
    try:
        with daemon.connect() as again:
            out = again.resume("nightly", timeout=60)
    finally:
        daemon.stop()
    assert out[g["sink"]] == sum(range(40))
    runs = _runs(marks)
    assert all(runs[name] == 1 for name in committed if name != "sink"), runs
    assert set(runs) == {f"a{i}" for i in range(40)} | {f"b{i}" for i in range(40)}
