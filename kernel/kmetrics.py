"""The kernel's metric families: the control block's words, the hot-path metrics table, the
rings' depths and the process table.

What a scrape sees, per worker where it makes sense (label ``worker="w03"``):

- from the control block (``kernel/control.py``): tasks finished, queue depth, steals,
  worker restarts; workers, clients, uptime;
- from the hot-path table (``kernel.metrics.MetricsTable``, segment ``metrics``, one row per
  worker, one for the supervisor, one per client slot; each row has one writer): tasks
  submitted and retried (client rows), started and failed, the task duration histogram,
  agents by state, mailbox depth, agent messages and restarts (worker rows), tool calls by
  outcome;
- from the rings: the depth of every worker's and client's inbox;
- from ``/proc`` through psutil: per-worker CPU seconds and RSS.

A scrape sends no message and cannot slow a worker. The agent gauges are sampled by each
worker about once a second (``AGENT_SAMPLE_S``), so they lag by up to that much.
"""

from __future__ import annotations

__all__ = [
    "AGENT_SAMPLE_S",
    "AGENT_STATES",
    "HOT_METRICS",
    "KERNEL_METRICS",
    "METRICS_SEGMENT",
    "TOOL_OUTCOMES",
    "client_row",
    "collect_kernel_metrics",
    "metrics_rows",
    "render_kernel_metrics",
    "tool_outcome",
]

import contextlib
import time
from typing import TYPE_CHECKING, Final

import psutil  # type: ignore[import-untyped]

from ipc import Instance, IPCError, ring_depth

from .metrics import LATENCY_BUCKETS_S, Histogram, MetricSpec, render_prometheus
from .scheduler import worker_ring

if TYPE_CHECKING:
    from .control import ControlBlock
    from .metrics import MetricsTable

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
    MetricSpec("astra_tasks_submitted_total", "counter", "Tasks clients submitted."),
    MetricSpec("astra_tasks_retried_total", "counter", "Tasks re-sent after their worker died."),
    MetricSpec("astra_tasks_started_total", "counter", "Tasks a worker started, per worker."),
    MetricSpec("astra_tasks_failed_total", "counter",
               "Tasks that ended in an error (raised, timed out, unshippable), per worker."),
    MetricSpec("astra_task_duration_seconds", "histogram",
               "Run time of a task in its worker.", LATENCY_BUCKETS_S),
    MetricSpec("astra_agents", "gauge", "Agents by worker and state (sampled each second)."),
    MetricSpec("astra_agent_mailbox_depth", "gauge", "Messages waiting in agents' mailboxes."),
    MetricSpec("astra_agent_messages_total", "counter", "Messages agents handled, per worker."),
    MetricSpec("astra_agent_restarts_total", "counter", "Restarts of agents, per worker."),
    MetricSpec("astra_tool_calls_total", "counter", "Sandboxed tool calls by outcome."),
    MetricSpec("astra_ring_depth", "gauge", "Slots written and not yet read, per inbox ring."),
)  # fmt: skip

#: The shared segment of the hot-path table, in the kernel's instance.
METRICS_SEGMENT: Final = "metrics"
#: How often a worker hosting agents samples their states into its row.
AGENT_SAMPLE_S: Final = 1.0
#: Agent states as ``astra_agents{state=...}`` shows them (``kernel.actors.AgentState``).
AGENT_STATES: Final = ("idle", "running", "waiting")
#: Outcomes of ``astra_tool_calls_total{outcome=...}`` (``tool_outcome`` maps the audit's).
TOOL_OUTCOMES: Final = ("ok", "refused", "timeout", "memory", "violation", "crashed", "error")
_TOOL_OUTCOME_OF: Final = {
    "ok": "ok",
    "refused": "refused",
    "CapabilityError": "refused",
    "SandboxTimeout": "timeout",
    "SandboxMemoryError": "memory",
    "SandboxViolation": "violation",
    "SandboxCrashed": "crashed",
}

