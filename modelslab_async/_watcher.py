"""
The watcher: polls the jobs that hold a queue slot while nobody waits.

A slot belongs to its job until the job is seen to leave the server's
queue. When no task waits for a job that holds one (its handle was never
awaited, or the wait was cancelled or timed out), the watcher fetches it on
the job's own schedule, so the slot comes back when the job ends, not
earlier (a cancelled wait would free it while the job still counts on the
server) and not never (an unawaited handle would keep it forever).

It costs one timer while jobs are watched and a task only while one is
due; with no slot held, nothing runs. The client owns it and closing ends
it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time

from typing import Final

from ._jobs import STEP_MAX, JobHandle
from .errors import ClientStateError, ModelsLabError, NotFoundError


__all__ = ["Watcher"]

log = logging.getLogger("modelslab_async")

#: Never poll one job more often than this, whatever its schedule says.
_MIN_GAP: Final = 0.02


class Watcher:
    """
    Strictly private: one client's poller of unattended slot holders.
    """

    def __init__(self) -> None:
        # Strong references: a job holding a slot stays until it ends.
        self._watched: set[JobHandle] = set()
        self._due: list[tuple[float, int, JobHandle]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, job: JobHandle) -> None:
        """
        Poll *job* whenever it is due and nobody waits for it, until it
        ends or :meth:`forget`.
        """
        if self._closed or job.status.is_finished:
            return
        self._watched.add(job)
        self._push(job, job.next_poll_at)

    def forget(self, job: JobHandle) -> None:
        """
        Stop watching *job* (it ended); harmless if not watched.
        """
        self._watched.discard(job)

    async def aclose(self) -> None:
        """
        Stop: no more polls; wait for one in flight to end.
        """
        self._closed = True
        self._watched.clear()
        self._due.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _push(self, job: JobHandle, when: float) -> None:
        heapq.heappush(self._due, (when, next(self._order), job))
        if self._task is None and when < self._timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - time.monotonic())
        self._timer = loop.call_later(delay, self._start)
        self._timer_at = when

    def _start(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._due:
                when, _, job = self._due[0]
                if (
                    job not in self._watched
                    or job.status.is_finished
                    or job.has_waiters
                ):
                    # A waiter polls it; when the last one leaves, the job
                    # is handed back here.
                    heapq.heappop(self._due)
                    continue
                now = time.monotonic()
                if when > now:
                    self._arm(when)
                    return
                heapq.heappop(self._due)
                if job.next_poll_at > when:
                    self._push(job, job.next_poll_at)  # it was rescheduled
                    continue
                try:
                    await self._poll(job)
                except ClientStateError:
                    return
                if not job.status.is_finished:
                    again = max(job.next_poll_at, time.monotonic() + _MIN_GAP)
                    heapq.heappush(self._due, (again, next(self._order), job))
        finally:
            self._task = None

    async def _poll(self, job: JobHandle) -> None:
        try:
            await job.poll()
        except ClientStateError:
            raise
        except NotFoundError as exc:
            # The server does not know the job: it is on no queue.
            log.warning("job %s is gone: %s", job.id, str(exc))
            job.give_up(f"the server no longer knows the job: {exc}")
        except ModelsLabError as exc:
            log.warning(
                "job %s: fetch failed (%s); again in %gs",
                job.id,
                exc,
                STEP_MAX,
            )
            job.postpone(STEP_MAX)
