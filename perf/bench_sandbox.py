"""A trivial sandboxed Python call, Astra cold and warm, beside a plain subprocess and beside
bubblewrap and nsjail where their binaries are installed, in one run on one machine.

Run ``python -m perf.bench_sandbox`` (about a minute), ``--quick`` (under 15 s),
``--json-only`` (JSON lines only).

Workloads (each system runs "nothing" in Python, so the figure is the sandbox's own cost):

- ``call_p50``, ``call_p99`` (ms): one call at a time, from the caller's request to its
  result in hand.

  - ``astra_warm``: ``WarmPool.call(noop)`` on a pool of 2 that has settled
    (``wait_ready()`` between calls, not timed): a call pays for handing over the call,
    the child's run and its reply, up to the value in the caller's hand. The pool forks
    the replacement and reaps the finished child after the call returns, before the next
    timed one: that cost shows in ``calls_per_s``, where the next call starts at once.
  - ``astra_cold``: ``Runner.call(noop)``: fork, the whole lockdown (namespaces, rlimits,
    Landlock, loading the precompiled seccomp filter), run, reap.
  - ``subprocess``: ``subprocess.run([sys.executable, "-c", "pass"])``: no sandbox at all,
    the floor of any design that starts an interpreter per call.
  - ``bwrap``: ``bwrap --unshare-all --die-with-parent`` over a read-only / running the same
    ``python -c pass``; ``nsjail`` likewise (``-Mo``). Skipped when not installed; nothing
    is installed by this script.

- ``calls_per_s`` (calls/s): back-to-back calls, the next started as soon as the last
  returned: what one caller thread can push through. A warm pool's steady state is bound
  by how fast it can fork and lock down replacements.

Method: medians and nearest-rank p99 over every timed call after ``WARMUP`` untimed ones;
``time.perf_counter()``; the Astra figures and their peers interleave by system, not by
call, in one process. Every pool is closed and every child reaped (the runner reaps its own
children; subprocess peers are waited for).
"""

from __future__ import annotations

__all__ = ["FULL", "QUICK", "Plan", "main", "run"]

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Final

from sandbox import Policy, Runner, WarmPool
from sandbox.landlock import abi_version

from ._harness import Report, Target, median, percentile, run_and_report

if TYPE_CHECKING:
    from collections.abc import Callable

_SUMMARY: Final = "A trivial sandboxed Python call: Astra cold and warm beside their peers."
#: Untimed calls before timing starts (caches, page tables, the filter compile).
WARMUP: Final = 5
#: Children in the benchmark's warm pool.
POOL_SIZE: Final = 2
#: Every workload and its unit.
_WORKLOAD_UNITS: Final = (("call_p50", "ms"), ("call_p99", "ms"), ("calls_per_s", "calls/s"))


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """How many calls each system makes."""

    warm_calls: int  # astra_warm, one at a time
    cold_calls: int  # astra_cold, one at a time
    process_calls: int  # subprocess, bwrap, nsjail
    burst_calls: int  # back-to-back, per system


QUICK: Final = Plan(warm_calls=300, cold_calls=150, process_calls=25, burst_calls=150)
FULL: Final = Plan(warm_calls=2_000, cold_calls=1_000, process_calls=200, burst_calls=1_000)


def noop() -> None:
    """The sandboxed call: nothing, so the figure is the sandbox's cost."""


# ---- Timing ----


def _time_calls(
    call: Callable[[], object], n: int, before: Callable[[], object] | None = None
) -> list[float]:
    """Milliseconds of ``n`` calls of ``call`` (after ``WARMUP`` untimed ones); ``before``
    runs untimed ahead of each."""
    samples = []
    for i in range(WARMUP + n):
        if before is not None:
            before()
        start = time.perf_counter()
        call()
        if i >= WARMUP:
            samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _rate(call: Callable[[], object], n: int) -> float:
    """Calls per second of ``n`` back-to-back calls."""
    for _ in range(WARMUP):
        call()
    start = time.perf_counter()
    for _ in range(n):
        call()
    return n / (time.perf_counter() - start)


def _add_latency(report: Report, system: str, samples: list[float], label: str) -> None:
    report.add("call_p50", system, median(samples), "ms", label=label)
    report.add("call_p99", system, percentile(samples, 99), "ms", label=label)


