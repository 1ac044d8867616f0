"""Astra's task graphs and work stealing beside Ray and Dask, in one run on one machine.

Run ``python -m perf.bench_dag`` (about four minutes on a 2-core VM, most of it Dask),
``--quick`` (fewer runs and nodes: under two minutes), ``--json-only``, ``--only
astra,dask,ray`` (a subset of systems).

Workloads (every system runs ``WORKERS`` worker processes, default one per CPU, except in
the scaling sweep; Dask is ``distributed.LocalCluster(processes=True, threads_per_worker=1)``):

- ``tree_8191`` (us per node): a binary-tree reduction of 8,191 nodes: 4,096 leaves
  ``leaf()`` returning 1, each inner node ``add(a, b)`` of its two children; the root must
  be 4,096. Wall time from building the first node to the root's result in hand, divided by
  the nodes: what a node costs when the work is nothing. Astra: an ``astra.Graph`` and
  ``k.run(g)``; Ray: ``add.remote(a, b)`` on ``ObjectRef``s; Dask: ``dask.delayed`` nodes
  and one ``client.compute`` (its graph API; ``client.submit`` on futures costs the same
  here).
- ``imbalanced`` (ms): 64 sleeps, 8 of 200 ms then 56 of 10 ms (long ones first), all
  queued on one worker; the makespan from the first submit to the last result, median of
  ``IMBALANCED_RUNS``, printed with its ratio to the ideal (total work / ``WORKERS``: 1,080
  ms on 2 workers). Astra: ``k.submit(sleep_for, d, worker=0)``; idle workers steal.
  Dask: ``client.submit(..., workers=[first worker], allow_other_workers=True)``; its
  work stealing may move them. Ray cannot queue a task on one worker process, so its tasks
  are submitted plainly and Ray's scheduler places them: its figure is its own placement,
  not a recovery from an imbalance.
- ``wide_1m`` (nodes/s): 1,000,000 independent no-op nodes (100,000 with ``--quick``), one
  ``k.run`` of an ``astra.Graph``, building it included. Ray (``f.remote(i)`` each, then
  one ``ray.get``) and Dask (``client.map``, then ``gather``) run fewer nodes, named in the
  label: at their rates here a million would take about 8 and 50 minutes.
  ``wide_1m_rss`` (MiB): the peak RSS of this (the driver) process during that run, sampled
  every ``RSS_SAMPLE_S`` by a thread, with its growth over the RSS just before the graph
  was built. The driver is the scheduler of Astra's graphs and of Dask's (a LocalCluster's
  scheduler runs in this process); Ray keeps its task table in its raylet and GCS, which
  are not counted. Counts differ, so no ratio.
- ``scaling_1w`` (ms per task), ``scaling_<n>w`` (efficiency): CPU-bound tasks of 5 ms of
  thread CPU time, ``TASKS_PER_WORKER`` per worker (about 1 s per run), at 1, 2, 4, ...
  workers up to the CPU count. The task spins on ``time.thread_time()``, not on a loop
  calibrated in this process: the work is the same in every system and on every core,
  and a worker's other threads (Astra's steal responder, Ray's and Dask's event loops)
  do not shorten it. Efficiency at n workers is (T1 / Tn) / n, with T1 one worker's time
  for the same ``TASKS_PER_WORKER * n`` tasks, taken as n times its time for
  ``TASKS_PER_WORKER`` (one worker runs them back to back). ``scaling_1w`` is T1 per task:
  5 ms plus the per-task overhead. Astra: a fresh ``astra.Kernel(workers=n)`` per n; Dask:
  a fresh ``LocalCluster(n_workers=n)`` per n; Ray: one ``ray.init`` with every CPU
  (another costs about 5 s), each task asking ``num_cpus=WORKERS / n`` so that at most n
  run at once. The issue's target is at 16 workers: it needs a 16-core host.

Method: every system first runs a small version of each workload (ships the functions,
starts the workers), untimed. ``time.perf_counter()``; medians of the runs in ``Plan``.
Dask runs before Ray: after ``ray.init`` nothing forks. Everything is shut down in
``finally`` blocks; Astra removes its shared memory when its ``with`` block ends.
"""

from __future__ import annotations

__all__ = ["FULL", "QUICK", "Plan", "main", "run"]

import contextlib
import dataclasses
import importlib.util
import logging
import os
import platform
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Final, TypeVar

