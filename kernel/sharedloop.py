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

Invariants: the loop's callbacks run one at a time, whichever thread runs them (``lock``),
so the loop's single-writer rule holds; the borrowing thread runs only callbacks that were
ready when it looked, and wakes the loop thread for anything it left behind (new ready
callbacks, an earlier timer, a new reader), so nothing waits for an unrelated event. If the
loop thread is busy (a callback is running), ``borrow`` fails at once and the caller hands
the work over as before.

This reaches into two private attributes of CPython's ``BaseEventLoop`` (``_ready``,
``_scheduled``) and uses ``asyncio._set_running_loop``, all stable from 3.8 to 3.13; a loop
without them is never borrowed (``borrowable`` is False) and everything goes through
``call_soon_threadsafe``.
"""

from __future__ import annotations

__all__ = ["BORROW_BUDGET_S", "SharedLoop"]

import asyncio
import contextlib
import selectors
import threading
import time
from typing import TYPE_CHECKING, Final, Protocol, cast

if TYPE_CHECKING:
    import collections
    from collections.abc import Iterator


#: How long the borrowing thread may run ready callbacks before leaving the rest to the loop
#: thread (the main thread has tasks and the ring to attend to).
BORROW_BUDGET_S: Final = 0.002


class _Internals(Protocol):
    """What ``borrow`` and ``run_ready`` use of CPython's ``BaseEventLoop``."""

    _ready: collections.deque[asyncio.Handle]
    _scheduled: list[asyncio.TimerHandle]


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
            return super().select(timeout)
        finally:
            self._borrow_lock.acquire()


class SharedLoop:
    """An event loop running on thread ``astra-loop``, borrowable between its iterations."""

    def __init__(self, name: str = "astra-loop") -> None:
        self.lock = threading.Lock()
        self.loop = asyncio.SelectorEventLoop(_Selector(self.lock))
        self.borrowable = hasattr(self.loop, "_ready") and hasattr(self.loop, "_scheduled")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.lock:
            self.loop.run_forever()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[bool]:
        """Yield True with the loop held by this thread (run loop code, then ``run_ready``),
        or False at once if the loop thread is running callbacks (hand the work over)."""
        if not self.borrowable or not self.lock.acquire(blocking=False):
            yield False
            return
        loop = cast("_Internals", self.loop)
        scheduled = loop._scheduled
        first = scheduled[0] if scheduled else None
        asyncio._set_running_loop(self.loop)
        try:
            yield True
        finally:
            asyncio._set_running_loop(None)
            wake = bool(loop._ready) or (scheduled[0] if scheduled else None) is not first
            self.lock.release()
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
