"""astrad's event log and its SIGHUP reload, on a real astrad with real workers.

The log lines must split back into level, process name, pid, event and fields (or parse as
JSON); a reload must apply every ``RELOADABLE`` key (the restart policy in the supervisor,
the log level and format in the workers too), compare later reloads against what runs, and
end with READY=1 whether or not the new configuration was good.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

import psutil  # type: ignore[import-untyped]
import pytest

from kernel.supervisor import EXIT_RESTART_INTENSITY
from tests.astra.conftest import _ASTRAD, Astrad
from tests.helpers import wait_until

if TYPE_CHECKING:
    import pathlib

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


class LoggedAstrad(Astrad):
    """An ``astrad`` reading ``astrad.toml`` in ``tmp_path``, its stderr kept in a file."""

    def __init__(self, tmp_path: pathlib.Path, config: str, extra: tuple[str, ...] = ()) -> None:
        self.config_path = tmp_path / "astrad.toml"
        self.config_path.write_text(config)
        self.log_path = tmp_path / "astrad.log"
        super().__init__(str(tmp_path / "state"), extra=("--config", str(self.config_path), *extra))

    def start(self) -> LoggedAstrad:
        with open(self.log_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _ASTRAD, *self.args()],
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
            )
        wait_until(self._ready, timeout_s=30)
        return self

    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def wait_line(self, needle: str, after: int = 0) -> str:
        """The first log line past line ``after`` that contains ``needle``, once it is there."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [x for x in self.lines()[after:] if needle in x]
            return bool(found)

        wait_until(seen, timeout_s=20)
        return found[0]

    def reload(self, config: str) -> int:
        """Rewrite the file and send SIGHUP; returns how many log lines came before."""
        before = len(self.lines())
        self.config_path.write_text(config)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        return before

    def worker(self, index: int) -> psutil.Process:
        """Worker ``index`` (astra-wNN) once it runs."""
        name = f"astra-w{index:02d}"
        found: list[psutil.Process] = []

        def running() -> bool:
            found[:] = [p for p in psutil.Process(self.pid).children() if p.name() == name]
            return bool(found)

        wait_until(running, timeout_s=20)
        return found[0]

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker ``index``; returns once its replacement runs or astrad exited."""
        old = self.worker(index)
        old.kill()
        old.wait(10)
        name = f"astra-w{index:02d}"

        def replaced_or_gone() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return True
            with contextlib.suppress(psutil.Error):
                children = psutil.Process(self.pid).children()
                return any(p.pid != old.pid and p.name() == name for p in children)
            return False

        wait_until(replaced_or_gone, timeout_s=20)


def _kv(line: str) -> tuple[str, str, int, str, dict[str, str]]:
    """A text line as (level, process name, pid, event, fields); fails unless it splits."""
    stamp, level, who, event, *rest = shlex.split(line)
    assert stamp.endswith("Z"), line
    proc, _, pid = who.partition("[")
    assert pid.endswith("]"), line
    fields = dict(word.split("=", 1) for word in rest)
    return level, proc, int(pid[:-1]), event, fields


def _events(lines: list[str]) -> dict[str, dict[str, str]]:
    return {event: fields for _, _, _, event, fields in map(_kv, lines)}


# ---- The event log ----


def test_astrad_log_lines_split_into_level_process_pid_event_and_fields(tmp_path):
    """A kill, a restart and a stop: every line astrad writes is key=value, and the events
    carry what the old free-text lines did."""
    daemon = LoggedAstrad(tmp_path, "restart_within_s = 60.0\n").start()
    try:
        old = daemon.worker(1).pid
        daemon.kill_worker(1)
        daemon.wait_line("child_exited")
    finally:
        assert daemon.stop() == 0
    parsed = [_kv(line) for line in daemon.lines()]  # every line, not only ours
    assert {(level, proc, pid) for level, proc, pid, _, _ in parsed} >= {
        ("INFO", "astrad", daemon.pid),
        ("WARNING", "astrad", daemon.pid),
    }
    events = {event: fields for _, _, _, event, fields in parsed}
    assert events["astrad_ready"]["name"] == "t"
    assert events["astrad_ready"]["workers"] == "2"
    exited = events["child_exited"]
    assert exited["id"] == "w01"
    assert exited["pid"] == str(old)
    assert exited["reason"] == "SIGKILL"
    assert exited["restarts"] == "1/10"
    assert exited["within_s"] == "60.0"
    assert "stop_requested" in events
    assert not [line for line in daemon.lines() if "[PID" in line]


def test_astrad_json_log_lines_are_objects_with_the_same_fields(tmp_path):
    daemon = LoggedAstrad(tmp_path, "", extra=("--log-format", "json")).start()
    try:
        old = daemon.worker(0).pid
        daemon.kill_worker(0)
        daemon.wait_line("child_exited")
    finally:
        assert daemon.stop() == 0
    records = [json.loads(line) for line in daemon.lines()]
    exited = next(r for r in records if r["event"] == "child_exited")
    assert exited["level"] == "WARNING"
    assert exited["proc"] == "astrad"
    assert exited["pid"] == daemon.pid
    assert exited["pid_"] == old  # the field, renamed: it never overwrites the line's pid
    assert exited["id"] == "w00"
    assert exited["reason"] == "SIGKILL"
    assert exited["restarts"] == "1/10"
    assert {"astrad_ready", "stop_requested"} <= {r["event"] for r in records}


# ---- Reload ----


def test_reload_applies_a_new_restart_limit(tmp_path):
    """After a reload to max_restarts = 1, the second kill is one past the new limit:
    astrad stops everything and exits 70 (it would restart up to 10 times otherwise)."""
    daemon = LoggedAstrad(tmp_path, "max_restarts = 10\nrestart_within_s = 60.0\n").start()
    try:
        daemon.kill_worker(0)
        assert _kv(daemon.wait_line("child_exited"))[4]["restarts"] == "1/10"
        before = daemon.reload("max_restarts = 1\nrestart_within_s = 60.0\n")
        reloaded = _kv(daemon.wait_line("config_reloaded", after=before))[4]
        assert reloaded["changed"] == "max_restarts"
        assert reloaded["max_restarts"] == "1"
        before = len(daemon.lines())
        daemon.kill_worker(1)
        assert daemon.proc is not None
        assert daemon.proc.wait(30) == EXIT_RESTART_INTENSITY
    finally:
        daemon.stop()
    events = _events(daemon.lines()[before:])
    assert events["child_exited"]["restarts"] == "2/1"
    assert events["restart_intensity_exceeded"]["restarts"] == "2/1"


def test_a_bad_reload_keeps_the_config_and_still_ends_with_ready(tmp_path, monkeypatch):
    """RELOADING=1 then READY=1 with a STATUS naming the failure; the log names the key;
    the running policy is unchanged (the next exit is judged by max_restarts = 3), and
    a good reload after it reports only what differs from the running config."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)

    def recv() -> dict[str, str]:
        return dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))

    daemon = LoggedAstrad(tmp_path, "max_restarts = 3\nrestart_within_s = 60.0\n")
    try:
        daemon.start()
        assert recv()["READY"] == "1"
        before = daemon.reload("max_restarts = -1\nrestart_within_s = 60.0\n")
        assert recv() == {"RELOADING": "1"}
        ready = recv()
        assert ready["READY"] == "1"
        assert ready["MAINPID"] == str(daemon.pid)
        assert "reload failed" in ready["STATUS"]
        assert "max_restarts" in ready["STATUS"]
        failed = _kv(daemon.wait_line("config_reload_failed", after=before))
        assert failed[0] == "ERROR"
        assert failed[4]["key"] == "max_restarts"
        daemon.kill_worker(0)
        assert _kv(daemon.wait_line("child_exited", after=before))[4]["restarts"] == "1/3"
        before = daemon.reload("max_restarts = 3\nrestart_within_s = 30.0\n")
        assert recv() == {"RELOADING": "1"}
        assert recv()["STATUS"] == "configuration reloaded"
        assert _kv(daemon.wait_line("config_reloaded", after=before))[4]["changed"] == (
            "restart_within_s"
        )
        assert daemon.stop() == 0
    finally:
        daemon.stop()
        sock.close()


