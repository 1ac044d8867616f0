"""Fixtures for the public API tests: a fresh embedded kernel per test.

A module-scoped kernel would be faster, but the suite's leak guard counts every live child
process after each test, so each test starts its own (about 10 ms) and closes it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

import astra
from kernel import read_state
from tests.helpers import wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def kernel() -> Iterator[astra.Kernel]:
    with astra.Kernel(workers=2) as k:
        yield k


@pytest.fixture
def kernel1() -> Iterator[astra.Kernel]:
    """One worker: for tests about ordering and concurrency within a worker."""
    with astra.Kernel(workers=1) as k:
        yield k


class Astrad:
    """An ``astrad`` run as a real subprocess, with its own state directory."""

    def __init__(
        self, state_dir: str, name: str = "t", workers: int = 2, extra: tuple[str, ...] = ()
    ) -> None:
        self.state_dir = state_dir
        self.name = name
        self.workers = workers
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Astrad:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ASTRAD, *self.args()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(self._ready, timeout_s=30)
        return self

    def args(self) -> list[str]:
        return [
            "--workers", str(self.workers), "--name", self.name, "--state-dir", self.state_dir,
            *self.extra,
        ]  # fmt: skip

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"astrad exited {self.proc.returncode}: {self.proc.stderr}")
        state = read_state(self.name, self.state_dir)
        return state is not None and state.pid == self.proc.pid

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def connect(self) -> astra.Client:
        return astra.connect(self.name, state_dir=self.state_dir)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.communicate()
        return self.proc.returncode


_ASTRAD = "import sys; from astra._cli import astrad_main; sys.exit(astrad_main(sys.argv[1:]))"


@pytest.fixture
def astrad(tmp_path) -> Iterator[Astrad]:
    daemon = Astrad(str(tmp_path / "state")).start()
    try:
        yield daemon
    finally:
        daemon.stop()
