"""Astra's tasks beside Ray, multiprocessing.Pool, ProcessPoolExecutor and Dask, in one run
on one machine.

Run ``python -m perf.bench_tasks`` (about a minute, most of it Ray and Dask starting),
``--quick`` (fewer rounds, fewer tasks for the slow peers), ``--json-only``, ``--only
astra,pool,ppe,dask,ray`` (a subset of systems).

Workloads (every system runs ``WORKERS`` worker processes, default one per CPU):

- ``noop_10k`` (tasks/s): 10,000 no-op tasks submitted one by one, then every result
  awaited. Astra ``submit`` then ``gather``; ``Pool.apply_async`` then ``get``;
  ``ProcessPoolExecutor.submit``; Ray ``f.remote`` then ``ray.get``; Dask
  ``client.submit`` then ``client.gather``.
- ``noop_10k_map`` (tasks/s): the same tasks through each system's bulk API: Astra
  ``map``, ``Pool.imap`` (chunksize 1, its default) and ``Pool.map``,
  ``ProcessPoolExecutor.map`` (chunksize 1).
- ``sync_p50``, ``sync_p99`` (us): one task submitted and waited for, repeated.
- ``first_result`` (ms): from constructing the pool (kernel, cluster) to the first result.
- ``ready`` (ms): constructing an embedded ``astra.Kernel`` until it accepts tasks.

Method: each throughput figure is the median of ``reps`` runs after one warm-up run (which
ships the function); latencies are percentiles of every round after ``SYNC_WARMUP``. Ray and
Dask run last and in that order: after Ray starts, nothing forks. Everything is shut down
in ``finally`` blocks; Astra removes its shared memory when its ``with`` block ends.
"""

from __future__ import annotations

__all__ = ["FULL", "QUICK", "Plan", "main", "run"]

import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import logging
import multiprocessing
import os
import platform
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Final

import astra

