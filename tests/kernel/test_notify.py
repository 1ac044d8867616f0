"""The sd_notify protocol against a real datagram socket, as systemd would open it."""

from __future__ import annotations

import os
import socket

import pytest

from kernel.notify import Notifier


@pytest.fixture(params=["path", "abstract"])
def manager(request, tmp_path):
    """A stand-in for systemd: a bound SOCK_DGRAM socket and its NOTIFY_SOCKET address."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify")
        sock.bind(address)
    else:
        name = f"astra-test-notify-{os.getpid()}-{id(sock)}"
        sock.bind("\0" + name)
        address = "@" + name
    sock.settimeout(5)
    yield sock, address
    sock.close()


def _recv(sock: socket.socket) -> dict[str, str]:
    lines = sock.recv(4096).decode().split("\n")
    return dict(line.split("=", 1) for line in lines)


def test_ready_status_watchdog_stopping_arrive_in_order(manager):
    sock, address = manager
    n = Notifier.from_environment({"NOTIFY_SOCKET": address})
    try:
        assert n.enabled
        assert n.ready(status="2 workers up")
        assert n.status("serving 0 clients")
        assert n.watchdog()
        assert n.stopping()
        assert _recv(sock) == {"READY": "1", "MAINPID": str(os.getpid()), "STATUS": "2 workers up"}
        assert _recv(sock) == {"STATUS": "serving 0 clients"}
        assert _recv(sock) == {"WATCHDOG": "1"}
        assert _recv(sock) == {"STOPPING": "1"}
    finally:
        n.close()


def test_a_newline_in_a_status_cannot_inject_an_assignment(manager):
    sock, address = manager
    n = Notifier(address)
    try:
        n.status("line one\nREADY=1")
        assert _recv(sock) == {"STATUS": "line one READY=1"}
    finally:
        n.close()


def test_environment_is_consumed_so_children_do_not_inherit_it(manager):
    _, address = manager
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000", "OTHER": "x"}
    n = Notifier.from_environment(env)
    n.close()
    assert env == {"OTHER": "x"}
    assert n.watchdog_interval_s == pytest.approx(2.0)  # half of WatchdogSec


def test_watchdog_meant_for_another_pid_is_ignored(manager):
    _, address = manager
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
    n = Notifier.from_environment(env)
    n.close()
    assert n.watchdog_interval_s is None


def test_watchdog_for_this_pid_is_honoured(manager):
    _, address = manager
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    n = Notifier.from_environment(env)
    n.close()
    assert n.watchdog_interval_s == pytest.approx(0.5)


def test_without_notify_socket_everything_is_a_no_op():
    n = Notifier.from_environment({})
    assert not n.enabled
    assert n.watchdog_interval_s is None
    assert not n.ready()
    assert not n.watchdog()
    assert not n.stopping()
    n.close()


def test_a_vanished_manager_is_logged_not_raised(tmp_path, caplog):
    n = Notifier(str(tmp_path / "gone"))
    try:
        assert not n.ready()
    finally:
        n.close()
    assert "sd_notify failed" in caplog.text


def test_bad_watchdog_value_is_a_clear_error():
    with pytest.raises(ValueError, match="invalid literal"):
        Notifier.from_environment({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "soon"})
