"""The kernel's wire envelopes (tags 200 and up) and the decoder for every frame it reads.

The kernel reuses ``ipc.messages.TaskDone`` (tag 3) for results and adds what ``ipc`` does
not know about: which client a task belongs to, cancellation by client, a worker's stop
order, and the supervisor's notice that a worker was lost. All are frozen, tagged,
``array_like`` msgspec Structs, sorted by OTP kind (STYLE.md 3). Tag numbers are never
reused. They hold only scalars and bytes, so they are ``gc=False``: a stream of tasks costs
the cyclic garbage collector nothing.

- *Calls*: ``RunTask`` (client -> worker), answered by ``TaskDone`` or ``TaskError``
  (worker -> client); ``SpawnAgent``, ``AgentCall`` (an ask) and ``StopAgent`` (client or
  worker -> the agent's worker), answered by ``AgentReply`` (kernel/agentd.py).
- *Casts*: ``CancelRun`` (client -> worker), ``StopWorker`` (supervisor -> worker),
  ``Wake`` (to a client's own receiver thread, or to an idle worker), ``StealReply``
  (victim worker -> thief worker).
- *Info*: ``WorkerLost`` (supervisor -> every client), ``TasksMoved`` (victim -> client).
"""

from __future__ import annotations

__all__ = [
    "KERNEL_TAGS",
    "MAX_REPLY_BYTES",
    "AgentCall",
    "AgentCalls",
    "AgentReplies",
    "AgentReply",
    "CancelRun",
    "ErrorKind",
    "KernelMessage",
    "ListAgents",
    "RunTask",
    "SpawnAgent",
    "StealReply",
    "StopAgent",
    "StopWorker",
    "TaskDone",
    "TaskError",
    "TasksMoved",
    "Wake",
    "WorkerLost",
    "decode_frames",
    "encode",
    "encode_queue",
]

from enum import IntEnum
from typing import TYPE_CHECKING, Final

import msgspec

from ipc import ArrayRef, CodecError
from ipc.messages import TaskDone

if TYPE_CHECKING:
    from collections.abc import Sequence

# ---- Calls ----


class RunTask(msgspec.Struct, frozen=True, tag=200, array_like=True, gc=False):
    """Call: run a task on this worker. Answered by ``TaskDone`` or ``TaskError``."""

    client: int  #: the submitting client's slot in the control block
    client_gen: int  #: the slot's claim generation; a mismatch means the client is gone
    task_id: int  #: unique per client; echoed in the reply
    fn_key: bytes  #: content hash of the pickled function (the worker caches by it)
    fn: bytes | None  #: the pickled function, or None if this worker already has fn_key
    args: bytes  #: pickled (args, kwargs)
    priority: int = 0  #: higher runs first among this worker's ready tasks
    timeout_s: float = 0.0  #: wall-clock limit for one run; 0 means none
    refs: bool = False  #: ``args`` holds arena references (``shipping.dumps_refs``)
    stolen: bool = False  #: forwarded by a victim to a thief (kernel/scheduler.py), not new
    #: no retries left: the worker shows it running until its reply is in the ring, so a
    #: worker death before the reply fails it (WorkerCrashedError) instead of re-running it
    once: bool = False


class SpawnAgent(msgspec.Struct, frozen=True, tag=208, array_like=True, gc=False):
    """Call: start agent ``name`` on this worker (already claimed in the registry by the
    sender). Answered by ``AgentReply`` (the name, or the error ``__init__`` raised)."""

    reply_to: int  #: the origin code of who waits (kernel/agentd.py)
    call_id: int  #: echoed in the reply
    name: str  #: the agent's unique name (its id)
    cls: bytes  #: the pickled agent class
    args: bytes  #: pickled (args, kwargs) for the class
    restart: str  #: "permanent", "on-failure" or "temporary"
    persist: bool  #: checkpoint the agent's state
    mailbox: int = 0  #: mailbox capacity; 0 for the default
    tools: bytes = b""  #: pickled {name: ToolSpec} of the tools granted to it (kernel/tools.py)
    #: plugin name -> what it was granted for that plugin, e.g. {"memory": ["team"]}
    #: (kernel/plugins.py ``AgentInfo.grants``)
    grants: dict[str, list[str]] = {}


