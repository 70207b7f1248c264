"""
Closing: everything that must stop the moment a client closes.

A closed client must leave nothing waiting: back-off sleeps, jobs sleeping
until their next fetch, and requests whose answer is still arriving. Each
of them registers here while it waits, and :meth:`Closing.close` ends them
all at once: a sleep wakes, a request's scope is cancelled, and the caller
gets :class:`~modelslab_async.errors.ClientStateError` instead of waiting
out a 30 s request timeout or a 60 s ``retry_after``. A request runs in an
``asyncio.timeout(None)`` scope registered here; closing reschedules every
such scope to now, which cancels the request the way a timeout would.
"""

from __future__ import annotations

import asyncio

from typing import Final

from .errors import ClientStateError


__all__ = ["Closing"]

_CLOSED: Final = "the client was closed"


def _wake(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)


class Closing:
    """
    Strictly private: the sleeps and calls a client's close must end.
    """

    __slots__ = ("_scopes", "_wakers", "closed")

    def __init__(self) -> None:
        self.closed = False
        self._wakers: set[asyncio.Future[None]] = set()
        self._scopes: set[asyncio.Timeout] = set()

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

    def add_scope(self, scope: asyncio.Timeout) -> None:
        """
        Expire *scope* (a scope without a deadline) when closing.
        """
        self._scopes.add(scope)

    def discard_scope(self, scope: asyncio.Timeout) -> None:
        """
        Forget *scope*; harmless if unknown.
        """
        self._scopes.discard(scope)

    def closed_it(self, scope: asyncio.Timeout) -> ClientStateError | None:
        """
        The error for a TimeoutError out of *scope*, if closing caused it.
        """
        if scope.expired() and self.closed:
            return ClientStateError(_CLOSED)
        return None

    def close(self) -> None:
        """
        Wake every sleeper and cancel every guarded call, now.
        """
        self.closed = True
        wakers, self._wakers = self._wakers, set()
        for waker in wakers:
            _wake(waker)
        scopes, self._scopes = self._scopes, set()
        now = asyncio.get_running_loop().time()
        for scope in scopes:
            scope.reschedule(now)
