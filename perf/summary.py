"""Run every benchmark of ``perf/`` in turn and print one Markdown table of the headline figures,
Astra beside its peers, with the machine it ran on: the README's performance table.

    python -m perf.summary                 # run all (minutes: Ray and Dask start slowly)
    python -m perf.summary --quick         # each benchmark's --quick
    python -m perf.summary --from F.jsonl  # no run: the table of a saved run
    python -m perf.summary --save F.jsonl  # keep the run's JSON lines (the first is the machine)

Each benchmark runs as its own process (``python -m perf.bench_X --json-only``), one after
another, so none disturbs another; their JSON lines (``perf/_harness.py``) are the input.
A peer that is not installed shows as "not installed" (``pip install -e '.[bench]'``).
The table keeps the rows of ``HEADLINES``; ``--all`` prints every figure instead.
"""

from __future__ import annotations

__all__ = ["BENCHES", "HEADLINES", "Headline", "machine", "main", "render"]

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import TYPE_CHECKING, Final, NamedTuple

import psutil  # type: ignore[import-untyped]

from ._harness import lower_is_better

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

#: The benchmark modules, in the order they run.
BENCHES: Final = ("ipc", "tasks", "dag", "agents", "sandbox", "memory")
#: Seconds one benchmark may take before the run gives up on it.
BENCH_TIMEOUT_S: Final = 900


class Headline(NamedTuple):
    """One row: ``workload`` of ``bench`` as ``system`` ran it, what it means, and the peers
    to set beside it."""

    bench: str
    workload: str
    what: str
    peers: tuple[str, ...]
    system: str = "astra"


_POOLS: Final = ("mp_pool", "ppe", "dask", "ray")
_RUNNERS: Final = ("subprocess", "bwrap", "nsjail")

