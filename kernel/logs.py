"""One line per event, to stderr, where journald (or a terminal) keeps it.

Every line carries the level, the process name (``astrad``, ``astra-w03``: what ``ps``
shows), the pid, an event name and ``key=value`` fields; ``--log-format json`` writes the same
as one JSON object per line for log shippers:

    2026-11-27T04:20:00.123Z WARNING astrad[4242] child_exited id=w03 pid=4250 restarts=1/3
    {"ts": "2026-11-27T04:20:00.123Z", "level": "WARNING", "proc": "astrad", "pid": 4242,
     "event": "child_exited", "id": "w03", "pid_": 4250, ...}

Code logs an event with ``log_event(logger, logging.WARNING, "child_exited", id="w03",
...)``; plain ``logger.info("text %s", x)`` calls still work (the message becomes the event).
Values with spaces, quotes or ``=`` are quoted so a line always splits back into its fields.

Live reconfiguration (SIGHUP) reaches every process, not only the one that calls
``configure_logging``: the supervisor calls ``share_logging()`` before it forks, and from
then on its level and format are also one word of shared memory that every process it forks
(workers, their tools) inherits the mapping of. A forked process compares the word with the
one it last applied before each ``log_event`` and in its handler's filter, and adopts a
change before that line is written. Rejected: a message to each worker (a new message
type in every worker's loop for a setting read only when logging) and a signal (it would
interrupt the workers' semaphore waits).
"""

from __future__ import annotations

__all__ = ["LOGGER_NAME", "EventFormatter", "configure_logging", "log_event", "share_logging"]

import datetime
import logging
import mmap
import os
import struct
import sys
from typing import TYPE_CHECKING, Final, Literal

import msgspec

if TYPE_CHECKING:
    from typing import TextIO

#: The root of Astra's loggers: ``astra.supervisor``, ``astra.worker.w03``, ...
LOGGER_NAME: Final = "astra"
_FIELDS_ATTR: Final = "astra_fields"
_RESERVED: Final = frozenset({"ts", "level", "proc", "pid", "event"})

# The shared settings word (module doc): 0x8000 | levelno << 1 | json; 0 until written.
# Writer: the process that called share_logging (configure_logging). Readers: the processes
# it forked (_follow). A reader that catches a half-written word applies nonsense once and
# the real value at its next line (it compares whole words), so no lock is needed.
_WORD: Final = struct.Struct("H")
_shared: mmap.mmap | None = None
_following = False  # set in a forked child of the sharing process: read, never write
_seen = 0  # the word this process last wrote or applied
_registered = False  # whether _after_fork runs in this process's forked children


def log_event(
    logger: logging.Logger, level: int, event: str, /, *, exc_info: bool = False, **fields: object
) -> None:
    """Log ``event`` with ``fields`` (cheap when the level is disabled); ``exc_info=True``
    adds the exception being handled as the ``exc`` field."""
    if _following:
        _follow()
    if logger.isEnabledFor(level):
        logger.log(level, event, exc_info=exc_info, extra={_FIELDS_ATTR: fields}, stacklevel=2)


class EventFormatter(logging.Formatter):
    """Formats records as ``text`` (key=value) or ``json`` lines (see the module doc)."""

    def __init__(self, fmt: Literal["text", "json"] = "text") -> None:
        super().__init__()
        self.fmt = fmt
        self._comm_pid = -1
        self._comm = ""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = dict(getattr(record, _FIELDS_ATTR, None) or {})
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        stamp = ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"
        proc = self._process_name(record.process or os.getpid())
        event = record.getMessage()
        if self.fmt == "json":
            out: dict[str, object] = {
                "ts": stamp, "level": record.levelname, "proc": proc,
                "pid": record.process, "event": event,
            }  # fmt: skip
            for key, value in fields.items():
                out[key + "_" if key in _RESERVED else key] = value
            return msgspec.json.encode(out, enc_hook=str).decode()
        parts = [stamp, record.levelname, f"{proc}[{record.process}]", _quote(event)]
        parts += [f"{key}={_quote(str(value))}" for key, value in fields.items()]
        return " ".join(parts)

    def _process_name(self, pid: int) -> str:
        # What ps shows (workers rename themselves with prctl); re-read after a fork.
        if pid != self._comm_pid:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    self._comm = f.read().strip()
            except OSError:
                self._comm = os.path.basename(sys.argv[0]) or "python"
            self._comm_pid = pid
        return self._comm


