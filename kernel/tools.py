"""Tools: named sandboxed calls, the capabilities that grant them to agents, and the audit
log of every call.

A tool is a function (or a built-in: ``python`` runs source text, ``shell`` a command line)
with a ``sandbox.Policy``. ``ToolSpec`` is what travels: the name, the pickled function
(empty for a built-in) and the policy's fields. A call runs in the process that makes it (a
worker: a client's ``call_tool`` is a task; an agent's ``self.tool`` runs on a thread of
its worker so the agent's loop goes on) through ``sandbox.Runner``: a fresh child, locked
down, killed at its limits. A tool that crashes, times out or runs out of memory fails that
call with the sandbox's typed error; the worker and the agent carry on.

Capabilities: an agent may call only the tools named at its spawn (``tools=[...]``); any
other name raises ``CapabilityError`` before anything runs.

Plugin tools (``ctx.tool`` in kernel/plugins.py) travel as ``ToolSpec(name, b"", {})``: the
worker that runs the call takes the function and policy from its own plugins. Every call,
granted or refused, is a ``tool_called`` event for the plugins' listeners.

Audit: every call, granted or refused, appends an ``AuditEntry`` (time, agent, tool, a
digest of the arguments, outcome, duration, peak RSS of the child) to the ``audit`` table
of the kernel's journal ``<data_dir>/audit`` (synced: the log is a record). ``read_audit``
returns them in order; ``astra audit`` prints them.
"""

from __future__ import annotations

__all__ = [
    "AUDIT_JOURNAL",
    "BUILTIN_TOOLS",
    "AuditEntry",
    "CapabilityError",
    "ToolSpec",
    "read_audit",
    "run_tool",
    "set_data_dir",
    "tool_task",
]

import dataclasses
import hashlib
import os
import threading
import time
from typing import TYPE_CHECKING, Final

import msgspec

from sandbox import Policy, Runner, SandboxError

from . import plugins, shipping
from .errors import KernelError
from .journal import Journal, JournalError
from .kmetrics import tool_outcome

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .metrics import MetricsRow

#: The journal (under the kernel's data dir) and its table holding the audit log.
AUDIT_JOURNAL: Final = "audit"
_TABLE: Final = "audit"
#: The built-in tools: run Python source text, run a shell command line.
BUILTIN_TOOLS: Final = ("python", "shell")


class CapabilityError(KernelError, PermissionError):
    """Raised when an agent calls a tool it was not granted at spawn, or a tool that does
    not exist. Nothing runs."""


@dataclasses.dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool as it travels to the process that runs it."""

    name: str
    fn: bytes  # the pickled function; b"" for a built-in
    policy: Mapping[str, object]  # sandbox.Policy fields

    def make_policy(self) -> Policy:
        return Policy(**dict(self.policy))  # type: ignore[arg-type]


class AuditEntry(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One tool call, as the audit log keeps it."""

    time: float  #: wall clock at the call's end (seconds since the epoch)
    agent: str  #: the calling agent's name; "" for a client's call
    tool: str  #: the tool's name
    args_digest: str  #: BLAKE2b (16 bytes, hex) of the pickled arguments
    outcome: str  #: "ok", "refused", or the error's type name
    duration_s: float  #: the sandboxed call's wall time (0 if it did not run)
    peak_rss_kb: int  #: the child's peak resident set (0 if it did not run)


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(AuditEntry)
_runners: dict[tuple[str, tuple[tuple[str, str], ...]], Runner] = {}
_runners_lock = threading.Lock()
_journals: dict[str, Journal] = {}
_metrics: tuple[MetricsRow, threading.Lock] | None = None  # set_metrics
_seq = 0


def _runner(spec: ToolSpec) -> Runner:
    key = (spec.name, tuple(sorted((k, repr(v)) for k, v in spec.policy.items())))
    with _runners_lock:
        runner = _runners.get(key)
        if runner is None:
            runner = _runners[key] = Runner(spec.make_policy())  # compiles the filter once
        return runner