#: The rows of the README's table (a figure missing from the run is left out).
HEADLINES: Final = (
    Headline("ipc", "64B_batched", "64 B messages between processes", ("faster_fifo",)),
    Headline("ipc", "rtt_p50", "ping-pong round trip, p50", ("mp_pipe", "faster_fifo")),
    Headline("ipc", "100MB_handoff", "100 MB array to another process",
             ("mp_pipe", "mp_shared_memory", "ray")),
    Headline("tasks", "noop_10k", "10,000 tasks submitted one by one", _POOLS),
    Headline("tasks", "sync_p50", "one task's round trip, p50", _POOLS),
    Headline("tasks", "ready", "embedded kernel ready", ()),
    Headline("dag", "tree_8191", "tree DAG of 8,191 nodes, per node", ("dask", "ray")),
    Headline("dag", "imbalanced", "64 imbalanced tasks, makespan", ("dask", "ray")),
    Headline("dag", "wide_1m", "1,000,000-node wide DAG", ("dask", "ray")),
    Headline("agents", "ask_p50", "agent ask, p50", ("mp_pipe", "ray")),
    Headline("agents", "ask_async_20k", "20,000 asks in flight, to 1 agent", ("mp_pipe", "ray")),
    Headline("agents", "ask_async_20k", "20,000 asks in flight, over 2 agents (1/worker)",
             ("mp_pipe", "ray"), "astra_spread"),
    Headline("agents", "tell_rate", "20,000 one-way messages", ("mp_pipe", "ray")),
    Headline("agents", "spawn_10k_s", "10,000 agents spawned (spawn_many; Ray: 100 actors)",
             ("ray",), "astra_many"),
    Headline("agents", "memory_per_agent", "memory per idle agent", ("ray",)),
    Headline("sandbox", "call_p50", "sandboxed Python call, warm pool, p50", _RUNNERS,
             "astra_warm"),
    Headline("sandbox", "call_p50", "sandboxed Python call, cold, p50", _RUNNERS, "astra_cold"),
    Headline("memory", "get_p99", "memory get, p99", ("sqlite", "redis")),
    Headline("memory", "put_durable", "durable memory put", ("sqlite", "redis")),
    Headline("memory", "search_100k", "top-10 of 100,000 x 384 vectors", ("numpy_matrix",)),
)  # fmt: skip


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    freq = psutil.cpu_freq()
    return {
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "mhz": round(freq.max or freq.current) if freq else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(benches: Sequence[str], *, quick: bool) -> list[dict[str, object]]:
    """Run each benchmark as its own process; every JSON line it printed, machine first."""
    records: list[dict[str, object]] = [machine()]
    for bench in benches:
        cmd = [sys.executable, "-m", f"perf.bench_{bench}", "--json-only"]
        if quick:
            cmd.append("--quick")
        print(f"running {' '.join(cmd[1:])} ...", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            print(f"  bench_{bench} ran past {BENCH_TIMEOUT_S} s: skipped", file=sys.stderr)
            continue
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            print(f"  bench_{bench} failed ({done.returncode}): {tail}", file=sys.stderr)
        records.extend(_parse(done.stdout.splitlines()))
    return records


def _parse(lines: Iterable[str]) -> list[dict[str, object]]:
    out = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _fmt(value: float, unit: str) -> str:
    if value >= 1000:
        text = f"{value:,.0f}"
    elif value >= 100:
        text = f"{value:.0f}"
    elif value >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}"


def _ratio(r: float) -> str:
    """``2.1x``, ``62x``, ``1,900x``; below 0.1 as a fraction, ``1/15``, ``1/170,000``."""
    if r >= 10:
        return f"{r:,.0f}x"
    if r >= 0.1:
        return f"{r:.2g}x"
    if r <= 0:
        return "0x"
    inverse = float(f"{1 / r:.2g}")
    return f"1/{inverse:,.0f}"


def render(records: Sequence[dict[str, object]], *, every: bool = False) -> str:
    """The Markdown table (with the machine line) of a run's records."""
    info = next((r for r in records if "machine" in r), None)
    figures = {
        (str(r["bench"]), str(r["workload"]), str(r["system"])): r for r in records if "bench" in r
    }
    rows = list(HEADLINES)
    if every:
        seen = {(h.bench, h.workload) for h in rows}
        for bench, workload, system in figures:
            if system.startswith("astra") and (bench, workload) not in seen:
                seen.add((bench, workload))
                peers = tuple(
                    s
                    for (b, w, s) in figures
                    if (b, w) == (bench, workload) and not s.startswith("astra")
                )
                rows.append(Headline(bench, workload, workload, peers))
    lines = []
    if info is not None:
        lines.append(
            f"Measured {info.get('date')} on `{info.get('machine')}`: {info.get('cpus')} CPUs "
            f"({info.get('cpu')}), {info.get('memory_gib')} GiB, Linux {info.get('kernel')}, "
            f"Python {info.get('python')}. Ratios are Astra / peer; "
            "lower is better for times and memory, higher for rates."
        )
        lines.append("")
    lines.append("| workload | Astra | peers (Astra / peer) |")
    lines.append("|---|---|---|")
    for h in rows:
        mine = figures.get((h.bench, h.workload, h.system))
        if mine is None or mine.get("value") is None:
            continue
        value, unit = float(mine["value"]), str(mine["unit"])  # type: ignore[arg-type]
        cells = []
        for peer in h.peers:
            theirs = figures.get((h.bench, h.workload, peer))
            if theirs is None:
                continue
            if theirs.get("value") is None:
                cells.append(f"{peer}: {theirs.get('skipped') or 'not measured'}")
                continue
            other = float(theirs["value"])  # type: ignore[arg-type]
            ratio = value / other if other else float("inf")
            better = ratio <= 1 if lower_is_better(unit) else ratio >= 1
            mark = "**" if better else ""
            cells.append(f"{peer} {_fmt(other, unit)} ({mark}{_ratio(ratio)}{mark})")
        lines.append(f"| {h.what} | {_fmt(value, unit)} | {'; '.join(cells) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perf.summary", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick")
    parser.add_argument(
        "--only", default=",".join(BENCHES), help="benchmarks to run, e.g. tasks,agents"
    )
    parser.add_argument("--from", dest="source", help="a saved run (JSON lines) instead of running")
    parser.add_argument("--save", help="write the run's JSON lines here")
    parser.add_argument(
        "--all", action="store_true", help="every Astra figure, not only the headlines"
    )
    args = parser.parse_args(argv)
    if args.source:
        with open(args.source, encoding="utf-8") as f:
            records = _parse(f)
    else:
        only = [b.strip() for b in args.only.split(",") if b.strip()]
        unknown = sorted(set(only) - set(BENCHES))
        if unknown:
            parser.error(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHES)}")
        records = run(only, quick=args.quick)
    if args.save:
        with open(args.save, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    print(render(records, every=args.all), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
