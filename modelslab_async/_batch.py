"""
Many jobs at once: results as they come, one failure never sinks the rest.
"""

from __future__ import annotations

import asyncio
import time

from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)

import attrs

from ._jobs import JobHandle, JobResult
from ._requests import JobRequest
from ._validation import integer
from .errors import ModelsLabError


__all__ = ["BatchItem", "BatchProgress", "generate_many"]


@attrs.frozen(kw_only=True)
class BatchItem:
    """
    One request's outcome in a batch: a result or the error in its place.

    Attributes:
        index: The request's position in the input.
        request: The request.
        result: Its result, or ``None`` if it failed.
        error: Why it failed, or ``None``.
        seconds: From submit (queue slot included) to outcome.
    """

    index: int
    request: JobRequest
    result: JobResult | None = None
    error: ModelsLabError | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """
        Whether the job succeeded.
        """
        return self.error is None

    def unwrap(self) -> JobResult:
        """
        The result, or raise the error.
        """
        if self.error is not None:
            raise self.error
        assert self.result is not None  # noqa: S101 (one of them is set)
        return self.result


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
    result = error = None
    queued = False
    try:
        job = await submit(request)
        queued = True
        tally.update(submitted=1, queued=1)
        result = await job.wait(timeout)
    except ModelsLabError as exc:
        error = exc
    finally:
        if queued:
            tally.update(queued=-1)
    tally.update(**({"failed": 1} if error else {"done": 1}))
    return BatchItem(
        index=index,
        request=request,
        result=result,
        error=error,
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
