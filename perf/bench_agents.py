"""Astra's agents beside Ray actors and a ``multiprocessing.Pipe`` server, in one run on one
machine.

Run ``python -m perf.bench_agents`` (about two minutes, most of it Ray: 40 s to start 100
actors, 20,000-call runs at 5,000 calls/s), ``--quick`` (about 20 s: fewer rounds, fewer Ray
calls and actors), ``--json-only``, ``--only astra,pipe,ray`` (a subset of systems).

The peers. Astra: an embedded ``astra.Kernel(workers=WORKERS)``, agents spawned with
``k.spawn``. Ray: ``ray.init(num_cpus=WORKERS)``, actors from ``ray.remote(cls)``. Pipe: one
forked server process looping ``conn.recv()`` then ``conn.send(answer)`` on a
``multiprocessing.Pipe()`` with plain (pickling) ``send``/``recv``, the messages being
``(method, argument)`` tuples, as a user would write it. Every handler is a no-op: ``echo``
returns its argument, ``note`` counts, ``total`` returns the count.

Workloads:

- ``ask_p50``, ``ask_p99`` (us): one ask of ``echo(1)`` and its answer awaited, repeated:
  ``ref.ask("echo", 1).result()``, ``ray.get(actor.echo.remote(1))``, ``send`` then
  ``recv``. Percentiles of ``rounds`` rounds after ``ASK_WARMUP``.
- ``ask_async_20k`` (calls/s): 20,000 asks issued without waiting, then every answer
  awaited. Astra all to one agent (``astra``, the figure the targets use: one agent, as
  the peers have one server process and one actor) and spread round robin over one agent
  per worker (``astra_spread``: on 2 CPUs the client shares a core with a worker, so this
  is the slower of the two here); Ray to one actor, ``.remote()`` each
  then one ``ray.get(list)`` (fewer calls with ``--quick``; the label says how many); Pipe
  pipelined in one thread, each send past the first ``PIPE_WINDOW`` (64) followed by one
  receive (sending all before receiving any deadlocks once both socket buffers fill).
- ``tell_rate`` (msgs/s): 20,000 one-way ``note`` messages to one agent, then one ``total``
  ask, timed to its answer (which must count them all): ``ref.tell``, ``actor.note.remote``
  without ``ray.get``, Pipe ``send`` with no answer.
- ``spawn_10k`` (agents/s), ``spawn_10k_s`` (s): 10,000 ``k.spawn(Idle)`` in a loop, in a
  fresh kernel (each ``spawn`` returns once the agent is built); and the same through
  ``k.spawn_many`` (every spawn sent before any answer is awaited). Ray starts an actor
  process per actor, so it spawns only 100 (``--quick``: 20) and waits for each to answer
  a ``ready()`` call; its ``spawn_10k_s`` is the time for those, not for 10,000.
- ``memory_per_agent`` (bytes, lower is better): the growth of the summed RSS of the
  kernel's worker processes (``k.worker_pids()``) over the spawns, per agent; for Ray the
  growth of the summed RSS of every process whose name starts with ``ray::`` (the actor
  processes, found by scanning with psutil; raylet and GCS are not counted), per actor.
  RSS counts shared pages in each process, so the Ray figure overstates a little.

Method: each rate is the median of ``reps`` runs after one warm-up run. Astra runs first,
then the Pipe server, then Ray: after ``ray.init`` nothing forks. Everything is shut down in
``finally`` blocks; SIGTERM unwinds like Ctrl-C.
"""

from __future__ import annotations

__all__ = ["FULL", "QUICK", "Echo", "Idle", "Plan", "main", "run"]

import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import multiprocessing
import os
import platform
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Final

import psutil  # type: ignore[import-untyped]

import astra

