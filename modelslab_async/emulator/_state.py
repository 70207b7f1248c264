"""
The emulator's memory: jobs, queues per key, and a log of every request.
"""

from __future__ import annotations

import heapq
import itertools
import uuid

from collections import Counter, defaultdict
from typing import Any, Literal

import attrs


__all__ = ["EmulatedJob", "Record", "Store"]

Outcome = Literal["success", "failed"]


@attrs.define(kw_only=True)
class EmulatedJob:
    """
    One job as the emulator sees it.
    """

    id: int
    key: str
    endpoint: str
    prompt: str
    width: int
    height: int
    samples: int
    seed: int
    base64: bool
    webhook: str | None
    track_id: str | None
    created: float
    eta: float
    ready_at: float
    outcome: Outcome
    body: dict[str, Any]
    prefix: str = attrs.Factory(lambda: str(uuid.uuid4()))
    fetches: int = 0
    cancelled: bool = False

    def status(self, now: float) -> str:
        """
        ``processing`` until the job's time is up, then its outcome.
        """
        if self.cancelled:
            return "failed"
        if now < self.ready_at:
            return "processing"
        return self.outcome

    def files(self) -> list[str]:
        """
        The output file names, ``.base64`` in base64 mode.
        """
        suffix = ".base64" if self.base64 else ".png"
        return [f"{self.prefix}-{i}{suffix}" for i in range(self.samples)]


@attrs.frozen(kw_only=True)
class Record:
    """
    One request the emulator received.

    Attributes:
        time: The emulator's clock when it arrived.
        route: ``submit``, ``fetch``, ``download``, ``manage`` or ``webhook``
            (a webhook the emulator sent).
        endpoint: ``v6``, ``flux-klein``, or ``""``.
        path: The URL path.
        job_id: The job, when known.
        body: The decoded JSON body (key included, it is a fake server).
        headers: The request headers.
        status: The HTTP status answered, or ``0`` for a dropped connection.
        fault: The fault injected, if any.
    """

    time: float
    route: str
    endpoint: str
    path: str
    job_id: str | None
    body: Any
    headers: dict[str, str]
    status: int
    fault: str | None = None


@attrs.define
class Store:
    """
    Jobs by id, and the queue of each key as a heap of finish times.
    """

    jobs: dict[int, EmulatedJob] = attrs.Factory(dict)
    records: list[Record] = attrs.Factory(list)
    max_queued: Counter[str] = attrs.Factory(Counter)
    _queues: defaultdict[str, list[tuple[float, int]]] = attrs.Factory(
        lambda: defaultdict(list)
    )
    _ids: itertools.count[int] = attrs.Factory(
        lambda: itertools.count(134_700_000)
    )
    _by_prefix: dict[str, EmulatedJob] = attrs.Factory(dict)

    def queued(self, key: str, now: float) -> int:
        """
        Jobs of *key* still processing at *now*.
        """
        queue = self._queues[key]
        while queue and (
            queue[0][0] <= now or self.jobs[queue[0][1]].cancelled
        ):
            heapq.heappop(queue)
        return len(queue)

    def add(self, **fields: Any) -> EmulatedJob:
        """
        Create a job and count it in its key's queue.
        """
        job = EmulatedJob(id=next(self._ids), **fields)
        self.jobs[job.id] = job
        self._by_prefix[job.prefix] = job
        heapq.heappush(self._queues[job.key], (job.ready_at, job.id))
        self.max_queued[job.key] = max(
            self.max_queued[job.key], self.queued(job.key, job.created)
        )
        return job

    def by_file(self, name: str) -> tuple[EmulatedJob, int] | None:
        """
        The job and output index a file name belongs to.
        """
        stem = name.rsplit(".", 1)[0]
        prefix, _, index = stem.rpartition("-")
        job = self._by_prefix.get(prefix)
        if job is None or not index.isdigit() or int(index) >= job.samples:
            return None
        return job, int(index)
