"""The supervisor: forks one worker per core, restarts them OTP-style, and stops them.

The supervisor is always a process of its own whose main thread runs ``Supervisor.run``:

- under ``astrad`` it is the daemon itself (``kernel.daemon``);
- under an embedded ``astra.Kernel`` the embedding process forks it (``fork_supervisor``)
  and stays a plain client. The embedding process owns the instance (so leaving the ``with``
  block, or its death followed by the next start's ``cleanup_stale``, removes every segment),
  but it never forks workers from its own, possibly multi-threaded, address space after
  start-up, and never runs supervision code on a user thread. Both modes run the same code.

    client(s) ==RunTask==> to_wNN.<gen> ==> astra-wNN ==TaskDone==> to_c<slot> ==> client
                                ^                                      ^
    supervisor --StopWorker-----'      supervisor --WorkerLost---------'
        |  pidfd per worker (poll): exits are seen at once, without SIGCHLD or polling
        |-- wake fd: signals (set_wakeup_fd) wake the same poll
        '-- a socketpair per worker (poll): calls of supervisor services (kernel/plugins.py
            protocol 6), answered on this thread

Protocols:

1. *Start.* Stale instances (dead owners) are removed by whoever creates the instance. For
   each worker the supervisor creates its inbox ring ``to_wNN.<gen>`` (lanes: one per client
   slot plus its own), forks, records pid/generation/core in the control block, and keeps a
   pidfd. With plugins, it also makes a socketpair before the fork: its end joins the poll,
   the worker's end goes to the worker's ``PluginHost``. Then the state becomes
   ``RUNNING`` and the ``ready`` semaphore is posted.
2. *Restart (one_for_one).* A pidfd becomes readable: the supervisor reaps the worker, reads
   which (client, task) it was running from the control block (final: the writer is dead),
   removes the dead ring and closes its end of the dead worker's socketpair, forks a
   replacement reading a *new* ring (a ring whose reader died is closed for good) with a
   *new* socketpair, and sends ``WorkerLost`` to every client, which re-sends that
   worker's tasks (the running one counts against its ``retries``). More than
   ``max_restarts`` restarts within ``within_s`` means something is systematically wrong:
   the supervisor stops everything and exits with ``EXIT_RESTART_INTENSITY``. The policy
   is read at each exit, so ``set_policy`` (a SIGHUP reload) applies to the next one.
3. *Clients.* Every ``TICK_S`` the supervisor frees the control-block slots of dead clients
   and removes their instances' segments; workers drop the queued tasks of freed slots.
4. *Stop.* SIGTERM or SIGINT: state ``DRAINING`` (clients refuse new tasks), then
   ``StopWorker(drain=True)`` to each worker in reverse start order; workers finish what is
   queued and exit (the supervisor answers their service calls meanwhile). Whoever is
   still alive after ``shutdown_timeout_s`` gets SIGKILL. A
   worker dies with its supervisor (``PR_SET_PDEATHSIG``), so a SIGKILLed supervisor leaves
   no process behind, only segments, which the next start removes.
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_RESTART_INTENSITY",
    "RestartPolicy",
    "Supervisor",
    "fork_supervisor",
    "worker_ring",
]

import collections
import contextlib
import dataclasses
import logging
import os
import select
import signal
import socket
import time
from typing import TYPE_CHECKING, Final

import posix_ipc

from ipc import (
    Arena,
    Instance,
    IPCError,
    RingClosedError,
    RingFull,
    RingWriter,
    SegmentError,
    cleanup_stale,
    open_ring,
    unlink_ring,
)

from . import plugins, proc
from .agentd import RUNTIME_JOURNAL, SPECS_TABLE, decode_spec
from .control import KernelState
from .journal import Journal, JournalError
from .logs import log_event, share_logging
from .messages import SpawnAgent, StopWorker, WorkerLost, encode
from .scheduler import steal_bell, worker_ring
from .worker import Worker

if TYPE_CHECKING:
    from collections.abc import Callable

    from ipc import RingReader

    from .control import ControlBlock
    from .journal import Table
    from .notify import Notifier
    from .plugins import Candidate, PluginHost

#: Exit codes of a supervisor process (sysexits.h values where one fits).
EXIT_OK: Final = 0
EXIT_RESTART_INTENSITY: Final = 70  # EX_SOFTWARE: workers kept dying; everything stopped
#: How often the supervisor wakes, when nothing happens, to reclaim dead clients' slots.
TICK_S: Final = float(os.getenv("ASTRA_SUPERVISOR_TICK_S", "1.0"))
#: Slots and bytes per slot of each lane of a worker's inbox ring.
INBOX_SLOTS: Final = int(os.getenv("ASTRA_INBOX_SLOTS", "64"))
INBOX_SLOT_BYTES: Final = int(os.getenv("ASTRA_INBOX_SLOT_BYTES", str(16 * 1024)))
#: How long the supervisor waits to hand a client a ``WorkerLost`` notice (a client that
#: misses one still notices the new generation in the control block).
NOTIFY_TIMEOUT_S: Final = 0.5

log = logging.getLogger("astra.supervisor")


@dataclasses.dataclass(frozen=True, slots=True)
class RestartPolicy:
    """OTP restart intensity: more than ``max_restarts`` within ``within_s`` seconds and the
    supervisor gives up (STYLE.md 6). The strategy is one_for_one."""

    max_restarts: int = 10
    within_s: float = 5.0
    shutdown_timeout_s: float = 5.0


@dataclasses.dataclass
class _Child:
    """The supervisor's record of one worker slot (one OTP child)."""

    index: int
    generation: int = 0
    pid: int = 0
    pidfd: int = -1
    core: int | None = None
    writer: RingWriter | None = None  # the supervisor's lane into the worker's inbox
    # The supervisor's end of this generation's socketpair (plugins' supervisor services);
    # None without plugins, or once closed (the worker was reaped, or its end hung up).
    link: socket.socket | None = None
    polled: bool = False  # link is registered with the loop's poll


