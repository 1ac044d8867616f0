"""Shipping code and values between processes: functions by content hash, arguments,
results and exceptions.

Functions ship once per worker generation and are cached by content hash: an importable
function pickles *by reference* (module and qualified name, a few dozen bytes; the worker
imports it), anything else (defined in ``__main__``, a notebook, a closure, a lambda) goes
through cloudpickle *by value*. The key is the BLAKE2b digest of those bytes, so two
submissions of one function share a cache entry and a changed function gets a new one.

Values (arguments, results) use pickle protocol 5, falling back to cloudpickle for what
pickle cannot reach (lambdas inside arguments). Large numpy arguments can travel by
reference: ``dumps_refs`` replaces each array ``to_ref`` maps to an arena ``ArrayRef`` with
a persistent id, and ``loads_refs`` turns it back into a read-only view of the arena block
(no copy). Exceptions cross with their formatted
traceback; one that will not pickle crosses as its ``repr``.
"""

from __future__ import annotations

__all__ = [
    "ShippingError",
    "TaskFunction",
    "dumps",
    "dumps_refs",
    "function_key",
    "load_function",
    "loads",
    "loads_refs",
    "pack_exception",
]

import hashlib
import io
import pickle
import traceback
from typing import TYPE_CHECKING, Final, Protocol

import cloudpickle

from ipc import ArrayRef

if TYPE_CHECKING:
    from collections.abc import Callable

#: Bytes of the function cache key.
KEY_BYTES: Final = 16


class TaskFunction(Protocol):
    """What a task is: any callable (``Callable[..., object]`` without an explicit Any)."""

    def __call__(self, *args: object, **kwargs: object) -> object: ...


class ShippingError(Exception):
    """Raised when a function or value cannot be pickled or unpickled. ``__cause__`` holds
    the pickler's own error."""


def _by_reference_ok(fn: object) -> bool:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    return bool(module) and module != "__main__" and "<locals>" not in qualname


def function_key(fn: object) -> tuple[bytes, bytes]:
    """Pickle ``fn`` for shipping; returns (key, pickled bytes). Raises ``ShippingError``."""
    data: bytes | None = None
    if _by_reference_ok(fn):
        try:
            data = pickle.dumps(fn, protocol=5)
        except (pickle.PicklingError, AttributeError, TypeError):
            data = None  # not reachable by name after all (e.g. a rebound global)
    if data is None:
        try:
            data = cloudpickle.dumps(fn, protocol=5)
        except Exception as exc:
            raise ShippingError(f"cannot pickle function {fn!r}: {exc}") from exc
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest(), data


def load_function(data: bytes) -> TaskFunction:
    """Unpickle a shipped function. Raises ``ShippingError``."""
    fn = loads(data)
    if not callable(fn):
        raise ShippingError(f"shipped object is not callable: {type(fn).__qualname__}")
    return fn


def dumps(value: object) -> bytes:
    """Pickle a value (pickle, then cloudpickle). Raises ``ShippingError``."""
    try:
        return pickle.dumps(value, protocol=5)
    except Exception as first:  # pickle raises PicklingError, TypeError, AttributeError...
        try:
            data: bytes = cloudpickle.dumps(value, protocol=5)
            return data
        except Exception as exc:
            raise ShippingError(f"cannot pickle {type(value).__qualname__}: {first}") from exc


_REF_TAG: Final = "astra.arena"


def dumps_refs(value: object, to_ref: Callable[[object], ArrayRef | None]) -> bytes:
    """Pickle ``value``, replacing every object ``to_ref`` maps to an ``ArrayRef`` by that
    reference (a persistent id). Raises ``ShippingError``."""

    class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
        def persistent_id(self, obj: object) -> object:
            ref = to_ref(obj)
            if ref is None:
                return None
            return (_REF_TAG, ref.block, ref.generation, ref.nbytes, ref.dtype, ref.shape)

    buf = io.BytesIO()
    try:
        _Pickler(buf, protocol=5).dump(value)
    except Exception as exc:
        raise ShippingError(f"cannot pickle {type(value).__qualname__}: {exc}") from exc
    return buf.getvalue()


def loads_refs(data: bytes | memoryview, from_ref: Callable[[ArrayRef], object]) -> object:
    """Unpickle what ``dumps_refs`` made, each reference through ``from_ref``. Raises
    ``ShippingError``."""

    class _Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: object) -> object:
            if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == _REF_TAG):
                raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
            _, block, generation, nbytes, dtype, shape = pid
            return from_ref(ArrayRef(block, generation, nbytes, dtype, tuple(shape)))

    try:
        return _Unpickler(io.BytesIO(data)).load()
    except Exception as exc:
        raise ShippingError(f"cannot unpickle value: {exc!r}") from exc


def loads(data: bytes | memoryview) -> object:
    """Unpickle a value. Raises ``ShippingError``."""
    try:
        return pickle.loads(data)
    except Exception as exc:  # any error of the unpickled object's own __setstate__ etc.
        raise ShippingError(f"cannot unpickle value: {exc!r}") from exc


def pack_exception(exc: BaseException) -> tuple[bytes, str, str]:
    """(pickled exception or b"", formatted traceback, "Type: message") for a ``TaskError``."""
    tb = "".join(traceback.format_exception(exc))
    exc.__traceback__ = None  # tracebacks do not pickle; the text above carries it
    try:
        data = dumps(exc)
        pickle.loads(data)  # some exceptions pickle but fail to rebuild (custom __init__)
    except Exception:
        data = b""
    return data, tb, f"{type(exc).__qualname__}: {exc}"
