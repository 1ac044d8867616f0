"""astrad as a systemd service: the unit file Astra ships and ``astra service install``.

The unit runs astrad as ``Type=notify`` (astrad sends READY=1 once its workers are up, and
WATCHDOG=1 from the supervisor's loop: ``kernel/notify.py``), restarts it on failure, gives
it a state directory, and turns on the hardening options that leave the tool sandbox
working. What is deliberately *not* set, and why:

- ``PrivateDevices=``, ``PrivateIPC=``: clients attach to astrad's segments in the host's
  ``/dev/shm``; a private one would hide the daemon from them.
- ``RestrictNamespaces=`` beyond ``user mnt net``: the sandbox unshares exactly those for
  each tool call (``sandbox/lockdown.py``).
- ``SystemCallFilter=``: the sandbox installs its own, stricter filter per tool call; a
  service-wide one would have to allow everything the sandbox's lockdown needs
  (``unshare``, ``mount``, ``landlock_*``, ``seccomp``).
- ``MemoryDenyWriteExecute=``: cloudpickle'd and ctypes code paths need it off.
- ``PrivateNetwork=``: the ``network`` tool profile and the metrics listener need the host's.
"""

from __future__ import annotations

__all__ = ["HIDDEN_TREES", "UNIT_NAME", "check_reachable", "install_unit", "render_unit"]

import os
import shutil
import sys
from typing import Final

#: The unit's file name.
UNIT_NAME: Final = "astrad.service"

_UNIT: Final = """\
[Unit]
Description=Astra supervisor (astrad): an operating system for AI agents
After=network.target
StartLimitIntervalSec=60
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
WatchdogSec={watchdog_s}
TimeoutStopSec={stop_timeout_s}
# SIGTERM to astrad alone: it drains its workers in reverse start order, then systemd
# SIGKILLs whatever is left after TimeoutStopSec.
KillMode=mixed
User={user}
Group={group}
StateDirectory=astra
StateDirectoryMode=0700
RuntimeDirectory=astra
RuntimeDirectoryMode=0700
ConfigurationDirectory=astra
Environment=ASTRA_STATE_DIR=/var/lib/astra
LimitNOFILE=65536
UMask=0077

# Hardening that leaves the per-call tool sandbox working (see astra/_service.py).
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictNamespaces=user mnt net
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
CapabilityBoundingSet=
AmbientCapabilities=

[Install]
WantedBy=multi-user.target
"""


def render_unit(
    *,
    astrad: str | None = None,
    args: str = "",
    user: str = "astra",
    group: str | None = None,
    watchdog_s: int = 30,
    stop_timeout_s: int = 30,
) -> str:
    """The unit file's text.

    Args:
        astrad: absolute path of the ``astrad`` executable (default: the one installed beside
            this Python, else the first on ``PATH``; it must be absolute).
        args: extra astrad arguments (``--name nightly --workers 16``).
        user, group: the account astrad runs as (the group defaults to the user's name).

    Raises:
        ValueError: no absolute astrad path could be found, or a bad argument.
    """
    beside = os.path.join(os.path.dirname(sys.executable), "astrad")  # this installation's
    exe = astrad or (beside if os.path.exists(beside) else shutil.which("astrad")) or beside
    if not os.path.isabs(exe):
        raise ValueError(f"astrad must be an absolute path, got {exe!r}")
    if watchdog_s <= 0 or stop_timeout_s <= 0:
        raise ValueError("watchdog_s and stop_timeout_s must be positive")
    if not user or any(c.isspace() for c in user):
        raise ValueError(f"bad user name {user!r}")
    exec_start = f"{exe} {args}".strip()
    return _UNIT.format(
        exec_start=exec_start,
        user=user,
        group=group or user,
        watchdog_s=watchdog_s,
        stop_timeout_s=stop_timeout_s,
    )


def install_unit(unit_dir: str = "/etc/systemd/system", **options: object) -> str:
    """Write the unit to ``unit_dir`` (mode 0644) and return its path. Refuses to overwrite a
    different existing unit only if it is not one Astra wrote.

    Raises:
        FileExistsError: a foreign ``astrad.service`` is there.
        OSError: the directory is not writable (run as root for the system directory).
    """
    text = render_unit(**options)  # type: ignore[arg-type]
    check_reachable(_exec_path(text))
    path = os.path.join(unit_dir, UNIT_NAME)
    if os.path.exists(path):
        with open(path) as f:
            if "Astra supervisor (astrad)" not in f.read():
                raise FileExistsError(f"{path} exists and was not written by Astra")
    os.makedirs(unit_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


#: Trees the unit's ProtectHome=yes hides from the service.
HIDDEN_TREES: Final = ("/root", "/home", "/run/user")


def _exec_path(unit: str) -> str:
    line = next(ln for ln in unit.splitlines() if ln.startswith("ExecStart="))
    return line.removeprefix("ExecStart=").split()[0]


def check_reachable(astrad: str) -> None:
    """Refuse an ``astrad`` (or the interpreter its ``#!`` line names) that the service could
    not run: under a home directory, which ``ProtectHome=yes`` hides, as a pyenv or a
    ``pip install --user`` puts it. Install Astra into a system location instead.

    Raises:
        ValueError: naming the path and the way out.
    """
    paths = [astrad]
    try:
        with open(astrad, "rb") as f:
            first = f.readline(4096)
        if first.startswith(b"#!"):
            paths.append(first[2:].decode(errors="replace").split()[0])
    except (OSError, IndexError):
        pass
    for path in paths:
        real = os.path.realpath(path)
        for tree in HIDDEN_TREES:
            if real == tree or real.startswith(tree + "/"):
                raise ValueError(
                    f"{path} is under {tree}, which the unit's ProtectHome=yes hides from the "
                    "service (and its user cannot read): install Astra into a system location "
                    "first, e.g. python3 -m venv /opt/astra && /opt/astra/bin/pip install "
                    "<this checkout>, then /opt/astra/bin/astra service install"
                )
