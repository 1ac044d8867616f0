"""``astrad``: the supervisor as a daemon with a name, a state directory and one instance
per name.

Protocol (single instance and discovery):

1. *Lock.* ``astrad --name N`` takes an exclusive ``flock`` on ``<state-dir>/N.lock``
   (mode 0600, in a 0700 directory). The kernel drops the lock when the process dies,
   however it dies, so a second ``astrad`` with the same name is refused while the first
   lives (``InstanceExistsError``) and accepted once it is dead.
2. *Clean.* Holding the lock, it removes the segments of every instance whose owner is dead
   (``cleanup_stale``), the remains of an ``astrad`` killed with SIGKILL included.
3. *Publish.* It creates its instance, control block and arena, loads the plugins
   (kernel/plugins.py: a plugin that fails is reported and skipped, never fatal), starts
   the supervisor, and only then writes ``N.json`` (instance id, pid, start time,
   workers) by rename, so a client that reads the file finds a running kernel.
4. *Reload.* SIGHUP (given ``reload_config``): ``RELOADING=1``; re-read the configuration;
   a bad one is logged (``config_reload_failed key=...``) and the running one kept whole;
   else the ``RELOADABLE`` keys are applied (restart policy and drain timeout in the
   supervisor, log level and format in it and its workers: kernel/config.py) and become
   the running config the next reload compares against. Whatever happened, ``READY=1``
   follows, with a ``STATUS=`` that says whether the reload failed.
5. *Stop.* SIGTERM/SIGINT drain the workers (``kernel.supervisor`` protocol 4); the state
   file, then every segment, is removed; the lock goes with the process.
"""

from __future__ import annotations

__all__ = ["DaemonState", "default_state_dir", "read_state", "run_daemon"]

import contextlib
import fcntl
import logging
import os
import time
from typing import TYPE_CHECKING, Final

import msgspec

from ipc import Arena, Instance, cleanup_stale

from . import plugins as plugins_, proc
from .config import ConfigError, apply_reload
from .control import ControlBlock
from .errors import InstanceExistsError
from .kmetrics import render_kernel_metrics
from .logs import configure_logging, log_event
from .metrics import MetricsServer
from .registry import MAX_AGENTS, Registry
from .supervisor import RestartPolicy, Supervisor, install_signal_wakeup

#: Default client slots of an astrad.
DEFAULT_MAX_CLIENTS: Final = int(os.getenv("ASTRA_MAX_CLIENTS", "16"))
#: Default size of an astrad's payload arena.
DEFAULT_ARENA_BYTES: Final = int(os.getenv("ASTRA_ARENA_BYTES", str(1 << 30)))

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import Config
    from .notify import Notifier
    from .plugins import Candidate

log = logging.getLogger("astra.daemon")


class DaemonState(msgspec.Struct, frozen=True):
    """The contents of ``<state-dir>/<name>.json``."""

    name: str  #: the daemon's name
    instance: str  #: its shared-memory instance id
    pid: int  #: the astrad process
    start: int  #: its start time (ticks since boot), so a reused pid is not taken for it
    workers: int  #: number of workers
    started: float  #: wall-clock start (time.time())


