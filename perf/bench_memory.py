"""Astra's agent memory (the memory plugin, ``astra.memory``, on ``kernel.memory.MemoryStore``)
beside sqlite3, Redis and plain numpy, in one run on one machine.

Run ``python -m perf.bench_memory`` (about 10 s on the 2-core development machine),
``--quick`` (about 5 s: fewer rounds, the same 100k vectors), ``--json-only`` (JSON lines
only), ``--only get,put,search`` (a subset of the workload groups).

Peers: sqlite3 from the standard library (a file in WAL mode, table ``kv(k TEXT PRIMARY KEY,
v BLOB) WITHOUT ROWID``, the same SQL text on one cursor every time, so the module's
statement cache keeps it prepared); Redis (Debian's ``redis-server`` on loopback through
redis-py) when both are installed, else reported as skipped with the reason; numpy for
vector search, which sqlite3 does not have.

Workloads:

- ``get_p50``, ``get_p99`` (us): one read of a random key among ``KEYS`` small values
  (a ~100-byte msgpack dict), decoded. Astra three ways: ``astra_agent``, an agent's
  ``self.memory.get(key)`` inside an embedded kernel's worker (timed in the agent: the
  plugin's direct read of the worker's own map, no message); ``astra``, the storage
  engine's ``Namespace.get`` in this process (the floor under the agent's figure);
  ``astra_client``, ``k.memory(ns).get(key)`` from a client (a service call: a task round
  trip to a worker, ``client_gets`` of them). sqlite ``SELECT v FROM kv WHERE k = ?`` plus
  the same msgspec decode, in process; Redis ``GET`` over loopback plus the decode (a round
  trip).
- ``put_durable`` (puts/s): one put per commit, each fsynced before it returns: Astra
  ``sync=True``; sqlite ``synchronous=FULL`` (the like-for-like setting); Redis
  ``appendfsync always``.
- ``put_relaxed`` (puts/s): one put per commit, not fsynced (a machine crash may lose the
  last ones; a process crash loses nothing): Astra ``sync=False``; sqlite
  ``synchronous=NORMAL``; Redis without persistence.
- ``load`` (vectors/s): ``VECTORS`` vectors of dimension ``DIM`` into an index, by
  ``add_many`` in transactions of ``LOAD_BATCH``.
- ``search_100k`` (ms per query): top-10 cosine over the ``VECTORS`` vectors. Astra
  ``Namespace.search`` with its matrix cached in process; the baseline a user writes without
  a store: numpy over a Python list of arrays (``np.stack``, row norms and a matrix-vector
  product per query); and the floor: one numpy product over a prebuilt normalized matrix
  (no storage, no bookkeeping). The results of Astra and the floor are checked equal.
- ``search_cold`` (ms): the first search after opening the store (the matrix copied out of
  LMDB; the OS page cache is warm). ``search_after_add`` (ms): a search right after one
  ``add`` (the version moved: one chunk re-read), the median of ``ADD_ROUNDS``.

Method: latencies are percentiles of every timed call after ``WARMUP`` untimed ones, timed
one by one with ``perf_counter_ns``; throughputs are counts over wall time. Every system
reads the same key sequence and writes the same values. Everything lives in one temporary
directory on the file system of ``tempfile.gettempdir()`` (its type is printed: fsync cost
depends on it), removed at the end, also on error or Ctrl-C; redis-server is terminated.
"""

from __future__ import annotations

__all__ = ["FULL", "QUICK", "Plan", "main", "run"]

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Final, cast

import lmdb
import msgspec
import numpy as np

import astra
from kernel.memory import MemoryStore

