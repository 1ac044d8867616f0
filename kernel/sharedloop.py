"""An asyncio event loop on its own thread that the worker's main thread may borrow.

A worker's agents live on an asyncio loop (``kernel/actors.py``), on a thread of their own so
that ``async def`` handlers can await I/O while the main thread runs tasks. An ask used to
cross that thread boundary twice: the main thread read the frame from the ring and handed it
over with ``call_soon_threadsafe``, which wakes the loop thread (a self-pipe write, then a
thread wake-up on the same pinned core: tens of microseconds here, most of an ask's cost).

A ``SharedLoop`` lets the thread that read the frame run it instead, when the loop is idle:

    loop thread                                   main thread (ring reader)
    -----------                                   -------------------------
    holds ``lock`` while it runs callbacks        frame arrives
    releases it only inside ``select()`` ------>  borrow(): lock acquired without waiting
    (blocked in epoll, lock free)                 dispatch + one pass over the ready queue,
                                                  the running loop set for this thread
    wakes from select, waits for the lock <-----  release; wake the loop thread only if the
    runs whatever is left                         ready queue or the earliest timer changed

Invariants:

- The loop's callbacks run one at a time, whichever thread runs them (``lock``), so the
  loop's single-writer rule holds, and in ready-queue order: a borrower queues its work
  behind what is ready (``call_soon``) and runs the queue, so work handed over earlier by
  another thread is never overtaken.
- The borrower runs ready callbacks for at most ``budget_s`` (checked after each) and wakes
  the loop thread for anything left behind (ready callbacks, an earlier timer), so nothing
  waits for an unrelated event. Readers it registers are seen by a running ``epoll_wait``;
  events the loop thread collected for a registration the borrower replaced meanwhile are
  dropped (``_Selector``).
- While borrowed, the thread has the loop as its running loop and the loop's async-generator
  hooks, so coroutines and async generators behave as on the loop thread.
- If the loop thread is busy (a callback is running), ``borrow`` fails at once and the
  caller hands the work over. It also fails in asyncio debug mode (which checks the thread
  of every ``call_soon``) and for ``BORROW_BACKOFF_S`` after a borrow that a slow handler
  held past ``SLOW_BORROW_S``: the borrowing thread is the worker's ring reader, and a
  handler that blocks should block the loop thread, not the tasks, cancels and steals.

This reaches into private attributes of CPython's ``BaseEventLoop`` (``_ready``,
``_scheduled``, the async-generator hooks) and uses ``asyncio._set_running_loop``, all
stable from 3.8 to 3.13; a loop without them is never borrowed (``borrowable`` is False)
and everything goes through ``call_soon_threadsafe``.
"""

from __future__ import annotations

__all__ = ["BORROW_BACKOFF_S", "BORROW_BUDGET_S", "SLOW_BORROW_S", "SharedLoop"]

import asyncio
import contextlib
import selectors
import sys
import threading
import time
from typing import TYPE_CHECKING, Final, Protocol, cast

if TYPE_CHECKING:
    import collections
    from collections.abc import Iterator


#: How long the borrowing thread may run ready callbacks before leaving the rest to the loop
#: thread (the main thread has tasks and the ring to attend to).
BORROW_BUDGET_S: Final = 0.002


#: A borrow held longer than this (a slow handler) suspends borrowing for BORROW_BACKOFF_S.
SLOW_BORROW_S: Final = 0.02
BORROW_BACKOFF_S: Final = 1.0


class _Internals(Protocol):
    """What ``borrow`` and ``run_ready`` use of CPython's ``BaseEventLoop``."""

    _ready: collections.deque[asyncio.Handle]
    _scheduled: list[asyncio.TimerHandle]

    def _asyncgen_firstiter_hook(self, agen: object) -> None: ...
    def _asyncgen_finalizer_hook(self, agen: object) -> None: ...


class _Selector(selectors.DefaultSelector):
    """The loop's selector: frees the borrow lock while it blocks, and only then."""

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        self._borrow_lock = lock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:  # type: ignore[explicit-any]
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        self._borrow_lock.release()
        try:
            events = super().select(timeout)
        finally:
            self._borrow_lock.acquire()
        # A borrower may have replaced a registration meanwhile (a cancelled sock_recv and a
        # new one on the same fd): an event of the old key would act on the new one. Keep
        # only current keys; level-triggered epoll reports a dropped readiness again.
        current = self.get_map()
        return [(key, ev) for key, ev in events if current.get(key.fd) is key]


class SharedLoop:
    """An event loop running on thread ``astra-loop``, borrowable between its iterations."""

    def __init__(self, name: str = "astra-loop") -> None:
        self.lock = threading.Lock()
        self.loop = asyncio.SelectorEventLoop(_Selector(self.lock))
        self.borrowable = hasattr(self.loop, "_ready") and hasattr(self.loop, "_scheduled")
        self._suspended_until = 0.0  # after a slow borrow: hand work over until then
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.lock:
            self.loop.run_forever()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[bool]:
        """Yield True with the loop held by this thread (run loop code, then ``run_ready``),
        or False at once if the loop thread is running callbacks (hand the work over)."""
        if (
            not self.borrowable
            or self.loop.get_debug()  # debug mode checks that call_soon runs on its thread
            or (self._suspended_until and time.monotonic() < self._suspended_until)
            or not self.lock.acquire(blocking=False)
        ):
            yield False
            return
        loop = cast("_Internals", self.loop)
        scheduled = loop._scheduled
        first = scheduled[0] if scheduled else None
        asyncio._set_running_loop(self.loop)
        # Async generators started here are finalized by the loop (aclose), as on its thread.
        hooks = sys.get_asyncgen_hooks()
        sys.set_asyncgen_hooks(
            firstiter=loop._asyncgen_firstiter_hook, finalizer=loop._asyncgen_finalizer_hook
        )
        t0 = time.monotonic()
        try:
            yield True
        finally:
            sys.set_asyncgen_hooks(*hooks)
            asyncio._set_running_loop(None)
            wake = bool(loop._ready) or (scheduled[0] if scheduled else None) is not first
            self.lock.release()
            held_s = time.monotonic() - t0
            if held_s > SLOW_BORROW_S:
                # A handler ran long on the borrowing thread (the worker's ring reader, which
                # tasks, cancels and steals also wait for): let the loop thread have the work
                # for a while; one slow agent then costs the reader at most this once.
                self._suspended_until = time.monotonic() + BORROW_BACKOFF_S
            if wake:
                self.wake()

    def run_ready(self, budget_s: float = BORROW_BUDGET_S) -> None:
        """Run ready callbacks as loop iterations would, inside ``borrow``: pass after pass
        (what a pass adds runs in the next), until none is ready or ``budget_s`` is spent;
        the loop thread gets the rest."""
        ready = cast("_Internals", self.loop)._ready
        deadline = time.monotonic() + budget_s
        while ready:
            for _ in range(len(ready)):
                handle = ready.popleft()
                if not handle.cancelled():
                    handle._run()
                if time.monotonic() >= deadline:
                    return

    def wake(self) -> None:
        """Make the loop thread leave ``select`` and look again (timers, ready queue)."""
        with contextlib.suppress(RuntimeError):  # closed
            self.loop.call_soon_threadsafe(_nothing)

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the loop and join its thread (the loop is not closed: the process exits)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=timeout)


def _nothing() -> None:
    pass
