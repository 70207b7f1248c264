"""
Closing: everything that must stop the moment a client closes.

A closed client must leave nothing waiting: back-off sleeps, jobs sleeping
until their next fetch, and requests whose answer is still arriving. Each
of them registers here while it waits, and :meth:`Closing.close` ends them
all at once: a sleep wakes, a request's scope is cancelled, and the caller
gets :class:`~modelslab_async.errors.ClientStateError` instead of waiting
out a 30 s request timeout or a 60 s ``retry_after``. A request's task is
registered here while the call runs; closing cancels it with a message of
its own, and the call withdraws that cancellation (``Task.uncancel``, as
``asyncio.timeout`` does) and raises instead.
"""

from __future__ import annotations

import asyncio

from typing import Any, Final

from .errors import ClientStateError


__all__ = ["Closing"]

_CLOSED: Final = "the client was closed"
#: The message of the cancellation closing sends, to tell it from others.
_BY_CLOSE: Final = "modelslab-async: the client was closed"


def _wake(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)


class Closing:
    """
    Strictly private: the sleeps and calls a client's close must end.
    """

    __slots__ = ("_calls", "_wakers", "closed")

    def __init__(self) -> None:
        self.closed = False
        self._wakers: set[asyncio.Future[None]] = set()
        # Tasks in a call (a request, its retries): closing cancels them.
        self._calls: set[asyncio.Task[Any]] = set()

    def check(self) -> None:
        """
        Raise :class:`ClientStateError` if closed.
        """
        if self.closed:
            raise ClientStateError(_CLOSED)

    def add_waker(self, waker: asyncio.Future[None]) -> None:
        """
        Resolve *waker* when closing; the owner checks :attr:`closed`.
        """
        self._wakers.add(waker)

    def discard_waker(self, waker: asyncio.Future[None]) -> None:
        """
        Forget *waker*; harmless if unknown.
        """
        self._wakers.discard(waker)

    async def sleep(self, delay: float) -> None:
        """
        Sleep *delay* seconds, unless closing comes first.

        Raises:
            ClientStateError: Closed before or during the sleep.
        """
        self.check()
        loop = asyncio.get_running_loop()
        waker = loop.create_future()
        timer = loop.call_later(delay, _wake, waker)
        self._wakers.add(waker)
        try:
            await waker
        finally:
            timer.cancel()
            self._wakers.discard(waker)
        self.check()

    def enter(self) -> asyncio.Task[Any]:
        """
        Register the running task's call, for :meth:`close` to cancel.

        Raises:
            ClientStateError: Already closed.
        """
        if self.closed:
            raise ClientStateError(_CLOSED)
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 (called from a coroutine)
        self._calls.add(task)
        return task

    def leave(self, task: asyncio.Task[Any]) -> None:
        """
        The call of *task* ended; harmless if unknown.
        """
        self._calls.discard(task)

    def closed_it(
        self, task: asyncio.Task[Any], cancelled: asyncio.CancelledError
    ) -> ClientStateError | None:
        """
        The error for *cancelled*, if closing caused it (then the task's
        cancellation is withdrawn, as ``asyncio.timeout`` does); else
        ``None``, and the cancellation is the caller's.
        """
        if cancelled.args[:1] != (_BY_CLOSE,):
            return None
        task.uncancel()
        return ClientStateError(_CLOSED)

    def close(self) -> None:
        """
        Wake every sleeper and cancel every guarded call, now.
        """
        self.closed = True
        wakers, self._wakers = self._wakers, set()
        for waker in wakers:
            _wake(waker)
        calls, self._calls = self._calls, set()
        for task in calls:
            task.cancel(_BY_CLOSE)
