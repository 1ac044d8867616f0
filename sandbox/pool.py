"""A warm pool: sandboxed children forked and locked down ahead of time, one call each.

A cold call (``runner.Runner``) pays for the fork and the whole lockdown (about 5 ms here);
a :class:`WarmPool` pays for them before the call arrives, so a call costs the hand-over,
the run and the reply (under 2 ms here). Each child still serves exactly one call and
exits: no state, file or process of one call can reach the next.

    WarmPool                                    idle children (locked down)
    --------                                    ---------------------------
    _idle: deque[Child]  ------- take oldest -> [c1] [c2]       (call pipe open, no call)
       |  call frame (cloudpickle) ---------->  c1 runs the call
       |  fork a replacement c3 ------------->  [c2] [c3]       (while c1 runs)
       |  collect c1's reply <---------------   c1 replies, exits
    _exiting: [c1]  (python profile: returned at the reply, reaped on a later call)

Invariants, each kept under ``_lock``:

- Every child in ``_idle`` is unreaped, has its call pipe open and has had no call.
- A child leaves ``_idle`` exactly once (``_take``); once handed a call it is collected by
  that caller, then reaped by it or put in ``_exiting`` and reaped by a later call or
  ``close()``.
- After ``close()`` no child is added to either list: late ones are reaped at once.
"""

from __future__ import annotations

__all__ = ["POOL_SIZE", "PoolStatistics", "WarmPool"]

import collections
import dataclasses
import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any, Final

import cloudpickle

from .child import FRAME, Call, Reply, parse_frames
from .errors import SandboxError
from .policy import Policy
from .runner import READ_CHUNK, Child, Template, check_shell, finish, reap, rebuild

if TYPE_CHECKING:
    from collections.abc import Callable

    from .runner import SandboxResult