def default_state_dir() -> str:
    """``$ASTRA_STATE_DIR``, else ``$XDG_RUNTIME_DIR/astra``, else ``~/.astra``."""
    env = os.getenv("ASTRA_STATE_DIR")
    if env:
        return env
    runtime = os.getenv("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "astra")
    return os.path.join(os.path.expanduser("~"), ".astra")


def read_state(name: str, state_dir: str | None = None) -> DaemonState | None:
    """The state file of daemon ``name``, or None if there is none (or it is unreadable)."""
    path = os.path.join(state_dir or default_state_dir(), f"{name}.json")
    try:
        with open(path, "rb") as f:
            return msgspec.json.decode(f.read(), type=DaemonState)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def list_states(state_dir: str | None = None) -> list[DaemonState]:
    """Every daemon state file in the directory."""
    root = state_dir or default_state_dir()
    try:
        names = sorted(e[:-5] for e in os.listdir(root) if e.endswith(".json"))
    except FileNotFoundError:
        return []
    return [s for n in names if (s := read_state(n, root)) is not None]


def _lock(state_dir: str, name: str) -> int:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    fd = os.open(
        os.path.join(state_dir, f"{name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        other = read_state(name, state_dir)
        who = f" (pid {other.pid})" if other else ""
        raise InstanceExistsError(f"astrad {name!r} is already running{who}") from None
    return fd


def _write_state(state_dir: str, state: DaemonState) -> str:
    path = os.path.join(state_dir, f"{state.name}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.encode(state))
    os.replace(tmp, path)
    return path


# ---- Reload: SIGHUP (protocol step 4) ----


class _Reloader:
    """Re-reads the configuration and applies what can change live (``RELOADABLE``); the
    supervisor's loop calls ``reload`` on SIGHUP, between two events, so nothing it applies
    races with a restart or a drain."""

    def __init__(
        self, running: Config, load: Callable[[], Config], notifier: Notifier | None
    ) -> None:
        self.running = running  # what the next reload compares against
        self.supervisor: Supervisor | None = None  # set once the supervisor exists
        self._load = load
        self._notifier = notifier

    def reload(self) -> None:
        if self._notifier is not None:
            self._notifier.reloading()
        try:
            status = self._apply()
        except Exception as exc:  # a bug, not a bad file: report it, keep serving
            log_event(log, logging.ERROR, "config_reload_failed", error=repr(exc), exc_info=True)
            status = f"reload failed: {exc!r}"
        if self._notifier is not None:  # READY=1 follows RELOADING=1, always
            self._notifier.ready(status=status)

    def _apply(self) -> str:
        try:
            new = self._load()
        except ConfigError as exc:
            log_event(
                log, logging.ERROR, "config_reload_failed", key=exc.key or "-", error=str(exc),
                kept="running configuration",
            )  # fmt: skip
            return f"reload failed, configuration unchanged: {exc}"
        running, live, later = apply_reload(self.running, new)
        configure_logging(running.log_level, running.log_format)  # workers too (logs.py)
        assert self.supervisor is not None
        self.supervisor.set_policy(
            RestartPolicy(
                max_restarts=running.max_restarts,
                within_s=running.restart_within_s,
                shutdown_timeout_s=running.shutdown_timeout_s,
            )
        )
        self.running = running
        log_event(
            log, logging.INFO, "config_reloaded", changed=",".join(live) or "-",
            needs_restart=",".join(later) or "-", log_level=running.log_level,
            log_format=running.log_format, max_restarts=running.max_restarts,
            restart_within_s=running.restart_within_s,
            shutdown_timeout_s=running.shutdown_timeout_s,
        )  # fmt: skip
        if later:
            return f"configuration reloaded; needs a restart: {', '.join(later)}"
        return "configuration reloaded"


def run_daemon(
    name: str = "default",
    *,
    workers: int | None = None,
    state_dir: str | None = None,
    max_clients: int = DEFAULT_MAX_CLIENTS,
    arena_bytes: int = DEFAULT_ARENA_BYTES,
    policy: RestartPolicy | None = None,
    notifier: Notifier | None = None,
    on_reload: Callable[[], None] | None = None,
    config: Config | None = None,
    reload_config: Callable[[], Config] | None = None,
    metrics_addr: str = "",
    plugins: list[Candidate] | None = None,
) -> int:
    """Run ``astrad`` in this process (its main thread) until SIGTERM/SIGINT; returns the
    exit code. Tells systemd through ``notifier`` (READY=1 once the workers are up, watchdog
    pings, STOPPING=1); ``metrics_addr`` (``HOST:PORT``) serves Prometheus ``/metrics``;
    ``plugins`` (from ``kernel.plugins.discover``) are loaded before the workers start.

    SIGHUP: given ``reload_config`` (which re-reads the configuration ``config`` came from,
    raising ``ConfigError`` for a bad one), the daemon reloads (protocol step 4); else it
    calls ``on_reload``, a bare hook that does its own notifying and applying.

    Raises:
        InstanceExistsError: a live astrad already has ``name``.
        OSError: the metrics address cannot be bound.
    """
    assert reload_config is None or (config is not None and on_reload is None)
    root = state_dir or default_state_dir()
    lock_fd = _lock(root, name)
    proc.set_name("astrad")
    state_path = ""
    server: MetricsServer | None = None
    host: plugins_.PluginHost | None = None
    try:
        cleanup_stale(os.getenv("ASTRA_SHM_LABEL") or None)
        n = workers or os.cpu_count() or 1
        with Instance.create() as inst:
            control = ControlBlock.create(inst, n, max_clients)
            arena = Arena.create(inst, size=arena_bytes)
            registry = Registry.create(inst, MAX_AGENTS)
            try:
                data_dir = os.path.join(root, name)
                if plugins is not None:
                    host = plugins_.PluginHost.load(plugins, data_dir)
                    plugins_.activate(host)
                reloader = None
                if reload_config is not None:
                    assert config is not None
                    reloader = _Reloader(config, reload_config, notifier)
                    on_reload = reloader.reload
                sup = Supervisor(
                    inst, control, arena, policy, notifier=notifier, on_reload=on_reload,
                    data_dir=data_dir, plugin_host=host,
                )  # fmt: skip
                if reloader is not None:
                    reloader.supervisor = sup
                sup.start()
                install_signal_wakeup(sup.wake_fd)
                if metrics_addr:
                    # Served by a forked exporter process, astra-metrics (kernel/metrics.py):
                    # no thread of the supervisor may hold a lock when it forks a worker.
                    server = MetricsServer(metrics_addr, lambda: render_kernel_metrics(control))
                    bound_host, bound_port = server.address[0], server.address[1]
                    log_event(
                        log, logging.INFO, "metrics_serving", host=bound_host, port=bound_port
                    )
                pid = os.getpid()
                state = DaemonState(name, inst.id, pid, proc.process_start(pid), n, time.time())
                state_path = _write_state(root, state)
                log_event(log, logging.INFO, "astrad_ready", name=name, workers=n, instance=inst.id)
                if notifier is not None:
                    notifier.ready(status=f"{n} workers, instance {inst.id}")
                return sup.run()
            finally:
                if server is not None:
                    server.close()
                if state_path:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(state_path)
                registry.close()
                arena.close()
                control.close()
    finally:
        if host is not None:
            host.close()
        os.close(lock_fd)
