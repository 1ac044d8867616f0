"""The child's side of a call, and the records that cross back: run one call inside a
locked-down child, encode its value or failure, exit.

Everything here runs in the forked child (after ``lockdown.lock_down``) except
:func:`parse_frames`, which the parent uses to read the reply stream. The child writes
frames (``u32 length + msgpack``) to fd 4: :class:`Locked` once locked down, then one
:class:`Reply`. msgspec decodes them in the parent into plain data only (a typed decoder:
no class named by the child is ever imported or built), because the child's bytes are
untrusted. The only pickle here flows the other way: the warm child unpickles the
:class:`Call` the (trusted) parent sent.

Invariants:

- The child never returns into the parent's code: :func:`child_main` ends in ``os._exit``.
- A reply is written only once fds 0-5 are the call's (``lockdown.descriptors_arranged``):
  before that, fd 4 may be one of the parent's own descriptors.
- stdout and stderr are closed before the reply is sent, and fd 4 right after: with all
  three at EOF the parent knows the call is over without waiting for the exit.
"""

from __future__ import annotations

__all__ = [
    "EXIT_NO_MEMORY",
    "EXIT_NO_REPLY",
    "FRAME",
    "SHELL",
    "Call",
    "Failure",
    "FailureKind",
    "Locked",
    "Reply",
    "child_main",
    "parse_frames",
]

import ast
import builtins
import contextlib
import dataclasses
import errno
import linecache
import os
import resource
import signal
import struct
import sys
import traceback
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn

import cloudpickle
import msgspec

from . import seccomp
from .lockdown import CALL_FD, REPLY_FD, descriptors_arranged, lock_down

if TYPE_CHECKING:
    from collections.abc import Callable

    from .lockdown import Plan

#: The shell a ``run_shell`` command line runs under.
SHELL: Final = "/bin/sh"
#: Exit code of a child whose reply could not be written (the pipe broke).
EXIT_NO_REPLY: Final = 120
#: Exit code of a child that could not even encode a MemoryError reply.
EXIT_NO_MEMORY: Final = 121
#: The header of every frame on the call and reply pipes: the payload's length.
FRAME: Final = struct.Struct("<I")


# ---- Wire records (child -> parent) ----


FailureKind = Literal["raised", "violation", "memory", "exit", "setup", "unserializable"]


class Failure(msgspec.Struct, frozen=True):
    """Why a call produced no value. ``kind`` decides the parent's exception."""

    kind: FailureKind
    type_name: str  # "builtins.ValueError", "mymod.MyError"
    message: str  # str(exc)
    traceback: str = ""  # the child's formatted traceback
    args: list[Any] = msgspec.field(default_factory=list)  # exc.args when plain data
    filename: str | None = None  # OSError.filename
    filename2: str | None = None
    syscall: str | None = None  # violation: the denied syscall
    nr: int | None = None
    exit_code: int | None = None  # exit: the code passed to sys.exit


class Locked(msgspec.Struct, frozen=True, tag=True):
    """First frame: the lockdown is complete (a warm child is ready)."""

    layers: list[str]


class Reply(msgspec.Struct, frozen=True, tag=True):
    """Last frame: the call's value or failure, and the child's own resource use (the
    parent may return before it can reap the child and read its rusage)."""

    value: Any = None
    failure: Failure | None = None
    cpu_s: float = 0.0
    peak_rss_kb: int = 0


_decoder = msgspec.msgpack.Decoder(Locked | Reply)
_encoder = msgspec.msgpack.Encoder()


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """One call, as the parent hands it to a child."""

    kind: Literal["call", "python", "shell"]
    fn: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    text: str = ""  # python: the source; shell: the command line


# ---- The child side ----

#: The call a warm child rehearses (see _rehearse): nothing, by reference.
_REHEARSAL: Final = Call("call", int)


