"""
Many jobs at once: results as they come, one failure never sinks the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from typing import Any, ClassVar, Final, Literal, NoReturn, TypeAlias

import attrs

from ._jobs import JobHandle, JobResult
from ._requests import JobRequest
from ._validation import integer
from .errors import ModelsLabError


__all__ = [
    "BATCH_PREFIX",
    "BatchFailure",
    "BatchItem",
    "BatchProgress",
    "BatchSuccess",
    "batch_track_id",
    "generate_many",
    "with_batch_track_ids",
]


@attrs.frozen(kw_only=True)
class BatchSuccess:
    """
    One request of a batch that succeeded.

    Attributes:
        index: The request's position in the input.
        request: The request as sent (with its ``track_id`` when the batch
            derived one).
        result: Its result.
        seconds: From the start of its turn (queue slot included) to its
            outcome.
        ok: Always ``True``: type checkers narrow :data:`BatchItem` on it.
        error: Always ``None``.
    """

    index: int
    request: JobRequest
    result: JobResult
    seconds: float = 0.0
    ok: ClassVar[Literal[True]] = True
    error: ClassVar[None] = None

    def unwrap(self) -> JobResult:
        """
        The result.
        """
        return self.result


@attrs.frozen(kw_only=True)
class BatchFailure:
    """
    One request of a batch that failed: the error in place of a result.

    Attributes:
        index: The request's position in the input.
        request: The request as sent (with its ``track_id`` when the batch
            derived one).
        error: Why it failed.
        seconds: From the start of its turn (queue slot included) to its
            outcome.
        ok: Always ``False``: type checkers narrow :data:`BatchItem` on it.
        result: Always ``None``.
    """

    index: int
    request: JobRequest
    error: ModelsLabError
    seconds: float = 0.0
    ok: ClassVar[Literal[False]] = False
    result: ClassVar[None] = None

    def unwrap(self) -> NoReturn:
        """
        Raise the error.
        """
        raise self.error


#: One request's outcome in a batch: a :class:`BatchSuccess` or a
#: :class:`BatchFailure`. ``if item.ok:`` (or ``item.error is None``)
#: narrows it, so ``item.result`` is a :class:`JobResult` there.
BatchItem: TypeAlias = BatchSuccess | BatchFailure


def batch_track_id(batch_id: str, index: int, request: JobRequest) -> str:
    """
    The ``track_id`` a batch derives for request number *index*.

    A hash of *batch_id*, *index*, the request's class and every field set
    on it but ``track_id`` and ``webhook`` (where results go is not what
    is asked for): the same batch, run again, maps each request to the
    same ``track_id``, and so to the job already journaled for it.
    """
    # Requests are attrs classes; JobRequest, their base, is not one.
    instance: Any = request
    fields = {
        name: value
        for name, value in attrs.asdict(instance, recurse=False).items()
        if name not in _NOT_CONTENT and value is not None
    }
    content = json.dumps(
        [batch_id, index, type(request).__name__, fields],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=_plain,
    )
    digest = hashlib.sha256(content.encode("utf-8", "surrogatepass"))
    return f"{BATCH_PREFIX}{digest.hexdigest()[:32]}"


#: How derived ``track_id`` values begin (generated ones: ``mla-``).
BATCH_PREFIX: Final = "mlb-"
_NOT_CONTENT: Final = frozenset({"track_id", "webhook"})


def with_batch_track_ids(
    batch_id: str, requests: Iterable[JobRequest]
) -> list[JobRequest]:
    """
    *requests*, each without a ``track_id`` given the one
    :func:`batch_track_id` derives for it.
    """
    keyed = []
    for index, request in enumerate(requests):
        if request.track_id is not None:
            keyed.append(request)
            continue
        instance: Any = request  # an attrs class, as above
        track_id = batch_track_id(batch_id, index, request)
        keyed.append(attrs.evolve(instance, track_id=track_id))
    return keyed


def _plain(value: object) -> object:
    """
    JSON for field values json does not know: mappings and the like.
    """
    if isinstance(value, Mapping):
        return dict(value)
    return str(value)


@attrs.frozen(kw_only=True)
class BatchProgress:
    """
    Counts of a running batch, for progress bars and bots.

    Attributes:
        total: Requests in the batch.
        submitted: Jobs the server accepted so far.
        queued: Accepted jobs not finished yet.
        done: Jobs that succeeded.
        failed: Requests that ended in an error.
    """

    total: int
    submitted: int = 0
    queued: int = 0
    done: int = 0
    failed: int = 0

    @property
    def finished(self) -> int:
        """
        Requests with an outcome, good or bad.
        """
        return self.done + self.failed


ProgressCallback = Callable[[BatchProgress], object]


@attrs.define
class _Tally:
    progress: BatchProgress
    callback: ProgressCallback | None

    def update(self, **changes: int) -> None:
        fields = attrs.asdict(self.progress)
        for name, change in changes.items():
            fields[name] += change
        self.progress = BatchProgress(**fields)
        if self.callback is not None:
            self.callback(self.progress)


#: How a batch sends one request: ``Client.submit``.
Submit = Callable[[JobRequest], Awaitable[JobHandle]]


async def generate_many(
    submit: Submit,
    requests: Iterable[JobRequest],
    *,
    timeout: float | None,
    ordered: bool,
    concurrency: int,
    on_progress: ProgressCallback | None,
    batch_id: str | None = None,
) -> AsyncIterator[BatchItem]:
    """
    Strictly private: the engine of :meth:`Client.generate_many`.

    Workers take requests from one iterator and put outcomes on one queue;
    a worker that dies of a bug puts its exception there instead. So each
    outcome costs the same whatever the concurrency. (Not a task group: an
    async generator must not yield inside one.)
    """
    integer(1)("concurrency", concurrency)
    pending = list(requests)
    if batch_id is not None:
        pending = with_batch_track_ids(batch_id, pending)
    tally = _Tally(BatchProgress(total=len(pending)), on_progress)
    if not pending:
        return
    feed = iter(enumerate(pending))
    outcomes: asyncio.Queue[BatchItem | BaseException] = asyncio.Queue()

    async def worker() -> None:
        for index, request in feed:
            outcomes.put_nowait(
                await _run(submit, tally, index, request, timeout)
            )

    def died(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            outcomes.put_nowait(task.exception())  # type: ignore[arg-type]

    tasks = []
    for _ in range(min(len(pending), concurrency)):
        task = asyncio.create_task(worker())
        task.add_done_callback(died)
        tasks.append(task)
    arrivals = (await _next(outcomes) for _ in pending)
    items = _in_order(arrivals) if ordered else arrivals
    try:
        async for item in items:
            yield item
    finally:
        # Close our own generators now, not whenever they are collected.
        await items.aclose()
        await arrivals.aclose()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _run(
    submit: Submit,
    tally: _Tally,
    index: int,
    request: JobRequest,
    timeout: float | None,
) -> BatchItem:
    """
    One request to its outcome, counted as it goes.
    """
    started = time.monotonic()
    queued = False
    try:
        job = await submit(request)
        queued = True
        tally.update(submitted=1, queued=1)
        result = await job.wait(timeout)
    except ModelsLabError as error:
        if queued:
            tally.update(queued=-1)
        tally.update(failed=1)
        return BatchFailure(
            index=index,
            request=request,
            error=error,
            seconds=time.monotonic() - started,
        )
    except BaseException:
        if queued:
            tally.update(queued=-1)
        raise
    tally.update(queued=-1)
    tally.update(done=1)
    return BatchSuccess(
        index=index,
        request=request,
        result=result,
        seconds=time.monotonic() - started,
    )


async def _in_order(
    arrivals: AsyncIterator[BatchItem],
) -> AsyncGenerator[BatchItem]:
    """
    Items in index order, holding back those that arrive early.
    """
    held: dict[int, BatchItem] = {}
    following = 0
    async for item in arrivals:
        held[item.index] = item
        while following in held:
            yield held.pop(following)
            following += 1


async def _next(
    outcomes: asyncio.Queue[BatchItem | BaseException],
) -> BatchItem:
    """
    The next outcome; if a worker died of a bug instead, raise that.
    """
    outcome = await outcomes.get()
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