def run_tool(
    spec: ToolSpec,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    *,
    agent: str = "",
    data_dir: str | None = None,
) -> object:
    """Run one tool call here, sandboxed, and audit it (when ``data_dir`` is given).
    Returns the call's value (a shell command's exit code). Raises the sandbox's typed
    errors, or what the tool raised."""
    digest = _digest(args, kwargs)
    outcome, duration, rss = "ok", 0.0, 0
    try:
        if not spec.fn and spec.name not in BUILTIN_TOOLS:
            spec = _plugin_tool(spec.name)
        runner = _runner(spec)
        if spec.fn:
            fn = shipping.load_function(spec.fn)
            result = runner.call(fn, *args, **kwargs)
        elif spec.name == "python":
            result = runner.run_python(*args, **kwargs)  # type: ignore[arg-type]
        elif spec.name == "shell":
            result = runner.run_shell(*args, **kwargs)  # type: ignore[arg-type]
        else:
            raise CapabilityError(f"no tool named {spec.name!r}")
        duration, rss = result.duration_s, result.peak_rss_kb
        return result.value
    except SandboxError as exc:
        outcome = type(exc).__name__
        failed = getattr(exc, "result", None)
        if failed is not None:
            duration, rss = failed.duration_s, failed.peak_rss_kb
        raise
    except BaseException as exc:
        outcome = type(exc).__name__
        raise
    finally:
        if data_dir is not None:
            audit(data_dir, AuditEntry(time.time(), agent, spec.name, digest, outcome,
                                       duration, rss))  # fmt: skip
        _count(outcome)
        if plugins.events.tool_called:
            plugins.emit("tool_called", agent=agent, name=spec.name, detail=outcome)


def set_metrics(row: MetricsRow | None, lock: threading.Lock) -> None:
    """Count this process's tool calls by outcome into ``row`` (a worker's metrics row,
    kernel/kmetrics.py), under ``lock`` (the row's other writers take it too)."""
    global _metrics
    _metrics = (row, lock) if row is not None else None


def _count(outcome: str) -> None:
    held = _metrics
    if held is not None:
        row, lock = held
        with lock:
            row.inc(f"tool_{tool_outcome(outcome)}")


def _plugin_tool(name: str) -> ToolSpec:
    """The spec of a tool a plugin of this process offers (kernel/plugins.py): what a
    client or a spawn grant names by ``ToolSpec(name, b"", {})``."""
    host = plugins.current()
    spec = host.tool_spec(name) if host is not None else None
    if spec is None:
        raise CapabilityError(f"no tool named {name!r}")
    return spec


_data_dir: str | None = None  # this process's kernel data dir (a worker sets it)


def set_data_dir(path: str | None) -> None:
    """A worker: where the audit log of calls made in this process goes."""
    global _data_dir
    _data_dir = path


def tool_task(spec: ToolSpec, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
    """The task a client's ``call_tool`` submits: the call, run in the worker, audited."""
    return run_tool(spec, args, kwargs, data_dir=_data_dir)


def refuse(data_dir: str | None, agent: str, name: str, args: tuple[object, ...]) -> None:
    """Audit a refused call and raise ``CapabilityError``."""
    if data_dir is not None:
        audit(data_dir, AuditEntry(time.time(), agent, name, _digest(args, {}), "refused", 0, 0))
    _count("refused")
    if plugins.events.tool_called:
        plugins.emit("tool_called", agent=agent, name=name, detail="refused")
    raise CapabilityError(f"agent {agent!r} was not granted the tool {name!r}")


def _digest(args: tuple[object, ...], kwargs: dict[str, object]) -> str:
    try:
        data = shipping.dumps((args, kwargs))
    except shipping.ShippingError:
        data = repr((args, kwargs)).encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def audit(data_dir: str, entry: AuditEntry) -> None:
    """Append ``entry`` to the audit log under ``data_dir`` (keys: time, pid, sequence)."""
    global _seq
    path = os.path.join(data_dir, AUDIT_JOURNAL)
    with _runners_lock:
        journal = _journals.get(path)
        if journal is None or journal.closed:
            journal = _journals[path] = Journal.open(path)
        _seq += 1
        key = f"{time.time_ns():020d}.{os.getpid():08d}.{_seq:08d}".encode()
    try:
        journal.table(_TABLE).put(key, _encoder.encode(entry))
    except JournalError:
        journal.reopen()  # a forked child's inherited handle: this process's own now
        journal.table(_TABLE).put(key, _encoder.encode(entry))


def read_audit(data_dir: str, *, tail: int | None = None) -> list[AuditEntry]:
    """The audit log under ``data_dir``, oldest first ([] if there is none)."""
    path = os.path.join(data_dir, AUDIT_JOURNAL)
    if not os.path.exists(path):
        return []
    with Journal.open(path) as journal:
        entries = [_decoder.decode(v) for _, v in journal.table(_TABLE).scan()]
    return entries[-tail:] if tail else entries