def child_main(plan: Plan, call: Call | None, fds: tuple[int, int, int, int, int]) -> NoReturn:
    """Lock down, run one call, reply, exit. Never returns (runs right after fork)."""
    code = EXIT_NO_REPLY
    try:
        layers = lock_down(plan, fds)
        if call is None:
            _rehearse(plan)  # before Locked: a pool's wait_ready() counts it as lockdown
        _send_frame(_encoder.encode(Locked(layers)))
        if call is None:  # a warm child: wait for the call
            call = _read_call()
        reply = _run_and_encode(call, plan)
        _close_output()
        _send_frame(reply)
        os.close(REPLY_FD)  # EOF now, not after the (slower) teardown of our memory
        code = 0
    except BaseException as exc:  # the lockdown failed, or the reply pipe broke
        if descriptors_arranged():  # else fd 4 may be one of the parent's: exit mute
            with contextlib.suppress(BaseException):
                _send_frame(_encode_failure(exc, "setup"))
                code = 0
    finally:
        # Whatever happened, flush what the call printed, then leave without running any
        # of the parent's atexit handlers or finalizers (they are the parent's business).
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


def _rehearse(plan: Plan) -> None:
    """Take a warm child through the path of a call once, with a call that does nothing
    and a reply that is thrown away, before the real call arrives.

    Fork left this child's memory shared copy-on-write with the parent: the first write to
    each page copies it, at a page fault of a few microseconds. Serving a call writes to
    many pages (reference counts of the unpickler's, the call's and the encoder's objects),
    which the rehearsal copies now, off the call's path. It also spares the parent (which
    takes ~160 such faults per call): a page this child has copied is the parent's alone
    again, so the parent's next write to it (pickling the call, say) copies nothing. In a
    scratch timing here a warm call took about 0.7 ms without it, 0.5 ms with it.
    """
    _run_and_encode(cloudpickle.loads(cloudpickle.dumps(_REHEARSAL)), plan)


def _close_output() -> None:
    """Flush and close stdout and stderr: their EOF, with the reply, tells the parent the
    call is over before this process has finished exiting."""
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
        os.close(fd)


def _read_call() -> Call:
    # The parent is trusted: it pickled this with cloudpickle, so unpickling it is safe.
    header = _read_exactly(CALL_FD, FRAME.size)
    call = cloudpickle.loads(_read_exactly(CALL_FD, FRAME.unpack(header)[0]))
    os.close(CALL_FD)
    assert isinstance(call, Call)
    return call


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            raise EOFError("the parent closed the call pipe")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _send_frame(payload: bytes) -> None:
    # A pipe write may be partial (the parent drains as we write): loop until all is out.
    data = memoryview(FRAME.pack(len(payload)) + payload)
    while data:
        data = data[os.write(REPLY_FD, data) :]


def _run_and_encode(call: Call, plan: Plan) -> bytes:
    """Run ``call`` and encode its reply; a failure becomes a ``Failure`` reply."""
    # Encoded now, while there is memory: the call may leave none for encoding later.
    no_memory = _encoder.encode(Reply(failure=Failure("memory", "MemoryError", "")))
    try:
        try:
            value = _run(call, plan)
        except SystemExit as exc:
            if exc.code not in (0, None):
                return _encode_failure(exc, "raised")
            value = None  # sys.exit() or sys.exit(0): a normal end without a value
        except BaseException as exc:
            return _encode_failure(exc, "raised")
        try:
            # Our own use: the parent may return before it reaps us and reads rusage.
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu_s = usage.ru_utime + usage.ru_stime
            return _encoder.encode(Reply(value, None, cpu_s, usage.ru_maxrss))
        except (TypeError, ValueError, OverflowError) as exc:
            return _encode_failure(exc, "unserializable")
    except MemoryError:
        return no_memory  # encoded before the call, when memory was there


