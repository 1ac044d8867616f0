"""Dependency edges inside task arguments: futures (or graph nodes) at any depth of lists,
tuples and dict values.

``find`` is on the submit path of every task, so the common case (flat arguments of
scalars, strings, arrays) costs one type check per argument; only lists, tuples and dicts
are walked. ``substitute`` rebuilds just the containers that hold an edge.
"""

from __future__ import annotations

__all__ = ["find", "substitute"]

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

_CONTAINERS: Final = (list, tuple, dict)


def find(args: tuple[object, ...], kwargs: dict[str, object], cls: type) -> list[object]:
    """The instances of ``cls`` among ``args`` and ``kwargs`` values, at any depth (repeats
    kept; nested ones in no particular order)."""
    found: list[object] = []
    for a in args:
        if isinstance(a, cls):
            found.append(a)
        elif isinstance(a, _CONTAINERS):
            _walk(a, cls, found)
    if kwargs:
        for v in kwargs.values():
            if isinstance(v, cls):
                found.append(v)
            elif isinstance(v, _CONTAINERS):
                _walk(v, cls, found)
    return found


def _walk(root: object, cls: type, found: list[object]) -> None:
    stack = [root]  # iterative: a deeply nested argument must not hit the recursion limit
    while stack:
        obj = stack.pop()
        items = obj.values() if isinstance(obj, dict) else obj
        for x in items:  # type: ignore[attr-defined]
            if isinstance(x, cls):
                found.append(x)
            elif isinstance(x, _CONTAINERS):
                stack.append(x)


def substitute(value: object, cls: type, fn: Callable[[object], object]) -> object:
    """``value`` with every instance of ``cls`` (at any depth of lists, tuples and dict
    values) replaced by ``fn(instance)``; containers without one are returned as they are."""
    if isinstance(value, cls):
        return fn(value)
    if not isinstance(value, _CONTAINERS):
        return value
    if isinstance(value, dict):
        out = {k: substitute(v, cls, fn) for k, v in value.items()}
        if all(out[k] is value[k] for k in value):
            return value
        return type(value)(out) if type(value) is not dict else out
    items = [substitute(x, cls, fn) for x in value]
    if all(a is b for a, b in zip(items, value, strict=True)):
        return value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*items)  # type: ignore[arg-type]
    return type(value)(items)
