"""``astra top``: a live view of a running astrad, refreshed about once a second.

The frame is built from the same snapshot as ``astra status`` (control block words and
``/proc`` through psutil: nothing is asked of the workers), plus rates computed between two
snapshots. ``render_frame`` is pure text, so ``--once`` prints exactly what the live view
shows, and tests can check it without a terminal. The live view uses curses from the
standard library: ``q`` quits, any other key refreshes at once.

Agents come from the workers through a client of the daemon (``Client.agents()``, once per
refresh); without a free client slot the frame says so. Task failures and tool calls by
outcome come from the hot-path metrics table (``kernel/kmetrics.py``, ``metrics_snapshot``),
read like the control block: shared memory, no message.
"""

from __future__ import annotations

__all__ = ["metrics_snapshot", "render_frame", "run_top"]

import curses
import time
from typing import TYPE_CHECKING, Any

from kernel.kmetrics import TOOL_OUTCOMES

if TYPE_CHECKING:
    from collections.abc import Callable

    from kernel.control import ControlBlock

Snapshot = dict[str, Any]

#: Seconds between refreshes of the live view.
REFRESH_S = 1.0


def render_frame(snap: Snapshot, prev: Snapshot | None, dt_s: float) -> list[str]:
    """The lines of one frame; rates (tasks/s) need ``prev`` taken ``dt_s`` seconds earlier."""
    before = {w["id"]: w for w in (prev or {}).get("workers", [])}
    total_rate = 0.0
    rows = []
    for w in snap["workers"]:
        rate = _rate(w, before.get(w["id"]), "tasks_done", dt_s)
        steals = _rate(w, before.get(w["id"]), "steals", dt_s)
        total_rate += rate
        core = "-" if w["core"] is None else str(w["core"])
        cpu = "-" if w["cpu_percent"] is None else f"{w['cpu_percent']:.1f}"
        rss = "-" if w["rss_bytes"] is None else f"{w['rss_bytes'] / 2**20:.1f}"
        rows.append(
            f"{w['id']:<7}{w['pid']:>8}{core:>6}{cpu:>7}{rss:>9}{w['queued']:>8}"
            f"{w['tasks_done']:>11}{rate:>10.0f}{steals:>9.0f}{w['restarts']:>9}"
            f"  {w.get('running', '-')}"
        )
    lines = [
        f"astra top - astrad {snap['name']!r} pid {snap['pid']} {snap['state']}, up "
        f"{snap['uptime_s']:.0f} s, {len(snap['clients'])} client(s), "
        f"{total_rate:.0f} tasks/s",
        "",
        f"{'worker':<7}{'pid':>8}{'core':>6}{'cpu%':>7}{'rss MiB':>9}{'queued':>8}"
        f"{'done':>11}{'tasks/s':>10}{'steals/s':>9}{'restarts':>9}  running",
        *rows,
        "",
        *_agent_lines(snap.get("agents"), (prev or {}).get("agents"), dt_s),
        "",
        *_metric_lines(snap.get("metrics"), (prev or {}).get("metrics"), dt_s),
    ]
    return lines


def metrics_snapshot(control: ControlBlock) -> dict[str, float] | None:
    """Totals of the hot-path table for a frame: tasks started and failed, tool calls by
    outcome (``tool_<outcome>``); None without the table (an older astrad)."""
    table = control.metrics
    if table is None:
        return None
    totals = table.collect()
    names = ("tasks_submitted", "tasks_started", "tasks_failed",
             *(f"tool_{o}" for o in TOOL_OUTCOMES))  # fmt: skip
    return {name: float(totals[name]) for name in names}  # type: ignore[arg-type]


def _metric_lines(
    now: dict[str, float] | None, then: dict[str, float] | None, dt_s: float
) -> list[str]:
    if now is None:
        return ["tasks and tools: no metrics table"]

    def rate(key: str) -> float:
        return _rate(now, then, key, dt_s)

    tools = sum(now[f"tool_{o}"] for o in TOOL_OUTCOMES)
    failed_tools = tools - now["tool_ok"]
    tool_rate = sum(rate(f"tool_{o}") for o in TOOL_OUTCOMES)
    outcomes = ", ".join(f"{o} {now[f'tool_{o}']:.0f}" for o in TOOL_OUTCOMES if now[f"tool_{o}"])
    return [
        f"tasks: {now['tasks_started']:.0f} started, {rate('tasks_started'):.0f}/s; "
        f"{now['tasks_failed']:.0f} failed, {rate('tasks_failed'):.0f}/s",
        f"tools: {tools:.0f} calls, {tool_rate:.1f}/s; {failed_tools:.0f} not ok"
        + (f" ({outcomes})" if outcomes else ""),
    ]


def _rate(now: dict[str, Any], then: dict[str, Any] | None, key: str, dt_s: float) -> float:
    if then is None or dt_s <= 0 or key not in now or key not in then:
        return 0.0
    return float(max(0, now[key] - then[key]) / dt_s)


#: Agents shown at most (the busiest first).
MAX_AGENT_ROWS = 20


def _agent_lines(
    agents: list[dict[str, Any]] | None, prev: list[dict[str, Any]] | None, dt_s: float
) -> list[str]:
    if agents is None:
        return ["agents: not available (no free client slot)"]
    if not agents:
        return ["agents: none"]
    before = {a["name"]: a for a in prev or []}
    rated = [(_rate(a, before.get(a["name"]), "handled", dt_s), a) for a in agents]
    rated.sort(key=lambda ra: (-ra[0], -ra[1]["mailbox"], ra[1]["name"]))
    lines = [
        f"agents: {len(agents)}",
        f"{'agent':<24}{'worker':>7}{'mailbox':>9}  {'state':<9}{'msgs/s':>8}{'restarts':>9}",
    ]
    for rate, a in rated[:MAX_AGENT_ROWS]:
        worker = f"w{a['worker']:02d}"
        lines.append(
            f"{a['name'][:23]:<24}{worker:>7}{a['mailbox']:>9}  {a['state']:<9}{rate:>8.0f}"
            f"{a['restarts']:>9}"
        )
    if len(agents) > MAX_AGENT_ROWS:
        lines.append(f"... and {len(agents) - MAX_AGENT_ROWS} more")
    return lines


def run_top(snapshot: Callable[[], Snapshot], *, once: bool) -> int:
    """Print one frame (``once``) or run the live view until ``q``. Returns 0."""
    if once:
        first = snapshot()
        t0 = time.monotonic()
        time.sleep(0.2)  # a short second sample, so the rates mean something
        second = snapshot()
        print("\n".join(render_frame(second, first, time.monotonic() - t0)))
        return 0
    curses.wrapper(_live, snapshot)
    return 0


def _live(screen: curses.window, snapshot: Callable[[], Snapshot]) -> None:
    curses.curs_set(0)
    screen.timeout(int(REFRESH_S * 1000))  # getch() waits at most this long: the refresh
    prev: Snapshot | None = None
    prev_t = time.monotonic()
    while True:
        snap = snapshot()
        now = time.monotonic()
        lines = render_frame(snap, prev, now - prev_t)
        prev, prev_t = snap, now
        screen.erase()
        height, width = screen.getmaxyx()
        for y, line in enumerate(lines[: height - 1]):
            screen.addnstr(y, 0, line, width - 1)
        screen.addnstr(min(len(lines), height - 1), 0, "q: quit", width - 1)
        screen.refresh()
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return
