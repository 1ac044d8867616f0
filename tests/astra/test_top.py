"""`astra top` in a real terminal (a pty), while a workload runs; and `--once`."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

import pytest

from astra._cli import EXIT_OK, main
from astra._top import render_frame
from kernel.kmetrics import TOOL_OUTCOMES
from tests.astra.agents import Counter
from tests.astra.conftest import Astrad
from tests.astra.tasks import square

SNAP = {
    "name": "t", "pid": 10, "state": "running", "uptime_s": 5.0, "clients": [{"slot": 0}],
    "workers": [
        {"id": "w00", "pid": 11, "core": 0, "cpu_percent": 50.0, "rss_bytes": 2**21,
         "queued": 3, "tasks_done": 100, "restarts": 0, "running": "c0:t7"},
        {"id": "w01", "pid": 12, "core": None, "cpu_percent": None, "rss_bytes": None,
         "queued": 0, "tasks_done": 40, "restarts": 1},
    ],
}  # fmt: skip


def test_frame_shows_workers_and_rates():
    prev = {**SNAP, "workers": [{**w, "tasks_done": w["tasks_done"] - 20} for w in SNAP["workers"]]}
    lines = render_frame(SNAP, prev, 2.0)
    assert "20 tasks/s" in lines[0]  # (20 + 20) / 2 s
    w00 = next(line for line in lines if line.startswith("w00"))
    assert w00.split() == ["w00", "11", "0", "50.0", "2.0", "3", "100", "10", "0", "0", "c0:t7"]
    w01 = next(line for line in lines if line.startswith("w01"))
    assert w01.split()[2:5] == ["-", "-", "-"]
    assert "agents: not available (no free client slot)" in lines
    assert "agents: none" in render_frame({**SNAP, "agents": []}, None, 1.0)


def test_frame_shows_agents_busiest_first():
    agents = [
        {"name": "idle", "worker": 0, "mailbox": 0, "handled": 5, "state": "idle", "restarts": 0},
        {"name": "busy", "worker": 1, "mailbox": 7, "handled": 50, "state": "running",
         "restarts": 2},
    ]  # fmt: skip
    prev_agents = [{**a, "handled": 5} for a in agents]
    lines = render_frame({**SNAP, "agents": agents}, {**SNAP, "agents": prev_agents}, 1.0)
    start = lines.index("agents: 2")
    assert lines[start + 2].split() == ["busy", "w01", "7", "running", "45", "2"]
    assert lines[start + 3].split() == ["idle", "w00", "0", "idle", "0", "0"]


def test_frame_shows_task_failures_and_tool_calls_by_outcome():
    zero = {"tasks_submitted": 0.0, "tasks_started": 0.0, "tasks_failed": 0.0,
            **{f"tool_{o}": 0.0 for o in TOOL_OUTCOMES}}  # fmt: skip
    now = {**zero, "tasks_started": 30.0, "tasks_failed": 4.0, "tool_ok": 6.0,
           "tool_timeout": 1.0, "tool_refused": 1.0}  # fmt: skip
    then = {**zero, "tasks_started": 10.0, "tool_ok": 2.0}
    lines = render_frame({**SNAP, "metrics": now}, {**SNAP, "metrics": then}, 2.0)
    assert "tasks: 30 started, 10/s; 4 failed, 2/s" in lines
    assert "tools: 8 calls, 3.0/s; 2 not ok (ok 6, refused 1, timeout 1)" in lines
    assert "tasks and tools: no metrics table" in render_frame(SNAP, None, 1.0)


def _read_until(fd: int, pattern: bytes, timeout_s: float = 20.0) -> bytes:
    buf = b""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                buf += os.read(fd, 65536)
            except OSError:
                break
            if re.search(pattern, buf):
                return buf
    raise AssertionError(f"{pattern!r} not seen in {buf[-2000:]!r}")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_top_in_a_pty_shows_live_workers_and_quits_on_q(tmp_path):
    daemon = Astrad(str(tmp_path / "state")).start()
    master, slave = os.openpty()
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "astra._cli", "top", "--name", daemon.name,
             "--state-dir", daemon.state_dir],
            stdin=slave, stdout=slave, stderr=slave, close_fds=True,
            env={**os.environ, "TERM": "xterm", "LINES": "30", "COLUMNS": "100"},
        )  # fmt: skip
        os.close(slave)
        _read_until(master, rb"w00.*w01")
        with daemon.connect() as client:
            client.map(square, range(200))
            # a later frame shows them as a rate (curses redraws only what changed, so
            # look for the header's figure rather than whole rows)
            _read_until(master, rb"[1-9]\d* tasks/s")
            watched = client.spawn(Counter, 0, name="watched")
            for _ in range(50):
                watched.tell("add", 1)
            _read_until(master, rb"watched.*w0[01]")  # the agent's row, new in the frame
        os.write(master, b"q")
        assert proc.wait(timeout=10) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        daemon.stop()


@pytest.mark.slow
def test_top_once_prints_one_frame(astrad, capsys):
    with astrad.connect() as client:
        assert client.map(square, range(50)) == [x * x for x in range(50)]
    assert main(["top", "--once", "--name", astrad.name, "--state-dir", astrad.state_dir]) == (
        EXIT_OK
    )
    out = capsys.readouterr().out
    assert "astra top - astrad" in out
    assert "w01" in out
    started = re.search(r"tasks: (\d+) started", out)  # from the metrics table
    assert started is not None, out
    assert int(started.group(1)) >= 50
    assert "tools: 0 calls" in out
