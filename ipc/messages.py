"""Wire envelopes: every message that crosses a ring is one of these msgspec Structs.

Structs are frozen, tagged with a small integer (their entry in ``ipc.codec.MESSAGE_TAGS``)
and ``array_like``, so an envelope encodes as a msgpack array ``[tag, field, ...]``: no field
names on the wire, one validated decode step (NOTES.md: 0.23 us for a small struct, against
about 1 us for a dataclass through msgspec). Payloads that the kernel treats as opaque
(pickled functions, arguments, results) travel as ``bytes``; large arrays travel as an
``ArrayRef`` into the shared arena, never inline.

Messages are sorted by OTP kind:

- *Calls* expect a reply: ``SubmitTask`` -> ``TaskAccepted``, then ``TaskDone`` or
  ``TaskFailed``.
- *Casts* expect none: ``CancelTask``.
- *Info* messages come from the system: ``Heartbeat``, ``WorkerExited``.

Commands are ``VerbNoun``; events are ``NounVerbed``/``NounDone``. A tag number, once
published, is never reused: retire a message by leaving its number out of the table.
"""

from __future__ import annotations

__all__ = [
    "ArrayRef",
    "CancelTask",
    "Heartbeat",
    "Message",
    "SubmitTask",
    "TaskAccepted",
    "TaskDone",
    "TaskFailed",
    "WorkerExited",
]

import msgspec

# ---- Payload descriptors (not envelopes; carried inside them) ----


class ArrayRef(msgspec.Struct, frozen=True, tag=100, array_like=True):
    """A reference to an array or byte block in the shared payload arena (``ipc.arena``)."""

    block: int  #: index of the block in the arena's block table
    generation: int  #: the block's allocation number; a mismatch means the block was freed
    nbytes: int  #: payload length in bytes (at most the block's pages)
    dtype: str  #: numpy dtype string, e.g. ``"<f8"``; ``"|u1"`` for raw bytes
    shape: tuple[int, ...]  #: array shape; ``(nbytes,)`` for raw bytes


# ---- Calls ----


class SubmitTask(msgspec.Struct, frozen=True, tag=1, array_like=True):
    """Call: run a task. Answered by ``TaskAccepted``, then ``TaskDone`` or ``TaskFailed``."""

    task_id: int  #: unique per submitting client; echoed in every reply
    fn_key: bytes  #: content hash of the pickled function (the receiver caches by it)
    fn: bytes | None  #: the pickled function, or None if the receiver already has fn_key
    args: bytes  #: pickled (args, kwargs), Futures replaced by their task ids
    priority: int = 0  #: higher runs first among ready tasks on a worker
    retries: int = 0  #: re-runs allowed after a worker crash or a retryable error
    timeout_s: float = 0.0  #: wall-clock limit for one run; 0 means none


class TaskAccepted(msgspec.Struct, frozen=True, tag=2, array_like=True):
    """Reply to ``SubmitTask``: the task is queued on ``worker``."""

    task_id: int  #: the submitted task
    worker: int  #: index of the worker that queued it


class TaskDone(msgspec.Struct, frozen=True, tag=3, array_like=True):
    """Reply: the task finished and produced a result."""

    task_id: int  #: the finished task
    result: bytes | None  #: the pickled result inline, or None when ``ref`` holds it
    ref: ArrayRef | None = None  #: a large result left in the arena


class TaskFailed(msgspec.Struct, frozen=True, tag=4, array_like=True):
    """Reply: the task raised, timed out, or lost its worker."""

    task_id: int  #: the failed task
    error: bytes  #: the pickled exception (its remote traceback becomes ``__cause__``)
    traceback: str  #: the formatted remote traceback, kept even if unpickling fails


# ---- Casts ----


class CancelTask(msgspec.Struct, frozen=True, tag=5, array_like=True):
    """Cast: cancel a task if it has not started; no reply."""

    task_id: int  #: the task to cancel


# ---- Info ----


class Heartbeat(msgspec.Struct, frozen=True, tag=6, array_like=True):
    """Info: a worker is alive; sent by each worker every heartbeat interval."""

    worker: int  #: the worker's index (``w03`` is 3)
    sent_ns: int  #: ``time.monotonic_ns()`` at the sender
    queued: int  #: ready tasks waiting in the worker's deque


class WorkerExited(msgspec.Struct, frozen=True, tag=7, array_like=True):
    """Info: the supervisor saw a worker process exit."""

    worker: int  #: the worker's index
    pid: int  #: the pid that exited
    exitcode: int  #: exit status, or minus the signal number that killed it


Message = SubmitTask | TaskAccepted | TaskDone | TaskFailed | CancelTask | Heartbeat | WorkerExited