from ._harness import (
    Report,
    Target,
    latency_us,
    median,
    parse_options,
    rate,
    run_and_report,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

#: Worker processes of every system.
WORKERS: Final = os.cpu_count() or 1
#: Synchronous rounds dropped before the latency samples start.
SYNC_WARMUP: Final = 100
#: The systems ``--only`` accepts, in the order they run (Ray last: nothing forks after it).
SYSTEMS: Final = ("astra", "pool", "ppe", "dask", "ray")


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """How much work each measurement does."""

    tasks: int  # no-op tasks per throughput run
    slow_tasks: int  # the same, for Ray and Dask (their rates make 10k runs long)
    reps: int  # throughput runs per system; the median is reported
    sync_rounds: int  # submit-and-wait rounds timed per system, after SYNC_WARMUP
    ready_reps: int  # embedded kernels started for the ``ready`` figure


FULL: Final = Plan(tasks=10_000, slow_tasks=10_000, reps=5, sync_rounds=5_000, ready_reps=10)
QUICK: Final = Plan(tasks=10_000, slow_tasks=2_000, reps=3, sync_rounds=1_000, ready_reps=5)


def noop(x: object = None) -> object:
    """The task: does nothing, returns its argument."""
    return x


# ---- Measuring helpers ----


def _add_all(
    report: Report, system: str, label: str, figs: dict[str, float], config: str = ""
) -> None:
    units = {"noop_10k": "tasks/s", "noop_10k_map": "tasks/s", "sync_p50": "us",
             "sync_p99": "us", "first_result": "ms", "ready": "ms"}  # fmt: skip
    for workload, value in figs.items():
        report.add(workload, system, value, units[workload], label=label, config=config)


# ---- Astra ----


def _bench_astra(report: Report, plan: Plan) -> None:
    n = plan.tasks
    ready = []
    for _ in range(plan.ready_reps):
        t0 = time.perf_counter()
        with astra.Kernel(workers=WORKERS) as k:
            ready.append((time.perf_counter() - t0) * 1e3)
            if len(ready) == 1:
                k.submit(noop, 1).result()
                first = (time.perf_counter() - t0) * 1e3
    with astra.Kernel(workers=WORKERS) as k:
        submit = rate(n, plan.reps, lambda: k.gather([k.submit(noop, i) for i in range(n)]))
        mapped = rate(n, plan.reps, lambda: k.map(noop, range(n)))
        p50, p99 = latency_us(plan.sync_rounds, SYNC_WARMUP, lambda: k.submit(noop, 1).result())
    _add_all(report, "astra", "astra submit", {"noop_10k": submit, "sync_p50": p50,
             "sync_p99": p99, "first_result": first, "ready": median(ready)})  # fmt: skip
    report.add("noop_10k_map", "astra_map", mapped, "tasks/s", label="astra map")


# ---- multiprocessing.Pool and ProcessPoolExecutor ----


def _bench_pool(report: Report, plan: Plan) -> None:
    n = plan.tasks
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    with ctx.Pool(WORKERS, initializer=_peer_signals) as pool:
        pool.apply(noop, (1,))
        first = (time.perf_counter() - t0) * 1e3

        def apply_async() -> None:
            for r in [pool.apply_async(noop, (i,)) for i in range(n)]:
                r.get()

        submit = rate(n, plan.reps, apply_async)
        imap = rate(n, plan.reps, lambda: list(pool.imap(noop, range(n))))
        pmap = rate(n, plan.reps, lambda: pool.map(noop, range(n)))
        p50, p99 = latency_us(plan.sync_rounds, SYNC_WARMUP, lambda: pool.apply(noop, (1,)))
    _add_all(report, "mp_pool", "mp.Pool apply_async", {"noop_10k": submit, "sync_p50": p50,
             "sync_p99": p99, "first_result": first})  # fmt: skip
    report.add("noop_10k_map", "mp_imap", imap, "tasks/s", label="mp.Pool imap")
    report.add("noop_10k_map", "mp_map", pmap, "tasks/s", label="mp.Pool map (chunked)")


def _bench_ppe(report: Report, plan: Plan) -> None:
    n = plan.tasks
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(
        WORKERS, mp_context=ctx, initializer=_peer_signals
    ) as ex:
        ex.submit(noop, 1).result()
        first = (time.perf_counter() - t0) * 1e3

        def submit_all() -> None:
            for f in [ex.submit(noop, i) for i in range(n)]:
                f.result()

        submit = rate(n, plan.reps, submit_all)
        mapped = rate(n, plan.reps, lambda: list(ex.map(noop, range(n))))
        p50, p99 = latency_us(plan.sync_rounds, SYNC_WARMUP, lambda: ex.submit(noop, 1).result())
    _add_all(report, "ppe", "ProcessPoolExecutor", {"noop_10k": submit, "sync_p50": p50,
             "sync_p99": p99, "first_result": first})  # fmt: skip
    report.add("noop_10k_map", "ppe_map", mapped, "tasks/s", label="ProcessPoolExecutor map")


# ---- Dask and Ray ----


def _skip_all(report: Report, system: str, label: str, reason: str) -> None:
    for workload, unit in (("noop_10k", "tasks/s"), ("sync_p50", "us"), ("sync_p99", "us"),
                           ("first_result", "ms")):  # fmt: skip
        report.skip(workload, system, unit, reason, label=label)


def _bench_dask(report: Report, plan: Plan) -> None:
    if importlib.util.find_spec("distributed") is None:
        _skip_all(report, "dask", "Dask distributed", "not installed")
        return
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    n = plan.slow_tasks
    t0 = time.perf_counter()
    cluster = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
    )
    try:
        with Client(cluster) as client:  # type: ignore[no-untyped-call]
            client.submit(noop, 1, pure=False).result()
            first = (time.perf_counter() - t0) * 1e3

            def submit_all() -> None:
                client.gather([client.submit(noop, i, pure=False) for i in range(n)])

            submit = rate(n, plan.reps, submit_all)
            p50, p99 = latency_us(
                plan.sync_rounds // 5,
                SYNC_WARMUP,
                lambda: client.submit(noop, 1, pure=False).result(),
            )
    finally:
        cluster.close()
    _add_all(report, "dask", "Dask distributed", {"noop_10k": submit, "sync_p50": p50,
             "sync_p99": p99, "first_result": first}, config=f"{n} tasks")  # fmt: skip