from ._harness import (
    Report,
    Target,
    median,
    parse_options,
    percentile,
    run_and_report,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator

    import numpy.typing as npt

    from kernel.memory import Namespace

#: Keys in the key/value store that ``get`` reads at random.
KEYS: Final = 10_000
#: Dimension of the vectors.
DIM: Final = 384
#: Vectors in the index that ``search_100k`` ranks.
VECTORS: Final = 100_000
#: Vectors per ``add_many`` transaction when loading.
LOAD_BATCH: Final = 10_000
#: Untimed calls before each latency series.
WARMUP: Final = 1_000
#: add-then-search rounds for ``search_after_add``.
ADD_ROUNDS: Final = 10
#: The workload groups ``--only`` accepts, in the order they run.
GROUPS: Final = ("get", "put", "search")
#: How long redis-server gets to answer PING after it starts.
REDIS_START_S: Final = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """How much work each measurement does."""

    gets: int  # timed gets per system
    client_gets: int  # timed gets from a client (each a service call: a round trip)
    durable_puts: int  # fsynced puts per system
    relaxed_puts: int  # puts per system without fsync
    queries: int  # timed searches for Astra and the floor
    list_queries: int  # timed searches for the list-of-arrays baseline (slow)
    cold_reps: int  # reopen-and-search rounds for ``search_cold``


FULL: Final = Plan(
    gets=200_000, client_gets=20_000, durable_puts=2_000, relaxed_puts=20_000, queries=100,
    list_queries=10, cold_reps=5,
)  # fmt: skip
QUICK: Final = Plan(
    gets=50_000, client_gets=5_000, durable_puts=500, relaxed_puts=5_000, queries=30,
    list_queries=4, cold_reps=2,
)  # fmt: skip


def _value(i: int) -> dict[str, object]:
    """The stored value: a small dict, ~100 bytes as msgpack."""
    return {"role": "note", "n": i, "text": f"observation {i:06d} " * 3, "tags": ["a", "b"]}


def _keys(n: int, seed: int = 0) -> list[str]:
    """A reproducible random sequence of ``n`` existing keys."""
    rng = np.random.default_rng(seed)
    return [f"key{i:06d}" for i in rng.integers(0, KEYS, n).tolist()]


def _latency_us(keys: list[str], get: Callable[[str], object]) -> tuple[float, float]:
    for key in keys[:WARMUP]:
        get(key)
    samples = []
    clock = time.perf_counter_ns
    for key in keys:
        t0 = clock()
        get(key)
        samples.append((clock() - t0) / 1e3)
    return percentile(samples, 50), percentile(samples, 99)


def _rate(n: int, put: Callable[[str, object], None]) -> float:
    values = [(f"key{i % KEYS:06d}", _value(i)) for i in range(n)]
    t0 = time.perf_counter()
    for key, value in values:
        put(key, value)
    return n / (time.perf_counter() - t0)


# ---- Key/value: Astra, sqlite3, Redis ----


class _Reader(astra.Agent):
    """The agent that times its own ``self.memory.get`` (its namespace is its name)."""

    def latency_us(self, keys: list[str]) -> tuple[float, float]:
        return _latency_us(keys, lambda key: self.memory.get(key))


def _bench_get_kernel(report: Report, plan: Plan, tmp: str) -> None:
    """In an agent and from a client, through the memory plugin of an embedded kernel."""
    keys = _keys(plan.gets + WARMUP)
    with astra.Kernel(workers=2, state_dir=os.path.join(tmp, "kernel")) as k:
        mem = k.memory("r1")
        with mem.batch() as b:
            for i in range(KEYS):
                b.put(f"key{i:06d}", _value(i))
        reader = k.spawn(_Reader, name="r1")
        p50, p99 = cast("tuple[float, float]", reader.ask("latency_us", keys).result(600))
        _add_get(report, "astra_agent", "astra self.memory.get (in an agent)", p50, p99)
        assert mem.get("key000007") == _value(7)
        p50, p99 = _latency_us(_keys(plan.client_gets + WARMUP, seed=1), mem.get)
        _add_get(report, "astra_client", "astra k.memory().get (client: service)", p50, p99)


def _bench_get(report: Report, plan: Plan, tmp: str) -> None:
    _bench_get_kernel(report, plan, tmp)
    keys = _keys(plan.gets + WARMUP)
    with MemoryStore(os.path.join(tmp, "astra-kv"), sync=False) as store:
        ns = store.namespace("r1")
        with ns.batch() as b:
            for i in range(KEYS):
                b.put(f"key{i:06d}", _value(i))
        assert ns.get("key000007") == _value(7)
        p50, p99 = _latency_us(keys, ns.get)
    _add_get(report, "astra", "astra Namespace.get (engine, in process)", p50, p99)

    decode = msgspec.msgpack.Decoder().decode
    with _sqlite(os.path.join(tmp, "kv.sqlite"), "NORMAL") as (conn, put):
        for i in range(KEYS):
            put(f"key{i:06d}", _value(i))
        cursor = conn.cursor()

        def sqlite_get(key: str) -> object:
            row = cursor.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
            return None if row is None else decode(row[0])

        assert sqlite_get("key000007") == _value(7)
        p50, p99 = _latency_us(keys, sqlite_get)
    _add_get(report, "sqlite", "sqlite3 SELECT (in process, WAL)", p50, p99)

    with _redis(report, ("get_p50", "get_p99"), "us", tmp) as client:
        if client is not None:
            encode = msgspec.msgpack.Encoder().encode
            pipe = client.pipeline(transaction=False)
            for i in range(KEYS):
                pipe.set(f"key{i:06d}", encode(_value(i)))
            pipe.execute()

            def redis_get(key: str) -> object:
                raw = client.get(key)
                return None if raw is None else decode(raw)

            assert redis_get("key000007") == _value(7)
            p50, p99 = _latency_us(keys, redis_get)
            _add_get(report, "redis", "Redis GET (loopback round trip)", p50, p99)


def _add_get(report: Report, system: str, label: str, p50: float, p99: float) -> None:
    report.add("get_p50", system, p50, "us", label=label)
    report.add("get_p99", system, p99, "us", label=label)


def _bench_put(report: Report, plan: Plan, tmp: str) -> None:
    for workload, sync, level, n in (
        ("put_durable", True, "FULL", plan.durable_puts),
        ("put_relaxed", False, "NORMAL", plan.relaxed_puts),
    ):
        path = os.path.join(tmp, f"astra-{workload}")
        with MemoryStore(path, sync=sync) as store:
            rate = _rate(n, store.namespace("r1").put)
        label = f"astra put, sync={sync}"
        report.add(workload, "astra", rate, "puts/s", label=label)
        with _sqlite(os.path.join(tmp, f"{workload}.sqlite"), level) as (_, put):
            rate = _rate(n, put)
        report.add(workload, "sqlite", rate, "puts/s", label=f"sqlite3 WAL, synchronous={level}")
    _bench_redis_put(report, plan, tmp)


def _bench_redis_put(report: Report, plan: Plan, tmp: str) -> None:
    with _redis(report, ("put_durable", "put_relaxed"), "puts/s", tmp) as client:
        if client is None:
            return
        encode = msgspec.msgpack.Encoder().encode

        def put(key: str, value: object) -> None:
            client.set(key, encode(value))

        rate = _rate(plan.relaxed_puts, put)
        report.add("put_relaxed", "redis", rate, "puts/s", label="Redis SET, no persistence")
        client.config_set("appendonly", "yes")
        client.config_set("appendfsync", "always")
        deadline = time.monotonic() + REDIS_START_S
        while client.info("persistence").get("aof_rewrite_in_progress") and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)  # setup only: the AOF rewrite that enabling it starts
        rate = _rate(plan.durable_puts, put)
        report.add("put_durable", "redis", rate, "puts/s", label="Redis SET, appendfsync always")


