"""What every benchmark in ``perf/`` shares: figures, the report table, JSON lines, statistics,
and forked children that are always reaped.

A benchmark adds one ``Figure`` per measured number to a ``Report`` (or a skipped figure when a
peer is not installed), then calls ``Report.emit()``, which prints, on stdout:

1. a table per *section* (a group of workloads whose figures are comparable: same unit, same
   thing measured), one row per system, with one ratio column ``astra/peer`` for each Astra
   figure of the section marked ``compare=True``;
2. one JSON line per figure, ``{"bench": ..., "workload": ..., "system": ..., "value": ...,
   "unit": ...}`` plus ``"config"`` when the figure names a configuration and ``"skipped"``
   (with ``"value": null``) when it was not measured.

``--json-only`` runs print only (2). Progress lines go to stderr so they never mix with either.

Children are forked through ``Children`` (multiprocessing's ``fork`` context): each child gets
a control pipe for readiness and results, ignores SIGINT (a Ctrl-C is the parent's to handle),
and reports its own exception through the pipe, where the parent re-raises it as
``ChildFailedError`` with the child's traceback. Leaving the ``with Children()`` block joins
every child, and terminates then kills any that do not exit in time, also on error.

Units decide the direction of goodness: time units (``ns``, ``us``, ``ms``, ``s``) are lower
is better, and of memory (``bytes``, ``MiB``); everything else (``msgs/s``, ``MB/s``,
``tasks/s``) higher is better.
"""

from __future__ import annotations

__all__ = [
    "Child",
    "ChildFailedError",
    "Children",
    "Figure",
    "Report",
    "Target",
    "format_targets",
    "interrupt_on_sigterm",
    "latency_us",
    "lower_is_better",
    "median",
    "parse_options",
    "percentile",
    "pinned",
    "rate",
    "run_and_report",
    "two_cpus",
]

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING, Final, NamedTuple, TextIO

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

#: Units whose smaller values are better: times, and memory (a cost, like time).
TIME_UNITS: Final = frozenset({"ns", "us", "ms", "s"})
COST_UNITS: Final = TIME_UNITS | {"bytes", "KiB", "MiB"}
#: Prefix of the system names that are Astra (the left side of every ratio).
ASTRA_PREFIX: Final = "astra"
#: How long a child gets to exit by itself before it is terminated, then killed.
JOIN_TIMEOUT_S: Final = 10.0
#: How long children get to exit when the parent leaves on an error (they may be blocked).
_ERROR_GRACE_S: Final = 0.5
#: Slice of a parent's wait on a child's control pipe between liveness checks.
_POLL_SLICE_S: Final = 0.2


# ---- Statistics ----


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence (the mean of the middle two for even lengths)."""
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by the nearest-rank method: an observed value, never an
    interpolation, so a p99 of 100 samples is the 99th smallest."""
    assert values, "no samples"
    assert 0 <= q <= 100, q
    s = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(s)))
    return s[rank - 1]


def rate(n: int, reps: int, run_once: Callable[[], object]) -> float:
    """``n`` operations per second: the median of ``reps`` timed ``run_once()`` (each doing
    ``n``) after one untimed warm-up (it ships functions, faults in rings and pages)."""
    run_once()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - t0)
    return n / median(times)


def latency_us(rounds: int, warmup: int, call_once: Callable[[], object]) -> tuple[float, float]:
    """(p50, p99) in microseconds of ``rounds`` timed ``call_once()`` after ``warmup``."""
    for _ in range(warmup):
        call_once()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        call_once()
        samples.append((time.perf_counter() - t0) * 1e6)
    return percentile(samples, 50), percentile(samples, 99)


def lower_is_better(unit: str) -> bool:
    """Whether smaller figures in ``unit`` are better (time and memory units)."""
    return unit in COST_UNITS


# ---- Figures and the report ----