#: Children a WarmPool keeps ready.
POOL_SIZE: Final = int(os.getenv("ASTRA_SANDBOX_POOL_SIZE", 2))


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a :class:`WarmPool` (``WarmPool.statistics()``)."""

    size: int  # children the pool keeps ready
    idle: int  # children forked and waiting now
    calls: int  # calls dispatched so far
    spawned: int  # children forked so far


class WarmPool:
    """Pre-forked sandboxed children, already locked down, each serving exactly one call
    and then exiting; a call pays neither for the fork nor for the lockdown.

    Each call takes the oldest ready child; a refill thread forks its replacement while the
    call runs, so the caller pays for no fork.
    Close the pool (``close()`` or ``with``) to kill and reap the idle children and remove
    their workdirs. Thread-safe.

    Args:
        policy: the policy of every call (default ``Policy()``).
        size: children kept ready (default :data:`POOL_SIZE`).
    """

    def __init__(self, policy: Policy | None = None, size: int = POOL_SIZE) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least one child, got size={size}")
        self.policy = policy if policy is not None else Policy()
        self._template = Template(self.policy, spare_workdirs=size + 2)
        self._size = size
        self._lock = threading.Lock()
        # Invariant: every child here is unreaped, has its call pipe open and no call yet.
        self._idle: collections.deque[Child] = collections.deque()  # guarded by _lock
        # Children whose call is over, still exiting; reaped on the next call or close.
        self._exiting: list[Child] = []  # guarded by _lock
        self._calls = 0
        self._spawned = 0
        self._forking = 0  # replacements the refill thread is forking; guarded by _lock
        self._closed = False
        self._want = threading.Condition(self._lock)  # a child was taken: fork another
        for _ in range(size):
            self._add_child()
        self._refiller = threading.Thread(
            target=self._refill_loop, name="astra-pool-refill", daemon=True
        )
        self._refiller.start()

    # -- calls --

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> SandboxResult:
        """As :meth:`Runner.call`, in a warm child. ``fn`` and its arguments are pickled
        with cloudpickle. Blocks; raises as :meth:`Runner.call`, and ``RuntimeError``
        once the pool is closed."""
        return self._dispatch(Call("call", fn, args, kwargs))

    def run_python(self, source: str) -> SandboxResult:
        """As :meth:`Runner.run_python`, in a warm child."""
        return self._dispatch(Call("python", text=source))

    def run_shell(self, command: str) -> SandboxResult:
        """As :meth:`Runner.run_shell`, in a warm child."""
        check_shell(self.policy)
        return self._dispatch(Call("shell", text=command))

    def _dispatch(self, call: Call) -> SandboxResult:
        payload = cloudpickle.dumps(call)  # before taking a child: a pickling error wastes none
        frame = FRAME.pack(len(payload)) + payload
        child, started = self._hand_over(frame)
        with self._lock:
            self._want.notify()  # the refill thread forks the replacement meanwhile
        self._reap_exited(block=False)
        deadline = started + self.policy.wall_s
        return finish(child, deadline, started, call, self.policy, defer_reap=self._exited)

    def _hand_over(self, frame: bytes) -> tuple[Child, float]:
        """Send ``frame`` to a ready child; return it and the dispatch time. A child found
        dead when the call is written to it (killed while idle) is replaced, once."""
        for attempt in range(2):
            child = self._take()
            started = time.monotonic()
            try:
                _write_all(child.call_w, frame)
            except BrokenPipeError:
                if attempt == 0:
                    self._discard(child)
                    continue
                # Twice: not a fluke. Let collecting report how the child died.
            finally:
                if child.call_w >= 0:
                    os.close(child.call_w)
                    child.call_w = -1
            return child, started
        raise AssertionError("unreachable")

    # -- the idle children --

    def _take(self) -> Child:
        # Oldest first: it has had the longest to finish its lockdown.
        with self._lock:
            if self._closed:
                raise RuntimeError("the WarmPool is closed")
            self._calls += 1
            while self._idle:
                child = self._idle.popleft()
                if not _has_exited(child):
                    return child
                self._discard(child)  # died idle (killed from outside): use another
        return self._spawn()  # none ready: this call pays for a fork, as a cold one would

    def _refill_loop(self) -> None:
        """The refill thread: fork a replacement whenever fewer than ``size`` children are
        ready or being forked, so that a call never waits for a fork (~0.5-1 ms) it does
        not need: its caller only hands the call over and collects the result."""
        while True:
            with self._lock:
                while not self._closed and len(self._idle) + self._forking >= self._size:
                    self._want.wait()
                if self._closed:
                    return
                self._forking += 1
            try:
                child = self._spawn()
            except Exception:  # out of pids or fds: try again a little later
                with self._lock:
                    self._forking -= 1
                    self._want.wait(0.1)
                continue
            with self._lock:
                self._forking -= 1
                closed = self._is_closed()  # close() may have run while we forked
                if not closed:
                    self._idle.append(child)
            if closed:
                self._discard(child)

    def _is_closed(self) -> bool:
        return self._closed

    def _add_child(self) -> None:
        child = self._spawn()
        with self._lock:
            if not self._closed:
                self._idle.append(child)
                return
        self._discard(child)  # closed meanwhile

    def _spawn(self) -> Child:
        child = self._template.spawn(None)
        with self._lock:
            self._spawned += 1
        return child

    def _discard(self, child: Child) -> None:
        reap(child)

    def _exited(self, child: Child) -> None:
        """Keep a child whose call is over but which is still exiting, to reap later."""
        with self._lock:
            if not self._closed:
                self._exiting.append(child)
                return
        reap(child)  # close() has reaped the others already: nobody would reap this one

    def _reap_exited(self, *, block: bool) -> None:
        """Reap the children kept by :meth:`_exited` (those that have exited, or all)."""
        with self._lock:
            ready = [c for c in self._exiting if block or _has_exited(c)]
            self._exiting = [c for c in self._exiting if c not in ready]
        for child in ready:
            reap(child)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until every idle child has finished its lockdown.

        Raises:
            TimeoutError: a child was not ready within ``timeout_s``.
            SandboxError: a child could not lock down (its failure is the message).
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            children = list(self._idle)
        for child in children:
            # Read only the Locked frame: what follows belongs to the call's collector,
            # which continues from child.reply.
            while not parse_frames(bytes(child.reply)):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([child.reply_r], [], [], remaining)[0]:
                    raise TimeoutError(f"sandbox child {child.pid} not ready in {timeout_s} s")
                chunk = os.read(child.reply_r, READ_CHUNK)
                if not chunk:
                    raise SandboxError(f"sandbox child {child.pid} exited during its lockdown")
                child.reply += chunk
            first = parse_frames(bytes(child.reply))[0]
            if isinstance(first, Reply) and first.failure is not None:
                raise rebuild(first.failure, self.policy)

    # -- life cycle --

    def statistics(self) -> PoolStatistics:
        """A snapshot of the pool's counters."""
        with self._lock:
            return PoolStatistics(self._size, len(self._idle), self._calls, self._spawned)

    def close(self) -> None:
        """Kill and reap the idle children and remove their workdirs. Idempotent; calls in
        progress finish normally."""
        with self._lock:
            self._closed = True
            self._want.notify_all()
        if self._refiller is not threading.current_thread():
            self._refiller.join()  # it finishes a fork in progress and discards that child
        with self._lock:
            idle, self._idle = list(self._idle), collections.deque()
        for child in idle:
            self._discard(child)
        self._reap_exited(block=True)
        self._template.close()

    def __enter__(self) -> WarmPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _has_exited(child: Child) -> bool:
    # A pidfd polls readable once its process has exited (a zombie not yet reaped counts).
    return bool(select.select([child.pidfd], [], [], 0)[0])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