@contextlib.contextmanager
def _sqlite(
    path: str, synchronous: str
) -> Iterator[tuple[sqlite3.Connection, Callable[[str, object], None]]]:
    """A WAL-mode sqlite3 database with the kv table, in autocommit (one transaction per
    statement), and its put."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB) WITHOUT ROWID")
        cursor = conn.cursor()
        encode = msgspec.msgpack.Encoder().encode

        def put(key: str, value: object) -> None:
            cursor.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, encode(value)))

        yield conn, put
    finally:
        conn.close()


@contextlib.contextmanager
def _redis(report: Report, workloads: tuple[str, ...], unit: str, tmp: str) -> Iterator[Any]:
    """A redis-py client of a fresh redis-server on loopback (no persistence), or None when
    Redis is not installed (then ``workloads`` are reported as skipped)."""
    server, reason = shutil.which("redis-server"), ""
    if server is None:
        reason = "redis-server not installed"
    elif importlib.util.find_spec("redis") is None:
        reason = "redis-py not installed (pip install redis)"
    if server is None or reason:
        for workload in workloads:
            report.skip(workload, "redis", unit, reason, label="Redis")
        yield None
        return
    redis = importlib.import_module("redis")
    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = os.path.join(tmp, f"redis-{port}")
    os.makedirs(data)
    argv = [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
            "no", "--dir", data, "--daemonize", "no"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + REDIS_START_S
        while True:  # setup only: wait for the server to listen
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.02)
        yield client
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- Vector search: Astra beside numpy ----


def _bench_search(report: Report, plan: Plan, tmp: str) -> None:
    rng = np.random.default_rng(42)
    vectors = rng.standard_normal((VECTORS, DIM), dtype=np.float32)
    queries = rng.standard_normal((max(plan.queries, ADD_ROUNDS) + WARMUP // 100, DIM))
    ids = [f"doc{i}" for i in range(VECTORS)]
    path = os.path.join(tmp, "astra-vectors")
    with MemoryStore(path, sync=True, map_size=1 << 30) as store:
        ns = store.namespace("r1")
        t0 = time.perf_counter()
        for start in range(0, VECTORS, LOAD_BATCH):
            end = start + LOAD_BATCH
            ns.add_many(ids[start:end], vectors[start:end], [{"i": i} for i in range(start, end)])
        report.add("load", "astra", VECTORS / (time.perf_counter() - t0), "vectors/s",
                   label=f"astra add_many, {LOAD_BATCH} per transaction, sync=True")  # fmt: skip
    _search_cold(report, plan, path, queries[0])
    with MemoryStore(path, map_size=1 << 30) as store:
        ns = store.namespace("r1")
        astra = _time_queries(queries, plan.queries, lambda q: ns.search(q, k=10))
        report.add("search_100k", "astra", astra, "ms", label="astra search (matrix cached)")
        floor = _bench_numpy(report, plan, vectors, queries)
        for q in queries[:3]:
            got = [i for i, _, _ in ns.search(q, k=10)]
            assert got == [f"doc{i}" for i in floor(q)], "astra and numpy disagree"
        _search_after_add(report, ns, queries)
    report.skip("search_100k", "sqlite", "ms", "sqlite3 has no vector search", label="sqlite3")


def _time_queries(queries: npt.NDArray[np.float64], n: int, search: Callable[..., object]) -> float:
    """Median ms of ``n`` timed searches (after a few warm-up ones)."""
    for q in queries[:3]:
        search(q)
    times = []
    for q in queries[:n]:
        t0 = time.perf_counter()
        search(q)
        times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def _search_cold(report: Report, plan: Plan, path: str, query: npt.NDArray[np.float64]) -> None:
    times = []
    for _ in range(plan.cold_reps):
        with MemoryStore(path, map_size=1 << 30) as store:  # a new handle: an empty cache
            t0 = time.perf_counter()
            store.namespace("r1").search(query, k=10)
            times.append((time.perf_counter() - t0) * 1e3)
    report.add("search_cold", "astra", median(times), "ms",
               label="astra first search after open (copies the matrix)")  # fmt: skip


def _search_after_add(report: Report, ns: Namespace, queries: npt.NDArray[np.float64]) -> None:
    times = []
    for i in range(ADD_ROUNDS):
        ns.add(f"new{i}", queries[i], {"i": -1})  # a commit: the next search must see it
        t0 = time.perf_counter()
        top = ns.search(queries[i], k=10)
        times.append((time.perf_counter() - t0) * 1e3)
        assert top[0][0] == f"new{i}"
    report.add("search_after_add", "astra", median(times), "ms",
               label=f"astra search after one add (median of {ADD_ROUNDS})")  # fmt: skip


def _bench_numpy(
    report: Report, plan: Plan, vectors: npt.NDArray[np.float32], queries: npt.NDArray[np.float64]
) -> Callable[[npt.NDArray[np.float64]], list[int]]:
    """The two numpy figures; returns the floor's top-10 function, for the check."""
    rows = list(vectors)  # what an agent without a store keeps: a list of arrays

    def from_list(q: npt.NDArray[np.float64]) -> list[int]:
        matrix = np.stack(rows)
        q32 = q.astype(np.float32)
        scores = (matrix @ q32) / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(q32))
        top = np.argpartition(-scores, 9)[:10]
        return [int(i) for i in top[np.argsort(-scores[top])]]

    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def floor(q: npt.NDArray[np.float64]) -> list[int]:
        q32 = (q / np.linalg.norm(q)).astype(np.float32)
        scores = unit @ q32
        top = np.argpartition(-scores, 9)[:10]
        return [int(i) for i in top[np.argsort(-scores[top])]]

    ms = _time_queries(queries, plan.list_queries, from_list)
    report.add("search_100k", "numpy_list", ms, "ms",
               label="numpy from a list of arrays (stack + norms per query)")  # fmt: skip
    ms = _time_queries(queries, plan.queries, floor)
    report.add("search_100k", "numpy_matrix", ms, "ms",
               label="numpy prebuilt unit matrix (floor: no storage)")  # fmt: skip
    return floor