# ---- Systems ----


def _bench_astra(report: Report, plan: Plan) -> None:
    policy = Policy(wall_s=30.0)
    with WarmPool(policy, size=POOL_SIZE) as pool:
        pool.wait_ready()
        samples = _time_calls(lambda: pool.call(noop), plan.warm_calls, before=pool.wait_ready)
        _add_latency(report, "astra_warm", samples, f"astra warm pool (size {POOL_SIZE})")
        rate = _rate(lambda: pool.call(noop), plan.burst_calls)
        report.add("calls_per_s", "astra_warm", rate, "calls/s", label="astra warm pool")
    runner = Runner(policy)
    samples = _time_calls(lambda: runner.call(noop), plan.cold_calls)
    _add_latency(report, "astra_cold", samples, "astra cold (fork + lockdown per call)")
    rate = _rate(lambda: runner.call(noop), plan.burst_calls)
    report.add("calls_per_s", "astra_cold", rate, "calls/s", label="astra cold")


def _peer_commands() -> dict[str, tuple[str, list[str] | None, str]]:
    """``{system: (label, argv or None if not installed, why skipped)}``."""
    python = [sys.executable, "-c", "pass"]
    bwrap, nsjail = shutil.which("bwrap"), shutil.which("nsjail")
    bwrap_argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"] if bwrap else []
    return {
        "subprocess": ("subprocess.run(python -c pass)", python, ""),
        "bwrap": (
            "bubblewrap --unshare-all",
            [*bwrap_argv, "--unshare-all", "--die-with-parent", *python] if bwrap else None,
            "bwrap not installed",
        ),
        "nsjail": (
            "nsjail -Mo",
            [nsjail, "-Mo", "-q", "--chroot", "/", "--", *python] if nsjail else None,
            "nsjail not installed",
        ),
    }


def _bench_peers(report: Report, plan: Plan) -> None:
    for system, (label, argv, why) in _peer_commands().items():
        if argv is None:
            for workload, unit in (
                ("call_p50", "ms"),
                ("call_p99", "ms"),
                ("calls_per_s", "calls/s"),
            ):
                report.skip(workload, system, unit, why, label=label)
            continue
        cmd = list(argv)

        def one(cmd: list[str] = cmd) -> None:
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        try:
            samples = _time_calls(one, plan.process_calls)
        except subprocess.CalledProcessError as exc:  # e.g. bwrap without user namespaces
            for workload, unit in (
                ("call_p50", "ms"),
                ("call_p99", "ms"),
                ("calls_per_s", "calls/s"),
            ):
                report.skip(workload, system, unit, f"failed: exit {exc.returncode}", label=label)
            continue
        _add_latency(report, system, samples, label)
        report.add("calls_per_s", system, _rate(one, plan.process_calls), "calls/s", label=label)


# ---- Targets ----

#: The issue's targets on the 2-core machine.
_TARGETS: Final = (
    Target("warm-pool call p50 under 2 ms", ("call_p50", "astra_warm"), None, 2.0),
    Target("cold call p50 under 15 ms", ("call_p50", "astra_cold"), None, 15.0),
)


# ---- Entry point ----


def run(plan: Plan, *, progress: bool = True) -> Report:
    """Run every system and return the report (nothing printed but progress)."""
    report = Report("sandbox", progress=sys.stderr if progress else None)
    report.section("trivial sandboxed Python call, p50", "call_p50")
    report.section("trivial sandboxed Python call, p99", "call_p99")
    report.section("back-to-back trivial calls, one caller", "calls_per_s")
    _bench_astra(report, plan)
    _bench_peers(report, plan)
    return report


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_sandbox", description=_SUMMARY)
    parser.add_argument("--quick", action="store_true", help="fewer calls: under ~15 s")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command line entry: run, then print the tables, the targets and the JSON lines."""
    args = _parse(argv)
    return run_and_report(
        args,
        lambda progress: run(QUICK if args.quick else FULL, progress=progress),
        title="Astra sandbox benchmark",
        facts=lambda: (
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, Linux "
            f"{platform.release()}, Landlock ABI {abi_version()}, uid {os.geteuid()}"
        ),
        interrupted="pools closed, children reaped",
        targets=_TARGETS,
    )


if __name__ == "__main__":
    sys.exit(main())