class Supervisor:
    """Forks, watches, restarts and stops the workers of one instance. Runs in its own
    process (see the module docstring); every method is for that process's main thread."""

    def __init__(
        self,
        instance: Instance,
        control: ControlBlock,
        arena: Arena | None,
        policy: RestartPolicy | None = None,
        *,
        pin: bool = True,
        notifier: Notifier | None = None,
        on_reload: Callable[[], None] | None = None,
        data_dir: str | None = None,
        plugin_host: PluginHost | None = None,
    ) -> None:
        self._data_dir = data_dir  # the workers' (persisted agents)
        self._plugins = plugin_host  # this process's; each worker builds its own from it
        self._specs_journal: Journal | None = None
        self._notifier = notifier
        # SIGHUP (install_signal_wakeup routes it here). It owns the RELOADING=1 ... READY=1
        # framing; if it raises, _on_wake still sends READY=1 so systemd is not left waiting.
        self._on_reload = on_reload
        self._instance = instance
        self._control = control
        self._arena = arena
        self._policy = policy or RestartPolicy()  # replaced whole by set_policy
        self._pin = pin
        # Lanes: every client, the supervisor, and every worker twice (stolen tasks and
        # hints; a replacement claims a lane before its predecessor's is reaped).
        self._lanes = control.max_clients + 1 + 2 * control.workers
        self._children = [_Child(i) for i in range(control.workers)]
        self._restarts: collections.deque[float] = collections.deque()
        self._client_writers: dict[int, tuple[int, RingWriter]] = {}
        self._wake_r, self._wake_w = -1, -1
        # The loop's poll (a plain list in the kernel, no fd): the wake fd, each worker's
        # pidfd (registered by run) and its link (registered by _spawn, dropped at EOF).
        self._poller = select.poll()
        self._links: dict[int, _Child] = {}  # fd of a polled link -> its worker slot
        self._stopping = False
        self.exit_code = EXIT_OK

    # ---- Start (protocol step 1) ----

    def start(self) -> None:
        """Fork every worker, then publish ``RUNNING``."""
        pid = os.getpid()
        start = proc.process_start(pid)
        self._control.set_supervisor(pid, start)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        share_logging()  # before the first fork: a reload's log level reaches the workers
        for child in self._children:
            self._spawn(child)
        self._control.set_state(KernelState.RUNNING)

    def _spawn(self, child: _Child) -> None:
        child.generation += 1
        name = worker_ring(child.index, child.generation)
        writer, reader = open_ring(
            self._instance, name, lanes=self._lanes, slots=INBOX_SLOTS, slot_bytes=INBOX_SLOT_BYTES
        )
        bell = self._instance.create_semaphore(steal_bell(child.index, child.generation), 0)
        bell.close()  # the worker and thieves open it by name; _retire_ring unlinks it
        theirs = self._open_link(child)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker process; it never returns
            self._worker_main(child.index, child.generation, reader, parent, theirs)
        reader.close()  # only unmaps: this process never read it
        if theirs is not None:
            theirs.close()  # the worker's now: its death is our end's EOF
        child.pid, child.writer = pid, writer
        child.pidfd = os.pidfd_open(pid)
        child.core = None
        if self._pin and (core := _core_for(child.index)) is not None:
            with contextlib.suppress(OSError):  # the child pins itself too; this makes
                os.sched_setaffinity(pid, {core})  # it hold from the moment we report ready
                child.core = core
        self._control.set_worker(child.index, pid, child.generation, child.core)

    def _worker_main(
        self,
        index: int,
        generation: int,
        reader: RingReader,
        parent: int,
        link: socket.socket | None,
    ) -> None:
        code = 1
        try:
            private = [self._wake_r, self._wake_w] + [c.pidfd for c in self._children]
            # Our ends of every link, this worker's included; detached so that no socket
            # object of this copy of the supervisor closes the number again later.
            private += [c.link.detach() for c in self._children if c.link is not None]
            proc.after_fork_in_child(
                f"astra-w{index:02d}",
                parent_pid=parent,
                death_signal=signal.SIGKILL,
                close_fds=[fd for fd in private if fd >= 0],
            )
            if self._pin:
                proc.pin(index)
            # The worker's own plugin instances (kernel/plugins.py protocol 2), set up
            # before it serves anything; the supervisor's stay unused in this process.
            host = None
            if self._plugins is not None:
                to_sup = plugins.SupervisorLink(link) if link is not None else None
                host = self._plugins.for_worker(index, to_sup)
            plugins.activate(host)
            worker = Worker(
                index, self._instance, self._control, reader, self._arena, generation,
                self._data_dir,
            )  # fmt: skip
            code = worker.run()
            if host is not None:
                host.close()
        except BaseException:
            log_event(log, logging.ERROR, "worker_crashed", id=f"w{index:02d}", exc_info=True)
        finally:
            os._exit(code)

    # ---- The loop ----

    def run(self) -> int:
        """Supervise until stopped (a signal on the wake fd, or give-up); then stop every
        worker and return the exit code. SIGTERM/SIGINT handlers must write to ``wake_fd``
        (``install_signal_wakeup`` does)."""
        poller = self._poller
        poller.register(self._wake_r, select.POLLIN)
        by_fd: dict[int, _Child] = {}
        for child in self._children:
            poller.register(child.pidfd, select.POLLIN)
            by_fd[child.pidfd] = child
        watchdog_s = self._notifier.watchdog_interval_s if self._notifier else None
        tick_s = min(TICK_S, watchdog_s) if watchdog_s else TICK_S
        next_ping = time.monotonic()
        while not self._stopping:
            if watchdog_s and time.monotonic() >= next_ping:
                # From this loop, so a wedged supervisor stops pinging (kernel/notify.py).
                assert self._notifier is not None
                self._notifier.watchdog()
                next_ping = time.monotonic() + watchdog_s
            events = poller.poll(tick_s * 1000)
            exited: list[_Child] = []
            for fd, _ in events:
                if fd == self._wake_r:
                    self._on_wake()
                elif fd in self._links:
                    self._on_call(self._links[fd])
                else:
                    exited.append(by_fd.pop(fd))
            # Exits last: a reap closes fds, and a new worker's may reuse the number of an
            # fd this batch still names.
            for child in exited:
                poller.unregister(child.pidfd)
                self._on_exit(child)
                if child.pidfd >= 0:
                    poller.register(child.pidfd, select.POLLIN)
                    by_fd[child.pidfd] = child
            if not events:
                self._reclaim_clients()
        if self._notifier is not None:
            self._notifier.stopping(status="draining workers")
        self._shutdown()
        if self._specs_journal is not None:
            self._specs_journal.close()
        return self.exit_code

    @property
    def wake_fd(self) -> int:
        """The write end of the wake pipe (for ``signal.set_wakeup_fd``)."""
        return self._wake_w

    def set_policy(self, policy: RestartPolicy) -> None:
        """Apply a new restart policy (a SIGHUP reload): the next worker exit is judged by
        it, against the restarts already counted in the window, and a later stop drains
        with its ``shutdown_timeout_s``. Main thread only."""
        self._policy = policy

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            data = os.read(self._wake_r, 64)
            if any(sig in (signal.SIGTERM, signal.SIGINT) for sig in data):
                log_event(log, logging.INFO, "stop_requested")
                self._stopping = True
            elif signal.SIGHUP in data and self._on_reload is not None:
                try:
                    self._on_reload()
                except Exception as exc:  # a bad reload keeps the running configuration
                    log_event(log, logging.ERROR, "reload_failed", error=repr(exc), exc_info=True)
                    if self._notifier is not None:  # never leave systemd in "reloading"
                        self._notifier.ready(status=f"reload failed: {exc}")

    # ---- Links: supervisor services (kernel/plugins.py protocol 6) ----

    def _open_link(self, child: _Child) -> socket.socket | None:
        """A new socketpair for ``child``'s next generation (with plugins only): keep and
        poll our end, return the worker's."""
        if self._plugins is None:
            return None
        assert child.link is None, "the last generation's link is closed at its reap"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child.link = ours
        self._poller.register(ours.fileno(), select.POLLIN)
        self._links[ours.fileno()] = child
        return theirs

    def _on_call(self, child: _Child) -> None:
        """``child``'s link is readable: answer its call, or stop polling it at EOF."""
        assert child.link is not None
        assert self._plugins is not None
        if not self._plugins.serve(child.link):
            self._unwatch_link(child)  # its worker died; closed when it is reaped

    def _unwatch_link(self, child: _Child) -> None:
        if child.link is not None and self._links.pop(child.link.fileno(), None) is not None:
            self._poller.unregister(child.link.fileno())

    def _close_link(self, child: _Child) -> None:
        if child.link is not None:
            self._unwatch_link(child)
            child.link.close()
            child.link = None

    # ---- Restart: a worker has exited (protocol step 2) ----

    def _on_exit(self, child: _Child) -> None:
        _, status = os.waitpid(child.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os.close(child.pidfd)
        child.pidfd = -1
        self._close_link(child)
        running_client, running_task = self._control.running(child.index)
        self._retire_ring(child)
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > self._policy.within_s:
            self._restarts.popleft()
        restarts = f"{len(self._restarts)}/{self._policy.max_restarts}"
        log_event(
            log, logging.WARNING, "child_exited", id=f"w{child.index:02d}", pid=child.pid,
            reason=_reason(code), restarts=restarts, within_s=self._policy.within_s,
        )  # fmt: skip
        if len(self._restarts) > self._policy.max_restarts:
            log_event(
                log, logging.ERROR, "restart_intensity_exceeded", restarts=restarts,
                within_s=self._policy.within_s, action="stopping",
            )  # fmt: skip
            self.exit_code = EXIT_RESTART_INTENSITY
            self._stopping = True
            return
        old_pid = child.pid
        self._spawn(child)
        self._control.add_restart(child.index)
        self._restart_agents(child.index)
        self._notify_lost(child, old_pid, code, running_client, running_task)

    def _restart_agents(self, index: int) -> None:
        """The agents of dead worker ``index`` died with it: start them again on the other
        workers from their spawn specs, or free their names (kernel/agentd.py). Called
        after the replacement was forked, so a lone worker's agents go to it."""
        try:
            registry = plugins.router().names(self._instance)  # plugins.py protocol 7
        except (SegmentError, OSError):
            return  # a kernel without an agent registry
        try:
            names = [name for name, worker in registry.entries() if worker == index]
            if not names:
                return
            specs = self._agent_specs()
            targets = [c for c in self._children if c.index != index] or [self._children[index]]
            restarted = 0
            for k, name in enumerate(names):
                raw = specs.get(name.encode()) if specs is not None else None
                spec = decode_spec(raw) if raw is not None else None
                target = targets[k % len(targets)]
                if spec is None or spec.restart == "temporary" or target.writer is None:
                    registry.release(name, worker=index)
                    continue
                registry.move(name, target.index)
                frame = encode(SpawnAgent(
                    target.index, 0, name, spec.cls, spec.args, spec.restart, spec.persist,
                    spec.mailbox, spec.tools, spec.grants,
                ))  # fmt: skip
                try:
                    target.writer.send_many([frame], timeout=1.0)
                    restarted += 1
                except IPCError:
                    registry.release(name, worker=target.index)
            log_event(
                log, logging.WARNING, "agents_restarted", id=f"w{index:02d}",
                count=restarted, lost=len(names) - restarted,
            )  # fmt: skip
        finally:
            registry.close()

    def _agent_specs(self) -> Table | None:
        if self._data_dir is None:
            return None
        if self._specs_journal is None:
            try:
                self._specs_journal = Journal.open(
                    os.path.join(self._data_dir, RUNTIME_JOURNAL), sync=False
                )
            except JournalError:
                log_event(
                    log, logging.ERROR, "agent_specs_unavailable", dir=self._data_dir,
                    exc_info=True,
                )  # fmt: skip
                return None
        return self._specs_journal.table(SPECS_TABLE)

    def _retire_ring(self, child: _Child) -> None:
        if child.writer is not None:
            with contextlib.suppress(IPCError, OSError):
                child.writer.close()
            child.writer = None
        unlink_ring(self._instance, worker_ring(child.index, child.generation))
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(
                self._instance.name(steal_bell(child.index, child.generation))
            )

    def _notify_lost(
        self, child: _Child, pid: int, code: int, running_client: int, running_task: int
    ) -> None:
        for row in self._control.clients():
            writer = self._client_writer(row.slot, row.generation, row.instance_id)
            if writer is None:
                continue
            task = running_task if row.slot == running_client else -1
            msg = WorkerLost(child.index, pid, code, child.generation, task)
            try:
                writer.send(encode(msg), timeout=NOTIFY_TIMEOUT_S)
            except (RingFull, RingClosedError, OSError):
                self._drop_client_writer(row.slot)

    def _client_writer(self, slot: int, generation: int, instance_id: str) -> RingWriter | None:
        cached = self._client_writers.get(slot)
        if cached is not None and cached[0] == generation:
            return cached[1]
        self._drop_client_writer(slot)
        try:
            inst = (
                self._instance if instance_id == self._instance.id else Instance.attach(instance_id)
            )
            writer = RingWriter.attach(inst, f"to_c{slot}")
        except (IPCError, OSError):
            return None
        self._client_writers[slot] = (generation, writer)
        return writer

    def _drop_client_writer(self, slot: int) -> None:
        cached = self._client_writers.pop(slot, None)
        if cached is not None:
            with contextlib.suppress(IPCError, OSError):
                cached[1].close()

    # ---- Clients (protocol step 3) ----

    def _reclaim_clients(self) -> None:
        for row in self._control.clients():
            if proc.process_alive(row.pid, row.start):
                continue
            if self._control.unregister(row.slot, row.generation):
                log_event(
                    log, logging.WARNING, "client_exited", slot=row.slot, pid=row.pid,
                    reason="died",
                )  # fmt: skip
                self._drop_client_writer(row.slot)
                if row.instance_id != self._instance.id:
                    cleanup_stale(row.instance_id.partition("@")[2] or None)

    # ---- Stop (protocol step 4) ----

    def _shutdown(self) -> None:
        self._control.set_state(KernelState.DRAINING)
        deadline = time.monotonic() + self._policy.shutdown_timeout_s
        live = [c for c in reversed(self._children) if c.pidfd >= 0]
        for child in live:
            try:
                assert child.writer is not None
                child.writer.send(encode(StopWorker(drain=True)), timeout=1.0)
            except (IPCError, OSError):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
        for child in live:
            if not self._wait_exit(child, deadline):
                log_event(
                    log, logging.WARNING, "stop_ignored", id=f"w{child.index:02d}",
                    pid=child.pid, timeout_s=self._policy.shutdown_timeout_s, action="SIGKILL",
                )  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
            os.waitpid(child.pid, 0)
            os.close(child.pidfd)
            child.pidfd = -1
            self._close_link(child)
            self._retire_ring(child)
        for slot in list(self._client_writers):
            self._drop_client_writer(slot)
        for child in self._children:  # those whose last restart was refused
            self._close_link(child)
        self._control.set_state(KernelState.STOPPED)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _wait_exit(self, child: _Child, deadline: float) -> bool:
        """Wait until ``child`` exits (True) or ``deadline`` passes (False), answering the
        service calls of the draining workers meanwhile."""
        while True:
            left = max(0.0, deadline - time.monotonic())
            links = list(self._links)
            ready = select.select([child.pidfd, *links], [], [], left)[0]
            if child.pidfd in ready:
                return True
            if not ready:
                return False
            for fd in ready:
                if fd in self._links:
                    self._on_call(self._links[fd])


def _reason(code: int) -> str:
    if code < 0:
        return signal.Signals(-code).name
    return f"exit({code})"


def _core_for(index: int) -> int | None:
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    return allowed[index % len(allowed)]


def install_signal_wakeup(wake_fd: int) -> None:
    """Route SIGTERM, SIGINT and SIGHUP to the supervisor's poll (main thread only)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)


def fork_supervisor(
    instance: Instance,
    control: ControlBlock,
    arena: Arena | None,
    ready: posix_ipc.Semaphore,
    policy: RestartPolicy | None = None,
    *,
    pin: bool = True,
    child_hook: Callable[[], None] | None = None,
    data_dir: str | None = None,
    plugin_candidates: list[Candidate] | None = None,
) -> int:
    """Fork the supervisor of an embedded kernel; returns its pid. The child loads the
    plugins (``plugin_candidates``, from ``kernel.plugins.discover``, their status under
    ``data_dir``), starts the workers, posts ``ready``, supervises until SIGTERM (or until
    the embedding thread dies: ``PR_SET_PDEATHSIG``), stops the workers and exits. It never
    returns into the caller."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1  # pragma: no cover - the supervisor process
    try:
        proc.after_fork_in_child("astra-sup", parent_pid=parent, death_signal=signal.SIGTERM)
        if child_hook is not None:
            child_hook()
        host = None
        if plugin_candidates is not None and data_dir is not None:
            host = plugins.PluginHost.load(plugin_candidates, data_dir)
            plugins.activate(host)
        sup = Supervisor(
            instance, control, arena, policy, pin=pin, data_dir=data_dir, plugin_host=host
        )
        sup.start()
        install_signal_wakeup(sup.wake_fd)
        ready.release()
        code = sup.run()
        if host is not None:
            host.close()
    except BaseException:
        log_event(log, logging.ERROR, "supervisor_crashed", exc_info=True)
    finally:
        os._exit(code)
