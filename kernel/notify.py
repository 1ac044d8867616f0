"""The sd_notify protocol, spoken by astrad itself (no libsystemd).

Under systemd with ``Type=notify``, the service manager passes ``NOTIFY_SOCKET``: a datagram
UNIX socket (a path, or an abstract name written with a leading ``@``). The daemon sends
newline-separated ``KEY=VALUE`` assignments to it:

    astrad                                        systemd
      | READY=1, MAINPID=<pid>, STATUS=...  ---->   unit becomes "active"
      | STATUS=<one line for systemctl status> -->
      | WATCHDOG=1 every WatchdogSec/2      ---->   no ping for WatchdogSec: SIGABRT, restart
      | STOPPING=1                          ---->   unit becomes "deactivating"

Protocol (what makes each step correct):

1. *Discovery.* ``Notifier.from_environment()`` reads ``NOTIFY_SOCKET`` and, for the
   watchdog, ``WATCHDOG_USEC`` (honoured only when ``WATCHDOG_PID`` is unset or is this
   process, as ``sd_watchdog_enabled`` does), then removes the three variables from
   ``os.environ`` so the workers and tools it forks never talk to systemd on its behalf
   (the unit says ``NotifyAccess=main`` anyway).
2. *Sending.* One ``sendto`` per message on a non-blocking ``SOCK_DGRAM`` socket with
   ``SOCK_CLOEXEC``. A datagram is delivered whole or not at all, so a message is never
   interleaved with another. A failed send (systemd restarting, a full queue) is logged and
   dropped: notification is advisory and must never take the daemon down.
3. *Absent systemd.* Without ``NOTIFY_SOCKET`` every method is a no-op costing one attribute
   test, so astrad run by hand, in tests, or embedded behaves the same.
4. *Watchdog.* ``watchdog_interval_s`` is half of ``WatchdogSec`` (systemd's advice); the
   supervisor's loop pings from the same thread that supervises, so a wedged supervisor stops
   pinging and systemd restarts it.
"""

from __future__ import annotations

__all__ = ["Notifier"]

import logging
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import MutableMapping

logger = logging.getLogger("astra.notify")

_ENV_SOCKET = "NOTIFY_SOCKET"
_ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
_ENV_WATCHDOG_PID = "WATCHDOG_PID"


class Notifier:
    """Sends sd_notify messages to the service manager; a no-op when there is none.

    Args:
        address: the socket's address as in ``NOTIFY_SOCKET`` (``/run/...`` or
            ``@abstract``), or None for a disabled notifier.
        watchdog_usec: ``WATCHDOG_USEC``, or None when the unit has no watchdog.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._target = ""
        if address:
            # An abstract socket is written "@name" and addressed with a leading NUL.
            self._target = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        #: Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None: no watchdog.
        self.watchdog_interval_s = (
            watchdog_usec / 2e6 if self._sock is not None and watchdog_usec else None
        )

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Build the notifier systemd asked for, and unset its variables (protocol step 1).

        Raises:
            ValueError: ``WATCHDOG_USEC`` or ``WATCHDOG_PID`` is not an integer.
        """
        env = os.environ if environ is None else environ
        address = env.pop(_ENV_SOCKET, None) or None
        usec_text = env.pop(_ENV_WATCHDOG_USEC, None)
        pid_text = env.pop(_ENV_WATCHDOG_PID, None)
        usec = int(usec_text) if usec_text else None
        if pid_text and int(pid_text) != os.getpid():
            usec = None  # the watchdog is meant for another process (a wrapper's parent)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self._sock is not None

    def notify(self, **fields: object) -> bool:
        """Send one message of ``KEY=VALUE`` lines (keyword names are upper-cased).
        Never raises; returns whether the datagram was sent (False when disabled)."""
        if self._sock is None:
            return False
        text = "\n".join(f"{key.upper()}={_one_line(value)}" for key, value in fields.items())
        try:
            self._sock.sendto(text.encode(), self._target)
        except OSError as exc:
            logger.warning("sd_notify failed: %s (message dropped: %s)", exc, text)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 with MAINPID (and STATUS): the workers are up and clients may attach."""
        if status is None:
            return self.notify(ready=1, mainpid=os.getpid())
        return self.notify(ready=1, mainpid=os.getpid(), status=status)

    def status(self, text: str) -> bool:
        """STATUS=<text>: the line ``systemctl status`` shows."""
        return self.notify(status=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the supervisor's loop is alive."""
        return self.notify(watchdog=1)

    def reloading(self) -> bool:
        """RELOADING=1: a configuration reload (SIGHUP) began; send ``ready()`` after it."""
        return self.notify(reloading=1)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: the daemon is draining and will exit."""
        if status is None:
            return self.notify(stopping=1)
        return self.notify(stopping=1, status=status)

    def close(self) -> None:
        """Close the socket. Safe to call twice."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __repr__(self) -> str:
        return f"<Notifier {self.address or 'disabled'} watchdog={self.watchdog_interval_s}>"


def _one_line(value: object) -> str:
    # A newline would start a new assignment: systemd would read the rest as another key.
    return str(value).replace("\n", " ")