# ---- Targets (the memory issue, on the 2-core development machine) ----


_TARGETS: Final = (
    Target("in-agent get p99 < 20 us", ("get_p99", "astra_agent"), None, 20.0),
    Target("in-agent get p50 >= 5x faster than a Redis round trip (p50)",
           ("get_p50", "astra_agent"), ("get_p50", "redis"), 0.2),
    Target("in-agent get p99 >= 5x faster than a Redis round trip (p99)",
           ("get_p99", "astra_agent"), ("get_p99", "redis"), 0.2),
    Target("in-process (engine) get p99 < 20 us", ("get_p99", "astra"), None, 20.0),
    Target("top-10 cosine search over 100k x 384 < 20 ms", ("search_100k", "astra"), None,
            20.0),
)  # fmt: skip


# ---- Entry point ----


def run(plan: Plan, groups: tuple[str, ...] = GROUPS, *, progress: bool = True) -> Report:
    """Run the chosen workload groups and return the report (nothing printed but progress).
    Everything is written under one temporary directory, removed before this returns."""
    report = Report("memory", progress=sys.stderr if progress else None)
    report.section(f"get of a random key among {KEYS:,}, p50", "get_p50")
    report.section(f"get of a random key among {KEYS:,}, p99", "get_p99")
    report.section("put, one per commit, fsynced before it returns", "put_durable")
    report.section("put, one per commit, not fsynced", "put_relaxed")
    report.section(f"top-10 cosine search, {VECTORS:,} x {DIM} float32", "search_100k")
    report.section("first search after opening the store", "search_cold")
    report.section("search right after one add", "search_after_add")
    report.section(f"loading {VECTORS:,} vectors of dimension {DIM}", "load")
    benches: dict[str, Callable[[Report, Plan, str], None]] = {
        "get": _bench_get, "put": _bench_put, "search": _bench_search,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="astra-bench-memory-") as tmp:
        for group in GROUPS:
            if group in groups:
                benches[group](report, plan, tmp)
    return report


def _fs_type(path: str) -> str:
    """The type of the file system holding ``path`` (from /proc/mounts), or "unknown"."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and path.startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def _parse(argv: list[str] | None) -> argparse.Namespace:
    return parse_options(
        argv, prog="python -m perf.bench_memory", description=__doc__, choices=GROUPS,
        dest="groups", quick_help="fewer rounds: about 5 s",
    )  # fmt: skip


def _facts() -> str:
    tmp = tempfile.gettempdir()
    return (
        f"{os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, numpy {np.__version__}, LMDB "
        f"{'.'.join(map(str, lmdb.version()))}, SQLite {sqlite3.sqlite_version}, "
        f"files in {tmp} ({_fs_type(os.path.realpath(tmp))})"
    )


def main(argv: list[str] | None = None) -> int:
    """Command line entry: run, then print the tables, the targets and the JSON lines."""
    args = _parse(argv)
    return run_and_report(
        args,
        lambda progress: run(QUICK if args.quick else FULL, args.groups, progress=progress),
        title="Astra memory benchmark",
        facts=_facts,
        interrupted="temporary files removed, redis-server stopped",
        targets=_TARGETS,
    )


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
