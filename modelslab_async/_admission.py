"""
Admission control: never have more jobs queued than the account allows.

ModelsLab counts *queued* jobs per account (5, 10 or 15 by plan) and answers
the next submit with HTTP 429. A slot is taken before a submit is sent and
given back when the job is seen to leave the queue, so ``asyncio.gather``
over any number of jobs stays under the cap without a single 429.
"""

from __future__ import annotations

import asyncio

import attrs

from .errors import ClientStateError


__all__ = ["QueueSlots", "Slot"]


@attrs.define(eq=False)
class Slot:
    """
    Strictly private: one queued job's place. Releasing twice is harmless.
    """

    _slots: QueueSlots | None

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots._give_back()  # noqa: SLF001


@attrs.define(eq=False)
class QueueSlots:
    """
    Strictly private: a semaphore whose releases may come from anywhere.

    Args:
        limit: Jobs allowed in the queue at once; ``None`` for no limit.
    """

    limit: int | None
    _semaphore: asyncio.Semaphore | None = attrs.field(init=False)
    _held: int = attrs.field(init=False, default=0)
    _waiting: int = attrs.field(init=False, default=0)
    _closed: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self._semaphore = (
            None if self.limit is None else asyncio.Semaphore(self.limit)
        )

    @property
    def held(self) -> int:
        """
        Slots held right now.
        """
        return self._held

    async def acquire(self) -> Slot | None:
        """
        Wait for a free slot; ``None`` when there is no limit to keep.
        """
        if self._semaphore is None:
            return None
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1
        if self._closed:
            self._semaphore.release()
            msg = "the client was closed while the submit waited for a slot"
            raise ClientStateError(msg)
        self._held += 1
        return Slot(self)

    def close(self) -> None:
        """
        Wake every waiter: they raise, as the client is closed.
        """
        self._closed = True
        if self._semaphore is not None:
            for _ in range(self._waiting):
                self._semaphore.release()

    def _give_back(self) -> None:
        self._held -= 1
        assert self._semaphore is not None  # noqa: S101 (only capped slots)
        self._semaphore.release()
