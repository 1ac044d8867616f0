"""The ``astra`` and ``astrad`` command lines (astra/_cli.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from astra._cli import EXIT_CONFIG, EXIT_OK, EXIT_UNAVAILABLE, astrad_main, main
from kernel import read_state

pytestmark = pytest.mark.multiprocess


@pytest.mark.slow
def test_status_ps_and_stop_speak_json(astrad, capsys):
    where = ["--name", astrad.name, "--state-dir", astrad.state_dir, "--json"]
    assert main(["status", *where]) == EXIT_OK
    status = json.loads(capsys.readouterr().out)
    assert status["pid"] == astrad.pid
    assert status["state"] == "running"
    assert [w["id"] for w in status["workers"]] == ["w00", "w01"]
    for w in status["workers"]:
        assert w["rss_bytes"] > 0
        assert w["tasks_done"] == 0
        assert w["queued"] == 0
    assert main(["ps", "--state-dir", astrad.state_dir, "--json"]) == EXIT_OK
    listing = json.loads(capsys.readouterr().out)
    roles = sorted(r["role"] for r in listing["processes"])
    assert roles == ["astra-w00", "astra-w01", "astrad"]
    assert listing["agents"] == []
    assert main(["stop", *where]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["stopped"] is True
    assert astrad.proc.wait(10) == 0
    assert read_state(astrad.name, astrad.state_dir) is None


@pytest.mark.slow
def test_status_prints_a_table(astrad, capsys):
    assert main(["status", "--name", astrad.name, "--state-dir", astrad.state_dir]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"pid {astrad.pid}" in out
    assert "w01" in out


def test_status_and_stop_without_a_daemon_exit_unavailable(tmp_path, capsys):
    for cmd in ("status", "stop"):
        assert main([cmd, "--name", "none", "--state-dir", str(tmp_path)]) == EXIT_UNAVAILABLE
        assert "no astrad named 'none'" in capsys.readouterr().err


def test_astrad_rejects_a_bad_worker_count_before_starting_anything(capsys):
    assert astrad_main(["--workers", "-1"]) == EXIT_CONFIG
    assert "flag --workers" in capsys.readouterr().err


def test_astrad_check_config_prints_the_effective_config(capsys, monkeypatch):
    monkeypatch.setenv("ASTRA_MAX_CLIENTS", "5")
    assert astrad_main(["--check-config", "--workers", "3", "--config", "/dev/null"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "workers = 3  # flag --workers" in out
    assert "max_clients = 5  # env ASTRA_MAX_CLIENTS" in out


@pytest.mark.slow
def test_astra_demo_runs_the_review_team_demo(tmp_path):
    """`astra demo ARGS` is astra._demo.main(ARGS): here on a two-file tree, as JSON."""
    (tmp_path / "a.py").write_text("def f(x):\n    return x\n")
    (tmp_path / "b.py").write_text("class C:\n    def m(self):\n        return 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "astra._cli", "demo", "--workers", "2", "--json", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    summary = json.loads(out)
    assert summary["files"] == 2
    assert summary["functions"] == 2
    assert summary["classes"] == 1


@pytest.mark.slow
def test_ps_lists_agents_and_kill_stops_one(astrad, capsys):
    from tests.astra.agents import Counter

    where = ["--name", astrad.name, "--state-dir", astrad.state_dir]
    with astrad.connect() as client:
        client.spawn(Counter, 1, name="keeper", worker=0)
        doomed = client.spawn(Counter, 2, name="doomed", worker=1)
        doomed.ask("add", 1).result(timeout=10)
        assert main(["ps", "--state-dir", astrad.state_dir, "--json"]) == EXIT_OK
        agents = {a["name"]: a for a in json.loads(capsys.readouterr().out)["agents"]}
        assert set(agents) == {"keeper", "doomed"}
        assert agents["doomed"]["worker"] == 1
        assert agents["doomed"]["handled"] == 1
        assert agents["doomed"]["class"].endswith("Counter")
        assert main(["ps", "--state-dir", astrad.state_dir]) == EXIT_OK
        assert "doomed" in capsys.readouterr().out
        assert main(["kill", "doomed", *where]) == EXIT_OK
        assert "killed doomed" in capsys.readouterr().out
        assert [a["name"] for a in client.agents()] == ["keeper"]
        assert main(["kill", "doomed", *where]) == 1
        assert "no agent" in capsys.readouterr().err