def test_reload_changes_the_log_level_and_format_in_the_workers_too(tmp_path):
    """agent_spawned is a DEBUG event logged by the worker that runs the agent: hidden at
    info; after a reload to debug and json it appears, from astra-w00, as JSON. A second
    reload of the same file changes nothing: it compares against the running config."""
    from tests.astra.agents import Counter

    daemon = LoggedAstrad(tmp_path, 'log_level = "info"\n').start()
    try:
        with daemon.connect() as client:
            client.spawn(Counter, 0, name="quiet", worker=0).ask("value").result(timeout=10)
            assert not [x for x in daemon.lines() if "agent_spawned" in x]
            config = 'log_level = "debug"\nlog_format = "json"\n'
            before = daemon.reload(config)
            reloaded = json.loads(daemon.wait_line("config_reloaded", after=before))
            assert reloaded["proc"] == "astrad"
            assert reloaded["changed"] == "log_level,log_format"
            client.spawn(Counter, 0, name="loud", worker=0).ask("value").result(timeout=10)
            spawned = json.loads(daemon.wait_line("agent_spawned", after=before))
            assert spawned["proc"] == "astra-w00"
            assert spawned["level"] == "DEBUG"
            assert spawned["pid"] == daemon.worker(0).pid
            assert spawned["cls"] == "Counter"
            before = daemon.reload(config)
            again = json.loads(daemon.wait_line("config_reloaded", after=before))
            assert again["changed"] == "-"
        assert daemon.stop() == 0
    finally:
        daemon.stop()