def _run(call: Call, plan: Plan) -> Any:
    # A shell call never comes back: the shell's exit status is its value.
    if call.kind == "shell":
        _exec_shell(call.text, plan)
    if call.kind == "python":
        return _run_source(call.text)
    assert call.fn is not None
    return call.fn(*call.args, **call.kwargs)


def _run_source(source: str) -> Any:
    """Run ``source`` as ``__main__``; its value is the last statement's, if an expression
    (as in a REPL), else None."""
    filename = "<sandbox>"
    # Registered so that tracebacks show the lines of the source, as a file's would.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tree = ast.parse(source, filename)
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr):
        tree.body.pop()
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(tree, filename, "exec"), namespace)
    if not isinstance(last, ast.Expr):
        return None
    return eval(compile(ast.Expression(last.value), filename, "eval"), namespace)


def _exec_shell(command: str, plan: Plan) -> NoReturn:
    """Replace the child with ``sh -c command`` (only returns by raising)."""
    sys.stdout.flush()
    sys.stderr.flush()
    # Python ignores these at startup; programs expect their default actions back.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    os.execve(SHELL, ["sh", "-c", command], dict(plan.env))


def _encode_failure(exc: BaseException, kind: FailureKind) -> bytes:
    """Classify ``exc`` and encode it as a reply, freeing the call's frames first."""
    if exc.__traceback__ is not None:
        traceback.clear_frames(exc.__traceback__)  # a MemoryError's frames hold the hog
    failure = _classify(exc, kind)
    return _encoder.encode(Reply(value=None, failure=failure))


def _classify(exc: BaseException, kind: FailureKind) -> Failure:
    """What the parent needs to know of ``exc``: a violation or out-of-memory anywhere in
    its chain wins over the exception the call let escape."""
    failure = Failure(
        kind,
        type_name=f"{type(exc).__module__}.{type(exc).__qualname__}",
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )
    if isinstance(exc, SystemExit):  # re-raising it in the parent would end the parent
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return msgspec.structs.replace(failure, kind="exit", exit_code=code)
    # Code that wraps a denied syscall's OSError in its own exception was still denied.
    for link in _chain(exc):
        denied = seccomp.violation_syscall(getattr(link, "errno", None))
        if denied is not None:
            syscall, nr = denied
            return msgspec.structs.replace(failure, kind="violation", syscall=syscall, nr=nr)
        if isinstance(link, MemoryError) or getattr(link, "errno", None) == errno.ENOMEM:
            return msgspec.structs.replace(failure, kind="memory")
    if kind != "raised":
        return failure
    # The args rebuild a built-in exception in the parent; if they are not plain data,
    # the message alone must do.
    args = list(exc.args) if _is_plain(exc.args) else [str(exc)]
    if not isinstance(exc, OSError):
        return msgspec.structs.replace(failure, args=args)
    names = [n if isinstance(n, str) else None for n in (exc.filename, exc.filename2)]
    return msgspec.structs.replace(failure, args=args, filename=names[0], filename2=names[1])


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes and contexts, each once."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        link = todo.pop()
        # By identity, not equality; and each once: a context can point back up the chain.
        if link is not None and all(link is not s for s in seen):
            seen.append(link)
            todo += [link.__cause__, link.__context__]
    return seen


def _is_plain(value: object) -> bool:
    # Plain means msgspec can encode it, the only form in which data crosses back.
    try:
        _encoder.encode(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def parse_frames(data: bytes) -> list[Locked | Reply]:
    """The complete frames of a reply stream; a malformed frame ends the stream (the child
    is not trusted to write well-formed ones)."""
    frames: list[Locked | Reply] = []
    pos = 0
    while pos + FRAME.size <= len(data):
        (size,) = FRAME.unpack_from(data, pos)
        end = pos + FRAME.size + size
        if end > len(data):
            break  # cut off: the child died mid-write
        try:
            frames.append(_decoder.decode(data[pos + FRAME.size : end]))
        except msgspec.DecodeError:
            break
        pos = end
    return frames
