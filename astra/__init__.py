"""Astra: an operating system for AI agents on one large Linux host.

This module only re-exports the public API; implementation lives in private modules.
"""

from __future__ import annotations

from . import errors as errors
from ._errors import AstraError as AstraError, AstraInternalError as AstraInternalError
from ._version import __version__ as __version__

__all__ = ["AstraError", "AstraInternalError", "__version__", "errors"]


def _fixup_module_metadata() -> None:
    # Show public objects as astra.X in reprs and docs, not astra._errors.X (as trio does).
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("astra._"):
            obj.__module__ = "astra"


_fixup_module_metadata()
del _fixup_module_metadata