@dataclasses.dataclass(frozen=True, slots=True)
class Figure:
    """One measured number (or a skipped measurement) of one system on one workload."""

    bench: str  # the benchmark module, e.g. "ipc"
    workload: str  # what was measured, e.g. "64B_batched"; a JSON key, no spaces
    system: str  # who was measured, e.g. "astra", "mp_pipe"; "astra*" are Astra
    value: float | None  # None when skipped
    unit: str  # "msgs/s", "MB/s", "us", "ms", ...
    label: str = ""  # the table's row label; the system name if empty
    config: str = ""  # the configuration measured, printed with the figure
    skipped: str = ""  # why it was not measured, e.g. "not installed"
    compare: bool = True  # for Astra figures: whether peers get a ratio column against it

    @property
    def is_astra(self) -> bool:
        return self.system.startswith(ASTRA_PREFIX)

    def as_json(self) -> str:
        record: dict[str, object] = {
            "bench": self.bench,
            "workload": self.workload,
            "system": self.system,
            "value": None if self.value is None else round(self.value, 3),
            "unit": self.unit,
        }
        if self.config:
            record["config"] = self.config
        if self.skipped:
            record["skipped"] = self.skipped
        return json.dumps(record)


@dataclasses.dataclass(slots=True)
class _Section:
    title: str
    workloads: tuple[str, ...]


class Report:
    """The figures of one benchmark run, printed as a table and as JSON lines.

    ``section()`` declares which workloads share a table (their figures are comparable);
    a workload never declared gets a section of its own, titled by its name.
    """

    def __init__(self, bench: str, *, progress: TextIO | None = sys.stderr) -> None:
        self.bench = bench
        self.figures: list[Figure] = []
        self._sections: list[_Section] = []
        self._progress = progress

    def section(self, title: str, *workloads: str) -> None:
        """Print ``workloads`` in one table titled ``title``, in the order declared."""
        self._sections.append(_Section(title, workloads))

    def add(
        self,
        workload: str,
        system: str,
        value: float,
        unit: str,
        *,
        label: str = "",
        config: str = "",
        compare: bool = True,
    ) -> Figure:
        """Record a measured figure and print a progress line."""
        fig = Figure(self.bench, workload, system, value, unit, label, config, "", compare)
        self.figures.append(fig)
        self._log(f"{workload:>18}  {label or system:<40} {_fmt(value):>12} {unit}")
        return fig

    def skip(self, workload: str, system: str, unit: str, reason: str, *, label: str = "") -> None:
        """Record a figure that was not measured, and why (e.g. ``"not installed"``)."""
        self.figures.append(Figure(self.bench, workload, system, None, unit, label, "", reason))
        self._log(f"{workload:>18}  {label or system:<40} skipped ({reason})")

    def find(self, workload: str, system: str) -> Figure | None:
        """The recorded figure of ``system`` on ``workload`` (perhaps skipped), or None."""
        for fig in self.figures:
            if fig.workload == workload and fig.system == system:
                return fig
        return None

    def _log(self, line: str) -> None:
        if self._progress is not None:
            print(line, file=self._progress, flush=True)

    # -- output --

    def emit(self, *, json_only: bool = False, footer: str = "", out: TextIO = sys.stdout) -> None:
        """Print the tables and ``footer`` (unless ``json_only``), then one JSON line per
        figure."""
        if not json_only:
            out.write(self.format_tables())
            out.write("\n" + footer + "\n" if footer else "\n")
        for fig in self.figures:
            out.write(fig.as_json() + "\n")
        out.flush()

    def format_tables(self) -> str:
        """Every section's table, in declaration order, then the undeclared workloads."""
        return "\n".join(_format_section(s, self.figures) for s in self._all_sections())

    def _all_sections(self) -> list[_Section]:
        declared = {w for s in self._sections for w in s.workloads}
        extra: list[_Section] = []
        for fig in self.figures:
            if fig.workload not in declared:
                declared.add(fig.workload)
                extra.append(_Section(fig.workload, (fig.workload,)))
        return [s for s in self._sections if _rows(s, self.figures)] + extra


def _rows(section: _Section, figures: Sequence[Figure]) -> list[Figure]:
    order = {w: i for i, w in enumerate(section.workloads)}
    rows = [f for f in figures if f.workload in order]
    return sorted(rows, key=lambda f: order[f.workload])  # stable: insertion order within


