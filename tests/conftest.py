"""Suite-wide fixtures: per-worker shm naming, and the leak guard every test runs under.

The guard fails any test that leaves behind, in this pytest process's namespace, a
/dev/shm segment or semaphore, a child process, or an open fd. Each pytest process (each xdist
worker) labels its shared objects ``@t<pid>`` through ``ASTRA_SHM_LABEL``, so parallel workers
never see each other's objects.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING

import psutil
import pytest

from ipc.shm import Instance, cleanup_stale, instance_objects

if TYPE_CHECKING:
    from collections.abc import Iterator

LABEL = f"t{os.getpid()}"
os.environ["ASTRA_SHM_LABEL"] = LABEL  # read by Instance.create at call time

#: How long the guard lets children finish exiting before calling them leaked.
CHILD_GRACE_S = 5.0


def _our_shm() -> set[str]:
    return {
        entry
        for inst, entries in instance_objects().items()
        if inst.endswith(f"@{LABEL}")
        for entry in entries
    }


def _fds() -> dict[int, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
    return out


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _settle_children() -> list[str]:
    """Give exiting children a grace period; then kill and report what is still there."""
    end = time.monotonic() + CHILD_GRACE_S
    while True:
        alive = [p for p in _children() if _running(p)]
        if not alive or time.monotonic() > end:
            break
        time.sleep(0.01)
    leaked = []
    for proc in _children():
        with contextlib.suppress(psutil.Error):
            leaked.append(f"pid {proc.pid} {proc.name()} ({proc.status()})")
            proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(proc.pid, 0)
    return leaked


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(autouse=True)
def leak_guard() -> Iterator[None]:
    """Fail the test if it leaks shm objects, child processes or fds of ours."""
    shm_before = _our_shm()
    fds_before = _fds()
    yield
    problems = []
    children = _settle_children()
    if children:
        problems.append(f"child processes left running or unreaped: {children}")
    shm_left = _our_shm() - shm_before
    if shm_left:
        for entry in shm_left:  # clean up so one leak does not fail every later test
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", entry))
        problems.append(f"/dev/shm entries left behind: {sorted(shm_left)}")
    fds_after = _fds()
    new_fds = {
        fd: target
        for fd, target in fds_after.items()
        if fds_before.get(fd) != target and not target.startswith("/proc/")
    }
    if new_fds:
        problems.append(f"fds left open: {new_fds}")
    if problems:
        pytest.fail("leak guard: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _session_shm_check() -> Iterator[None]:
    cleanup_stale()  # instances of earlier, killed runs (their owners are dead)
    yield
    left = _our_shm()
    assert not left, f"after the session, /dev/shm still holds: {sorted(left)}"


@pytest.fixture
def instance() -> Iterator[Instance]:
    """A fresh kernel instance namespace owned by this test, removed at the end."""
    inst = Instance.create()
    try:
        yield inst
    finally:
        inst.close()


# ---- Soak runs: long versions of stress tests, skipped unless asked for ----


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak", action="store_true", help="run the long soak/stress versions (marker: soak)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="long soak run: pass --soak to run it")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
