"""``astrad`` and ``astra.connect``: clients attaching over shared memory, dying, and the
daemon dying or draining (kernel/daemon.py, kernel/control.py, astra/_kernel.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

import astra
from ipc.shm import instance_objects
from kernel import read_state
from tests.astra import tasks
from tests.astra.conftest import _ASTRAD, Astrad
from tests.helpers import fork_child, reap, wait_until

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_two_clients_share_one_astrad(astrad):
    with astrad.connect() as a, astrad.connect() as b:
        fa = [a.submit(tasks.add, i, 1) for i in range(100)]
        fb = [b.submit(tasks.add, i, 2) for i in range(100)]
        assert a.gather(fa) == [i + 1 for i in range(100)]
        assert b.gather(fb) == [i + 2 for i in range(100)]
        workers = set(psutil.Process(astrad.pid).children())
        ran_on = {a.submit(tasks.pid).result(10), b.submit(tasks.pid).result(10)}
        assert ran_on <= {p.pid for p in workers}
        assert sorted(c.slot for c in a._control.clients()) == [0, 1]


def test_a_client_killed_with_tasks_in_flight_is_reclaimed(astrad, tmp_path):
    submitted = tmp_path / "submitted"

    def client():
        c = astrad.connect()
        for _ in range(20):
            c.submit(tasks.sleep, 0.05)
        submitted.write_text(str(c._inst.id))
        time.sleep(60)

    with astrad.connect() as survivor:
        child = fork_child(client)
        wait_until(submitted.exists, timeout_s=30)
        child_instance = submitted.read_text()
        os.kill(child, signal.SIGKILL)
        assert reap(child) == -signal.SIGKILL
        futures = [survivor.submit(tasks.square, i) for i in range(50)]
        assert survivor.gather(futures, timeout=30) == [i * i for i in range(50)]
        control = survivor._control
        wait_until(lambda: [c.pid for c in control.clients()] == [os.getpid()], timeout_s=10)
        wait_until(lambda: not instance_objects(child_instance), timeout_s=10)
        assert survivor.submit(tasks.square, 3).result(10) == 9


def test_astrad_killed_clients_get_a_typed_error_and_the_next_start_cleans_up(tmp_path):
    daemon = Astrad(str(tmp_path / "state")).start()
    old_instance = read_state(daemon.name, daemon.state_dir).instance
    client = daemon.connect()
    try:
        future = client.submit(tasks.sleep, 30)
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        with pytest.raises(astra.KernelNotRunningError):
            future.result(timeout=10)
        with pytest.raises(astra.KernelNotRunningError):
            client.submit(tasks.noop)
    finally:
        client.close()
    assert instance_objects(old_instance)  # SIGKILL left its segments behind...
    with pytest.raises(astra.KernelNotRunningError):
        daemon.connect()
    again = Astrad(daemon.state_dir).start()
    try:
        assert not instance_objects(old_instance)  # ...the next start removed them
        with again.connect() as c:
            assert c.submit(tasks.square, 4).result(10) == 16
    finally:
        assert again.stop() == 0


def test_sigterm_drains_queued_tasks_then_cleans_up(tmp_path):
    daemon = Astrad(str(tmp_path / "state")).start()
    instance = read_state(daemon.name, daemon.state_dir).instance
    with daemon.connect() as client:
        futures = [client.submit(tasks.sleep, 0.02) for _ in range(40)]
        assert daemon.stop(signal.SIGTERM) == 0
        assert client.gather(futures, timeout=30) == [0.02] * 40
        with pytest.raises(astra.KernelNotRunningError):
            client.submit(tasks.noop)
    assert read_state(daemon.name, daemon.state_dir) is None
    assert not instance_objects(instance)


def test_a_second_astrad_with_the_same_name_is_refused(astrad):
    second = Astrad(astrad.state_dir, name=astrad.name)
    out = subprocess.run(
        [sys.executable, "-c", _ASTRAD, *second.args()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 75
    assert "already running" in out.stderr
    assert str(astrad.pid) in out.stderr
    with astrad.connect() as c:  # the first one is unharmed
        assert c.submit(tasks.square, 2).result(10) == 4


def test_connect_to_a_missing_astrad_raises(tmp_path):
    with pytest.raises(astra.KernelNotRunningError):
        astra.connect("nobody", state_dir=str(tmp_path))


def test_an_idle_astrad_uses_under_one_percent_of_a_core(astrad):
    procs = [psutil.Process(astrad.pid), *psutil.Process(astrad.pid).children()]
    assert len(procs) == 3  # astrad and two workers
    before = [p.cpu_times() for p in procs]
    start = time.monotonic()
    time.sleep(5.0)
    elapsed = time.monotonic() - start
    used = sum(
        (a.user + a.system) - (b.user + b.system)
        for a, b in zip((p.cpu_times() for p in procs), before, strict=True)
    )
    assert used / elapsed < 0.01, f"idle astrad used {100 * used / elapsed:.2f}% of a core"


def test_a_full_astrad_refuses_more_clients(tmp_path):
    daemon = Astrad(str(tmp_path / "state"), workers=1, extra=("--max-clients", "1")).start()
    try:
        with daemon.connect() as first:
            with pytest.raises(astra.TooManyClientsError):
                daemon.connect()
            assert first.submit(tasks.square, 6).result(10) == 36
        with daemon.connect() as again:  # the slot was freed on close
            assert again.submit(tasks.square, 7).result(10) == 49
    finally:
        assert daemon.stop() == 0


def test_sigint_stops_astrad_like_sigterm(tmp_path):
    daemon = Astrad(str(tmp_path / "state"), workers=1).start()
    instance = read_state(daemon.name, daemon.state_dir).instance
    assert daemon.stop(signal.SIGINT) == 0
    assert not instance_objects(instance)