def _format_section(section: _Section, figures: Sequence[Figure]) -> str:
    """One table: a row per figure, a ratio column per comparable Astra figure."""
    rows = _rows(section, figures)
    unit = rows[0].unit
    assert all(f.unit == unit for f in rows), f"section {section.title!r} mixes units"
    refs = [f for f in rows if f.is_astra and f.compare and f.value is not None]
    ref_number = {id(f): i + 1 for i, f in enumerate(refs)}  # by identity: figures may be equal
    better = "lower" if lower_is_better(unit) else "higher"
    lines = [f"== {section.title} ({unit}, {better} is better) =="]
    labels = [f.label or f.system for f in rows]
    width = max(len(x) for x in [*labels, "system"]) + 2
    head = f"{'system':<{width}}{'value':>14}"
    for i, _ in enumerate(refs):
        head += f"{f'astra[{i + 1}]/peer':>16}"
    lines.append(head)
    for fig, label in zip(rows, labels, strict=True):
        if fig.value is None:
            lines.append(f"{label:<{width}}{'skipped (' + fig.skipped + ')':>14}")
            continue
        mark = f"[{ref_number[id(fig)]}] " if id(fig) in ref_number else ""
        line = f"{label:<{width}}{mark + _fmt(fig.value):>14}"
        if not fig.is_astra:
            line += "".join(f"{_fmt_ratio(ref.value, fig.value):>16}" for ref in refs)
        lines.append(line)
    lines += [
        f"    [{i + 1}] {r.config}"
        for i, r in enumerate(refs)
        if r.config and r.config not in (r.label or r.system)
    ]
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _fmt_ratio(astra: float | None, peer: float) -> str:
    if astra is None or peer == 0:
        return "-"
    ratio = astra / peer
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


# ---- CPU placement ----


def two_cpus() -> tuple[int, int] | None:
    """Two CPUs this process may run on (the first two allowed), or None on a 1-CPU box."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run the block on ``cpu`` only (no-op for None), restoring the affinity afterwards.
    A child forked inside inherits the pin until it sets its own."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# ---- Forked children ----


class ChildFailedError(RuntimeError):
    """Raised by ``Child.recv`` when the child raised (its traceback is the message) or exited
    without answering."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Failure:
    traceback: str


class Child:
    """A forked child and the parent's end of its control pipe."""

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn

    @property
    def pid(self) -> int:
        pid = self.process.pid
        assert pid is not None
        return pid

    def send(self, obj: object) -> None:
        """Send a control message (pickled; never on a timed path) to the child."""
        self.conn.send(obj)

    def recv(self, timeout_s: float = 60.0) -> object:
        """The child's next control message. Raises ``ChildFailedError`` if the child raised
        or died first, ``TimeoutError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(_POLL_SLICE_S):
            if not self.process.is_alive() and not self.conn.poll(0):
                raise ChildFailedError(f"child {self.pid} exited ({self.process.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"child {self.pid} sent nothing for {timeout_s} s")
        msg = self.conn.recv()
        if isinstance(msg, _Failure):
            raise ChildFailedError(f"child {self.pid} raised:\n{msg.traceback}")
        return msg


def _child_main(target: Callable[..., None], conn: Connection, args: tuple[object, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: parent's job
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # terminate() means now, whatever the parent set
    try:
        target(conn, *args)
    except BaseException:
        conn.send(_Failure(traceback.format_exc()))
        sys.exit(1)
    finally:
        conn.close()


class Children:
    """The forked children of a benchmark; ``with Children() as kids:`` reaps them all."""

    def __init__(self, join_timeout_s: float = JOIN_TIMEOUT_S) -> None:
        self._ctx = multiprocessing.get_context("fork")
        self._join_timeout_s = join_timeout_s
        self._children: list[Child] = []

    def start(self, target: Callable[..., None], *args: object) -> Child:
        """Fork a child running ``target(conn, *args)``, ``conn`` being its end of the control
        pipe. Whatever the parent holds now (rings, queues, arrays) the child inherits."""
        parent_end, child_end = self._ctx.Pipe()
        process = self._ctx.Process(target=_child_main, args=(target, child_end, args), daemon=True)
        process.start()
        child_end.close()  # the parent's copy; the child's EOF shows on our end if it dies
        child = Child(process, parent_end)
        self._children.append(child)
        return child

    def __enter__(self) -> Children:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # On error a child may wait forever for a message that will not come: no grace.
        self.reap(self._join_timeout_s if exc_type is None else _ERROR_GRACE_S)

    def reap(self, timeout_s: float) -> None:
        """Join every child; terminate, then kill, those still running after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for child in self._children:
            child.process.join(max(0.0, deadline - time.monotonic()))
        for child in self._children:
            if child.process.is_alive():
                child.process.terminate()
                child.process.join(1.0)
            if child.process.is_alive():
                child.process.kill()
                child.process.join()
            child.conn.close()
        self._children.clear()


