"""Metrics: counters, gauges and histograms in shared memory, one row per process, rendered
in the Prometheus text format.

    astra-w00 --inc/observe--> row 0 \\
    astra-w01 --inc/observe--> row 1  +--> table (segment "metrics") --> collect() --> render()
    astrad    --inc/set-----> row N  /                                  astra metrics,
                                                                        GET /metrics

Why shared memory: an update on the hot path (a task finished) must cost well under a
microsecond and no message; a scrape (``astra metrics``, an HTTP ``/metrics``, ``astra top``)
reads every row without asking anyone.

Correctness: each row has exactly one writer (the process the row was given to), so an
update is a plain read-modify-write of its own cells; every cell is an aligned float64
(8 bytes: a store does not tear, NOTES.md). A reader may see a row mid-update of *several*
cells (a histogram's bucket before its count): scrapes are monotonic per cell, not atomic
across cells, which is what Prometheus assumes of any exporter. A row outlives its process
(counters of a restarted worker's predecessor keep counting in its row), so totals never
go backwards across restarts.

Layout: ``rows x columns`` float64, row-major; a metric takes one column (counter, gauge)
or ``len(buckets) + 2`` (histogram: cumulative-later bucket counts, ``+Inf`` folded into
the count, sum, count). The spec list is agreed in code by every process, not stored.
"""

from __future__ import annotations

__all__ = [
    "Histogram",
    "MetricSpec",
    "MetricsRow",
    "MetricsServer",
    "MetricsTable",
    "parse_addr",
    "render_prometheus",
]

import bisect
import contextlib
import dataclasses
import http.server
import math
import os
import signal
import socket
import stat
import time
from typing import TYPE_CHECKING, Final, Literal

import numpy as np

from .proc import after_fork_in_child

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    import numpy.typing as npt

    from ipc import Instance, Segment

Kind = Literal["counter", "gauge", "histogram"]

