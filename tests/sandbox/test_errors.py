"""The sandbox's errors: the tree, and surviving pickling with their fields
(sandbox/errors.py)."""

from __future__ import annotations

import pickle
import signal

import pytest

from sandbox import (
    RemoteTraceback,
    SandboxCallError,
    SandboxCrashed,
    SandboxError,
    SandboxMemoryError,
    SandboxTimeout,
    SandboxViolation,
    SandboxWarning,
)

pytestmark = pytest.mark.sandbox

ERRORS = [
    SandboxError("could not set up"),
    SandboxTimeout("too slow", "cpu", 2.5),
    SandboxMemoryError("too big", 64),
    SandboxViolation("denied", "socket", 41),
    SandboxViolation("killed"),
    SandboxCrashed("died", signal.SIGSEGV),
    SandboxCrashed("exited", exit_code=3),
    SandboxCallError("mod.Err: boom", "mod.Err"),
]


@pytest.mark.parametrize("exc", ERRORS, ids=lambda e: f"{type(e).__name__}-{e}")
def test_errors_survive_pickling(exc):
    exc.result = {"stdout": b"partial"}  # set by the runner on errors it raises
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert vars(back) == vars(exc)
    assert isinstance(back, SandboxError)


def test_crashed_names_its_signal():
    assert SandboxCrashed("x", signal.SIGKILL).signal_name == "SIGKILL"
    assert SandboxCrashed("x", 200).signal_name == "signal 200"
    assert SandboxCrashed("x", exit_code=1).signal_name is None


def test_result_defaults_to_none_and_warning_is_a_user_warning():
    assert SandboxError("x").result is None
    assert issubclass(SandboxWarning, UserWarning)


def test_remote_traceback_prints_as_the_child_s_text():
    tb = RemoteTraceback('Traceback (most recent call last):\n  File "<sandbox>"')
    assert str(tb).startswith("Traceback")