import psutil  # type: ignore[import-untyped]

import astra

from ._harness import Report, Target, median, parse_options, run_and_report

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator
    from types import TracebackType

T = TypeVar("T")

_SUMMARY: Final = "Astra's task graphs and work stealing beside Ray and Dask."

#: Worker processes of every system (outside the scaling sweep).
WORKERS: Final = os.cpu_count() or 1
#: The systems ``--only`` accepts, in the order they run (Ray last: nothing forks after it).
SYSTEMS: Final = ("astra", "dask", "ray")
#: Leaves of the reduction tree; it has ``2 * TREE_LEAVES - 1`` nodes.
TREE_LEAVES: Final = 4096
TREE_NODES: Final = 2 * TREE_LEAVES - 1
#: Leaves of the untimed warm-up tree.
WARMUP_LEAVES: Final = 64
#: The imbalanced batch, in submission order: long sleeps first.
IMBALANCED_S: Final = (0.2,) * 8 + (0.01,) * 56
IMBALANCED_RUNS: Final = 3
#: Total work of the imbalanced batch over ``WORKERS``: the best makespan possible.
IDEAL_MS: Final = sum(IMBALANCED_S) / WORKERS * 1e3
#: CPU time of one scaling task, and how many tasks each worker gets.
SPIN_S: Final = 0.005
TASKS_PER_WORKER: Final = 200
#: The worker count of the issue's scaling target.
TARGET_WORKERS: Final = 16
#: Interval of the RSS sampler thread.
RSS_SAMPLE_S: Final = 0.005


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """How much work each measurement does."""

    tree_reps: int  # Astra tree runs; the median is reported
    peer_tree_reps: int  # the same for Ray and Dask (a Dask tree takes ~20 s here)
    wide_nodes: int  # nodes of Astra's wide graph
    ray_wide_nodes: int  # the same for Ray, and for Dask (their rates are far lower)
    dask_wide_nodes: int
    scaling_reps: int  # runs per worker count; the median is reported


FULL: Final = Plan(tree_reps=5, peer_tree_reps=3, wide_nodes=1_000_000, ray_wide_nodes=50_000,
                   dask_wide_nodes=10_000, scaling_reps=3)  # fmt: skip
QUICK: Final = Plan(tree_reps=3, peer_tree_reps=1, wide_nodes=100_000, ray_wide_nodes=10_000,
                    dask_wide_nodes=2_000, scaling_reps=1)  # fmt: skip


# ---- The tasks (module level: every system ships them by reference or by value) ----


def leaf() -> int:
    """A tree's leaf."""
    return 1


def add(a: int, b: int) -> int:
    """A tree's inner node."""
    return a + b


def noop(x: object = None) -> object:
    """A wide graph's node: does nothing, returns its argument."""
    return x


def sleep_for(seconds: float) -> None:
    """An imbalanced batch's task: blocks, holding no CPU (and not the GIL)."""
    time.sleep(seconds)


def spin(cpu_s: float) -> None:
    """A scaling task: burns ``cpu_s`` of this thread's CPU time in pure Python."""
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


# ---- Measuring helpers ----


def _reduce_tree(leaves: int, make_leaf: Callable[[], T], make_add: Callable[[T, T], T]) -> T:
    """Build a binary reduction over ``leaves`` (a power of two) leaves; return its root."""
    level = [make_leaf() for _ in range(leaves)]
    while len(level) > 1:
        level = [make_add(a, b) for a, b in zip(level[::2], level[1::2], strict=True)]
    return level[0]


def _tree_us_per_node(reps: int, run_tree: Callable[[int], object]) -> float:
    """Median wall time of ``run_tree(TREE_LEAVES)`` (which returns the root's value) per
    node, in microseconds, after one small untimed tree."""
    assert run_tree(WARMUP_LEAVES) == WARMUP_LEAVES
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        root = run_tree(TREE_LEAVES)
        times.append(time.perf_counter() - t0)
        assert root == TREE_LEAVES, root
    return median(times) / TREE_NODES * 1e6


def _makespan_ms(run_batch: Callable[[tuple[float, ...]], object]) -> float:
    """Median makespan of ``run_batch(IMBALANCED_S)`` (submits, then waits for all)."""
    run_batch((0.0,) * WORKERS)  # ships sleep_for
    spans = []
    for _ in range(IMBALANCED_RUNS):
        t0 = time.perf_counter()
        run_batch(IMBALANCED_S)
        spans.append(time.perf_counter() - t0)
    return median(spans) * 1e3