# ---- Targets: what an issue asks this machine to show ----


class Target(NamedTuple):
    """One bound from an issue: the Astra figure over the peer's (or the figure itself when
    ``peer`` is None) must be >= ``bound``, or <= for time units."""

    text: str
    astra: tuple[str, str]  # (workload, system)
    peer: tuple[str, str] | None
    bound: float


# ---- The command line every benchmark shares ----


def parse_options(
    argv: list[str] | None,
    *,
    prog: str,
    description: str | None,
    choices: Sequence[str],
    dest: str = "systems",
    quick_help: str = "fewer rounds",
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """``--quick``, ``--json-only`` and ``--only a,b`` (checked against ``choices``, kept
    as a tuple in ``dest``), plus whatever ``extra`` adds."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json-only", action="store_true", help="print only the JSON lines")
    parser.add_argument("--only", default=",".join(choices), help=f"comma-separated of {choices}")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    chosen = tuple(c for c in args.only.split(",") if c)
    if unknown := set(chosen) - set(choices):
        parser.error(f"unknown {dest} {sorted(unknown)}; choose from {tuple(choices)}")
    setattr(args, dest, chosen)
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C (``KeyboardInterrupt``), so every ``finally`` runs:
    children reaped, pools and clusters shut down, shared memory removed. A forked peer
    worker must put back SIG_DFL (its pool's ``terminate()`` relies on it)."""
    signal.signal(signal.SIGTERM, _interrupt)


def run_and_report(
    args: argparse.Namespace,
    run: Callable[[bool], Report],
    *,
    title: str,
    facts: Callable[[], str],
    interrupted: str,
    targets: Sequence[Target],
    notes: Callable[[], str] | None = None,
) -> int:
    """Every benchmark's ``main`` after parsing: SIGTERM unwinds like Ctrl-C, ``run(progress)``
    measures, then (unless ``--json-only``) a header line ``title (mode): facts(), N s``, the
    tables, the targets and ``notes()``, then the JSON lines. Returns the exit code (130 when
    interrupted, after saying what was cleaned up: ``interrupted``)."""
    interrupt_on_sigterm()
    started = time.perf_counter()
    try:
        report = run(not args.json_only)
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    if not args.json_only:
        mode = "quick" if args.quick else "full"
        print(f"{title} ({mode}): {facts()}, {time.perf_counter() - started:.1f} s\n")
    footer = format_targets(report, targets) + (notes() if notes is not None else "")
    report.emit(json_only=args.json_only, footer=footer)
    return 0


def format_targets(report: Report, targets: Sequence[Target]) -> str:
    """One line per target: the figure, met or not (n/a when a figure is missing)."""
    lines = ["== targets =="]
    for t in targets:
        fig = report.find(*t.astra)
        peer = report.find(*t.peer) if t.peer else None
        if fig is None or fig.value is None or (t.peer and (peer is None or not peer.value)):
            lines.append(f"  n/a      {t.text}")
            continue
        got = fig.value / peer.value if peer and peer.value else fig.value
        met = got <= t.bound if lower_is_better(fig.unit) else got >= t.bound
        shown = f"{got:.2f}x" if t.peer else f"{got:.3f} {fig.unit}"
        lines.append(f"  {'met    ' if met else 'NOT met'}  {t.text}: {shown}")
    return "\n".join(lines) + "\n"
