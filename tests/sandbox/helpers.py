"""Helpers of the sandbox tests: naming a call's outcome."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandbox import SandboxCrashed, SandboxError, SandboxTimeout, SandboxViolation

if TYPE_CHECKING:
    from collections.abc import Callable

    from sandbox import SandboxResult


def outcome(run: Callable[[], SandboxResult]) -> str:
    """A call's outcome as one comparable word: ``"ok"``, or the exception's type name, and
    for the sandbox's typed errors the detail that tells them apart
    (``SandboxViolation:socket``, ``SandboxTimeout:cpu``, ``SandboxCrashed:SIGSEGV``)."""
    try:
        run()
    except SandboxViolation as exc:
        return f"SandboxViolation:{exc.syscall}"
    except SandboxTimeout as exc:
        return f"SandboxTimeout:{exc.limit}"
    except SandboxCrashed as exc:
        return f"SandboxCrashed:{exc.signal_name or exc.exit_code}"
    except SandboxError as exc:
        return type(exc).__name__
    except Exception as exc:
        return type(exc).__name__
    return "ok"
