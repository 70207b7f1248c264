"""
Jobs: a handle per job, and how we wait for it.

Waiting runs in the caller's task: it sleeps until the server's ``eta``,
then polls with capped, jittered backoff, and wakes early when a webhook
settles the job. Cancelling the caller stops its wait at once and leaves
nothing behind. A job that holds a queue slot with nobody waiting for it
(never awaited, or its wait was cancelled) is polled by its client's
watcher instead, so its slot comes back when, and only when, the job
leaves the server's queue.

A handle is live machinery around a record: :attr:`JobHandle.state` is the
job as data (:class:`~modelslab_async.JobState`), and a handle rebuilt from
that record alone waits exactly as the original would have.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time

from collections.abc import Generator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import attrs

from ._closing import Closing
from ._learning import EtaLearner
from ._outputs import Output, os_reason
from ._requests import JobRequest
from ._responses import JobResponse, JobStatus
from ._routes import Endpoint
from ._state import JobPhase, JobState, response_of
from .errors import (
    ClientStateError,
    GenerationFailedError,
    JobTimeoutError,
    OutputError,
    SubmitUncertainError,
)


if TYPE_CHECKING:
    import os


__all__ = ["JobHandle", "JobHost", "JobResult", "WebhookLink"]

log = logging.getLogger("modelslab_async")

#: Assumed time to completion when the server gives no ``eta``.
DEFAULT_ETA: Final = 1.0
#: The longest ``eta`` believed: a wilder one (1e9) would put the first
#: fetch past any deadline, and a finished job would time out.
ETA_MAX: Final = 120.0
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
#: How often a job another process is submitting is looked up in the
#: journal, at first; it doubles up to STEP_MAX.
JOURNAL_STEP: Final = 0.05

_NO_META: Final[Mapping[str, Any]] = MappingProxyType({})
_PHASES: Final = {
    JobStatus.PROCESSING: JobPhase.QUEUED,
    JobStatus.SUCCESS: JobPhase.SUCCEEDED,
    JobStatus.ERROR: JobPhase.FAILED,
    JobStatus.FAILED: JobPhase.FAILED,
}


class JobHost(Protocol):
    """
    Strictly private: what a job needs from the client that tracks it.
    """

    @property
    def job_timeout(self) -> float: ...

    @property
    def closing(self) -> Closing: ...

    async def fetch(
        self, fetch_path: str, job_id: str, *, deadline: float | None
    ) -> JobResponse: ...

    async def lookup(self, track_id: str) -> JobState | None: ...

    async def download(
        self, url: str, *, missing_until: float | None
    ) -> bytes: ...

    def finished(self, job: JobHandle) -> None: ...

    def unattended(self, job: JobHandle) -> None: ...

    @property
    def learner(self) -> EtaLearner: ...


@attrs.frozen
class WebhookLink:
    """
    Strictly private: a job's callback registration, as the job sees it.

    Attributes:
        webhook_id: The registration id in the callback URL.
        token_hash: SHA-256 of the URL's token.
        grace: Seconds past the eta to wait for the webhook before polling.
        verify: Whether a webhook's claim is checked with a fetch.
    """

    webhook_id: str
    token_hash: str
    grace: float = 0.0
    verify: bool = False


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
        response: The server's final answer (rebuilt from the journal for
            a job that finished in an earlier run).
        request: The request, when this library submitted it.
    """

    id: str | None
    endpoint: Endpoint
    outputs: tuple[Output, ...]
    track_id: str | None
    generation_time: float | None
    meta: Mapping[str, Any]
    response: JobResponse = attrs.field(repr=False)
    request: JobRequest | None = attrs.field(repr=False)

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


def _wall(monotonic: float) -> float:
    return time.time() + (monotonic - time.monotonic())


