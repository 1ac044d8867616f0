"""The shipped systemd unit: systemd-analyze accepts it; install writes it and stays safe."""

from __future__ import annotations

import itertools
import shutil
import subprocess

import pytest

from astra._service import UNIT_NAME, install_unit, render_unit


def test_unit_speaks_notify_with_watchdog_and_restart():
    text = render_unit(astrad="/usr/bin/astrad", args="--name nightly")
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "Restart=on-failure",
        "StateDirectory=astra",
        "RuntimeDirectory=astra",
        "User=astra",
        "ExecStart=/usr/bin/astrad --name nightly",
        "RestrictNamespaces=user mnt net",  # the sandbox unshares these per call
    ):
        assert line in text.splitlines(), line
    assert "PrivateDevices" not in text  # clients need the host's /dev/shm


@pytest.mark.slow
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs it)")
    path = install_unit(str(tmp_path), astrad=shutil.which("sh"), user="root")
    run = subprocess.run([analyze, "verify", path], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "astrad.service" not in run.stderr, run.stderr  # no warning about our unit


def test_install_replaces_its_own_unit_but_not_a_foreign_one(tmp_path):
    path = install_unit(str(tmp_path), astrad="/usr/bin/astrad")
    assert path == str(tmp_path / UNIT_NAME)
    assert (tmp_path / UNIT_NAME).stat().st_mode & 0o777 == 0o644
    install_unit(str(tmp_path), astrad="/usr/bin/astrad", args="--workers 2")
    assert "--workers 2" in (tmp_path / UNIT_NAME).read_text()
    (tmp_path / UNIT_NAME).write_text("[Service]\nExecStart=/bin/true\n")
    with pytest.raises(FileExistsError):
        install_unit(str(tmp_path), astrad="/usr/bin/astrad")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"astrad": "astrad"}, "absolute"),
        ({"user": "a b"}, "user"),
        ({"watchdog_s": 0}, "positive"),
    ],
)
def test_bad_unit_options_are_refused(kwargs, needle):
    kwargs.setdefault("astrad", "/usr/bin/astrad")
    with pytest.raises(ValueError, match=needle):
        render_unit(**kwargs)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_astrad_speaks_sd_notify_to_a_real_socket(tmp_path, monkeypatch):
    """READY with MAINPID once workers are up, WATCHDOG pings at half of WatchdogSec,
    RELOADING then READY on SIGHUP, STOPPING on SIGTERM."""
    import signal
    import socket
    import time

    from tests.astra.conftest import Astrad

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1: a ping every 0.5 s
    daemon = Astrad(str(tmp_path / "state"))

    def recv() -> dict[str, str]:
        return dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))

    def next_not_watchdog() -> dict[str, str]:
        while (msg := recv()) == {"WATCHDOG": "1"}:
            pass
        return msg

    try:
        daemon.start()
        ready = next_not_watchdog()
        assert ready["READY"] == "1"
        assert ready["MAINPID"] == str(daemon.pid)
        assert "2 workers" in ready["STATUS"]
        stamps = []
        while len(stamps) < 4:
            if recv() == {"WATCHDOG": "1"}:
                stamps.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert all(0.2 < gap < 1.0 for gap in gaps), gaps  # within WatchdogSec, not spamming
        daemon.proc.send_signal(signal.SIGHUP)
        assert next_not_watchdog() == {"RELOADING": "1"}
        assert next_not_watchdog() == {
            "READY": "1",
            "MAINPID": str(daemon.pid),
            "STATUS": "configuration reloaded",
        }
        assert daemon.stop() == 0
        assert next_not_watchdog()["STOPPING"] == "1"
    finally:
        daemon.stop()
        sock.close()


def test_astra_service_install_writes_the_unit(tmp_path, capsys):
    from astra._cli import EXIT_CANTCREAT, EXIT_OK, main

    argv = ["service", "install", "--unit-dir", str(tmp_path), "--astrad", "/usr/bin/astrad"]
    assert main([*argv, "--args", "--workers 4"]) == EXIT_OK
    assert "ExecStart=/usr/bin/astrad --workers 4" in (tmp_path / UNIT_NAME).read_text()
    assert "systemctl daemon-reload" in capsys.readouterr().out
    assert main([*argv, "--user", "two words"]) == EXIT_CANTCREAT
    assert "bad user name" in capsys.readouterr().err
