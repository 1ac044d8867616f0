"""The kernel's metric families, read from the control block and the process table.

What a scrape sees today, per worker where it makes sense (label ``worker="w03"``): tasks
finished, queue depth, steals, restarts, CPU seconds and RSS, plus the number of workers, clients
and the uptime. Every figure comes from the control block's single-writer words
(``kernel/control.py``) and from ``/proc`` through psutil, so a scrape sends no message and
cannot slow a worker. Families that need hot-path counters (task latency, agents by state, mailbox
depths, tool calls) join through ``kernel.metrics.MetricsTable`` as their features land.
"""

from __future__ import annotations

__all__ = ["KERNEL_METRICS", "collect_kernel_metrics", "render_kernel_metrics"]

import time
from typing import TYPE_CHECKING, Final

import psutil  # type: ignore[import-untyped]

from .metrics import MetricSpec, render_prometheus

if TYPE_CHECKING:
    from .control import ControlBlock

Labelled = dict[tuple[tuple[str, str], ...], float]

#: The families ``collect_kernel_metrics`` fills.
KERNEL_METRICS: Final = (
    MetricSpec("astra_workers", "gauge", "Worker processes configured."),
    MetricSpec("astra_clients", "gauge", "Clients attached (embedded kernels included)."),
    MetricSpec("astra_uptime_seconds", "gauge", "Seconds since the supervisor started."),
    MetricSpec("astra_tasks_finished_total", "counter", "Tasks a worker finished, per worker."),
    MetricSpec("astra_worker_queue_depth", "gauge", "Tasks queued in a worker, not started."),
    MetricSpec("astra_steals_total", "counter", "Tasks a worker stole from others' queues."),
    MetricSpec("astra_worker_restarts_total", "counter", "Restarts of a worker slot."),
    MetricSpec("astra_worker_cpu_seconds_total", "counter", "User+system CPU of a worker."),
    MetricSpec("astra_worker_rss_bytes", "gauge", "Resident set size of a worker."),
)


def collect_kernel_metrics(control: ControlBlock) -> dict[str, float | Labelled]:
    """One scrape's values (see ``render_prometheus``)."""
    done: Labelled = {}
    queued: Labelled = {}
    steals: Labelled = {}
    restarts: Labelled = {}
    cpu: Labelled = {}
    rss: Labelled = {}
    for i in range(control.workers):
        row = control.worker(i)
        key = (("worker", f"w{i:02d}"),)
        done[key] = row.tasks_done
        queued[key] = row.queued
        steals[key] = row.steals
        restarts[key] = row.restarts
        if row.pid <= 0:
            continue  # not forked yet
        try:
            proc = psutil.Process(row.pid)
            times = proc.cpu_times()
            cpu[key] = times.user + times.system
            rss[key] = proc.memory_info().rss
        except psutil.Error:
            continue  # restarting right now: no process row for this scrape
    return {
        "astra_workers": control.workers,
        "astra_clients": len(control.clients()),
        "astra_uptime_seconds": max(0.0, time.time() - control.started_ns / 1e9),
        "astra_tasks_finished_total": done,
        "astra_worker_queue_depth": queued,
        "astra_steals_total": steals,
        "astra_worker_restarts_total": restarts,
        "astra_worker_cpu_seconds_total": cpu,
        "astra_worker_rss_bytes": rss,
    }


def render_kernel_metrics(control: ControlBlock) -> str:
    """The Prometheus text of one scrape."""
    return render_prometheus(KERNEL_METRICS, collect_kernel_metrics(control))
