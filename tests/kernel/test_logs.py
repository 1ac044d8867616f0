"""Log lines: level, process name, pid, event and key=value fields; or JSON."""

from __future__ import annotations

import io
import json
import logging
import os
import shlex
from typing import TYPE_CHECKING

import pytest

from kernel.logs import LOGGER_NAME, configure_logging, log_event, share_logging
from tests.helpers import fork_child, reap

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TextIO


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


Step = tuple["Callable[[TextIO], object]", "Callable[[], None]"]


def _share_and_fork(path: str, steps: list[Step]) -> None:
    """In a forked child (so pytest's own logging is untouched): log to ``path``, share,
    fork a grandchild, and take turns with it through ``steps``: pairs of (what the sharer
    does, what the forked process does then)."""
    stream = open(path, "a")  # noqa: SIM115 - the handler owns it until the process exits
    configure_logging("info", "text", stream)
    share_logging()
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()

    def follower() -> None:
        for _, act in steps:
            os.read(go_r, 1)
            act()
            os.write(done_w, b".")

    pid = fork_child(follower)
    for lead, _ in steps:
        lead(stream)
        os.write(go_w, b".")
        os.read(done_r, 1)
    assert reap(pid) == 0


@pytest.mark.multiprocess
def test_a_forked_process_follows_the_sharing_process_level_and_format(tmp_path):
    """A worker forked after share_logging adopts the supervisor's later level and format
    before its next line: a hidden DEBUG event shows, as JSON; a plain warning that passed
    the old level is dropped once the level is raised."""
    log = logging.getLogger(f"{LOGGER_NAME}.worker.w00")

    def at_info() -> None:
        log_event(log, logging.DEBUG, "hidden")

    def at_debug_json() -> None:
        log_event(log, logging.DEBUG, "shown", k=1)
        log.info("plain %d", 2)

    def at_error_text() -> None:
        log.warning("dropped")
        log.error("kept")

    steps: list[Step] = [
        (lambda stream: None, at_info),
        (lambda stream: configure_logging("debug", "json", stream), at_debug_json),
        (lambda stream: configure_logging("error", "text", stream), at_error_text),
    ]
    path = tmp_path / "log"
    assert reap(fork_child(lambda: _share_and_fork(str(path), steps))) == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 3, lines
    shown, plain = json.loads(lines[0]), json.loads(lines[1])
    assert (shown["event"], shown["level"], shown["k"]) == ("shown", "DEBUG", 1)
    assert plain["event"] == "plain 2"
    assert shown["pid"] == plain["pid"] != os.getpid()
    _, level, _, event = shlex.split(lines[2])
    assert (level, event) == ("ERROR", "kept")


@pytest.mark.multiprocess
def test_a_forked_process_that_shares_leads_its_own_children(tmp_path):
    """A follower that calls share_logging (an embedded kernel's supervisor) gets a word of
    its own: its parent's later changes reach neither it nor the children it forks."""
    path = tmp_path / "log"
    log = logging.getLogger(LOGGER_NAME)

    def parent() -> None:  # the sharer, in a child of pytest
        stream = open(path, "a")  # noqa: SIM115 - the handler owns it
        configure_logging("info", "text", stream)
        share_logging()
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()

        def nested() -> None:  # its follower, which starts sharing, and forks in turn
            share_logging()
            g_r, g_w = os.pipe()

            def grandchild_logs() -> None:
                os.read(g_r, 1)
                log_event(log, logging.DEBUG, "g")

            grandchild = fork_child(grandchild_logs)
            os.write(ready_w, b".")
            os.read(go_r, 1)  # the parent has switched to debug and json
            log_event(log, logging.WARNING, "child")
            os.write(g_w, b".")
            assert reap(grandchild) == 0

        child = fork_child(nested)
        os.read(ready_r, 1)
        configure_logging("debug", "json", stream)
        os.write(go_w, b".")
        assert reap(child) == 0

    assert reap(fork_child(parent)) == 0
    lines = path.read_text().splitlines()
    assert [line.split()[3:4] for line in lines] == [["child"]], lines  # text; no DEBUG g
