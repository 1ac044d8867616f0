"""``astra.tool``: register a function as a sandboxed tool; ``Client.call_tool`` and, inside
an agent, ``self.tool`` call it (kernel/tools.py runs and audits the calls).

    @astra.tool(profile="python", cpu_s=2, memory_mb=256, timeout_s=5)
    def run_code(src: str) -> str: ...

    k.call_tool("run_code", "print(1)")          # -> astra.Future
    k.spawn(Reviewer, tools=["run_code", "shell"])  # the agent may call these two only

The registry is this process's: a tool is shipped with each call (or with each spawn that
grants it), by reference when its function is importable, else by value (cloudpickle). The
built-in ``python`` and ``shell`` tools need no registration: ``call_tool("python", src)``.
"""

from __future__ import annotations

__all__ = ["resolve", "tool"]

import threading
from typing import TYPE_CHECKING, Final, TypeVar, overload

from kernel import function_key
from kernel.tools import BUILTIN_TOOLS, CapabilityError, ToolSpec
from sandbox import Policy

if TYPE_CHECKING:
    from collections.abc import Callable

F = TypeVar("F", bound="Callable[..., object]")

_registry: dict[str, ToolSpec] = {}
_lock = threading.Lock()
#: Policies of the built-in tools (their calls may pass limits of their own later).
_BUILTIN_POLICY: Final = {"python": {"profile": "python"}, "shell": {"profile": "shell"}}


@overload
def tool(
    fn: F,
    /,
    *,
    name: str | None = None,
    profile: str = "python",
    network: bool = False,
    timeout_s: float | None = None,
    **limits: object,
) -> F: ...


@overload
def tool(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    profile: str = "python",
    network: bool = False,
    timeout_s: float | None = None,
    **limits: object,
) -> Callable[[F], F]: ...


def tool(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    profile: str = "python",
    network: bool = False,
    timeout_s: float | None = None,
    **limits: object,
) -> F | Callable[[F], F]:
    """Register ``fn`` as the tool ``name`` (default: its ``__name__``) run under a sandbox
    policy: ``profile`` (``"python"``, ``"shell"``; ``network=True`` means ``"network"``),
    ``timeout_s`` (the wall limit) and any other ``sandbox.Policy`` field (``cpu_s``,
    ``memory_mb``, ``max_output_bytes``, ...). The function itself is returned unchanged.
    Raises ``ValueError`` for a bad limit (checked now, not at the first call)."""

    def register(f: F) -> F:
        fields: dict[str, object] = {"profile": "network" if network else profile, **limits}
        if timeout_s is not None:
            fields["wall_s"] = timeout_s
        Policy(**fields)  # type: ignore[arg-type]  # validates now
        tool_name = name or getattr(f, "__name__", "")
        if not tool_name or tool_name in BUILTIN_TOOLS:
            raise ValueError(f"a tool needs a name other than {BUILTIN_TOOLS}: {tool_name!r}")
        _, data = function_key(f)
        with _lock:
            _registry[tool_name] = ToolSpec(tool_name, data, fields)
        return f

    return register(fn) if fn is not None else register


def resolve(name: str) -> ToolSpec:
    """The spec of tool ``name`` (registered here, or built in). Raises ``CapabilityError``."""
    if name in BUILTIN_TOOLS:
        return ToolSpec(name, b"", _BUILTIN_POLICY[name])
    with _lock:
        spec = _registry.get(name)
    if spec is None:
        raise CapabilityError(f"no tool named {name!r} (register it with @astra.tool)")
    return spec
