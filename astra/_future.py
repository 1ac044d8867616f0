"""``astra.Future``: a ``concurrent.futures.Future`` that is also awaitable in asyncio.

Being a real ``concurrent.futures.Future`` subclass, it works with
``concurrent.futures.wait``/``as_completed`` and ``asyncio.wrap_future`` unchanged.
"""

from __future__ import annotations

__all__ = ["Future"]

import asyncio
import concurrent.futures
import threading
import time
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, overload

if TYPE_CHECKING:
    from collections.abc import Generator

T = TypeVar("T")

_PENDING: Final = "PENDING"
_DONE: Final = frozenset({"FINISHED", "CANCELLED", "CANCELLED_AND_NOTIFIED"})


class _Canceller(Protocol):
    def _cancel_task(self, task_id: int) -> None: ...

    def _unpark(self) -> None: ...


class _LazyList:
    """An attribute that is an empty list made on first use: a pending future holds no
    lists, so 20,000 futures in flight are 20,000 objects for the cyclic garbage collector
    to trace, not 60,000 (its full collections were a quarter of an async-ask run)."""

    __slots__ = ("name",)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _LazyList: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> list[Any]: ...
    def __get__(self, instance: object, owner: type | None = None) -> list[Any] | _LazyList:
        if instance is None:
            return self
        made: list[Any] = []
        setattr(instance, self.name, made)  # an instance attribute hides us from now on
        instance._lists = True  # type: ignore[attr-defined]
        instance._watch()  # type: ignore[attr-defined]  # a waiter or a callback: watched
        return made


class Future(concurrent.futures.Future[T]):
    """The eventual result of a task submitted with ``submit``/``map``.

    ``result(timeout)``, ``exception(timeout)``, ``done()``, ``add_done_callback()`` behave
    as in ``concurrent.futures``; ``await future`` works in any asyncio loop. ``cancel()``
    succeeds until the result has arrived: a task that has not started is dropped by its
    worker; a running ``async def`` task is cancelled; a running plain function runs to the
    end and its result is discarded.

    A failed task's exception carries the worker-side traceback as ``__cause__``
    (``astra.errors.RemoteTraceback``).
    """

    def __init__(
        self,
        owner: _Canceller | None = None,
        task_id: int = -1,
        condition: threading.Condition | None = None,
    ) -> None:
        # The fields of concurrent.futures.Future.__init__, set here so that the futures of
        # one client can share one Condition: a Condition is seven objects for the cyclic
        # garbage collector to trace, and 10,000 futures in flight made collections the
        # largest cost of submit(). result()/exception() below re-check their own state,
        # so a wake-up meant for another future is harmless.
        self._condition = condition if condition is not None else threading.Condition()
        # _state, _result, _exception, label, worker: the class's defaults below until set;
        # _waiters and _done_callbacks: made on first use (_LazyList).
        self._owner = owner
        self.task_id = task_id

    _state = _PENDING
    _result = None
    _exception: BaseException | None = None
    label = ""  #: what ran: the function's qualified name (errors name it)
    worker = -1  #: the worker that produced the result (an agent's, for an ask); -1 until then
    _waiters = _LazyList()
    _done_callbacks = _LazyList()
    _lists = False  # True once either was made

    def result(self, timeout: float | None = None) -> T:
        """The task's result, waiting up to ``timeout`` seconds (None: forever). Raises the
        task's exception, ``concurrent.futures.CancelledError`` or ``TimeoutError``."""
        if self._state == "FINISHED" and self._exception is None:
            # Set before the state, under the condition: no lock needed to read it now.
            return self._result  # type: ignore[return-value]
        self._wait(timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's exception, or None if it succeeded; waits like ``result``."""
        self._wait(timeout)
        return super().exception(0)

    def _wait(self, timeout: float | None) -> None:
        if self._state in _DONE:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        lead = getattr(self._owner, "_lead", None)
        if lead is not None:
            lead(self, deadline)  # take the reply ourselves while spinning catches it
            if self._state in _DONE:
                return
        t0 = time.monotonic()
        with self._condition:
            while self._state not in _DONE:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return  # super() raises TimeoutError
                self._condition.wait(left)
        note = getattr(self._owner, "_note_blocked", None)
        if note is not None:
            note(time.monotonic() - t0)

    @staticmethod
    def _set_results(
        condition: threading.Condition, results: list[tuple[Future[object], object]]
    ) -> None:
        """Complete many futures sharing ``condition`` at once: one lock round and one
        wake-up per batch instead of per future (the receiver thread's hot path). Does what
        ``set_result`` does, skipping futures already cancelled."""
        watched = []  # the futures with waiters or callbacks (most have neither)
        with condition:
            for future, value in results:
                if future._state != _PENDING:
                    continue  # cancelled meanwhile: the result is dropped
                future._result = value  # type: ignore[assignment]
                future._state = "FINISHED"
                if future._lists:
                    for waiter in future._waiters:
                        waiter.add_result(future)
                    watched.append(future)
            condition.notify_all()
        for future in watched:
            if future._done_callbacks:
                future._invoke_callbacks()  # type: ignore[attr-defined]

    def _watch(self) -> None:
        """Someone watches this future other than through ``result()`` (which takes the
        answer itself, ``Client._lead``): the client's receiver thread must not stay
        parked (astra/_client.py)."""
        owner = self._owner
        if owner is not None and self._state == _PENDING:
            owner._unpark()

    def done(self) -> bool:
        """Whether the future finished (result, exception or cancelled)."""
        if self._state == _PENDING:
            self._watch()  # polled: the answer must come in without result()
            return False
        return super().done()

    def cancel(self) -> bool:
        """Cancel the task; False if it already finished. Never blocks."""
        cancelled = super().cancel()
        if cancelled and self._owner is not None:
            owner, self._owner = self._owner, None
            owner._cancel_task(self.task_id)
        return cancelled

    def __await__(self) -> Generator[object, None, T]:
        self._watch()
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        return f"<astra.Future task={self.task_id} {self._state.lower()}>"
