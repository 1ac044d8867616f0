"""Log lines: level, process name, pid, event and key=value fields; or JSON."""

from __future__ import annotations

import io
import json
import logging
import os
import shlex

import pytest

from kernel.logs import LOGGER_NAME, configure_logging, log_event


@pytest.fixture(autouse=True)
def _restore_astra_logger():
    """configure_logging changes the process-wide ``astra`` logger: put it back."""
    root = logging.getLogger(LOGGER_NAME)
    saved = (root.level, root.propagate, list(root.handlers))
    yield
    root.setLevel(saved[0])
    root.propagate = saved[1]
    root.handlers[:] = saved[2]


@pytest.fixture
def capture():
    stream = io.StringIO()
    handler = configure_logging("debug", "text", stream)
    yield stream
    logging.getLogger(LOGGER_NAME).removeHandler(handler)


def _comm() -> str:
    with open("/proc/self/comm") as f:
        return f.read().strip()


def test_text_line_has_level_process_pid_event_and_fields(capture):
    log = logging.getLogger(f"{LOGGER_NAME}.supervisor")
    log_event(log, logging.WARNING, "child_exited", id="w03", pid=4250, reason="killed by SIGKILL")
    line = capture.getvalue().strip()
    words = shlex.split(line)
    assert words[1] == "WARNING"
    assert words[2] == f"{_comm()}[{os.getpid()}]"
    assert words[3] == "child_exited"
    assert words[4:] == ["id=w03", "pid=4250", "reason=killed by SIGKILL"]
    assert line.count("\n") == 0


def test_values_cannot_break_the_line_or_forge_fields(capture):
    log = logging.getLogger(LOGGER_NAME)
    log_event(log, logging.INFO, "x", note='a\nb="c" d=e')
    line = capture.getvalue()
    assert line.count("\n") == 1
    assert shlex.split(line)[-1].startswith("note=")


def test_json_format_is_one_object_per_line():
    stream = io.StringIO()
    handler = configure_logging("info", "json", stream)
    try:
        log = logging.getLogger(f"{LOGGER_NAME}.worker.w03")
        log_event(log, logging.INFO, "task_done", task=7, pid="clash")
        log.debug("hidden at info level")
        log.info("plain message %d", 5)
    finally:
        logging.getLogger(LOGGER_NAME).removeHandler(handler)
    first, second = (json.loads(x) for x in stream.getvalue().splitlines())
    assert first["event"] == "task_done"
    assert first["task"] == 7
    assert first["pid"] == os.getpid()
    assert first["pid_"] == "clash"  # a field never overwrites the line's own keys
    assert first["level"] == "INFO"
    assert second["event"] == "plain message 5"


def test_reconfiguring_replaces_the_handler_and_level(capture):
    stream = io.StringIO()
    handler = configure_logging("error", "text", stream)
    try:
        log = logging.getLogger(LOGGER_NAME)
        log.warning("dropped")
        log.error("kept")
    finally:
        log.removeHandler(handler)
    assert capture.getvalue() == ""
    assert "kept" in stream.getvalue()
    assert "dropped" not in stream.getvalue()


def test_exceptions_are_one_field(capture):
    log = logging.getLogger(LOGGER_NAME)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("handler_failed")
    assert capture.getvalue().count("\n") == 1
    assert "RuntimeError: boom" in capture.getvalue()


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud")