def _scaling_s(n: int, reps: int, run_tasks: Callable[[int], object]) -> float:
    """Median time of ``run_tasks(TASKS_PER_WORKER * n)`` after a small untimed run that
    ships the function and wakes every worker."""
    run_tasks(2 * n)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run_tasks(TASKS_PER_WORKER * n)
        times.append(time.perf_counter() - t0)
    return median(times)


def _worker_counts() -> list[int]:
    """1, 2, 4, ... below ``WORKERS``, then ``WORKERS``."""
    counts, n = [], 1
    while n < WORKERS:
        counts.append(n)
        n *= 2
    return [*counts, WORKERS]


class _PeakRss:
    """``with _PeakRss() as rss:``: this process's peak RSS during the block (``rss.peak``,
    bytes) and its RSS before (``rss.base``), sampled by a thread every ``RSS_SAMPLE_S``.

    Not ``getrusage``'s ``ru_maxrss``: that is the peak of the process's whole life, so it
    cannot tell one workload's peak from an earlier one's.
    """

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self.base = self.peak = self._rss()

    def _rss(self) -> int:
        rss: int = self._proc.memory_info().rss
        return rss

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _wide(n: int, run_wide: Callable[[int], object]) -> tuple[float, _PeakRss]:
    """Throughput (nodes/s) of ``run_wide(n)`` and the driver's RSS during it, after a
    small untimed run."""
    run_wide(100)
    with _PeakRss() as rss:
        t0 = time.perf_counter()
        run_wide(n)
        elapsed = time.perf_counter() - t0
    return n / elapsed, rss


# ---- Recording ----


def _add_tree(report: Report, system: str, label: str, us: float) -> None:
    report.add("tree_8191", system, us, "us", label=label)


def _add_imbalanced(report: Report, system: str, label: str, ms: float) -> None:
    ratio = ms / IDEAL_MS
    report.add("imbalanced", system, ms, "ms", label=f"{label} ({ratio:.2f}x ideal)",
               config=f"{ratio:.3f}x ideal ({IDEAL_MS:.0f} ms)")  # fmt: skip


def _add_wide(report: Report, system: str, label: str, n: int, rate: float, rss: _PeakRss) -> None:
    report.add("wide_1m", system, rate, "nodes/s", label=f"{label}, {n:,} nodes")
    grew = (rss.peak - rss.base) / 2**20
    report.add("wide_1m_rss", system, rss.peak / 2**20, "MiB", compare=False,
               label=f"{system}, {n:,} nodes (+{grew:,.0f} MiB)",
               config=f"{n} nodes, +{grew:.1f} MiB over {rss.base / 2**20:.1f} MiB")  # fmt: skip


def _add_scaling(report: Report, system: str, label: str, times: dict[int, float]) -> None:
    t1 = times[1]
    report.add("scaling_1w", system, t1 / TASKS_PER_WORKER * 1e3, "ms", label=label)
    for n, tn in times.items():
        if n > 1:  # T1 for the same 200 n tasks is n * t1: (n * t1 / tn) / n
            report.add(f"scaling_{n}w", system, t1 / tn, "efficiency",
                       label=f"{label} (Tn {tn:.2f} s)",
                       config=f"T1 {t1:.3f} s, Tn {tn:.3f} s")  # fmt: skip


# ---- Astra ----


def _bench_astra(report: Report, plan: Plan) -> None:
    with astra.Kernel(workers=WORKERS) as k:

        def tree(leaves: int) -> object:
            g = astra.Graph()
            root = _reduce_tree(leaves, lambda: g.add(leaf), lambda a, b: g.add(add, a, b))
            return k.run(g)[root]

        def imbalanced(durations: tuple[float, ...]) -> None:
            k.gather([k.submit(sleep_for, d, worker=0) for d in durations])

        def wide(n: int) -> None:
            g = astra.Graph()
            for i in range(n):
                g.add(noop, i)
            assert len(k.run(g)) == n

        _add_tree(report, "astra", "astra Graph + run", _tree_us_per_node(plan.tree_reps, tree))
        _add_imbalanced(report, "astra", "astra, all on worker 0", _makespan_ms(imbalanced))
        rate, rss = _wide(plan.wide_nodes, wide)
        _add_wide(report, "astra", "astra Graph + run", plan.wide_nodes, rate, rss)
    times = {n: _astra_scaling_s(n, plan.scaling_reps) for n in _worker_counts()}
    _add_scaling(report, "astra", "astra map", times)


