"""The shipped systemd unit: systemd-analyze accepts it; install writes it and stays safe."""

from __future__ import annotations

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
