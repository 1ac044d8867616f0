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
"""

from __future__ import annotations

__all__ = ["LOGGER_NAME", "EventFormatter", "configure_logging", "log_event"]

import datetime
import logging
import os
import sys
from typing import TYPE_CHECKING, Final, Literal

import msgspec

if TYPE_CHECKING:
    from typing import TextIO

#: The root of Astra's loggers: ``astra.supervisor``, ``astra.worker.w03``, ...
LOGGER_NAME: Final = "astra"
_FIELDS_ATTR: Final = "astra_fields"
_RESERVED: Final = frozenset({"ts", "level", "proc", "pid", "event"})


def log_event(logger: logging.Logger, level: int, event: str, /, **fields: object) -> None:
    """Log ``event`` with ``fields`` (cheap when the level is disabled)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={_FIELDS_ATTR: fields}, stacklevel=2)


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
    a handler installed before (a SIGHUP reload calls it again). Returns the handler.

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
    root.addHandler(handler)
    root.setLevel(numeric)
    root.propagate = False
    return handler
