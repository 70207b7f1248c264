"""
A store that can stop new jobs cleanly, for batches that are interrupted.

Stopping a batch by cancelling it would cancel submits on the wire, whose
jobs may exist (journaled ``uncertain``: a rerun could never finish them
without risking a second job). The journal's ``claim`` is the one point
between "waiting for a queue slot" and "about to be sent": closing the gate
refuses claims from then on and withdraws those still waiting, while the
submits already past it finish and journal their job ids. Only the CLI
needs this; it wraps the store it hands the client.
"""

from __future__ import annotations

import asyncio

from collections.abc import Callable

from modelslab_async._state import JobState
from modelslab_async.errors import ClientStateError
from modelslab_async.stores import JobStore, Journal


__all__ = ["Gate", "GatedStore", "NotSentError"]


class NotSentError(ClientStateError):
    """
    The batch stopped before this job was sent: nothing was sent or
    journaled for it.
    """


class Gate:
    """
    Open until :meth:`close`; then no new job passes.
    """

    def __init__(self) -> None:
        self._closed = asyncio.Event()
        #: Jobs past the gate whose submit has not returned: on the wire.
        self.sending: set[str] = set()

    @property
    def closed(self) -> bool:
        """
        Whether :meth:`close` was called.
        """
        return self._closed.is_set()

    def close(self) -> None:
        """
        Refuse new jobs, and withdraw those waiting for a queue slot.
        """
        self._closed.set()

    async def wait(self) -> None:
        """
        Return once closed.
        """
        await self._closed.wait()


class GatedStore:
    """
    *store*, with its claims behind *gate*.
    """

    def __init__(self, store: JobStore, gate: Gate) -> None:
        self.store = store
        self.gate = gate
        self._journals: list[Journal] = []

    async def open(self, account: str, *, max_queued: int | None) -> Journal:
        """
        Open the inner store's journal, gated.
        """
        journal = await self.store.open(account, max_queued=max_queued)
        self._journals.append(journal)
        return _GatedJournal(journal, self.gate)

    def settle(self, state: JobState) -> None:
        """
        Journal a job that finished in its submit's answer, and free its
        queue slot: the client's tracker leaves such a job ``submitting``
        with its slot held (a run after it would find it ``uncertain``).
        Idempotent, so harmless once the tracker does it itself.
        """
        for journal in self._journals:
            journal.settle(state)


class _GatedJournal:
    """
    Strictly private: a journal whose :meth:`claim` the gate can refuse.
    """

    def __init__(self, journal: Journal, gate: Gate) -> None:
        self._journal = journal
        self._gate = gate

    @property
    def held(self) -> int:
        return self._journal.held

    async def claim(self, state: JobState) -> JobState | None:
        if self._gate.closed:
            raise NotSentError("the batch stopped before this job was sent")
        claiming = asyncio.ensure_future(self._journal.claim(state))
        closing = asyncio.ensure_future(self._gate.wait())
        try:
            await asyncio.wait(
                {claiming, closing}, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            await asyncio.shield(self._withdraw(claiming, state))
            raise
        finally:
            closing.cancel()
        if claiming.done():
            # Won (or found journaled) before the gate closed: the submit
            # goes ahead, so its job is never left half-journaled.
            won = claiming.result()
            if won is None:
                self._gate.sending.add(state.track_id)
            return won
        await self._withdraw(claiming, state)
        raise NotSentError("the batch stopped before this job was sent")

    async def _withdraw(
        self, claiming: asyncio.Future[JobState | None], state: JobState
    ) -> None:
        """
        Take back a claim that will not be sent: cancel its wait for a
        slot, and forget it if its write happened all the same.
        """
        claiming.cancel()
        try:
            won = await claiming
        except asyncio.CancelledError:
            won = None
        except Exception:  # noqa: BLE001 (the store's failure, no claim)
            return
        if claiming.cancelled() or won is None:
            # The store's write is shielded from cancellation: it may
            # have happened. Nothing was sent, so the claim can go (the
            # journal undoes only a claim it won itself).
            await self._journal.abandon(state.track_id)

    async def record(self, state: JobState) -> JobState:
        return await self._journal.record(state)

    def settle(self, state: JobState) -> None:
        self._journal.settle(state)

    async def abandon(self, track_id: str) -> None:
        await self._journal.abandon(track_id)

    async def get(self, track_id: str) -> JobState | None:
        return await self._journal.get(track_id)

    async def find(self, webhook_id: str) -> JobState | None:
        return await self._journal.find(webhook_id)

    async def adopt(self) -> list[JobState]:
        return await self._journal.adopt()

    def listen(self, deliver: Callable[[JobState], object]) -> None:
        self._journal.listen(deliver)

    async def aclose(self) -> None:
        await self._journal.aclose()