#: Default latency buckets in seconds: 50 us to 10 s.
LATENCY_BUCKETS_S: Final = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric family. ``name`` follows Prometheus rules (``astra_tasks_finished_total``)."""

    name: str
    kind: Kind
    help: str
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").isalnum() or self.name[0].isdigit():
            raise ValueError(f"bad metric name {self.name!r}")
        if self.kind == "histogram" and list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"{self.name}: buckets must be strictly increasing")
        if self.kind != "histogram" and self.buckets:
            raise ValueError(f"{self.name}: only histograms have buckets")

    @property
    def width(self) -> int:
        """Columns taken: 1, or buckets + sum + count for a histogram."""
        return len(self.buckets) + 2 if self.kind == "histogram" else 1


@dataclasses.dataclass(frozen=True, slots=True)
class Histogram:
    """A collected histogram: per-bucket counts (not cumulative), sum and count."""

    buckets: tuple[float, ...]
    counts: tuple[float, ...]
    sum: float
    count: float


class MetricsTable:
    """The shared table. Made by the supervisor (``create``), attached by each process."""

    def __init__(self, segment: Segment, specs: Sequence[MetricSpec], rows: int) -> None:
        self.specs = tuple(specs)
        self.rows = rows
        self._segment = segment
        self._columns: dict[str, int] = {}
        col = 0
        for spec in self.specs:
            if spec.name in self._columns:
                raise ValueError(f"metric {spec.name} declared twice")
            self._columns[spec.name] = col
            col += spec.width
        self.width = col
        if segment.size < rows * col * 8:
            raise ValueError(f"segment {segment.name} is too small for {rows}x{col} cells")
        self._cells: npt.NDArray[np.float64] = np.ndarray(
            (rows, col), dtype=np.float64, buffer=segment.buf
        )

    @classmethod
    def create(
        cls, instance: Instance, specs: Sequence[MetricSpec], rows: int, name: str = "metrics"
    ) -> MetricsTable:
        """Create the segment (zeroed) for ``rows`` processes."""
        width = sum(s.width for s in specs)
        segment = instance.create_segment(name, max(8, rows * width * 8))
        try:
            return cls(segment, specs, rows)
        except BaseException:
            segment.close()
            segment.unlink()
            raise

    @classmethod
    def attach(
        cls, instance: Instance, specs: Sequence[MetricSpec], rows: int, name: str = "metrics"
    ) -> MetricsTable:
        """Map the table created by the supervisor, with the same specs and rows."""
        return cls(instance.open_segment(name), specs, rows)

    def row(self, index: int) -> MetricsRow:
        """The writing handle of row ``index``: give each process its own, and only one."""
        if not 0 <= index < self.rows:
            raise IndexError(f"row {index} of {self.rows}")
        return MetricsRow(self, self._cells[index])

    def column(self, name: str) -> int:
        return self._columns[name]

    def collect(self, rows: Iterable[int] | None = None) -> dict[str, float | Histogram]:
        """Sum the chosen rows (all by default): a value per counter and gauge, a
        ``Histogram`` per histogram."""
        cells = self._cells if rows is None else self._cells[list(rows)]
        totals = cells.sum(axis=0) if len(cells) else np.zeros(self.width)
        out: dict[str, float | Histogram] = {}
        for spec in self.specs:
            col = self._columns[spec.name]
            if spec.kind == "histogram":
                n = len(spec.buckets)
                out[spec.name] = Histogram(
                    spec.buckets,
                    tuple(float(v) for v in totals[col : col + n]),
                    float(totals[col + n]),
                    float(totals[col + n + 1]),
                )
            else:
                out[spec.name] = float(totals[col])
        return out

    def per_row(self, name: str) -> list[float]:
        """The value of counter or gauge ``name`` in every row (for per-worker views)."""
        return [float(v) for v in self._cells[:, self._columns[name]]]

    def close(self) -> None:
        """Unmap (the instance's owner removes the segment)."""
        del self._cells
        self._segment.close()


class MetricsRow:
    """One process's row. Updates are single-writer: never share a row between processes
    (or between threads without a lock of your own)."""

    __slots__ = ("_bounds", "_cells", "_columns")

    def __init__(self, table: MetricsTable, cells: npt.NDArray[np.float64]) -> None:
        self._cells = cells
        self._columns = table._columns
        self._bounds = {s.name: s.buckets for s in table.specs if s.kind == "histogram"}

    def inc(self, name: str, amount: float = 1.0) -> None:
        """Add to a counter (or a gauge)."""
        self._cells[self._columns[name]] += amount

    def set(self, name: str, value: float) -> None:
        """Set a gauge."""
        self._cells[self._columns[name]] = value

    def observe(self, name: str, value: float) -> None:
        """Count ``value`` into histogram ``name``."""
        col = self._columns[name]
        bounds = self._bounds[name]
        i = bisect.bisect_left(bounds, value)  # bucket i holds values <= bounds[i]
        cells = self._cells
        if i < len(bounds):
            cells[col + i] += 1
        n = len(bounds)
        cells[col + n] += value
        cells[col + n + 1] += 1


def render_prometheus(
    specs: Sequence[MetricSpec],
    values: Mapping[str, float | Histogram | Mapping[tuple[tuple[str, str], ...], float]],
) -> str:
    """The Prometheus text exposition format (version 0.0.4) of ``values``.

    A value may be a float, a ``Histogram``, or (for per-worker gauges) a mapping from label
    pairs, e.g. ``((("worker", "w03"),), 12.5)``, to floats.
    """
    lines: list[str] = []
    for spec in specs:
        if spec.name not in values:
            continue
        value = values[spec.name]
        lines.append(f"# HELP {spec.name} {_escape_help(spec.help)}")
        lines.append(f"# TYPE {spec.name} {spec.kind}")
        if isinstance(value, Histogram):
            cumulative = 0.0
            for bound, count in zip(value.buckets, value.counts, strict=True):
                cumulative += count
                lines.append(f'{spec.name}_bucket{{le="{_num(bound)}"}} {_num(cumulative)}')
            lines.append(f'{spec.name}_bucket{{le="+Inf"}} {_num(value.count)}')
            lines.append(f"{spec.name}_sum {_num(value.sum)}")
            lines.append(f"{spec.name}_count {_num(value.count)}")
        elif isinstance(value, int | float):
            lines.append(f"{spec.name} {_num(value)}")
        else:
            for labels, v in value.items():
                text = ",".join(f'{k}="{_escape_label(lv)}"' for k, lv in labels)
                lines.append(f"{spec.name}{{{text}}} {_num(v)}")
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# ---- Serving /metrics for scrapers ----


def parse_addr(addr: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"`` -> (host, port).

    Raises:
        ValueError: not ``HOST:PORT`` with a port in 0-65535.
    """
    host, sep, port_text = addr.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"metrics address must be HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port_text)


def _other_sockets(keep: int) -> list[int]:
    """This process's socket fds but ``keep``: an exporter forked by the supervisor drops
    the supervisor's (plugin service links, notify sockets); it reads shared memory only."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd != keep and fd > 2 and stat.S_ISSOCK(os.fstat(fd).st_mode):
                fds.append(fd)
        except OSError:
            continue  # the listing's own fd, already closed
    return fds


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves ``GET /metrics`` (the text of ``render()``) from a forked exporter process,
    ``astra-metrics``.

    Why a process: the supervisor forks replacement workers for as long as it runs, and a
    thread of its own serving HTTP could hold a lock (logging's, the allocator's, one of
    ``http.server``'s) at the moment of a fork, leaving the child with it held for ever. The
    exporter is forked once, serves from its own threads and never forks; ``render`` reads
    shared memory and ``/proc`` (nothing the supervisor must answer), so it works the same
    in the exporter. The socket is bound here first, so a bad or busy address raises in the
    caller. The exporter dies with the thread that made it (``PR_SET_PDEATHSIG``);
    ``close()`` stops and reaps it.

    Raises:
        OSError: the address cannot be bound (in use, not local).
    """

    def __init__(self, addr: str, render: Callable[[], str]) -> None:
        host, port = parse_addr(addr)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = render().encode()
                except Exception as exc:  # a failed collection is the scraper's 500
                    self.send_error(500, f"collecting metrics failed: {exc!r}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # one line per scrape would drown the event log

        server_cls = _V6Server if ":" in host else http.server.ThreadingHTTPServer
        server = server_cls((host, port), Handler)
        server.daemon_threads = True
        #: The bound (host, port): port 0 in the address picks a free one.
        self.address = server.server_address[:2]
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the exporter
            code = 0
            try:
                after_fork_in_child(
                    "astra-metrics",
                    parent_pid=parent,
                    death_signal=signal.SIGTERM,
                    close_fds=_other_sockets(server.fileno()),
                )
                server.serve_forever()
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        server.server_close()  # ours is a copy: the exporter serves
        self.pid = pid

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the exporter and reap it (SIGTERM, then SIGKILL after ``timeout_s``)."""
        if self.pid <= 0:
            return
        pid, self.pid = self.pid, 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.005)
