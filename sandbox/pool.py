"""A warm pool: sandboxed children forked and locked down ahead of time, one call each.

A cold call (``runner.Runner``) pays for the fork and the whole lockdown (about 5 ms here);
a :class:`WarmPool` pays for them before the call arrives, so a call costs the hand-over,
the run and the reply (about 1 ms here). Each child still serves exactly one call and
exits: no state, file or process of one call can reach the next.

    caller (WarmPool.call)                  keeper thread            children
    ----------------------                  -------------            --------
    _idle: deque[Child] -- take the oldest --------------------------> [c1] [c2]
       |  call frame (cloudpickle) ----------------------------------> c1 runs the call
       |  collect c1's reply <--------------------------------------- c1 replies, exits
       |  the result is in the caller's hand
       '-- _want.notify() ---------------> fork c3 ------------------> [c2] [c3 locks down]
    _exiting: [c1] (python profile) -----> reap c1

The replacement is forked once the call is over, not while it runs: the fork holds the
GIL for its page-table copy (~0.5-1 ms) and the replacement's lockdown takes a core for
~3 ms, which a call on this 2-core machine felt as ~1 ms of its ~2 ms. It is forked at
once instead when no other child is ready, so the next call does not wait for one. The
keeper also reaps the finished children, so a caller only waits for its own call.

Invariants, each kept under ``_lock``:

- Every child in ``_idle`` is unreaped, has its call pipe open and has had no call.
- A child leaves ``_idle`` exactly once (``_take``); once handed a call it is collected by
  that caller, then reaped by it or put in ``_exiting`` and reaped by the keeper or
  ``close()``.
- ``len(_idle) + _forking + _deferred <= size``: the keeper forks only while it is below.
- After ``close()`` no child is added to either list: late ones are reaped at once.
"""

from __future__ import annotations

__all__ = ["POOL_SIZE", "PoolStatistics", "WarmPool"]

