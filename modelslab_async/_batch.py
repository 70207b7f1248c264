"""
Many jobs at once: results as they come, one failure never sinks the rest.
"""

from __future__ import annotations

import asyncio
import time

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING

import attrs

from ._jobs import JobResult
from ._requests import Text2ImgRequest
from .errors import ModelsLabError


if TYPE_CHECKING:
    from ._client import Client


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
    request: Text2ImgRequest
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


async def generate_many(
    client: Client,
    requests: Iterable[Text2ImgRequest],
    *,
    timeout: float | None = None,
    ordered: bool = False,
    concurrency: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> AsyncIterator[BatchItem]:
    """
    Strictly private: the engine of :meth:`Client.generate_many`.
    """
    pending = list(requests)
    tally = _Tally(BatchProgress(total=len(pending)), on_progress)
    if not pending:
        return
    workers = min(len(pending), concurrency or 2 * (client.max_queued or 16))
    feed = iter(enumerate(pending))
    outcomes: asyncio.Queue[BatchItem] = asyncio.Queue()

    async def worker() -> None:
        for index, request in feed:
            await outcomes.put(
                await _run(client, tally, index, request, timeout)
            )

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    arrivals = (await _next(outcomes, tasks) for _ in pending)
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
    client: Client,
    tally: _Tally,
    index: int,
    request: Text2ImgRequest,
    timeout: float | None,
) -> BatchItem:
    """
    One request to its outcome, counted as it goes.
    """
    started = time.monotonic()
    result = error = None
    queued = False

    def sent() -> None:
        nonlocal queued
        queued = True
        tally.update(submitted=1, queued=1)

    try:
        result = await client._generate(request, timeout, sent)  # noqa: SLF001
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
    outcomes: asyncio.Queue[BatchItem], tasks: list[asyncio.Task[None]]
) -> BatchItem:
    """
    The next outcome; if a worker died of a bug instead, raise that.
    """
    getter = asyncio.ensure_future(outcomes.get())
    try:
        while True:
            broken = [t for t in tasks if t.done() and t.exception()]
            if broken:
                raise broken[0].exception()  # type: ignore[misc]
            alive = [t for t in tasks if not t.done()]
            done, _ = await asyncio.wait(
                [getter, *alive], return_when=asyncio.FIRST_COMPLETED
            )
            if getter in done:
                return getter.result()
    finally:
        getter.cancel()