class AgentCall(msgspec.Struct, frozen=True, tag=209, array_like=True, gc=False):
    """Call or cast: a message to an agent on this worker. An ask (``ask``) is answered by
    ``AgentReply``; a tell is not. With ``topic`` set it is a published event for this
    worker's subscribers (``target`` empty)."""

    reply_to: int  #: the origin code of the sender (where an answer goes)
    call_id: int  #: echoed in the reply; 0 for a tell
    target: str  #: the agent's name
    method: str  #: the handler
    args: bytes  #: pickled (args, kwargs)
    sender: str  #: stable sender id, for per-sender order and deduplication
    msg_id: int  #: per-sender increasing id
    ask: bool  #: an answer is wanted
    timeout_s: float = 0.0  #: how long a full mailbox may hold the message back; 0: default
    topic: str = ""  #: a published event's topic
    refs: bool = False  #: ``args`` holds arena references, held for this worker's process


class AgentReply(msgspec.Struct, frozen=True, tag=210, array_like=True, gc=False):
    """Reply: the answer to ``SpawnAgent``, ``AgentCall`` (ask) or ``StopAgent``."""

    call_id: int  #: the call answered
    ok: bool  #: ``payload`` is the pickled result (True) or a packed exception (False)
    payload: bytes  #: pickled result, or the pickled exception (b"" if it would not pickle)
    traceback: str = ""  #: the remote traceback of a failure
    message: str = ""  #: "Type: text" of a failure


class AgentCalls(msgspec.Struct, frozen=True, tag=213, array_like=True, gc=False):
    """Many ``AgentCall``s in one frame, in order: a client's batch (astra/_agents.py).
    One encode and one decode for all of them, not one each."""

    calls: list[AgentCall]


class AgentReplies(msgspec.Struct, frozen=True, tag=214, array_like=True, gc=False):
    """Many ``AgentReply``s in one frame, in order: a worker's answers to one client."""

    replies: list[AgentReply]


class StopAgent(msgspec.Struct, frozen=True, tag=211, array_like=True, gc=False):
    """Call: stop agent ``target`` (after its queued messages, or at once if ``kill``).
    Answered by ``AgentReply``."""

    reply_to: int  #: the origin code of who waits
    call_id: int  #: echoed in the reply
    target: str  #: the agent's name
    kill: bool  #: drop its mailbox instead of finishing it


class ListAgents(msgspec.Struct, frozen=True, tag=212, array_like=True, gc=False):
    """Call: the rows of this worker's agents (``astra ps``). Answered by ``AgentReply``
    with a list of (name, class, mailbox, handled, state, restarts)."""

    reply_to: int  #: the origin code of who waits
    call_id: int  #: echoed in the reply


class TaskError(msgspec.Struct, frozen=True, tag=204, array_like=True, gc=False):
    """Reply: the task did not produce a result. ``kind`` says why (``ErrorKind``)."""

    task_id: int  #: the failed task
    kind: int  #: an ``ErrorKind`` value
    error: bytes  #: the pickled exception (RAISED), or b"" when it could not be pickled
    traceback: str  #: the formatted remote traceback
    message: str  #: ``"Type: text"`` of the exception, kept even if unpickling fails


class ErrorKind(IntEnum):
    RAISED = 0  # the task raised; ``error`` holds the exception
    TIMEOUT = 1  # the task ran past its timeout_s
    SERIALIZATION = 2  # the function, its arguments or its result would not (un)pickle
    UNKNOWN_FUNCTION = 3  # fn was None and the worker does not know fn_key: resend with fn


# ---- Casts ----


class CancelRun(msgspec.Struct, frozen=True, tag=201, array_like=True, gc=False):
    """Cast: drop a queued task, or cancel a running ``async def`` task; no reply."""

    client: int  #: the client's slot
    task_id: int  #: the task to cancel


class StopWorker(msgspec.Struct, frozen=True, tag=202, array_like=True, gc=False):
    """Cast: the supervisor tells a worker to exit, after finishing its queue if ``drain``."""

    drain: bool  #: finish queued and running tasks first


class Wake(msgspec.Struct, frozen=True, tag=205, array_like=True, gc=False):
    """Cast: wakes a blocked reader. A client to its own receiver thread (to stop it); a
    client or worker to an idle worker: work is queued elsewhere, try to steal."""


class StealReply(msgspec.Struct, frozen=True, tag=206, array_like=True, gc=False):
    """Cast: a victim's answer to a steal request, after the ``count`` ``RunTask``s it
    forwarded on the same lane (kernel/scheduler.py)."""

    victim: int  #: the worker that gave
    seq: int  #: the request's sequence number
    count: int  #: tasks forwarded; 0 if it had none to spare


# ---- Info ----


class TasksMoved(msgspec.Struct, frozen=True, tag=207, array_like=True, gc=False):
    """Info: a victim gave these tasks of the client to worker ``worker`` (generation
    ``generation``), which now runs them and replies (kernel/scheduler.py)."""

    worker: int  #: the thief's index
    generation: int  #: the thief's generation
    task_ids: list[int]  #: the client's task ids that moved


