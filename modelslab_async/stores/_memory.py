"""
The default store: the journal in this process's memory.
"""

from __future__ import annotations

import collections
import time

from collections.abc import Callable
from typing import Final

import attrs

from modelslab_async._admission import LocalSlots
from modelslab_async._state import JobPhase, JobState

from ._protocol import Journal


__all__ = ["DEFAULT_RETENTION", "MemoryStore"]

#: How long finished jobs stay readable: their outputs' life on ModelsLab.
DEFAULT_RETENTION: Final = 24 * 3600.0


@attrs.define(eq=False)
class _Jobs:
    """
    Strictly private: one account's journal.

    Every state in one dict; the finished ones' ids also in the order they
    finished, so pruning takes the oldest from the front in O(1) each.
    """

    retention: float
    max_finished: int
    states: dict[str, JobState] = attrs.Factory(dict)
    done: collections.OrderedDict[str, None] = attrs.Factory(
        collections.OrderedDict
    )
    by_webhook: dict[str, str] = attrs.Factory(dict)
    # The open journal watching each unfinished job.
    watchers: dict[str, _MemoryJournal] = attrs.Factory(dict)
    _finishes: int = 0

    def put(self, state: JobState) -> None:
        track_id = state.track_id
        self.states[track_id] = state
        if state.webhook_id is not None:
            self.by_webhook[state.webhook_id] = track_id
        if state.phase in _FINISHED:
            self.watchers.pop(track_id, None)
            self.done[track_id] = None
            self._finishes += 1
            if len(self.done) > self.max_finished or (
                self._finishes % _AGE_CHECK == 0
            ):
                self.prune()

    def prune(self) -> None:
        """
        Drop the oldest finished jobs past ``max_finished``, and those past
        retention.
        """
        oldest = time.time() - self.retention
        while self.done:
            first = self.states[next(iter(self.done))]
            if len(self.done) <= self.max_finished and (
                first.updated_at >= oldest
            ):
                break
            self.forget(first.track_id)

    def forget(self, track_id: str) -> None:
        state = self.states.pop(track_id, None)
        self.done.pop(track_id, None)
        if state is not None and state.webhook_id is not None:
            self.by_webhook.pop(state.webhook_id, None)
        self.watchers.pop(track_id, None)


#: Finished jobs between two checks for ones past retention.
_AGE_CHECK: Final = 256
_FINISHED: Final = frozenset({JobPhase.SUCCEEDED, JobPhase.FAILED})


class MemoryStore:
    """
    Jobs journaled in memory: the default.

    Idempotency keys and :meth:`Client.unfinished
    <modelslab_async.Client.unfinished>` work for the life of the process;
    nothing survives it. Use :class:`~modelslab_async.stores.SQLiteStore`
    for jobs that outlive the process. A client opened on a ``MemoryStore``
    after another one closed adopts the jobs that one left unfinished.

    Args:
        retention: Seconds a job stays readable after its last change (24
            hours, the life of its outputs).
        max_finished: Finished jobs kept at most, oldest dropped first, so
            a long-running process stays small.
    """

    def __init__(
        self,
        *,
        retention: float = DEFAULT_RETENTION,
        max_finished: int = 10_000,
    ) -> None:
        self.retention = retention
        self.max_finished = max_finished
        self._accounts: dict[str, _Jobs] = {}

    def __repr__(self) -> str:
        return f"<MemoryStore accounts={len(self._accounts)}>"

    async def open(self, account: str, *, max_queued: int | None) -> Journal:
        """
        Open the journal of *account*; see :class:`JobStore
        <modelslab_async.stores.JobStore>`.
        """
        jobs = self._accounts.get(account)
        if jobs is None:
            jobs = self._accounts[account] = _Jobs(
                self.retention, self.max_finished
            )
        return _MemoryJournal(jobs, LocalSlots(max_queued))


class _MemoryJournal:
    """
    Strictly private: one client's view of a :class:`MemoryStore` account.
    """

    def __init__(self, jobs: _Jobs, slots: LocalSlots) -> None:
        self._jobs = jobs
        self._slots = slots
        self.closed = False
        # Claims this journal won and has not journaled anything of since:
        # the only ones abandon() undoes.
        self._claimed: set[str] = set()

    @property
    def held(self) -> int:
        return self._slots.held

    async def claim(self, state: JobState) -> JobState | None:
        track_id = state.track_id
        states = self._jobs.states
        known = states.get(track_id)
        if known is not None:
            return known
        if self._slots.try_acquire(track_id):
            self._won(state)
            return None
        took = await self._slots.acquire(track_id)
        known = states.get(track_id)
        if known is not None:
            # Another claim of it won while this one waited: the slot this
            # one took, if any (the winner's is not its to give), goes back.
            if took:
                self._slots.release(track_id)
            return known
        self._won(state)
        return None

    def _won(self, state: JobState) -> None:
        self._claimed.add(state.track_id)
        self._jobs.put(state)
        self._jobs.watchers[state.track_id] = self

    async def record(self, state: JobState) -> JobState:
        self._claimed.discard(state.track_id)
        known = self._jobs.states.get(state.track_id)
        if known is not None and known.phase in _FINISHED:
            return known
        self._jobs.put(state)
        return state

    def settle(self, state: JobState) -> None:
        self._claimed.discard(state.track_id)
        self._slots.release(state.track_id)
        known = self._jobs.states.get(state.track_id)
        if known is None or known.phase not in _FINISHED:
            self._jobs.put(state)

    async def abandon(self, track_id: str) -> None:
        if track_id not in self._claimed:
            # Not this journal's claim: another's submitting record may be
            # a job that exists.
            return
        self._claimed.discard(track_id)
        known = self._jobs.states.get(track_id)
        if known is None or known.phase is JobPhase.SUBMITTING:
            self._slots.release(track_id)
            if known is not None:
                self._jobs.forget(track_id)
        # A queued or uncertain job keeps its slot: it is not a claim to
        # undo, whoever asks (a cancelled claim that found it).

    async def get(self, track_id: str) -> JobState | None:
        return self._jobs.states.get(track_id)

    async def find(self, webhook_id: str) -> JobState | None:
        track_id = self._jobs.by_webhook.get(webhook_id)
        return None if track_id is None else self._jobs.states.get(track_id)

    async def adopt(self) -> list[JobState]:
        adopted = []
        stale = time.time() - self._jobs.retention
        for state in list(self._jobs.states.values()):
            if state.phase in _FINISHED:
                continue
            track_id = state.track_id
            if state.updated_at < stale:
                self._jobs.forget(track_id)  # its outputs are gone too
                continue
            watcher = self._jobs.watchers.get(track_id)
            if watcher is None or watcher.closed:
                self._jobs.watchers[track_id] = self
                # Queued, or (uncertain, submitting) perhaps queued: each
                # holds a slot until the tracker settles it.
                self._slots.hold(track_id)
                adopted.append(state)
        return adopted

    def listen(self, deliver: Callable[[JobState], object]) -> None:
        pass  # One process: nobody else settles our jobs.

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            await self._slots.close()
