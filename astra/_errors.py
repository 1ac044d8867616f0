"""The public exception tree. Every error Astra raises to users derives from AstraError.

    AstraError
    +-- AstraInternalError     this should never happen; please file a bug

Lower layers define their own roots (``ipc.IPCError``, ``sandbox.SandboxError``,
``kernel.KernelError``); the client maps them onto this tree at the boundary, so users never
meet a kernel class.
"""

from __future__ import annotations

__all__ = [
    "AstraError",
    "AstraInternalError",
]


class AstraError(Exception):
    """Root of every error Astra raises to users."""


class AstraInternalError(AstraError):
    """Raised when Astra finds itself in a state it believes impossible.

    This should never happen; please file a bug with the traceback.
    """
