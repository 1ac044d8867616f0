"""Metrics in shared memory: one writer per row, sums across processes, and an exposition
that Prometheus's own parser reads."""

from __future__ import annotations

import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kernel.metrics import (
    LATENCY_BUCKETS_S,
    Histogram,
    MetricSpec,
    MetricsTable,
    render_prometheus,
)
from tests.helpers import fork_child, reap, wait_until

SPECS = (
    MetricSpec("astra_tasks_finished_total", "counter", "Tasks that finished."),
    MetricSpec("astra_agents", "gauge", "Agents alive."),
    MetricSpec("astra_task_seconds", "histogram", "Task latency.", LATENCY_BUCKETS_S),
    MetricSpec("astra_worker_rss_bytes", "gauge", "Resident set per worker."),
)


@pytest.fixture
def table(instance):
    t = MetricsTable.create(instance, SPECS, rows=3)
    yield t
    t.close()


@pytest.mark.multiprocess
def test_rows_written_by_other_processes_sum_up(table, instance):
    def worker(row: int) -> None:
        attached = MetricsTable.attach(instance, SPECS, rows=3)
        r = attached.row(row)
        for i in range(1000):
            r.inc("astra_tasks_finished_total")
            r.observe("astra_task_seconds", 0.0001 * (i % 10))
        r.set("astra_agents", row + 1)
        attached.close()

    pids = [fork_child(lambda row=row: worker(row)) for row in (0, 1)]
    assert [reap(pid) for pid in pids] == [0, 0]
    got = table.collect()
    assert got["astra_tasks_finished_total"] == 2000
    assert got["astra_agents"] == 3
    hist = got["astra_task_seconds"]
    assert isinstance(hist, Histogram)
    assert hist.count == 2000
    assert sum(hist.counts) == 2000
    assert hist.sum == pytest.approx(2 * 100 * 0.0001 * sum(range(10)))
    assert table.per_row("astra_agents") == [1, 2, 0]


def test_histogram_bucket_edges_are_inclusive_and_overflow_counts_only_in_total(table):
    r = table.row(2)
    r.observe("astra_task_seconds", LATENCY_BUCKETS_S[0])  # exactly on the first edge
    r.observe("astra_task_seconds", 1e9)  # beyond the last: only +Inf
    hist = table.collect()["astra_task_seconds"]
    assert isinstance(hist, Histogram)
    assert hist.counts[0] == 1
    assert sum(hist.counts) == 1
    assert hist.count == 2


def test_exposition_parses_with_prometheus_client(table):
    r = table.row(0)
    r.inc("astra_tasks_finished_total", 5)
    r.observe("astra_task_seconds", 0.003)
    values = dict(table.collect())
    values["astra_worker_rss_bytes"] = {
        (("worker", "w00"),): 1.5e7,
        (("worker", 'w"01\n'),): 2e7,  # escaping
    }
    text = render_prometheus(SPECS, values)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # the parser drops the _total suffix from counter family names
    assert families["astra_tasks_finished"].samples[0].value == 5
    assert families["astra_agents"].samples[0].value == 0
    hist = {(s.name, s.labels.get("le")): s.value for s in families["astra_task_seconds"].samples}
    assert hist[("astra_task_seconds_bucket", "0.0025")] == 0
    assert hist[("astra_task_seconds_bucket", "0.005")] == 1
    assert hist[("astra_task_seconds_bucket", "+Inf")] == 1
    assert hist[("astra_task_seconds_count", None)] == 1
    rss = {s.labels["worker"]: s.value for s in families["astra_worker_rss_bytes"].samples}
    assert rss == {"w00": 1.5e7, 'w"01\n': 2e7}


def test_counters_change_as_work_runs(table):
    before = render_prometheus(SPECS, table.collect())
    table.row(1).inc("astra_tasks_finished_total")
    after = render_prometheus(SPECS, table.collect())
    assert "astra_tasks_finished_total 0" in before
    assert "astra_tasks_finished_total 1" in after


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (lambda: MetricSpec("bad name", "counter", "x"), "bad metric name"),
        (lambda: MetricSpec("h", "histogram", "x", (1.0, 0.5)), "increasing"),
        (lambda: MetricSpec("c", "counter", "x", (1.0,)), "only histograms"),
    ],
)
def test_bad_specs_are_refused(spec, needle):
    with pytest.raises(ValueError, match=needle):
        spec()


def test_rows_out_of_range_and_duplicate_names_are_refused(table, instance):
    with pytest.raises(IndexError):
        table.row(3)
    with pytest.raises(ValueError, match="declared twice"):
        MetricsTable.create(instance, (*SPECS, SPECS[0]), rows=1, name="dup")


def test_metrics_are_served_over_http(table):
    import urllib.error
    import urllib.request

    from kernel.metrics import MetricsServer

    server = MetricsServer("127.0.0.1:0", lambda: render_prometheus(SPECS, table.collect()))
    try:
        host, port = server.address
        table.row(0).inc("astra_tasks_finished_total", 3)
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["astra_tasks_finished"].samples[0].value == 3
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{host}:{port}/other", timeout=5)
        assert err.value.code == 404
        err.value.close()
    finally:
        server.close()


@pytest.mark.parametrize("addr", ["9464", "host:", ":9464", "h:99999", "h:p"])
def test_bad_metrics_addresses_are_refused(addr):
    from kernel.metrics import parse_addr

    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_addr(addr)


def test_the_exporter_is_its_own_process_and_is_reaped_at_close(table):
    """Not a thread of the (forking) supervisor: a child named astra-metrics, gone after close."""
    import socket

    import psutil

    from kernel.metrics import MetricsServer

    ours = socket.socketpair()  # like the supervisor's service links: not the exporter's
    server = MetricsServer("127.0.0.1:0", lambda: render_prometheus(SPECS, table.collect()))
    pid = server.pid
    try:
        assert pid != os.getpid()
        inodes = {f"socket:[{os.fstat(s.fileno()).st_ino}]" for s in ours}
        wait_until(lambda: psutil.Process(pid).name() == "astra-metrics")
        held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert not inodes & held
        wait_until(lambda: psutil.Process(pid).name() == "astra-metrics")  # named after fork
        assert psutil.Process(pid).ppid() == os.getpid()
    finally:
        server.close()
        for s in ours:
            s.close()
    assert not psutil.pid_exists(pid)  # reaped, not a zombie
    server.close()  # twice is harmless