import collections
import contextlib
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

    Each call takes the oldest ready child; a keeper thread forks its replacement once the
    call is over (at once if no other child is ready) and reaps the finished children, so
    the caller pays for neither.
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
        # Children whose call is over, still exiting; the keeper reaps them (or close()).
        self._exiting: list[Child] = []  # guarded by _lock
        self._reaping = False  # the keeper is reaping what it took from _exiting; by _lock
        self._calls = 0
        self._spawned = 0
        self._forking = 0  # replacements the keeper is forking; guarded by _lock
        # Replacements owed once a running call is over (see _take); guarded by _lock.
        # Invariant: len(_idle) + _forking + _deferred <= size (the keeper forks only
        # below it; a child a caller forks for itself counts in none of them).
        self._deferred = 0
        self._closed = False
        self._want = threading.Condition(self._lock)  # the keeper has work: fork or reap
        self._changed = threading.Condition(self._lock)  # the keeper forked, failed or reaped
        for _ in range(size):
            self._add_child()
        self._keeper = threading.Thread(
            target=self._keeper_loop, name="astra-pool-keeper", daemon=True
        )
        self._keeper.start()

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
        child, started, deferred = self._hand_over(frame)
        try:
            deadline = started + self.policy.wall_s
            return finish(child, deadline, started, call, self.policy, defer_reap=self._exited)
        finally:
            with self._lock:
                self._deferred -= deferred
                self._want.notify()  # the keeper forks the replacement, then reaps

    def _hand_over(self, frame: bytes) -> tuple[Child, float, bool]:
        """Send ``frame`` to a ready child; return it, the dispatch time and whether its
        replacement waits for the end of the call. A child found dead when the call is
        written to it (killed while idle) is replaced, once."""
        for attempt in range(2):
            child, deferred = self._take()
            started = time.monotonic()
            try:
                sent = _send_call(child, frame)
            except BaseException:  # KeyboardInterrupt mid-write: the child must not leak
                self._give_up(child, deferred)
                raise
            if sent or attempt == 1:  # twice: not a fluke; collecting says how it died
                return child, started, deferred
            self._give_up(child, deferred)
        raise AssertionError("unreachable")

    # -- the idle children --

    def _take(self) -> tuple[Child, bool]:
        """The oldest ready child (it has had the longest to finish its lockdown), and
        whether its replacement is deferred to the end of the call."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the WarmPool is closed")
            self._calls += 1
            while True:
                while self._idle:
                    child = self._idle.popleft()
                    if _has_exited(child):
                        self._discard(child)  # died idle (killed from outside): use another
                        continue
                    # Another child is ready for the next call: fork the replacement once
                    # this call is over, not during it, where the fork (which holds the
                    # GIL) and its lockdown would compete with the call for the CPU.
                    if self._idle:
                        self._deferred += 1
                        return child, True
                    self._want.notify()  # none left: the next call must not wait for one
                    return child, False
                if not self._forking:
                    break
                self._changed.wait()  # a fork in flight comes sooner than a new one
                if self._is_closed():
                    raise RuntimeError("the WarmPool is closed")
        return self._spawn(), False  # none ready: this call pays for a fork, as a cold one would

    def _give_up(self, child: Child, deferred: bool) -> None:
        """Reap a child taken for a call it will not serve; owe its replacement now."""
        self._discard(child)
        with self._lock:
            self._deferred -= deferred
            self._want.notify()

    def _keeper_loop(self) -> None:
        """The keeper thread: fork a replacement whenever fewer than ``size`` children are
        ready, being forked or owed after a running call, so that a call never waits for a
        fork (~0.5-1 ms) it does not need; then reap the children whose calls are over."""
        while True:
            with self._lock:
                while not (self._closed or self._owed() or self._exiting):
                    self._want.wait()
                if self._closed:
                    return
                fork = self._owed()
                if fork:
                    self._forking += 1
            if fork:
                self._refill()
            else:
                self._reap_exited()

    def _owed(self) -> bool:
        """Whether the keeper should fork a child now. Called under ``_lock``."""
        return len(self._idle) + self._forking + self._deferred < self._size

    def _refill(self) -> None:
        """Fork one replacement (the keeper has counted it in ``_forking``)."""
        try:
            child = self._spawn()
        except Exception:  # out of pids or fds: try again a little later
            with self._lock:
                self._forking -= 1
                self._changed.notify_all()  # a caller waiting for it forks its own
                self._want.wait(0.1)
            return
        with self._lock:
            self._forking -= 1
            closed = self._is_closed()  # close() may have run while we forked
            if not closed:
                self._idle.append(child)
            self._changed.notify_all()
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

    def _reap_exited(self) -> None:
        """Reap the children kept by :meth:`_exited`, waiting for them to exit (each has
        replied; it is only tearing down its memory and namespaces)."""
        with self._lock:
            exiting, self._exiting = self._exiting, []
            self._reaping = True
        try:
            for child in exiting:
                with contextlib.suppress(OSError):  # already reaped: nothing to wait for
                    reap(child)
        finally:
            with self._lock:
                self._reaping = False
                self._changed.notify_all()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the pool has settled: every replacement owed is forked (except those
        deferred to the end of a running call), every idle child has finished its lockdown,
        and every child whose call is over is reaped. Returns at once on a closed pool.

        Raises:
            TimeoutError: the pool did not settle within ``timeout_s``.
            SandboxError: a child could not lock down (its failure is the message).
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not (self._closed or self._settled()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the WarmPool did not settle in {timeout_s} s")
                self._changed.wait(remaining)
            children = list(self._idle)
        for child in children:
            self._wait_locked(child, deadline, timeout_s)

    def _settled(self) -> bool:
        """Whether the keeper has nothing to do or finish. Called under ``_lock``."""
        return not (self._owed() or self._forking or self._exiting or self._reaping)

    def _wait_locked(self, child: Child, deadline: float, timeout_s: float) -> None:
        """Wait for ``child``'s Locked frame; raise its lockdown failure, if any."""
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
            self._changed.notify_all()  # callers waiting for a fork, and wait_ready()
        if self._keeper is not threading.current_thread():
            self._keeper.join()  # it finishes a fork or reap in progress (discarding the child)
        with self._lock:
            idle, self._idle = list(self._idle), collections.deque()
        for child in idle:
            self._discard(child)
        self._reap_exited()
        self._template.close()

    def __enter__(self) -> WarmPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _has_exited(child: Child) -> bool:
    # A pidfd polls readable once its process has exited (a zombie not yet reaped counts).
    return bool(select.select([child.pidfd], [], [], 0)[0])


def _send_call(child: Child, frame: bytes) -> bool:
    """Write the call frame and close the call pipe; False if the child was dead."""
    try:
        view = memoryview(frame)
        while view:
            view = view[os.write(child.call_w, view) :]
    except BrokenPipeError:
        return False
    finally:
        os.close(child.call_w)  # before any reap: _release closes what is still >= 0
        child.call_w = -1
    return True