class JobHandle:
    """
    A job on the server, and the way to wait for it.

    Made by :meth:`Client.submit <modelslab_async.Client.submit>`,
    :meth:`Client.fetch <modelslab_async.Client.fetch>` and
    :meth:`Client.unfinished <modelslab_async.Client.unfinished>`, not
    constructed directly; ``await job`` is ``await job.wait()``.
    """

    __slots__ = (
        "__weakref__",
        "_announced",
        "_created_at",
        "_deadline",
        "_fetch_path",
        "_future_links",
        "_grace",
        "_host",
        "_late_polls",
        "_lock",
        "_next_at",
        "_ready_at",
        "_reported",
        "_response",
        "_running_until",
        "_started",
        "_step",
        "_submitting",
        "_uncertain",
        "_waiters",
        "_wakers",
        "_webhook_hint",
        "endpoint",
        "request",
        "track_id",
        "webhook",
    )

    def __init__(
        self,
        host: JobHost,
        response: JobResponse,
        *,
        endpoint: Endpoint,
        fetch_path: str,
        track_id: str | None = None,
        request: JobRequest | None = None,
        webhook: WebhookLink | None = None,
        created_at: float | None = None,
        uncertain: SubmitUncertainError | None = None,
        submitting: bool = False,
        fresh: bool = False,
    ) -> None:
        self._host = host
        self.endpoint: Endpoint = endpoint
        self.request = request
        self.track_id = track_id or response.track_id
        self.webhook = webhook
        self._fetch_path = fetch_path
        self._response = response
        self._future_links = response.future_links
        self._uncertain = uncertain
        # Submitted by another process right now: follow the journal until
        # the job has an id.
        self._submitting = submitting
        self._webhook_hint: JobResponse | None = None
        self._deadline: float | None = None
        self._created_at = time.time() if created_at is None else created_at
        # One future per sleeping waiter, woken by settle, webhook, close.
        self._wakers: list[asyncio.Future[None]] = []
        self._waiters = 0
        self._reported = False
        self._lock = asyncio.Lock()
        now = time.monotonic()
        eta = DEFAULT_ETA if response.eta is None else response.eta
        # A job just submitted learns from, and is scheduled by, how its
        # endpoint's etas have turned out (see _learning).
        self._announced = response.eta if fresh else None
        self._started = now
        self._running_until = 0.0
        first = eta
        if fresh:
            first = eta * host.learner.scale(endpoint)
        eta = min(eta, ETA_MAX)
        first = min(first, ETA_MAX)
        if submitting:
            eta = first = JOURNAL_STEP
        self._ready_at = now + first
        self._step = max(STEP_MIN, STEP_SHARE * eta)
        self._late_polls = 0
        self._grace = 0.0 if webhook is None else webhook.grace
        self._next_at = self._ready_at + self._grace
        if response.status.is_finished:
            self._finish()

    def __repr__(self) -> str:
        return (
            f"<JobHandle id={self.id} track_id={self.track_id} "
            f"endpoint={self.endpoint} phase={self.phase.value}>"
        )

    # --- what the job is -------------------------------------------------

    @property
    def id(self) -> str | None:
        """
        The job id; ``None`` while its submit is uncertain.
        """
        return self._response.id

    @property
    def status(self) -> JobStatus:
        """
        The last status seen.
        """
        return self._response.status

    @property
    def phase(self) -> JobPhase:
        """
        Where the job is, as the journal records it.
        """
        if not self._response.status.is_finished:
            if self._uncertain is not None:
                return JobPhase.UNCERTAIN
            if self._submitting:
                return JobPhase.SUBMITTING
        return _PHASES[self.status]

    @property
    def eta(self) -> float | None:
        """
        Seconds until the server expects the job done; ``None`` once done.
        """
        if self._response.status.is_finished:
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
        if self._response.status is not JobStatus.SUCCESS:
            return ()
        return tuple(
            Output(
                link,
                index,
                self.id,
                downloader=self._host,
                deadline=self._deadline,
            )
            for index, link in enumerate(self._links())
        )

    def _links(self) -> tuple[str, ...]:
        return (
            self._response.output
            or self._future_links
            or self._response.proxy_links
        )

    @property
    def state(self) -> JobState:
        """
        The job as a record: what a store keeps, enough to resume it.
        """
        response = self._response
        finished = response.status.is_finished
        webhook = self.webhook
        return JobState(
            track_id=self.track_id or "",
            endpoint=self.endpoint,
            phase=self.phase,
            request=self.request,
            job_id=response.id,
            eta_at=None if finished else _wall(self._ready_at),
            outputs=self._links(),
            message=(
                response.message
                if finished
                else None
                if self._uncertain is None
                else self._uncertain.message
            ),
            generation_time=response.generation_time,
            meta=response.meta if finished else _NO_META,
            webhook_id=None if webhook is None else webhook.webhook_id,
            token_hash=None if webhook is None else webhook.token_hash,
            created_at=self._created_at,
            updated_at=time.time(),
        )

    @property
    def has_waiters(self) -> bool:
        """
        Whether some task is waiting for the job right now.
        """
        return self._waiters > 0

    @property
    def next_poll_at(self) -> float:
        """
        When (``time.monotonic()``) the job is next due a fetch.
        """
        return self._next_at

    # --- waiting ---------------------------------------------------------

    async def refresh(self) -> JobStatus:
        """
        Ask the fetch endpoint about the job once, and return its status.

        Raises:
            APIError: The fetch failed.
            TransportError: No answer, after retries.
            SubmitUncertainError: The job has no id to fetch it by: its
                submit is uncertain.
        """
        await self._refresh(self._deadline)
        return self.status

    async def _refresh(self, deadline: float | None) -> None:
        async with self._lock:
            if self._response.status.is_finished:
                return
            job_id = self.id
            if job_id is not None:
                self._record(
                    await self._host.fetch(
                        self._fetch_path, job_id, deadline=deadline
                    )
                )
            elif self._submitting and self.track_id is not None:
                self._follow(await self._host.lookup(self.track_id))
            else:
                raise self._uncertainty()

    def _follow(self, state: JobState | None) -> None:
        """
        Take in the journal's record of a job another process submits.
        """
        now = time.monotonic()
        if state is None:
            self.give_up("its submit was refused in another process")
        elif state.phase is JobPhase.SUBMITTING:
            self._step = min(self._step * 2, STEP_MAX)
            self._next_at = now + self._step
        else:
            self._submitting = False
            if state.phase is JobPhase.UNCERTAIN:
                self._uncertain = SubmitUncertainError(
                    state.message or "its submit may or may not have made it",
                    track_id=self.track_id,
                    request=self.request,
                )
                return
            response = response_of(state)
            eta = DEFAULT_ETA if response.eta is None else response.eta
            self._ready_at = now + min(eta, ETA_MAX)
            self._step = max(STEP_MIN, STEP_SHARE * eta)
            self._next_at = self._ready_at + self._grace
            self._record(response)

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
            SubmitUncertainError: The job's submit may or may not have made
                it, and no webhook settled it within *timeout*.
            ClientStateError: The client was closed while waiting.
        """
        if self._uncertain is not None and (
            self.webhook is None and not self._response.status.is_finished
        ):
            # No id to fetch and no webhook to wait for: nothing can tell.
            raise self._uncertain
        if not self._done_waiting():
            if timeout is None:
                timeout = self._host.job_timeout
            deadline = time.monotonic() + timeout
            if self._deadline is None or deadline > self._deadline:
                self._deadline = deadline
            self._waiters += 1
            try:
                await self._poll_until(deadline)
            finally:
                self._waiters -= 1
                if not self._waiters and not self._response.status.is_finished:
                    self._host.unattended(self)
        if self._host.closing.closed and not self._response.status.is_finished:
            raise ClientStateError(
                "the client was closed while the job was waiting"
            )
        if not self._response.status.is_finished:
            if self._uncertain is not None:
                raise self._uncertainty()
            raise JobTimeoutError(
                f"job {self.id} still {self.status.value} after {timeout:g}s",
                job=self,
                timeout=timeout,
            )
        return self._result()

    def __await__(self) -> Generator[Any, None, JobResult]:
        return self.wait().__await__()

    async def poll(self) -> None:
        """
        Fetch the job once, for a watcher: nobody waits for it, so no
        waiter's deadline bounds the fetch's retries.
        """
        self._webhook_hint = None
        await self._refresh(None)

    async def _poll_until(self, deadline: float) -> None:
        """
        Sleep and fetch by the schedule until settled or *deadline*.

        A sleeping waiter costs one future and one timer, woken early by
        a settle, a webhook or the client closing; a deadline scope exists
        only around a fetch. So 10,000 pending jobs stay cheap.
        """
        loop = asyncio.get_running_loop()
        closing = self._host.closing
        while not self._done_waiting():
            now = time.monotonic()
            if now >= deadline:
                return
            # Without an id there is nothing to fetch: only a webhook can
            # settle the job, so sleep to the deadline unless woken.
            polls = self.id is not None or self._submitting
            if self._webhook_hint is None and (
                not polls or self._next_at > now
            ):
                wake_at = min(self._next_at, deadline) if polls else deadline
                waker = loop.create_future()
                timer = (
                    None
                    if wake_at == math.inf
                    else loop.call_later(wake_at - now, _wake, waker)
                )
                self._wakers.append(waker)
                closing.add_waker(waker)
                try:
                    await waker
                finally:
                    if timer is not None:
                        timer.cancel()
                    self._wakers.remove(waker)
                    closing.discard_waker(waker)
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
        return self._response.status.is_finished or self._host.closing.closed

    def _uncertainty(self) -> SubmitUncertainError:
        if self._uncertain is not None:
            return self._uncertain
        return SubmitUncertainError(
            "the job has no id: its submit may or may not have made it",
            track_id=self.track_id,
            request=self.request,
        )

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

    # --- news about the job ----------------------------------------------

    def _record(self, response: JobResponse) -> None:
        """
        Take in a fetch answer.
        """
        if self._response.status.is_finished:
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
        now = time.monotonic()
        if response.status.is_finished:
            self._finish()
            return
        self._running_until = now - self._started
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

    def take_webhook(self, response: JobResponse) -> bool:
        """
        Take in a webhook's payload; return whether it was for this job.
        """
        if (
            response.id is not None
            and self.id is not None
            and (response.id != self.id)
        ):
            return False
        if (
            self._response.status.is_finished
            or not response.status.is_finished
        ):
            return True
        if self.webhook is not None and self.webhook.verify and self.id:
            # Unsigned sender: let the waiter confirm with a fetch.
            self._webhook_hint = response
            self._wake_all()
            return True
        if response.id is None and self.id is not None:
            response = attrs.evolve(response, id=self.id)
        self._response = response
        self._finish()
        return True

    def settle(self, state: JobState) -> None:
        """
        Take in an outcome another process recorded in the journal.
        """
        if self._response.status.is_finished or not state.phase.is_finished:
            return
        self._response = response_of(state)
        self._finish()

    def give_up(self, message: str) -> None:
        """
        End a job the server no longer knows: it is on no queue.
        """
        if not self._response.status.is_finished:
            self._response = attrs.evolve(
                self._response, status=JobStatus.ERROR, message=message
            )
            self._finish()

    def postpone(self, seconds: float) -> None:
        """
        Fetch no sooner than *seconds* from now (after a failed fetch).
        """
        self._next_at = max(self._next_at, time.monotonic() + seconds)

    def _finish(self) -> None:
        self._wake_all()
        if not self._reported:
            self._reported = True
            if self._announced is not None:
                self._host.learner.observe(
                    self.endpoint,
                    eta=self._announced,
                    took=self._response.generation_time,
                    running_until=self._running_until,
                    done_by=time.monotonic() - self._started,
                )
            self._host.finished(self)