#: The table's columns: each process writes only its own row.
HOT_METRICS: Final = (
    MetricSpec("tasks_submitted", "counter", "client rows"),
    MetricSpec("tasks_retried", "counter", "client rows"),
    MetricSpec("tasks_started", "counter", "worker rows"),
    MetricSpec("tasks_failed", "counter", "worker rows"),
    MetricSpec("task_seconds", "histogram", "worker rows", LATENCY_BUCKETS_S),
    *(MetricSpec(f"agents_{state}", "gauge", "worker rows") for state in AGENT_STATES),
    MetricSpec("agent_mailbox", "gauge", "worker rows"),
    MetricSpec("agent_messages", "counter", "worker rows"),
    MetricSpec("agent_restarts", "counter", "worker rows"),
    *(MetricSpec(f"tool_{outcome}", "counter", "any row") for outcome in TOOL_OUTCOMES),
)


def metrics_rows(workers: int, max_clients: int) -> int:
    """Rows of the table: workers ``0..W-1``, one kept for the supervisor (it writes none
    yet), then client slots."""
    return workers + 1 + max_clients


def client_row(workers: int, slot: int) -> int:
    return workers + 1 + slot


def tool_outcome(audit_outcome: str) -> str:
    """The ``astra_tool_calls_total`` outcome of an audit entry's outcome."""
    return _TOOL_OUTCOME_OF.get(audit_outcome, "error")


def collect_kernel_metrics(control: ControlBlock) -> dict[str, float | Labelled | Histogram]:
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
    values: dict[str, float | Labelled | Histogram] = {
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
    table = control.metrics
    if table is not None:
        values.update(_hot(table, control.workers))
    if control.instance is not None:
        values["astra_ring_depth"] = _ring_depths(control, control.instance)
    return values


def _hot(table: MetricsTable, workers: int) -> dict[str, float | Labelled | Histogram]:
    rows = range(workers)
    total = table.collect()
    hist = table.collect(rows)["task_seconds"]
    assert isinstance(hist, Histogram)

    def per_worker(column: str) -> Labelled:
        return {
            (("worker", f"w{i:02d}"),): v for i, v in enumerate(table.per_row(column)[:workers])
        }

    agents: Labelled = {}
    for state in AGENT_STATES:
        for i, v in enumerate(table.per_row(f"agents_{state}")[:workers]):
            agents[(("worker", f"w{i:02d}"), ("state", state))] = v
    return {
        "astra_tasks_submitted_total": _float(total["tasks_submitted"]),
        "astra_tasks_retried_total": _float(total["tasks_retried"]),
        "astra_tasks_started_total": per_worker("tasks_started"),
        "astra_tasks_failed_total": per_worker("tasks_failed"),
        "astra_task_duration_seconds": hist,
        "astra_agents": agents,
        "astra_agent_mailbox_depth": per_worker("agent_mailbox"),
        "astra_agent_messages_total": per_worker("agent_messages"),
        "astra_agent_restarts_total": per_worker("agent_restarts"),
        "astra_tool_calls_total": {
            (("outcome", o),): _float(total[f"tool_{o}"]) for o in TOOL_OUTCOMES
        },
    }


def _float(value: float | Histogram) -> float:
    assert not isinstance(value, Histogram)
    return value


def _ring_depths(control: ControlBlock, instance: Instance) -> Labelled:
    depths: Labelled = {}
    for i in range(control.workers):
        name = worker_ring(i, control.worker_generation(i))
        with contextlib.suppress(IPCError, OSError):
            depths[(("ring", f"to_w{i:02d}"),)] = ring_depth(instance, name)
    for row in control.clients():
        with contextlib.suppress(IPCError, OSError):
            inst = instance if row.instance_id == instance.id else Instance.attach(row.instance_id)
            depths[(("ring", f"to_c{row.slot}"),)] = ring_depth(inst, f"to_c{row.slot}")
    return depths


def render_kernel_metrics(control: ControlBlock) -> str:
    """The Prometheus text of one scrape."""
    return render_prometheus(KERNEL_METRICS, collect_kernel_metrics(control))