from ._harness import (
    Children,
    Report,
    Target,
    latency_us,
    parse_options,
    rate,
    run_and_report,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from multiprocessing.connection import Connection

#: Worker processes of the kernel and CPUs given to Ray.
WORKERS: Final = os.cpu_count() or 1
#: Synchronous asks dropped before the latency samples start.
ASK_WARMUP: Final = 100
#: The systems ``--only`` accepts, in the order they run (Ray last: nothing forks after it).
SYSTEMS: Final = ("astra", "pipe", "ray")
#: Answers the Pipe client lets pile up while it sends (pipelining). Each small message
#: costs about 1 KiB of socket buffer (``wmem_default`` is 208 KiB here), so sending all
#: 20,000 before receiving any deadlocks both sides, and so does a window of 1,024; 64 is
#: far from that and, measured here, as fast as 128 and faster than a receiving thread
#: (which would also leave a thread blocked in ``recv`` on Ctrl-C).
PIPE_WINDOW: Final = 64
#: Agents ``spawn_10k`` starts in Astra (the workload's name says 10k: keep it so).
SPAWN_AGENTS: Final = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """How much work each measurement does."""

    rounds: int  # synchronous asks timed per system, after ASK_WARMUP
    asks: int  # asks per ask_async run (Astra, Pipe)
    ray_asks: int  # the same for Ray (about 3,500/s here)
    tells: int  # one-way messages per tell_rate run (Astra, Pipe)
    ray_tells: int  # the same for Ray
    ray_actors: int  # actors Ray spawns (each is a process of ~100 MB)
    reps: int  # timed runs per rate; the median is reported


FULL: Final = Plan(
    rounds=5_000, asks=20_000, ray_asks=20_000, tells=20_000, ray_tells=20_000, ray_actors=100,
    reps=5,
)  # fmt: skip
QUICK: Final = Plan(
    rounds=1_000, asks=20_000, ray_asks=2_000, tells=20_000, ray_tells=2_000, ray_actors=20,
    reps=3,
)  # fmt: skip


# ---- The agents (the same handlers for every system) ----


class Echo(astra.Agent):
    """The asked agent: ``echo`` answers its argument, ``note`` counts, ``total`` tells."""

    def __init__(self) -> None:
        self.count = 0

    def echo(self, x: object) -> object:
        return x

    def note(self, x: object) -> None:
        self.count += 1

    def total(self) -> int:
        return self.count


class Idle(astra.Agent):
    """The spawned agent: no state, no handlers."""


class _RayEcho:
    """``Echo`` for Ray (a Ray actor class must not subclass ``astra.Agent``)."""

    def __init__(self) -> None:
        self.count = 0

    def echo(self, x: object) -> object:
        return x

    def note(self, x: object) -> None:
        self.count += 1

    def total(self) -> int:
        return self.count


class _RayIdle:
    """``Idle`` for Ray, with a method to learn that the actor process is up."""

    def ready(self) -> None:
        return None


def _importable(cls: type[astra.Agent]) -> type[astra.Agent]:
    """``cls`` as ``perf.bench_agents`` defines it. Under ``python -m`` this module is
    ``__main__``, whose classes Astra ships by value (cloudpickle, on every spawn); a user's
    agents live in an importable module and ship as a name, so we measure that."""
    module = importlib.import_module("perf.bench_agents")
    found: type[astra.Agent] = getattr(module, cls.__name__)
    return found


# ---- Measuring helpers ----


def _counted(
    n: int, send_all: Callable[[], object], total: Callable[[], int]
) -> Callable[[], None]:
    """A tell run: ``send_all()`` then ``total()`` (timed to its answer), which must have
    grown by ``n``: a dropped message fails the run rather than flattering it."""
    last = total()

    def run_once() -> None:
        nonlocal last
        before = last
        send_all()
        last = total()
        assert last - before == n, f"{last - before} of {n} messages handled"

    return run_once


def _rss(pids: list[int]) -> int:
    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


def _add_ask(report: Report, system: str, label: str, p50: float, p99: float) -> None:
    report.add("ask_p50", system, p50, "us", label=label)
    report.add("ask_p99", system, p99, "us", label=label)


# ---- Astra ----


def _bench_astra(report: Report, plan: Plan) -> None:
    echo_cls = _importable(Echo)
    with astra.Kernel(workers=WORKERS) as k:
        one = k.spawn(echo_cls)
        p50, p99 = latency_us(plan.rounds, ASK_WARMUP, lambda: one.ask("echo", 1).result())
        _add_ask(report, "astra", "astra ask", p50, p99)
        refs = [k.spawn(echo_cls, worker=i) for i in range(WORKERS)]
        n = plan.asks

        def spread() -> None:
            futures = [refs[i % WORKERS].ask("echo", i) for i in range(n)]
            for f in futures:
                f.result()

        def single() -> None:
            for f in [one.ask("echo", i) for i in range(n)]:
                f.result()

        label = f"astra, {n:,} asks to 1 agent"
        report.add("ask_async_20k", "astra", rate(n, plan.reps, single), "calls/s", label=label)
        label = f"astra, {n:,} asks over {WORKERS} agents (1/worker)"
        spread_rate = rate(n, plan.reps, spread)
        report.add("ask_async_20k", "astra_spread", spread_rate, "calls/s", label=label)
        n = plan.tells

        def tell_all() -> None:
            for i in range(n):
                one.tell("note", i)

        tells = rate(n, plan.reps, _counted(n, tell_all, lambda: _int(one.ask("total").result())))
        report.add("tell_rate", "astra", tells, "msgs/s", label=f"astra, {n:,} tells + 1 ask")
    _bench_astra_spawn(report)


def _int(value: object) -> int:
    assert isinstance(value, int), value
    return value


def _bench_astra_spawn(report: Report) -> None:
    idle_cls = _importable(Idle)
    n = SPAWN_AGENTS
    with astra.Kernel(workers=WORKERS) as k:
        for i in range(WORKERS):  # warm-up: each worker imports the class, opens its journal
            k.spawn(idle_cls, worker=i).stop()
        pids = k.worker_pids()
        rss0 = _rss(pids)
        t0 = time.perf_counter()
        for _ in range(n):
            k.spawn(idle_cls)
        elapsed = time.perf_counter() - t0
        grown = _rss(pids) - rss0
    with astra.Kernel(workers=WORKERS) as k:  # the bulk API, in a fresh kernel
        for i in range(WORKERS):
            k.spawn(idle_cls, worker=i).stop()
        t0 = time.perf_counter()
        k.spawn_many(idle_cls, [()] * n)
        many = time.perf_counter() - t0
    label = f"astra, {n:,} agents"
    report.add("spawn_10k", "astra", n / elapsed, "agents/s", label=label + ", k.spawn loop")
    report.add("spawn_10k_s", "astra", elapsed, "s", label=label + ", k.spawn loop",
               compare=False)  # fmt: skip
    report.add("spawn_10k", "astra_many", n / many, "agents/s", label=label + ", k.spawn_many")
    report.add("spawn_10k_s", "astra_many", many, "s", label=label + ", k.spawn_many",
               compare=False)  # fmt: skip
    report.add("memory_per_agent", "astra", grown / n, "bytes", label=label + " (workers' RSS)")


# ---- A multiprocessing.Pipe server ----


def _pipe_server(control: Connection, data: Connection) -> None:
    """The forked server: answers ``echo`` and ``total``, counts ``note``; None stops it."""
    control.send("ready")
    count = 0
    while (msg := data.recv()) is not None:
        method, x = msg
        if method == "echo":
            data.send(x)
        elif method == "note":
            count += 1
        else:
            data.send(count)


def _bench_pipe(report: Report, plan: Plan) -> None:
    ctx = multiprocessing.get_context("fork")
    conn, server_end = ctx.Pipe()
    with Children() as kids:
        # The harness restores SIGTERM's default in the child (see bench_tasks._peer_signals).
        server = kids.start(_pipe_server, server_end)
        server_end.close()
        try:
            server.recv()
            _bench_pipe_workloads(report, plan, conn)
        finally:
            with contextlib.suppress(OSError):
                conn.send(None)
            conn.close()


def _bench_pipe_workloads(report: Report, plan: Plan, conn: Connection) -> None:
    def ask(x: object) -> object:
        conn.send(("echo", x))
        return conn.recv()

    def total() -> int:
        conn.send(("total", None))
        return _int(conn.recv())

    label = "mp.Pipe server (send/recv)"
    _add_ask(report, "mp_pipe", label, *latency_us(plan.rounds, ASK_WARMUP, lambda: ask(1)))
    n = plan.asks

    def pipelined() -> None:
        for i in range(n):
            conn.send(("echo", i))
            if i >= PIPE_WINDOW:
                conn.recv()
        for _ in range(min(n, PIPE_WINDOW)):
            conn.recv()

    report.add("ask_async_20k", "mp_pipe", rate(n, plan.reps, pipelined), "calls/s",
               label=f"mp.Pipe server, {n:,} pipelined ({PIPE_WINDOW} in flight)")  # fmt: skip
    n = plan.tells

    def note_all() -> None:
        for i in range(n):
            conn.send(("note", i))

    tells = rate(n, plan.reps, _counted(n, note_all, total))
    report.add(
        "tell_rate", "mp_pipe", tells, "msgs/s", label=f"mp.Pipe server, {n:,} sends + 1 ask"
    )


# ---- Ray ----


def _skip_ray(report: Report, reason: str) -> None:
    for workload, unit in (("ask_p50", "us"), ("ask_p99", "us"), ("ask_async_20k", "calls/s"),
                           ("tell_rate", "msgs/s"), ("spawn_10k", "agents/s"),
                           ("spawn_10k_s", "s"), ("memory_per_agent", "bytes")):  # fmt: skip
        report.skip(workload, "ray", unit, reason, label="Ray")


def _ray_rss() -> int:
    """The summed RSS of the processes named ``ray::...`` (actors, idle workers, agents)."""
    total = 0
    for proc in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.info["cmdline"] or [""]
            if (proc.info["name"] or "").startswith("ray::") or cmdline[0].startswith("ray::"):
                total += proc.memory_info().rss
    return total


def _bench_ray(report: Report, plan: Plan) -> None:
    if importlib.util.find_spec("ray") is None:
        _skip_ray(report, "not installed")
        return
    import ray

    ours = signal.getsignal(signal.SIGTERM)
    try:
        # ray.init installs its own SIGTERM handlers (sys.exit(15) while it starts, then
        # one that stops the node and exits): ours goes back once it returns.
        try:
            ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level=logging.ERROR)
        except SystemExit as exc:
            raise KeyboardInterrupt(f"SIGTERM while Ray started (exit {exc.code})") from None
        signal.signal(signal.SIGTERM, ours)
        _bench_ray_actor(report, plan, ray.remote(_RayEcho).remote())
        _bench_ray_spawn(report, plan, ray.remote(_RayIdle))
    finally:
        ray.shutdown()


