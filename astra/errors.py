"""Public namespace for Astra's exceptions: ``from astra.errors import AstraError``."""

from __future__ import annotations

from ._errors import AstraError as AstraError, AstraInternalError as AstraInternalError

__all__ = ["AstraError", "AstraInternalError"]
