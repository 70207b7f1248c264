"""
The store protocol: what a :class:`~modelslab_async.Client` needs from the
place its jobs are journaled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from modelslab_async._state import JobState


__all__ = ["JobStore", "Journal"]


@runtime_checkable
class JobStore(Protocol):
    """
    Where jobs are journaled: give one to ``Client(store=...)``.

    A store is a factory of :class:`Journal` views, one per open client. It
    holds no API key: the client opens it with a hash of the key, which
    keeps the accounts of different keys apart.
    """

    async def open(self, account: str, *, max_queued: int | None) -> Journal:
        """
        Open the journal of *account* for one client.

        Args:
            account: A hash of the API key (never the key itself).
            max_queued: The account's queue cap; ``None`` for none.

        Raises:
            StoreError: The store cannot be opened.
        """
        ...


@runtime_checkable
class Journal(Protocol):
    """
    One account's jobs, as one client sees them: the journal, its queue
    slots, and news of jobs other processes settled.

    The journal is keyed by ``track_id``. A job goes ``submitting`` (claimed
    before its submit is sent), then ``queued`` (with its job id), then
    ``succeeded`` or ``failed``; or ``uncertain`` when its submit may have
    created a job. Every method but :meth:`claim` is idempotent: calling it
    twice, from one process or two, changes nothing more.
    """

    @property
    def held(self) -> int:
        """
        Queue slots held, by this client or (shared stores) the account.
        """
        ...

    async def claim(self, state: JobState) -> JobState | None:
        """
        Take a queue slot for a new job and journal it, before its submit
        is sent.

        If ``state.track_id`` is journaled already, return that state at
        once and take nothing. Otherwise wait for a free slot (when the
        account has a cap), then journal *state*: a compare-and-set on the
        ``track_id``, so that of any number of claims of one ``track_id``,
        from any number of processes, exactly one wins.

        Returns:
            ``None`` if this claim won; else the state journaled for that
            ``track_id``, and nothing was taken or written.

        Raises:
            ClientStateError: The journal was closed while waiting.
            StoreUnavailableError: A shared store stayed unreachable.
        """
        ...

    async def record(self, state: JobState) -> JobState:
        """
        Journal a later state of a job, and return what is stored.

        A finished state is never replaced: the first writer wins, and the
        stored (winning) state is returned.
        """
        ...

    def settle(self, state: JobState) -> None:
        """
        The job left the server's queue (or, ``uncertain``, may never have
        joined it): give back its slot now, and journal *state* as
        :meth:`record` does. Never waits: the write is finished in the
        background, at the latest by :meth:`aclose`. Idempotent.
        """
        ...

    async def abandon(self, track_id: str) -> None:
        """
        The server provably refused the submit, or none was sent: give
        back the slot and forget the claim, so the same ``track_id`` may be
        submitted again. Only a claim this journal won, and has journaled
        nothing of since, is undone (a claim that came back known may have
        found another process's submit under way); only a ``submitting``
        record is removed, and only its slot (or, with no record, the
        claim's) is given back: a queued or uncertain job keeps its own.
        """
        ...

    async def get(self, track_id: str) -> JobState | None:
        """
        The journaled state of *track_id*, finished or not.
        """
        ...

    async def find(self, webhook_id: str) -> JobState | None:
        """
        The journaled state whose callback URL has this registration id.
        """
        ...

    async def adopt(self) -> list[JobState]:
        """
        The unfinished jobs this client should watch from now on.

        A store for one process returns, once, every unfinished job it
        holds: the ones a crashed run left. A shared store returns the jobs
        whose watcher's lease lapsed (and hands later ones to
        :meth:`listen`'s callback). Queued jobs returned hold their queue
        slots: they are still queued on the server, until :meth:`settle`.
        """
        ...

    def listen(self, deliver: Callable[[JobState], object]) -> None:
        """
        Call *deliver* with jobs another process settled or handed over:
        an outcome recorded from a webhook that reached another process, or
        a job adopted from a process that died. Stores for one process never
        call it.
        """
        ...

    async def aclose(self) -> None:
        """
        Close this view: wake claims waiting for a slot with
        :class:`~modelslab_async.errors.ClientStateError`, finish pending
        writes, and let go of connections. Idempotent.
        """
        ...
