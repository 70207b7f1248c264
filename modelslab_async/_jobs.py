"""
Jobs: a handle per submitted job, and how we wait for it.

Waiting runs entirely in the caller's task: it sleeps until the server's
``eta``, then polls with capped, jittered backoff, and wakes early when a
webhook settles the job. Nothing runs in the background, so cancelling the
caller stops everything at once and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import weakref

from collections.abc import Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import attrs

from ._outputs import Output, os_reason
from ._requests import Endpoint, Text2ImgRequest
from ._responses import JobResponse, JobStatus
from .errors import (
    ClientStateError,
    GenerationFailedError,
    JobTimeoutError,
    OutputError,
)


if TYPE_CHECKING:
    import os

    from ._admission import Slot


__all__ = ["JobHandle", "JobResult"]

log = logging.getLogger("modelslab_async")

#: Assumed time to completion when the server gives no ``eta``.
DEFAULT_ETA: Final = 1.0
#: After the eta, the first gap between fetches is this share of the eta...
STEP_SHARE: Final = 0.1
#: ... never shorter than this, and after EVEN_STEPS gaps doubling to the cap.
STEP_MIN: Final = 0.02
STEP_MAX: Final = 10.0
#: Gaps stay even this many times after the eta before they double: an
#: eta is an estimate, often off by up to 30%; beyond that, back off.
EVEN_STEPS: Final = 3
#: Gaps are stretched by up to this share, so many jobs don't poll in step.
JITTER: Final = 0.1


class _Owner(Protocol):
    """
    What a job needs from its client.
    """

    job_timeout: float
    _sleepers: set[asyncio.Future[None]]

    @property
    def is_closed(self) -> bool: ...

    async def _fetch_response(self, job: JobHandle) -> JobResponse: ...

    async def download(
        self, url: str, *, missing_until: float | None
    ) -> bytes: ...


class WebhookLink(Protocol):
    """
    Strictly private: what a job needs from its webhook registration.
    """

    @property
    def grace(self) -> float: ...

    @property
    def verify(self) -> bool: ...

    def close(self) -> None: ...


@attrs.frozen(kw_only=True)
class JobResult:
    """
    A finished, successful job.

    Attributes:
        id: The job id.
        endpoint: ``"v6"`` or ``"flux-klein"``.
        outputs: The images, ready to :meth:`~Output.read` or
            :meth:`~Output.save`.
        track_id: The ``track_id`` the job was sent with.
        generation_time: Seconds the server spent, when it says.
        meta: The parameters the server used.
        response: The server's final answer, whole.
        request: The request, when this process submitted it.
    """

    id: str | None
    endpoint: Endpoint
    outputs: tuple[Output, ...]
    track_id: str | None
    generation_time: float | None
    meta: Mapping[str, Any]
    response: JobResponse = attrs.field(repr=False)
    request: Text2ImgRequest | None = attrs.field(repr=False)

    async def save_all(
        self,
        directory: str | os.PathLike[str] = ".",
        *,
        timeout: float | None = None,
    ) -> list[Path]:
        """
        Save every output into *directory*, concurrently.

        Returns:
            The paths written, in output order.

        Raises:
            OutputError: The folder cannot be created (the message names
                it and the reason), or an output could not be saved; the
                others were still saved.
        """
        target = Path(directory)
        try:
            await anyio.Path(target).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"cannot create folder {target}: {os_reason(exc)}"
            ) from exc
        # Not a task group: its ExceptionGroup would hide the OutputError.
        saved = await asyncio.gather(
            *(output.save(target, timeout=timeout) for output in self.outputs),
            return_exceptions=True,
        )
        for outcome in saved:
            if isinstance(outcome, BaseException):
                raise outcome
        return [path for path in saved if isinstance(path, Path)]


def _wake(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)


def _release(slot: Slot | None, webhook: WebhookLink | None) -> None:
    if slot is not None:
        slot.release()
    if webhook is not None:
        webhook.close()


class JobHandle:
    """
    A job on the server, and the way to wait for it.

    Made by :meth:`Client.submit <modelslab_async.Client.submit>` and
    :meth:`Client.fetch <modelslab_async.Client.fetch>`, not constructed
    directly; ``await job`` is ``await job.wait()``.
    """

    __slots__ = (
        "__weakref__",
        "_deadline",
        "_finalizer",
        "_future_links",
        "_grace",
        "_late_polls",
        "_lock",
        "_next_at",
        "_owner",
        "_ready_at",
        "_response",
        "_step",
        "_wakers",
        "_webhook",
        "_webhook_hint",
        "endpoint",
        "request",
        "track_id",
    )

    def __init__(
        self,
        owner: _Owner,
        response: JobResponse,
        *,
        endpoint: Endpoint,
        request: Text2ImgRequest | None = None,
        track_id: str | None = None,
        slot: Slot | None = None,
        webhook: WebhookLink | None = None,
    ) -> None:
        self._owner = owner
        self.endpoint: Endpoint = endpoint
        self.request = request
        self.track_id = track_id or response.track_id
        self._response = response
        self._future_links = response.future_links
        self._webhook = webhook
        self._webhook_hint: JobResponse | None = None
        self._deadline: float | None = None
        # One future per sleeping waiter, woken by settle, webhook, close.
        self._wakers: list[asyncio.Future[None]] = []
        self._lock = asyncio.Lock()
        now = time.monotonic()
        eta = DEFAULT_ETA if response.eta is None else response.eta
        self._ready_at = now + eta
        self._step = max(STEP_MIN, STEP_SHARE * eta)
        self._late_polls = 0
        self._grace = 0.0 if webhook is None else webhook.grace
        self._next_at = self._ready_at + self._grace
        # A handle dropped unawaited must still give back its queue slot.
        self._finalizer = (
            None
            if slot is None and webhook is None
            else weakref.finalize(self, _release, slot, webhook)
        )
        if response.status.is_finished:
            self._finish()

    def __repr__(self) -> str:
        return (
            f"<JobHandle id={self.id} endpoint={self.endpoint} "
            f"status={self.status.value}>"
        )

    @property
    def id(self) -> str | None:
        """
        The job id; ``None`` only if the server never gave one.
        """
        return self._response.id

    @property
    def status(self) -> JobStatus:
        """
        The last status seen.
        """
        return self._response.status

    @property
    def eta(self) -> float | None:
        """
        Seconds until the server expects the job done; ``None`` once done.
        """
        if self.status.is_finished:
            return None
        return max(0.0, self._ready_at - time.monotonic())

    @property
    def response(self) -> JobResponse:
        """
        The last answer about the job, from a submit, fetch or webhook.
        """
        return self._response

    @property
    def outputs(self) -> tuple[Output, ...]:
        """
        The job's images; empty until it succeeded.
        """
        if self.status is not JobStatus.SUCCESS:
            return ()
        links = (
            self._response.output
            or self._future_links
            or self._response.proxy_links
        )
        return tuple(
            Output(
                link,
                index,
                self.id,
                downloader=self._owner,
                deadline=self._deadline,
            )
            for index, link in enumerate(links)
        )

    async def refresh(self) -> JobStatus:
        """
        Ask the fetch endpoint about the job once, and return its status.

        Raises:
            APIError: The fetch failed.
            TransportError: No answer, after retries.
        """
        async with self._lock:
            if not self.status.is_finished:
                self._record(await self._owner._fetch_response(self))  # noqa: SLF001
        return self.status

    async def wait(self, timeout: float | None = None) -> JobResult:
        """
        Wait for the job to finish and return its result.

        Sleeps until the server's ``eta`` (plus a grace period when a
        webhook may come first), then polls with backoff. Cancelling the
        calling task stops at once.

        Args:
            timeout: Seconds for the whole wait; the client's
                ``job_timeout`` when ``None``, ``math.inf`` to wait as long
                as it takes.

        Raises:
            JobTimeoutError: *timeout* passed first; the job may finish
                later, ``fetch`` it by id.
            GenerationFailedError: The server reports the job failed.
            ClientStateError: The client was closed while waiting.
        """
        if not self._done_waiting():
            if timeout is None:
                timeout = self._owner.job_timeout
            deadline = time.monotonic() + timeout
            if self._deadline is None or deadline > self._deadline:
                self._deadline = deadline
            await self._poll_until(deadline)
        if self._owner.is_closed and not self.status.is_finished:
            raise ClientStateError(
                "the client was closed while the job was waiting"
            )
        if not self.status.is_finished:
            raise JobTimeoutError(
                f"job {self.id} still {self.status.value} after {timeout:g}s",
                job=self,
                timeout=timeout,
            )
        return self._result()

    def __await__(self) -> Generator[Any, None, JobResult]:
        return self.wait().__await__()

    async def _poll_until(self, deadline: float) -> None:
        """
        Sleep and fetch by the schedule until settled or *deadline*.

        A sleeping waiter costs one future and one timer, woken early by
        a settle, a webhook or the client closing; a deadline scope exists
        only around a fetch. So 10,000 pending jobs stay cheap.
        """
        loop = asyncio.get_running_loop()
        while not self._done_waiting():
            now = time.monotonic()
            if now >= deadline:
                return
            if self._webhook_hint is None and self._next_at > now:
                waker = loop.create_future()
                timer = loop.call_later(
                    min(self._next_at, deadline) - now, _wake, waker
                )
                self._wakers.append(waker)
                self._owner._sleepers.add(waker)  # noqa: SLF001
                try:
                    await waker
                finally:
                    timer.cancel()
                    self._wakers.remove(waker)
                    self._owner._sleepers.discard(waker)  # noqa: SLF001
                continue
            if self._webhook_hint is not None:
                log.debug("job %s: webhook to verify", self.id)
                self._webhook_hint = None
            if not await self._refresh_by(deadline):
                return

    async def _refresh_by(self, deadline: float) -> bool:
        """
        Refresh, giving up at *deadline*; return whether it finished.
        """
        remaining = deadline - time.monotonic()
        if remaining == math.inf:
            await self.refresh()
            return True
        try:
            async with asyncio.timeout(remaining) as scope:
                await self.refresh()
        except TimeoutError:
            if scope.expired():
                return False
            raise
        return True

    def _wake_all(self) -> None:
        for waker in self._wakers:
            _wake(waker)

    def _done_waiting(self) -> bool:
        return self.status.is_finished or self._owner.is_closed

    def _result(self) -> JobResult:
        response = self._response
        if response.status is not JobStatus.SUCCESS:
            raise GenerationFailedError(
                f"job {self.id} {response.status.value}: "
                f"{response.message or 'no message'}",
                job=self,
            )
        return JobResult(
            id=self.id,
            endpoint=self.endpoint,
            outputs=self.outputs,
            track_id=self.track_id,
            generation_time=response.generation_time,
            meta=response.meta,
            response=response,
            request=self.request,
        )

    def _record(self, response: JobResponse) -> None:
        """
        Take in a fetch answer.
        """
        if self.status.is_finished:
            return
        if response.id is None and self.id is not None:
            # The thin fetch-processing shape carries no id.
            response = attrs.evolve(response, id=self.id)
        if response.future_links:
            self._future_links = response.future_links
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "job %s is %s (eta %s)",
                response.id,
                response.status.value,
                response.eta,
            )
        self._response = response
        if response.status.is_finished:
            self._finish()
            return
        now = time.monotonic()
        if response.eta is not None:
            self._ready_at = now + min(response.eta, STEP_MAX)
        if now < self._ready_at:
            # Fetched early (a webhook to verify, a re-estimate): the plan
            # resumes at the eta.
            self._next_at = self._ready_at + self._grace
            return
        jitter = 1 + random.random() * JITTER  # noqa: S311
        self._next_at = now + min(STEP_MAX, self._step * jitter)
        self._late_polls += 1
        if self._late_polls >= EVEN_STEPS:
            self._step *= 2

    def _on_webhook(self, response: JobResponse) -> bool:
        """
        Take in a webhook's payload; return whether it was for this job.
        """
        if (
            response.id is not None
            and self.id is not None
            and (response.id != self.id)
        ):
            return False
        if self.status.is_finished or not response.status.is_finished:
            return True
        if self._webhook is not None and self._webhook.verify:
            # Unsigned sender: let the waiter confirm with a fetch.
            self._webhook_hint = response
            self._wake_all()
            return True
        if response.id is None and self.id is not None:
            response = attrs.evolve(response, id=self.id)
        self._response = response
        self._finish()
        return True

    def _finish(self) -> None:
        self._wake_all()
        self._let_go()

    def _let_go(self) -> None:
        """
        Give back the queue slot and the webhook URL now (once).
        """
        if self._finalizer is not None:
            self._finalizer()