def _bench_ray(report: Report, plan: Plan) -> None:
    if importlib.util.find_spec("ray") is None:
        _skip_all(report, "ray", "Ray", "not installed")
        return
    import ray

    n = plan.slow_tasks
    t0 = time.perf_counter()
    ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level=logging.ERROR)
    try:
        # ray's stubs see noop's default argument and type the remote as taking none
        remote: Any = ray.remote(noop)
        ray.get(remote.remote(1))
        first = (time.perf_counter() - t0) * 1e3
        submit = rate(n, plan.reps, lambda: ray.get([remote.remote(i) for i in range(n)]))
        p50, p99 = latency_us(plan.sync_rounds // 5, SYNC_WARMUP, lambda: ray.get(remote.remote(1)))
    finally:
        ray.shutdown()
    _add_all(report, "ray", "Ray", {"noop_10k": submit, "sync_p50": p50, "sync_p99": p99,
             "first_result": first}, config=f"{n} tasks")  # fmt: skip


# ---- Targets (issue 3, on the 2-core development machine) ----


_TARGETS: Final = (
    Target("no-op throughput >= 2x mp.Pool apply_async", ("noop_10k", "astra"),
            ("noop_10k", "mp_pool"), 2.0),
    Target("no-op throughput (map) >= 1x mp.Pool imap", ("noop_10k_map", "astra_map"),
            ("noop_10k_map", "mp_imap"), 1.0),
    Target("no-op throughput >= 20x Ray", ("noop_10k", "astra"), ("noop_10k", "ray"), 20.0),
    Target("sync latency p50 <= ProcessPoolExecutor / 2", ("sync_p50", "astra"),
            ("sync_p50", "ppe"), 0.5),
    Target("embedded kernel ready < 150 ms", ("ready", "astra"), None, 150.0),
)  # fmt: skip


# ---- Entry point ----


def run(plan: Plan, systems: tuple[str, ...] = SYSTEMS, *, progress: bool = True) -> Report:
    """Run the chosen systems and return the report (nothing printed but progress)."""
    report = Report("tasks", progress=sys.stderr if progress else None)
    report.section(f"no-op tasks, submitted one by one, {WORKERS} workers", "noop_10k")
    report.section("no-op tasks, bulk map API", "noop_10k_map")
    report.section("submit and wait, p50", "sync_p50")
    report.section("submit and wait, p99", "sync_p99")
    report.section("start to first result", "first_result")
    report.section("embedded kernel ready", "ready")
    benches: dict[str, Callable[[Report, Plan], None]] = {
        "astra": _bench_astra, "pool": _bench_pool, "ppe": _bench_ppe,
        "dask": _bench_dask, "ray": _bench_ray,
    }  # fmt: skip
    for system in SYSTEMS:
        if system in systems:
            benches[system](report, plan)
    return report


def _parse(argv: list[str] | None) -> argparse.Namespace:
    return parse_options(
        argv, prog="python -m perf.bench_tasks", description=__doc__, choices=SYSTEMS,
        dest="systems", quick_help="fewer rounds and peer tasks",
    )  # fmt: skip


def _peer_signals() -> None:
    """In a forked peer worker: SIGTERM kills, as the peer expects. Our SIGTERM handler
    inherited through fork, made ``Pool.terminate()`` raise in a worker holding the task
    queue's lock, and the pool's join then hung on the worker stuck behind it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    """Command line entry: run, then print the tables, the targets and the JSON lines."""
    args = _parse(argv)
    return run_and_report(
        args,
        lambda progress: run(QUICK if args.quick else FULL, args.systems, progress=progress),
        title="Astra task benchmark",
        facts=lambda: (
            f"{os.cpu_count()} CPUs, {WORKERS} workers each, Python {platform.python_version()}"
        ),
        interrupted="pools shut down, shared memory removed",
        targets=_TARGETS,
    )


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