class WorkerLost(msgspec.Struct, frozen=True, tag=203, array_like=True, gc=False):
    """Info: the supervisor saw worker ``worker`` exit and (if ``generation`` > 0) started
    its replacement, reading ring ``to_w<NN>.<generation>``."""

    worker: int  #: the worker's index
    pid: int  #: the pid that exited
    exitcode: int  #: exit status, or minus the signal number that killed it
    generation: int  #: the replacement's generation; 0 if the worker was not restarted
    running_task: int  #: this client's task the worker was running, or -1


KernelMessage = (
    RunTask
    | TaskDone
    | TaskError
    | CancelRun
    | StopWorker
    | Wake
    | WorkerLost
    | StealReply
    | TasksMoved
    | SpawnAgent
    | AgentCall
    | AgentReply
    | StopAgent
    | ListAgents
    | AgentCalls
    | AgentReplies
)

#: Tag number -> envelope type, for the kernel's own messages (``ipc`` owns 1-199).
KERNEL_TAGS: Final[dict[int, type[KernelMessage]]] = {
    200: RunTask,
    201: CancelRun,
    202: StopWorker,
    203: WorkerLost,
    204: TaskError,
    205: Wake,
    206: StealReply,
    207: TasksMoved,
    208: SpawnAgent,
    209: AgentCall,
    210: AgentReply,
    211: StopAgent,
    212: ListAgents,
    213: AgentCalls,
    214: AgentReplies,
}
for _tag, _cls in KERNEL_TAGS.items():
    assert _cls.__struct_config__.tag == _tag, (_cls, _tag)

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(KernelMessage)
_ = ArrayRef  # carried inside TaskDone


#: Largest pickled result a reply carries (a task's ``TaskDone``, an agent's ``AgentReply``);
#: a bigger one fails with a serialization error. Under the rings' 64 MiB frame limit, with
#: room for a batch (``BATCH_FRAME_BYTES``). Numpy arrays travel through the arena instead.
MAX_REPLY_BYTES: Final = 48 << 20
#: Bytes of arguments (or answers) past which ``encode_queue`` starts another frame.
BATCH_FRAME_BYTES: Final = 1 << 20


def encode_queue(items: Sequence[bytes | AgentCall | AgentReply]) -> list[bytes]:
    """Frames for a queue of outgoing items, in order: bytes (frames already encoded) as
    they are; each run of ``AgentCall`` structs one ``AgentCalls`` frame (a run of one: the
    call's own frame) and each run of ``AgentReply`` structs one ``AgentReplies`` frame.
    A run stops short of ``BATCH_FRAME_BYTES`` of arguments or answers, so that a frame is
    either that small or one item alone: a batch is never too large for a ring when its
    items are not (twelve 1 MiB answers in one frame were)."""
    frames: list[bytes] = []
    run: list[AgentCall | AgentReply] = []
    size = 0
    for item in items:
        if type(item) is bytes:
            if run:
                frames.append(_encode_run(run))
                run, size = [], 0
            frames.append(item)
            continue
        n = len(item.args) if type(item) is AgentCall else len(item.payload)  # type: ignore[union-attr]
        if run and (type(run[0]) is not type(item) or size + n > BATCH_FRAME_BYTES):
            frames.append(_encode_run(run))
            run, size = [], 0
        run.append(item)  # type: ignore[arg-type]
        size += n
    if run:
        frames.append(_encode_run(run))
    return frames


def _encode_run(run: list[AgentCall | AgentReply]) -> bytes:
    if type(run[0]) is AgentReply:
        return _encoder.encode(AgentReplies(run))  # type: ignore[arg-type]
    if len(run) == 1:
        return _encoder.encode(run[0])
    return _encoder.encode(AgentCalls(run))  # type: ignore[arg-type]


#: Encode one kernel envelope (``KernelMessage``) to bytes: the encoder's own method, not a
#: Python function around it, as it is on the path of every message.
encode: Final = _encoder.encode


def decode_frames(frames: list[bytes]) -> list[KernelMessage | CodecError]:
    """Decode a ``recv_many`` batch; a bad frame yields a ``CodecError`` in its place, so the
    reader logs it and goes on (Principle 5)."""
    out: list[KernelMessage | CodecError] = []
    for frame in frames:
        try:
            out.append(_decoder.decode(frame))
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            err = CodecError(f"undecodable frame ({len(frame)} B): {exc}")
            err.__cause__ = exc
            out.append(err)
    return out
