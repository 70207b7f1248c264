"""
Admission control in one process: never more jobs queued than the cap.

ModelsLab counts *queued* jobs per account (5, 10 or 15 by plan) and answers
the next submit with HTTP 429. A slot belongs to a job: it is taken, under
the job's ``track_id``, before the submit is sent, and given back when the
job is seen to leave the server's queue, by whoever sees it.

The waiters are a queue of our own rather than ``asyncio.Semaphore``'s:
cancelling a waiter and closing are O(1) per waiter (the semaphore removes a
cancelled waiter from a deque by search, and wakes each at close with its
own release), so 50,000 submits waiting on a closing client cost one pass.
"""

from __future__ import annotations

import asyncio
import collections
import itertools

from collections.abc import Iterator
from typing import Final

from .errors import ClientStateError


__all__ = ["LocalSlots"]

#: Waiters woken per loop turn when closing: enough to finish 50,000 in a
#: few hundred milliseconds, few enough that the loop never stalls long.
_WAKE_BATCH: Final = 256
_CLOSED: Final = "the client was closed while the submit waited for a slot"


class LocalSlots:
    """
    Strictly private: a process's queue slots, each held by one job.

    Args:
        limit: Jobs allowed in the queue at once; ``None`` for no limit.
    """

    __slots__ = (
        "_closed",
        "_granted",
        "_held",
        "_waiters",
        "_waiting",
        "limit",
    )

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._held: set[str] = set()
        # Futures of waiting acquires, oldest first; a cancelled one stays
        # until it reaches the front (lazy deletion keeps cancels O(1)).
        self._waiters: collections.deque[asyncio.Future[None]] = (
            collections.deque()
        )
        self._waiting = 0
        # Slots handed to a waiter that has not resumed yet.
        self._granted = 0
        self._closed = False

    @property
    def held(self) -> int:
        """
        Slots held by jobs right now.
        """
        return len(self._held)

    def holds(self, track_id: str) -> bool:
        """
        Whether the job *track_id* holds a slot.
        """
        return track_id in self._held

    def try_acquire(self, track_id: str) -> bool:
        """
        Give the job *track_id* a slot if one is free now, without waiting.
        """
        if self._closed:
            raise ClientStateError(_CLOSED)
        if self.limit is None or track_id in self._held:
            return True
        if not self._waiting and len(self._held) + self._granted < self.limit:
            self._held.add(track_id)
            return True
        return False

    async def acquire(self, track_id: str) -> bool:
        """
        Wait for a free slot and give it to the job *track_id*.

        Waiters are served first come, first served.

        Returns:
            Whether this call took the slot *track_id* holds: ``False``
            when it held one already, or came to hold one while this
            call waited (another claim of it was served first). The slot
            this call was given then goes to the next waiter, so two
            claims of one job never count as one slot that either could
            give back.

        Raises:
            ClientStateError: The slots were closed while waiting.
        """
        if self.limit is not None and track_id in self._held:
            return False
        if self.try_acquire(track_id):
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._waiting += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Granted, then cancelled before resuming: pass it on.
                self._granted -= 1
                self._grant()
            raise
        finally:
            self._waiting -= 1
        self._granted -= 1
        if self._closed:
            raise ClientStateError(_CLOSED)
        if track_id in self._held:
            self._grant()
            return False
        self._held.add(track_id)
        return True

    def hold(self, track_id: str) -> None:
        """
        Count a job that is already queued (a resumed one), even past the
        limit: it is on the server's queue whether we like it or not.
        """
        if self.limit is not None:
            self._held.add(track_id)

    def release(self, track_id: str) -> None:
        """
        Give back the slot of *track_id*; harmless if it holds none.
        """
        if track_id in self._held:
            self._held.discard(track_id)
            self._grant()

    def _grant(self) -> None:
        assert self.limit is not None  # noqa: S101 (only capped slots wait)
        while len(self._held) + self._granted < self.limit and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._granted += 1
                waiter.set_result(None)

    async def close(self) -> None:
        """
        Make every waiting acquire raise :class:`ClientStateError`.

        Waiters are woken a batch per loop turn, so closing under tens of
        thousands of them never stalls the event loop.
        """
        self._closed = True
        waiters, self._waiters = self._waiters, collections.deque()
        while waiters:
            for waiter in itertools.islice(_drain(waiters), _WAKE_BATCH):
                if not waiter.done():
                    # One error each: a shared one would collect every
                    # waiter's traceback.
                    waiter.set_exception(ClientStateError(_CLOSED))
            await asyncio.sleep(0)


def _drain(
    waiters: collections.deque[asyncio.Future[None]],
) -> Iterator[asyncio.Future[None]]:
    while waiters:
        yield waiters.popleft()
