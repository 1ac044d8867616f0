"""``astra.Kernel`` (an embedded kernel owned by this process) and ``astra.connect`` (a
client of a running ``astrad``)."""

from __future__ import annotations

__all__ = ["BUILTIN_PLUGINS", "Kernel", "connect"]

import contextlib
import glob
import os
import select
import shutil
import signal
import tempfile
import time
from typing import TYPE_CHECKING, Final

import posix_ipc

from ipc import Arena, Instance, IPCError, cleanup_stale, is_alive
from kernel import (
    ControlBlock,
    RegistrationError,
    RestartPolicy,
    default_state_dir,
    fork_supervisor,
    read_state,
)
from kernel.plugins import discover
from kernel.registry import MAX_AGENTS, Registry

from ._client import Client
from ._errors import KernelNotRunningError, TooManyClientsError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from kernel.plugins import Plugin

#: Size of an embedded kernel's payload arena (tmpfs: pages cost memory only once touched).
DEFAULT_ARENA_BYTES: Final = int(os.getenv("ASTRA_KERNEL_ARENA_BYTES", str(256 << 20)))
#: How long ``Kernel()`` waits for its supervisor to report ready.
START_TIMEOUT_S: Final = 30.0
#: The plugins every kernel loads first: Astra's own services, built on the same plugin
#: API as a third party's (kernel/plugins.py). Routing first: it provides the default router.
BUILTIN_PLUGINS: Final = ("astra.routing:RoutingPlugin", "astra.memory:MemoryPlugin")


class Kernel(Client):
    """An embedded kernel: this process forks a supervisor, which forks ``workers`` worker
    processes (``astra-w00``...), and talks to them over shared memory.

    The default for scripts, notebooks and tests. Leaving the ``with`` block (or
    ``close()``, or the process exiting) drains the queued tasks, stops every process and
    removes every shared-memory object. Has the whole ``Client`` API. Starting takes about
    10 ms; it blocks until the workers are forked.

    The supervisor dies with the *thread* that created the kernel (``PR_SET_PDEATHSIG``):
    create it on a thread that outlives its use, such as the main thread.

    Args:
        workers: worker processes; default ``os.cpu_count()``.
        arena_bytes: size of the shared arena for large numpy results.
        pin: pin worker ``i`` to the ``i``-th allowed core.
        max_restarts, within_s: restart intensity; past it the kernel stops.
        shutdown_timeout_s: how long ``close()`` lets workers drain before SIGKILL.
        state_dir: where persisted agents keep their checkpoints (``<state_dir>/agents``);
            default: a directory of this kernel's own, removed when it closes.
        max_agents: agents that can run at once (the size of the name registry).
        plugins: plugins to load beside the built-in ones (memory) and those installed
            under the ``astra.plugins`` entry point: ``Plugin`` subclasses or
            ``"package.module:Class"`` strings. One that fails to load is reported
            (``plugins()``) and skipped.
        entry_points: load the ``astra.plugins`` entry points of installed distributions.

    Raises:
        KernelNotRunningError: the supervisor failed to start.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        arena_bytes: int = DEFAULT_ARENA_BYTES,
        pin: bool = True,
        max_restarts: int = 10,
        within_s: float = 5.0,
        shutdown_timeout_s: float = 5.0,
        state_dir: str | None = None,
        max_agents: int = MAX_AGENTS,
        plugins: Iterable[str | type[Plugin]] = (),
        entry_points: bool = True,
    ) -> None:
        n = workers if workers is not None else os.cpu_count() or 1
        if n < 1:
            raise ValueError("a kernel needs at least one worker")
        self._policy = RestartPolicy(max_restarts, within_s, shutdown_timeout_s)
        self._sup_pid = -1
        # Found here, in the embedding process, where the imports stay cached between
        # kernels; loaded in the supervisor and in each worker (kernel/plugins.py).
        candidates = discover(
            BUILTIN_PLUGINS, [(p, "Kernel(plugins=...)") for p in plugins],
            entry_points=entry_points,
        )  # fmt: skip
        cleanup_stale(os.getenv("ASTRA_SHM_LABEL") or None)
        _remove_stale_data_dirs()
        inst = Instance.create()
        control: ControlBlock | None = None
        arena: Arena | None = None
        registry: Registry | None = None
        # Persisted agents' checkpoints: under state_dir, or a directory of this kernel's
        # own, removed when it closes.
        self._own_data = None if state_dir else tempfile.mkdtemp(prefix=f"astra-{inst.id}-")
        data_dir = state_dir or self._own_data
        try:
            control = ControlBlock.create(inst, n, max_clients=1)
            arena = Arena.create(inst, size=arena_bytes)
            registry = Registry.create(inst, max_agents)
            ready = inst.create_semaphore("ready", 0)
            try:
                self._sup_pid = fork_supervisor(
                    inst, control, arena, ready, self._policy, pin=pin, data_dir=data_dir,
                    plugin_candidates=candidates,
                )  # fmt: skip
                self._wait_ready(ready)
            finally:
                ready.close()
            super().__init__(inst, control, arena, inst)
        except BaseException:
            self._stop_supervisor()
            for obj in (registry, arena, control, inst):
                if obj is not None:
                    obj.close()
            self._remove_own_data()
            raise
        self._kregistry = registry
        self.data_dir = data_dir

    def _remove_own_data(self) -> None:
        if self._own_data is not None:
            shutil.rmtree(self._own_data, ignore_errors=True)
            self._own_data = None

    def _wait_ready(self, ready: posix_ipc.Semaphore) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                ready.acquire(0.2)
                return
            except posix_ipc.BusyError:
                pass
            done, _ = os.waitpid(self._sup_pid, os.WNOHANG)
            if done or time.monotonic() > deadline:
                if done:
                    self._sup_pid = -1
                raise KernelNotRunningError("the kernel's supervisor failed to start")

    def _stop_supervisor(self) -> None:
        """SIGTERM the supervisor (it drains the workers), then reap it; SIGKILL if late."""
        pid, self._sup_pid = self._sup_pid, -1
        if pid < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        fd = os.pidfd_open(pid)
        try:
            if not select.select([fd], [], [], self._policy.shutdown_timeout_s + 2.0)[0]:
                os.kill(pid, signal.SIGKILL)  # workers die with it (PR_SET_PDEATHSIG)
        finally:
            os.close(fd)
        os.waitpid(pid, 0)

    def close(self) -> None:
        """Drain queued tasks, stop every kernel process and remove the shared memory.
        Blocks up to ``shutdown_timeout_s`` (plus a little). Safe to call twice."""
        if getattr(self, "_closed", True) or os.getpid() != self._pid:
            return
        self._wait_sent(self._policy.shutdown_timeout_s)  # queued means sent, then drained
        self._stop_supervisor()
        self._kregistry.close()
        super().close()
        self._remove_own_data()

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def supervisor_pid(self) -> int:
        """The pid of the kernel's supervisor process (``astra-sup``)."""
        return self._control.supervisor[0]

    def worker_pids(self) -> list[int]:
        """The current pid of each worker, by index."""
        return [self._control.worker(i).pid for i in range(self._control.workers)]


