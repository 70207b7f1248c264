"""
The emulator's memory: jobs, queues per key, the request log, and counts.

Memory stays bounded however long the emulator runs: the request log is a
ring, and jobs older than their time to live are dropped, as the real
service deletes outputs after 24 hours. The counters that tests check (jobs
created, answers per route and status, jobs per ``track_id``) are exact and
kept for the emulator's whole life.
"""

from __future__ import annotations

import heapq
import itertools
import uuid

from collections import Counter, defaultdict, deque
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
        route: ``submit``, ``fetch``, ``download``, ``manage``, ``webhook``
            (a webhook the emulator sent), or ``other`` (an unknown path or
            method).
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


#: (route, HTTP status, fault) of one answer, the key of exact counts.
CountKey = tuple[str, int, str | None]


@attrs.define
class Store:
    """
    Jobs by id, each key's queue as a heap of finish times, the request
    ring, and the exact counters.
    """

    jobs: dict[int, EmulatedJob] = attrs.Factory(dict)
    records: deque[Record] = attrs.Factory(lambda: deque(maxlen=10_000))
    max_queued: Counter[str] = attrs.Factory(Counter)
    counts: Counter[CountKey] = attrs.Factory(Counter)
    #: Jobs created per ``track_id``: more than one is a double charge.
    tracks: Counter[str] = attrs.Factory(Counter)
    #: Webhook deliveries: ``sent``, ``failed``, ``dropped``, ``duplicated``.
    webhooks: Counter[str] = attrs.Factory(Counter)
    jobs_created: int = 0
    fetches: int = 0
    _queues: defaultdict[str, list[tuple[float, int]]] = attrs.Factory(
        lambda: defaultdict(list)
    )
    _ids: itertools.count[int] = attrs.Factory(
        lambda: itertools.count(134_700_000)
    )
    _by_prefix: dict[str, EmulatedJob] = attrs.Factory(dict)
    # Creation order, oldest first, for dropping expired jobs cheaply.
    _order: deque[tuple[float, int]] = attrs.Factory(deque)

    def log(self, record: Record, limit: int | None) -> None:
        """
        Keep *record* in the ring of the last *limit* records (``None``:
        all of them), and count it for good.
        """
        if self.records.maxlen != limit:
            self.records = deque(self.records, maxlen=limit)
        self.records.append(record)
        self.counts[record.route, record.status, record.fault] += 1

    def queued(self, key: str, now: float) -> int:
        """
        Jobs of *key* still processing at *now*.
        """
        queue = self._queues.get(key)
        if queue is None:
            return 0
        while queue:
            ready_at, job_id = queue[0]
            job = self.jobs.get(job_id)
            if ready_at > now and job is not None and not job.cancelled:
                break
            heapq.heappop(queue)
        if not queue:
            # Fuzzing makes many keys; an empty queue costs nothing.
            del self._queues[key]
        return len(queue)

    def queued_by_key(self, now: float) -> dict[str, int]:
        """
        Jobs still processing at *now*, per key that has any.
        """
        counts = {key: self.queued(key, now) for key in list(self._queues)}
        return {key: count for key, count in counts.items() if count}

    def queue_time(self, key: str, now: float) -> float:
        """
        Seconds of work *key* has queued at *now*, added up.
        """
        self.queued(key, now)
        return sum(
            ready_at - now
            for ready_at, job_id in self._queues.get(key, ())
            if job_id in self.jobs and not self.jobs[job_id].cancelled
        )

    def cancel(self, key: str, now: float) -> None:
        """
        Cancel every job *key* has processing at *now*.
        """
        self.queued(key, now)
        for _, job_id in self._queues.get(key, ()):
            job = self.jobs.get(job_id)
            if job is not None:
                job.cancelled = True
        self.queued(key, now)

    def add(self, *, ttl: float, **fields: Any) -> EmulatedJob:
        """
        Create a job, count it in its key's queue, and drop the jobs that
        outlived *ttl* seconds.
        """
        job = EmulatedJob(id=next(self._ids), **fields)
        self.expire(job.created - ttl)
        self.jobs[job.id] = job
        self._by_prefix[job.prefix] = job
        self._order.append((job.created, job.id))
        heapq.heappush(self._queues[job.key], (job.ready_at, job.id))
        self.jobs_created += 1
        if job.track_id is not None:
            self.tracks[job.track_id] += 1
        self.max_queued[job.key] = max(
            self.max_queued[job.key], self.queued(job.key, job.created)
        )
        return job

    def expire(self, before: float) -> None:
        """
        Forget the jobs created before *before*.
        """
        while self._order and self._order[0][0] < before:
            _, job_id = self._order.popleft()
            job = self.jobs.pop(job_id, None)
            if job is not None:
                self._by_prefix.pop(job.prefix, None)

    def duplicates(self) -> dict[str, int]:
        """
        The ``track_id`` values that made more than one job, with how many.
        """
        return {track: n for track, n in self.tracks.items() if n > 1}

    def rate_limited(self) -> int:
        """
        429 answers given, for a full queue or an injected fault.
        """
        return sum(
            n for (_, status, _), n in self.counts.items() if status == 429
        )

    def stats(self, now: float) -> dict[str, Any]:
        """
        The exact counters, as JSON.
        """
        by_status: dict[str, dict[str, int]] = {}
        faults: dict[str, dict[str, int]] = {}
        for (route, status, fault), count in self.counts.items():
            statuses = by_status.setdefault(route, {})
            statuses[str(status)] = statuses.get(str(status), 0) + count
            if fault is not None:
                kinds = faults.setdefault(route, {})
                kinds[fault] = kinds.get(fault, 0) + count
        queued = self.queued_by_key(now)
        return {
            "jobs_created": self.jobs_created,
            "jobs_kept": len(self.jobs),
            "duplicates": self.duplicates(),
            "max_queued": {
                "overall": max(self.max_queued.values(), default=0),
                "by_key": dict(self.max_queued),
            },
            "queued": {"overall": sum(queued.values()), "by_key": queued},
            "rate_limited": self.rate_limited(),
            "fetches": self.fetches,
            "counts": by_status,
            "faults": faults,
            "webhooks": dict(self.webhooks),
            "records_kept": len(self.records),
        }

    def by_file(self, name: str) -> tuple[EmulatedJob, int] | None:
        """
        The job and output index a file name belongs to.
        """
        stem = name.rsplit(".", 1)[0]
        prefix, _, index = stem.rpartition("-")
        job = self._by_prefix.get(prefix)
        if (
            job is None
            or not (index.isascii() and index.isdigit())
            or int(index) >= job.samples
        ):
            return None
        return job, int(index)