def _bench_ray_actor(report: Report, plan: Plan, actor: Any) -> None:
    import ray

    ray.get(actor.echo.remote(0))  # the actor's process is up
    _add_ask(
        report,
        "ray",
        "Ray actor",
        *latency_us(plan.rounds, ASK_WARMUP, lambda: ray.get(actor.echo.remote(1))),
    )
    n = plan.ray_asks
    asks = rate(n, plan.reps, lambda: ray.get([actor.echo.remote(i) for i in range(n)]))
    label = f"Ray, {n:,} .remote() then ray.get(list), 1 actor"
    report.add("ask_async_20k", "ray", asks, "calls/s", label=label, config=f"{n} asks")
    n = plan.ray_tells

    def note_all() -> None:
        for i in range(n):
            actor.note.remote(i)

    tells = rate(n, plan.reps, _counted(n, note_all, lambda: _int(ray.get(actor.total.remote()))))
    label = f"Ray, {n:,} .remote() + 1 ray.get"
    report.add("tell_rate", "ray", tells, "msgs/s", label=label, config=f"{n} tells")


def _bench_ray_spawn(report: Report, plan: Plan, idle_cls: Any) -> None:
    import ray

    n = plan.ray_actors
    rss0 = _ray_rss()
    t0 = time.perf_counter()
    actors = [idle_cls.remote() for _ in range(n)]
    ray.get([a.ready.remote() for a in actors])
    elapsed = time.perf_counter() - t0
    grown = _ray_rss() - rss0
    for a in actors:
        ray.kill(a)
    label = f"Ray, {n} actors (not 10,000)"
    report.add("spawn_10k", "ray", n / elapsed, "agents/s", label=label, config=f"{n} actors")
    report.add("spawn_10k_s", "ray", elapsed, "s", label=label, config=f"{n} actors")
    report.add("memory_per_agent", "ray", grown / n, "bytes", label=f"Ray, {n} actors (ray:: RSS)")