def _remove_stale_data_dirs() -> None:
    """Remove the data directories (``astra-<instance>-*`` in the temp dir) of embedded
    kernels whose process died without closing them (SIGKILL)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "astra-*-*")):
        instance = os.path.basename(path)[len("astra-") :].rsplit("-", 1)[0]
        pid = instance.split("@", 1)[0].split(".", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(path, ignore_errors=True)


def connect(name: str = "default", *, state_dir: str | None = None) -> Client:
    """Attach to the running ``astrad`` called ``name`` over shared memory.

    Registers this process in the daemon's control block (a free client slot) and returns a
    ``Client``. Several clients may attach at once; a client that dies, even by SIGKILL,
    has its slot and queued work reclaimed by the daemon.

    Raises:
        KernelNotRunningError: no live ``astrad`` of that name, or it is stopping.
        TooManyClientsError: every client slot is taken.
        PermissionError: the daemon's segments belong to another user.
    """
    state = read_state(name, state_dir)
    if state is None or not is_alive(state.pid, state.start):
        raise KernelNotRunningError(f"no astrad named {name!r} is running")
    try:
        kinst = Instance.attach(state.instance)
        control = ControlBlock.open(kinst)
    except IPCError as exc:
        raise KernelNotRunningError(f"astrad {name!r} is gone: {exc}") from exc
    arena: Arena | None = None
    own: Instance | None = None
    try:
        arena = Arena.attach(kinst)
        own = Instance.create()
        client = Client(kinst, control, arena, own)
        client.state_dir = state_dir
        client.data_dir = os.path.join(state_dir or default_state_dir(), name)
        return client
    except BaseException as exc:
        for obj in (own, arena, control):
            if obj is not None:
                obj.close()
        if isinstance(exc, RegistrationError):
            if "slots" in str(exc):
                raise TooManyClientsError(f"astrad {name!r}: {exc}") from exc
            raise KernelNotRunningError(f"astrad {name!r}: {exc}") from exc
        raise