def _quote(text: str) -> str:
    if text and not any(c in text for c in ' "=\n\t\\'):
        return text
    return msgspec.json.encode(text).decode()  # quoted, with escapes: one line, splittable


def configure_logging(
    level: str = "info", fmt: Literal["text", "json"] = "text", stream: TextIO | None = None
) -> logging.Handler:
    """Send the ``astra`` loggers to ``stream`` (stderr) in ``fmt`` at ``level``; replaces
    a handler installed before (a SIGHUP reload calls it again). After ``share_logging``
    the level and format also reach the processes this one forked. Returns the handler.

    Raises:
        ValueError: an unknown level name.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger(LOGGER_NAME)
    for old in [h for h in root.handlers if isinstance(h.formatter, EventFormatter)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(EventFormatter(fmt))
    handler.addFilter(_follow_filter)
    root.addHandler(handler)
    root.setLevel(numeric)
    root.propagate = False
    if _shared is not None and not _following:
        _publish(numeric, fmt)
    return handler


# ---- Sharing the settings with forked processes (module doc) ----


def share_logging() -> None:
    """Make this process's ``configure_logging`` calls reach the processes it forks from now
    on (the supervisor calls it before forking its workers). Idempotent; never raises."""
    global _shared, _following, _registered
    if _shared is None or _following:
        # A follower that starts sharing (an embedded kernel's supervisor, forked by a
        # process that shares too) leads its own children through a word of its own.
        if _shared is not None:
            _shared.close()  # unmaps the parent's word in this process only
        _shared = mmap.mmap(-1, mmap.PAGESIZE)  # MAP_SHARED | MAP_ANONYMOUS: fork shares it
        _following = False
    if not _registered:  # a registration is inherited across fork, like this flag
        os.register_at_fork(after_in_child=_after_fork)
        _registered = True
    root = logging.getLogger(LOGGER_NAME)
    fmt: Literal["text", "json"] = "text"
    for handler in root.handlers:
        if isinstance(handler.formatter, EventFormatter):
            fmt = handler.formatter.fmt
    _publish(root.getEffectiveLevel(), fmt)


def _publish(level: int, fmt: Literal["text", "json"]) -> None:
    global _seen
    assert _shared is not None
    _seen = 0x8000 | (min(level, 0x3FFF) << 1) | (fmt == "json")
    _WORD.pack_into(_shared, 0, _seen)


def _after_fork() -> None:
    global _following
    _following = _shared is not None


def _follow() -> bool:
    """Adopt the sharing process's level and format if they changed; returns whether."""
    global _seen
    assert _shared is not None
    word: int = _WORD.unpack_from(_shared)[0]
    if word == _seen or not word & 0x8000:
        return False
    _seen = word
    root = logging.getLogger(LOGGER_NAME)
    root.setLevel((word & 0x7FFF) >> 1)
    for handler in root.handlers:
        if isinstance(handler.formatter, EventFormatter):
            handler.formatter.fmt = "json" if word & 1 else "text"
    return True


def _follow_filter(record: logging.LogRecord) -> bool:
    # For plain logger.info() calls, which skip log_event: a record that passed the old
    # level is dropped if the new one hides it. (A lowered level shows at the next event.)
    if _following and _follow():
        return logging.getLogger(record.name).isEnabledFor(record.levelno)
    return True
