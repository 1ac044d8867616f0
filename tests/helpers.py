"""Test helpers shared by every test module: waiting on conditions, child processes."""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


def wait_until(
    pred: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.005
) -> None:
    """Poll ``pred`` until it is truthy; fail the test after ``timeout_s``.

    For tests only: product code never sleep-polls.
    """
    end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout_s} s: {pred}")
        time.sleep(interval_s)


def fork_child(body: Callable[[], object]) -> int:
    """Fork a child that runs ``body`` and exits 0 (1 if it raised), never returning into
    pytest. Returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def reap(pid: int, timeout_s: float = 30.0) -> int:
    """Wait for child ``pid`` and return its exit status (negative signal number if killed).
    Kills it with SIGKILL if it outlives ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not exit within {timeout_s} s")
        time.sleep(0.002)