def _astra_scaling_s(n: int, reps: int) -> float:
    with astra.Kernel(workers=n) as k:
        return _scaling_s(n, reps, lambda count: k.map(spin, [SPIN_S] * count))


# ---- Dask and Ray ----


def _skip_all(report: Report, system: str, label: str, reason: str) -> None:
    for workload, unit in (("tree_8191", "us"), ("imbalanced", "ms"), ("wide_1m", "nodes/s"),
                           ("wide_1m_rss", "MiB"), ("scaling_1w", "ms")):  # fmt: skip
        report.skip(workload, system, unit, reason, label=label)
    for n in _worker_counts()[1:]:
        report.skip(f"scaling_{n}w", system, "efficiency", reason, label=label)


@contextlib.contextmanager
def _dask_client(workers: int) -> Iterator[Any]:
    """A ``distributed.Client`` of a fresh ``LocalCluster`` of ``workers`` processes."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    )
    try:
        with Client(cluster) as client:  # type: ignore[no-untyped-call]
            yield client
    finally:
        cluster.close()


def _bench_dask(report: Report, plan: Plan) -> None:
    if importlib.util.find_spec("distributed") is None:
        _skip_all(report, "dask", "Dask distributed", "not installed")
        return
    from dask.delayed import delayed

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with _dask_client(WORKERS) as client:
        first = sorted(client.scheduler_info()["workers"])[0]
        dleaf, dadd = delayed(leaf, pure=False), delayed(add, pure=False)

        def tree(leaves: int) -> object:
            return client.compute(_reduce_tree(leaves, dleaf, dadd)).result()

        def imbalanced(durations: tuple[float, ...]) -> None:
            client.gather([client.submit(sleep_for, d, workers=[first], pure=False,
                                         allow_other_workers=True) for d in durations])  # fmt: skip

        def wide(n: int) -> None:
            client.gather(client.map(noop, range(n), pure=False))

        nodes = plan.dask_wide_nodes
        _add_tree(report, "dask", "Dask delayed + compute",
                  _tree_us_per_node(plan.peer_tree_reps, tree))  # fmt: skip
        _add_imbalanced(report, "dask", "Dask, workers=[w0], may steal", _makespan_ms(imbalanced))
        rate, rss = _wide(nodes, wide)
        _add_wide(report, "dask", "Dask map", nodes, rate, rss)
    times = {n: _dask_scaling_s(n, plan.scaling_reps) for n in _worker_counts()}
    _add_scaling(report, "dask", "Dask map", times)


def _dask_scaling_s(n: int, reps: int) -> float:
    with _dask_client(n) as client:
        return _scaling_s(
            n, reps, lambda count: client.gather(client.map(spin, [SPIN_S] * count, pure=False))
        )


def _bench_ray(report: Report, plan: Plan) -> None:
    if importlib.util.find_spec("ray") is None:
        _skip_all(report, "ray", "Ray", "not installed")
        return
    import ray

    ours = signal.getsignal(signal.SIGTERM)
    # log_to_driver=False: Ray's log monitor otherwise copies its workers' output, mangled
    # (a stray "(n pid=...) oop" was seen), onto our stdout, among the JSON lines.
    ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)  # fmt: skip
    # ray.init replaces our SIGTERM handler (with sys.exit(15), and a C++ one that dumps a
    # stack first): put ours back, so that SIGTERM unwinds like Ctrl-C through the finally.
    signal.signal(signal.SIGTERM, ours)
    try:
        # ray's stubs type a remote function by its signature; .options() loses it anyway
        rleaf: Any = ray.remote(leaf)
        radd: Any = ray.remote(add)
        rnoop: Any = ray.remote(noop)
        rsleep: Any = ray.remote(sleep_for)
        rspin: Any = ray.remote(spin)

        def tree(leaves: int) -> object:
            return ray.get(_reduce_tree(leaves, rleaf.remote, radd.remote))

        def imbalanced(durations: tuple[float, ...]) -> None:
            ray.get([rsleep.remote(d) for d in durations])

        def wide(n: int) -> None:
            ray.get([rnoop.remote(i) for i in range(n)])

        def scaling(n: int) -> float:
            capped = rspin.options(num_cpus=WORKERS / n)  # at most n at once
            return _scaling_s(
                n, plan.scaling_reps, lambda count: ray.get([capped.remote(SPIN_S)
                                                             for _ in range(count)])
            )  # fmt: skip

        nodes = plan.ray_wide_nodes
        _add_tree(report, "ray", "Ray .remote on ObjectRefs",
                  _tree_us_per_node(plan.peer_tree_reps, tree))  # fmt: skip
        _add_imbalanced(report, "ray", "Ray, its own placement", _makespan_ms(imbalanced))
        rate, rss = _wide(nodes, wide)
        _add_wide(report, "ray", "Ray .remote", nodes, rate, rss)
        times = {n: scaling(n) for n in _worker_counts()}
        _add_scaling(report, "ray", f"Ray, num_cpus={WORKERS}/n per task", times)
    finally:
        ray.shutdown()


# ---- Targets (the DAG scheduler issue) ----


_TARGETS: Final = (
    Target("tree per-node overhead <= 1/10 of Ray's", ("tree_8191", "astra"),
           ("tree_8191", "ray"), 0.1),
    Target(f"imbalanced makespan <= 1.05x ideal ({1.05 * IDEAL_MS:,.0f} ms)",
           ("imbalanced", "astra"), None, 1.05 * IDEAL_MS),
    Target(f"parallel efficiency >= 0.9 at {TARGET_WORKERS} workers",
           ("scaling_16w", "astra"), None, 0.9),
)  # fmt: skip


def _notes() -> str:
    lines = []
    if WORKERS < TARGET_WORKERS:
        lines.append(
            f"note: the {TARGET_WORKERS}-worker efficiency target needs a "
            f"{TARGET_WORKERS}-core host; this one has {WORKERS} CPUs, so the sweep stops at "
            f"{WORKERS} workers"
        )
    lines.append(
        "note: Ray cannot queue tasks on one worker process: its imbalanced figure is its "
        "own scheduler's placement"
    )
    return "\n".join(lines) + "\n"


# ---- Entry point ----


def run(plan: Plan, systems: tuple[str, ...] = SYSTEMS, *, progress: bool = True) -> Report:
    """Run the chosen systems and return the report (nothing printed but progress)."""
    report = Report("dag", progress=sys.stderr if progress else None)
    report.section(f"binary-tree reduction, {TREE_NODES:,} nodes, per node", "tree_8191")
    report.section(f"64 sleeps (8 x 200 ms, 56 x 10 ms) queued on one worker, makespan; "
                   f"ideal {IDEAL_MS:,.0f} ms", "imbalanced")  # fmt: skip
    report.section("wide graph of independent no-op nodes, building included", "wide_1m")
    report.section("driver peak RSS during the wide graph", "wide_1m_rss")
    report.section(f"5 ms CPU tasks on 1 worker, wall per task ({TASKS_PER_WORKER} tasks)",
                   "scaling_1w")  # fmt: skip
    for n in _worker_counts()[1:]:
        report.section(f"parallel efficiency (T1/Tn)/n at {n} workers, "
                       f"{TASKS_PER_WORKER * n} tasks", f"scaling_{n}w")  # fmt: skip
    benches: dict[str, Callable[[Report, Plan], None]] = {
        "astra": _bench_astra, "dask": _bench_dask, "ray": _bench_ray,
    }  # fmt: skip
    for system in SYSTEMS:
        if system in systems:
            benches[system](report, plan)
    return report


def _parse(argv: list[str] | None) -> argparse.Namespace:
    return parse_options(
        argv, prog="python -m perf.bench_dag", description=_SUMMARY, choices=SYSTEMS,
        dest="systems", quick_help="fewer runs and nodes",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command line entry: run, then print the tables, the targets and the JSON lines."""
    args = _parse(argv)
    return run_and_report(
        args,
        lambda progress: run(QUICK if args.quick else FULL, args.systems, progress=progress),
        title="Astra DAG benchmark",
        facts=lambda: (
            f"{os.cpu_count()} CPUs, {WORKERS} workers each, Python {platform.python_version()}"
        ),
        interrupted="clusters shut down, shared memory removed",
        targets=_TARGETS,
        notes=_notes,
    )


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
