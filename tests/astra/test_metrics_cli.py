"""Metrics of a running astrad: `astra metrics` and `--metrics-addr`, parsed with
prometheus-client's parser, changing as work runs."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from astra._cli import EXIT_OK, main
from tests.astra.conftest import Astrad
from tests.astra.tasks import square
from tests.helpers import wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(text: str) -> dict[tuple[str, str | None], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, s.labels.get("worker"))] = s.value
    return out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_metrics_are_served_and_change_as_work_runs(tmp_path, capsys):
    port = _free_port()
    daemon = Astrad(str(tmp_path / "state"), extra=("--metrics-addr", f"127.0.0.1:{port}"))
    daemon.start()
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            before = _samples(resp.read().decode())
        assert before[("astra_workers", None)] == 2
        assert before[("astra_worker_rss_bytes", "w00")] > 0
        with daemon.connect() as client:
            assert client.map(square, range(50)) == [x * x for x in range(50)]
            assert main(["metrics", "--name", daemon.name, "--state-dir", daemon.state_dir]) == (
                EXIT_OK
            )
        during = _samples(capsys.readouterr().out)
        assert during[("astra_clients", None)] >= 1
        assert ("astra_tasks_finished_total", "w00") in during

        def finished() -> float:
            # a worker counts its tasks just after sending their replies: it may lag a little
            with urllib.request.urlopen(url, timeout=10) as resp:
                after = _samples(resp.read().decode())
            return sum(v for (name, _), v in after.items() if name == "astra_tasks_finished_total")

        wait_until(lambda: finished() >= 50)
    finally:
        daemon.stop()


def test_metrics_without_a_daemon_is_unavailable(tmp_path, capsys):
    from astra._cli import EXIT_UNAVAILABLE

    assert main(["metrics", "--name", "none", "--state-dir", str(tmp_path)]) == EXIT_UNAVAILABLE
    assert "no astrad named 'none'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_metrics_port_in_use_stops_astrad_cleanly(tmp_path):
    import subprocess
    import sys

    from tests.astra.conftest import _ASTRAD

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-c", _ASTRAD, "--workers", "1", "--name", "busy",
             "--state-dir", str(tmp_path), "--metrics-addr", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert run.returncode == 71, run.stderr
    assert "Address already in use" in run.stderr