# ---- Targets (on the 2-core development machine) ----


_TARGETS: Final = (
    Target("ask p50 <= mp.Pipe server's", ("ask_p50", "astra"), ("ask_p50", "mp_pipe"), 1.0),
    Target("ask p50 <= Ray / 10", ("ask_p50", "astra"), ("ask_p50", "ray"), 0.1),
    Target("async ask throughput >= 2x mp.Pipe server", ("ask_async_20k", "astra"),
           ("ask_async_20k", "mp_pipe"), 2.0),
    Target("async ask throughput >= 50x Ray", ("ask_async_20k", "astra"),
           ("ask_async_20k", "ray"), 50.0),
    Target("10,000 agents spawned in < 1 s (k.spawn loop)", ("spawn_10k_s", "astra"), None, 1.0),
    Target("10,000 agents spawned in < 1 s (k.spawn_many)", ("spawn_10k_s", "astra_many"),
           None, 1.0),
    Target("memory per agent < 5 KiB", ("memory_per_agent", "astra"), None, 5 * 1024.0),
)  # fmt: skip


# ---- Entry point ----


def run(plan: Plan, systems: tuple[str, ...] = SYSTEMS, *, progress: bool = True) -> Report:
    """Run the chosen systems and return the report (nothing printed but progress)."""
    report = Report("agents", progress=sys.stderr if progress else None)
    report.section("ask and wait for the answer, p50", "ask_p50")
    report.section("ask and wait for the answer, p99", "ask_p99")
    report.section("asks issued without waiting, then all awaited", "ask_async_20k")
    report.section("one-way messages to one agent, then one ask", "tell_rate")
    report.section("spawning agents", "spawn_10k")
    report.section("spawning agents, total time", "spawn_10k_s")
    report.section("memory per agent", "memory_per_agent")
    benches: dict[str, Callable[[Report, Plan], None]] = {
        "astra": _bench_astra, "pipe": _bench_pipe, "ray": _bench_ray,
    }  # fmt: skip
    for system in SYSTEMS:
        if system in systems:
            benches[system](report, plan)
    return report


def _parse(argv: list[str] | None) -> argparse.Namespace:
    return parse_options(
        argv, prog="python -m perf.bench_agents", description=__doc__, choices=SYSTEMS,
        dest="systems", quick_help="fewer rounds, Ray calls, actors",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command line entry: run, then print the tables, the targets and the JSON lines."""
    args = _parse(argv)
    return run_and_report(
        args,
        lambda progress: run(QUICK if args.quick else FULL, args.systems, progress=progress),
        title="Astra agent benchmark",
        facts=lambda: (
            f"{os.cpu_count()} CPUs, {WORKERS} workers, Python {platform.python_version()}"
        ),
        interrupted="kernels, servers and Ray shut down",
        targets=_TARGETS,
    )


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
