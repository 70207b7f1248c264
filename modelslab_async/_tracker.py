"""
The tracker: every job one client knows, and what keeps them honest.

Strictly private. It journals each job before its submit is sent and its
id before :meth:`Client.submit <modelslab_async.Client.submit>` returns,
gives each its callback URL, returns the journaled job instead of sending
a second one for a known ``track_id``, hands slot-holding jobs nobody waits
for to the watcher, and settles each job in the journal (its queue slot
freed) the moment it is seen to end. It is the
:class:`~modelslab_async._jobs.JobHost` of every handle it makes.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import os
import secrets
import time
import weakref

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Final

from ._closing import Closing
from ._engine import Engine
from ._jobs import DEFAULT_ETA, ETA_MAX, JobHandle, WebhookLink
from ._learning import EtaLearner
from ._requests import REQUEST_TYPES, JobRequest
from ._responses import JobResponse, JobStatus
from ._routes import Endpoint
from ._state import JobPhase, JobState, response_of
from ._watcher import Watcher
from .errors import InvalidRequestError, SubmitUncertainError


if TYPE_CHECKING:
    from .stores import Journal
    from .webhooks import Registration, WebhookReceiver


__all__ = ["Tracker", "fetch_path"]

log = logging.getLogger("modelslab_async")

#: Uncertain jobs kept listening for their webhook, at most.
_MAX_UNCERTAIN: Final = 1000
#: An uncertain job keeps its slot for this many times its endpoint's last
#: announced eta (estimates run up to ~30% late), plus the webhook grace.
_UNCERTAIN_HOLD: Final = 1.5


class _TrackIds:
    """
    Generated track_ids: a random prefix per process and a counter, unique
    across processes and runs without a system call per job. A forked child
    draws a prefix of its own.
    """

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self._prefix = f"mla-{secrets.token_hex(8)}-"
        self._count = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._count)}"


_TRACK_IDS: Final = _TrackIds()


def _resolve(
    followers: list[asyncio.Future[JobHandle | None]], job: JobHandle | None
) -> None:
    for follower in followers:
        if not follower.done():
            follower.set_result(job)


def fetch_path(endpoint: str) -> str:
    """
    The fetch route of an endpoint family.

    Raises:
        InvalidRequestError: No request class has that family.
    """
    for cls in REQUEST_TYPES.values():
        if cls.route.family == endpoint:
            return cls.route.fetch
    families = sorted({cls.route.family for cls in REQUEST_TYPES.values()})
    raise InvalidRequestError(
        "endpoint",
        endpoint,
        f"must be one of {', '.join(map(repr, families))}",
    )


class _Live:
    """
    Strictly private: unfinished journaled jobs by ``track_id``, held
    weakly: a job that must stay (it holds a slot, or waits for its webhook)
    is held by the watcher or the uncertain list. Plain references and a
    dict, not ``WeakValueDictionary``, whose Python-level ``get`` showed on
    every submit.
    """

    __slots__ = ("_refs",)

    def __init__(self) -> None:
        self._refs: dict[str, weakref.ref[JobHandle]] = {}

    def get(self, track_id: str) -> JobHandle | None:
        ref = self._refs.get(track_id)
        return None if ref is None else ref()

    def add(self, track_id: str, job: JobHandle) -> None:
        self._refs[track_id] = weakref.ref(
            job, functools.partial(self._gone, track_id)
        )

    def discard(self, track_id: str) -> None:
        self._refs.pop(track_id, None)

    def jobs(self) -> list[JobHandle]:
        return [job for ref in list(self._refs.values()) if (job := ref())]

    def _gone(self, track_id: str, ref: weakref.ref[JobHandle]) -> None:
        if self._refs.get(track_id) is ref:
            del self._refs[track_id]


class Tracker:
    """
    Strictly private: the jobs of one client.

    Args:
        engine: Talks to the API.
        journal: Where jobs are journaled, opened for this client.
        job_timeout: Seconds a wait lasts by default.
        capped: Whether the account has a queue cap (jobs hold slots).
        receiver: The webhook receiver, if any.
    """

    def __init__(
        self,
        engine: Engine,
        journal: Journal,
        *,
        job_timeout: float,
        capped: bool,
        receiver: WebhookReceiver | None,
    ) -> None:
        self.engine = engine
        self.journal = journal
        self.job_timeout = job_timeout
        self.closing: Closing = engine.closing
        self._capped = capped
        self._receiver = receiver
        self._watcher = Watcher()
        # How this client's endpoints' etas turn out: jobs learn from it.
        self.learner = EtaLearner()
        self._started_receiver = False
        # Unfinished journaled jobs: strongly held while they hold a slot
        # (the watcher) or wait for their webhook (uncertain ones).
        self._live = _Live()
        self._uncertain: collections.OrderedDict[str, JobHandle] = (
            collections.OrderedDict()
        )
        # Submits in flight in this process, by track_id: a second submit
        # of one waits for the first instead of racing it.
        self._sending: dict[str, list[asyncio.Future[JobHandle | None]]] = {}
        # The last eta announced by each endpoint, and the timers that give
        # back the slots of uncertain submits.
        self._etas: dict[str, float] = {}
        #: Uncertain jobs keeping their slot: the timer that lets each go.
        self._holds: dict[str, tuple[asyncio.TimerHandle, JobHandle]] = {}
        self._closing = False
        self._writes: set[asyncio.Task[object]] = set()
        # Jobs adopted from the journal, held until they finish: nobody
        # holds their handles until unfinished() hands them out, and
        # uncapped, no watcher does either.
        self._adopted: dict[str, JobHandle] = {}

    # --- JobHost ---------------------------------------------------------

    async def fetch(
        self, fetch_path: str, job_id: str, *, deadline: float | None
    ) -> JobResponse:
        return await self.engine.fetch(fetch_path, job_id, deadline=deadline)

    async def lookup(self, track_id: str) -> JobState | None:
        return await self.journal.get(track_id)

    async def download(
        self, url: str, *, missing_until: float | None
    ) -> bytes:
        return await self.engine.download(url, missing_until=missing_until)

    def finished(self, job: JobHandle) -> None:
        """
        A job ended: free its slot and journal the outcome, at once.
        """
        self._watcher.forget(job)
        track_id = job.track_id
        hold = None if track_id is None else self._holds.pop(track_id, None)
        if hold is not None:
            hold[0].cancel()
        if track_id is not None and self._live.get(track_id) is job:
            self._live.discard(track_id)
            self._uncertain.pop(track_id, None)
            self._adopted.pop(track_id, None)
            self.journal.settle(job.state)
        if job.webhook is not None and self._receiver is not None:
            self._receiver.retire(job.webhook.webhook_id)

    def unattended(self, job: JobHandle) -> None:
        """
        Nobody waits for *job* any more: if it holds a slot, watch it.
        """
        if (
            self._capped
            and job.track_id is not None
            and self._live.get(job.track_id) is job
            and job.phase is JobPhase.QUEUED
        ):
            self._watcher.watch(job)

    # --- opening and closing ---------------------------------------------

    async def open(self) -> None:
        """
        Take over what the journal says this client should watch, and
        hear of what other processes settle.
        """
        receiver = self._receiver
        if receiver is not None:
            receiver.bind(self.journal)
        adopted = await self.journal.adopt()
        if (
            receiver is not None
            and not receiver.is_ready
            and any(state.webhook_id is not None for state in adopted)
        ):
            # Their callbacks may come any moment: be there for them.
            self._started_receiver = True
            await receiver.start()
        for state in adopted:
            self._adopt(state)
        self.journal.listen(self._heard)

    async def aclose(self) -> None:
        """
        Stop watching, and finish the journal's pending writes.
        """
        self._closing = True
        await self._watcher.aclose()
        # Every uncertain job gives its slot back, watched or not (one
        # without a webhook is in no map but this one): handed to another
        # process, it would start a new hold there.
        for timer, job in list(self._holds.values()):
            timer.cancel()
            self._let_go(job)
        await asyncio.gather(*self._writes, return_exceptions=True)
        if self._receiver is not None:
            self._receiver.bind(None)
            if self._started_receiver:
                await self._receiver.aclose()
        await self.journal.aclose()

    # --- jobs ------------------------------------------------------------

    async def submit(self, request: JobRequest) -> JobHandle:
        """
        Send a job once per ``track_id``; see :meth:`Client.submit
        <modelslab_async.Client.submit>`.
        """
        track_id = request.track_id or _TRACK_IDS.next()
        while (followers := self._sending.get(track_id)) is not None:
            # The same track_id is being sent right now: its outcome is
            # ours too. None: the first was cancelled, so try ourselves
            # (the journal's claim then finds whatever it left).
            follower: asyncio.Future[JobHandle | None] = (
                asyncio.get_running_loop().create_future()
            )
            followers.append(follower)
            twin = await follower
            if twin is not None:
                return twin
        # Live, and no submit of it in flight: its id is journaled.
        known = self._live.get(track_id)
        if known is not None:
            return known
        followers = self._sending[track_id] = []
        try:
            job = await self._submit(request, track_id)
        except asyncio.CancelledError:
            _resolve(followers, None)
            raise
        except BaseException as exc:
            for follower in followers:
                if not follower.done():
                    follower.set_exception(exc)
            raise
        finally:
            del self._sending[track_id]
        if followers:
            _resolve(followers, job)
        return job

    async def _submit(self, request: JobRequest, track_id: str) -> JobHandle:
        route = request.route
        registration = link = None
        if self._receiver is not None and request.webhook is None:
            registration = await self._register(track_id)
            link = self._link(registration)
        now = time.time()
        claim = JobState(
            track_id=track_id,
            endpoint=route.family,
            phase=JobPhase.SUBMITTING,
            request=request,
            webhook_id=None if link is None else link.webhook_id,
            token_hash=None if link is None else link.token_hash,
            created_at=now,
            updated_at=now,
        )
        try:
            journaled = await self.journal.claim(claim)
        except asyncio.CancelledError:
            self._retire(registration)
            # The claim may have been written, and nothing was sent: it
            # must not read as an uncertain submit later.
            self._in_background(self.journal.abandon(track_id))
            raise
        except BaseException:
            self._retire(registration)
            raise
        if journaled is not None:
            self._retire(registration)
            return self._handle(journaled)
        try:
            response = await self.engine.submit(
                request,
                track_id=track_id,
                webhook_url=None if registration is None else registration.url,
            )
        except SubmitUncertainError as error:
            job = self._keep_uncertain(claim, link, registration, error)
            await self.journal.record(job.state)
            raise
        except asyncio.CancelledError:
            # It may have left: the job may exist, and only its webhook can
            # tell. The journal says so; the caller's cancel goes on.
            cancelled = SubmitUncertainError(
                "the submit was cancelled after it may have reached the "
                "server",
                endpoint=route.submit,
                track_id=track_id,
                request=request,
            )
            # A string, not the error: a kept log record must not keep the
            # client alive through its traceback.
            log.warning("%s", str(cancelled))
            job = self._keep_uncertain(claim, link, registration, cancelled)
            self._in_background(self.journal.record(job.state))
            raise
        except BaseException:
            self._retire(registration)
            if not self.closing.closed:
                await self.journal.abandon(track_id)
            raise
        job = JobHandle(
            self,
            response,
            endpoint=route.family,
            fetch_path=route.fetch,
            track_id=track_id,
            request=request,
            webhook=link,
            created_at=now,
            fresh=True,
        )
        return await self._track(job, registration)

    async def _track(
        self, job: JobHandle, registration: Registration | None
    ) -> JobHandle:
        """
        Journal a submitted job's id, then give it its webhook and, while
        nobody waits for it, the watcher.
        """
        assert job.track_id is not None  # noqa: S101 (submitted by us)
        if job.response.eta is not None:
            self._etas[job.endpoint] = job.response.eta
        if job.status.is_finished:
            # Done in the submit's answer itself: it left the queue at once,
            # and its outcome is durable before submit() returns, as any
            # job id is.
            state = job.state
            try:
                await self.journal.record(state)
            finally:
                self.journal.settle(state)
                self._attend(job, registration)
            return job
        self._live.add(job.track_id, job)
        try:
            # Durable before submit() returns: a crash from here on leaves
            # a job the next run finds.
            await self.journal.record(job.state)
        finally:
            # Cancelled meanwhile, the job is queued all the same: it hears
            # its webhook, and is watched while it holds a slot.
            self._attend(job, registration)
        return job

    def _attend(
        self, job: JobHandle, registration: Registration | None
    ) -> JobHandle:
        if registration is not None:
            registration.subscribe(job.take_webhook)
        self.unattended(job)
        return job

    def _keep_uncertain(
        self,
        claim: JobState,
        link: WebhookLink | None,
        registration: Registration | None,
        error: SubmitUncertainError,
    ) -> JobHandle:
        """
        The handle of an uncertain submit: it holds its slot for a while,
        and listens for its webhook. The caller journals its state.
        """
        job = JobHandle(
            self,
            JobResponse(status=JobStatus.PROCESSING, track_id=claim.track_id),
            endpoint=claim.endpoint,
            fetch_path=fetch_path(claim.endpoint),
            track_id=claim.track_id,
            request=claim.request,
            webhook=link,
            created_at=claim.created_at,
            uncertain=error,
        )
        self._hold(job)
        if registration is None:
            return job
        self._live.add(claim.track_id, job)
        self._uncertain[claim.track_id] = job
        while len(self._uncertain) > _MAX_UNCERTAIN:
            _, oldest = self._uncertain.popitem(last=False)
            if oldest.webhook is not None:
                self._retire_id(oldest.webhook.webhook_id)
        registration.subscribe(job.take_webhook)
        return job

    def _in_background(self, write: Coroutine[Any, Any, object]) -> None:
        """
        Run a journal write on its own: awaiting it would hold up a
        cancellation. :meth:`aclose` waits for it.
        """
        task = asyncio.get_running_loop().create_task(write)
        self._writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, write: asyncio.Task[object]) -> None:
        self._writes.discard(write)
        if not write.cancelled() and write.exception() is not None:
            log.warning("journal write failed: %s", str(write.exception()))

    def _let_go(self, job: JobHandle) -> None:
        """
        The slot an uncertain job held is given back, its time up.
        """
        assert job.track_id is not None  # noqa: S101 (ours)
        self._holds.pop(job.track_id, None)
        if not job.status.is_finished:
            self.journal.settle(job.state)

    def _handle(self, state: JobState, *, orphaned: bool = False) -> JobHandle:
        """
        The live handle of a journaled job, made from the record if need
        be. A ``submitting`` job is followed in the journal while another
        process sends it, or is uncertain if that process is gone
        (*orphaned*).
        """
        live = self._live.get(state.track_id)
        if live is not None:
            return live
        link = None
        if state.webhook_id is not None and state.token_hash is not None:
            link = WebhookLink(
                state.webhook_id,
                state.token_hash,
                0.0 if self._receiver is None else self._receiver.grace,
                self._receiver is not None
                and self._receiver.verify == "fetch",
            )
        phase = state.phase
        uncertain = None
        if phase is JobPhase.UNCERTAIN or (
            phase is JobPhase.SUBMITTING and orphaned
        ):
            uncertain = SubmitUncertainError(
                state.message
                or "the submit was in flight when its process ended",
                track_id=state.track_id,
                request=state.request,
            )
        job = JobHandle(
            self,
            response_of(state),
            endpoint=state.endpoint,
            fetch_path=(
                state.request.route.fetch
                if state.request is not None
                else fetch_path(state.endpoint)
            ),
            track_id=state.track_id,
            request=state.request,
            webhook=link,
            created_at=state.created_at,
            uncertain=uncertain,
            submitting=phase is JobPhase.SUBMITTING and not orphaned,
        )
        if not phase.is_finished:
            self._live.add(state.track_id, job)
            if uncertain is not None:
                self._uncertain[state.track_id] = job
            if link is not None and self._receiver is not None:
                self._receiver.watch(
                    link.webhook_id, link.token_hash, state.track_id
                ).subscribe(job.take_webhook)
        return job

    def _adopt(self, state: JobState) -> None:
        """
        Watch a job the journal handed over: a crashed run's, or a dead
        replica's.
        """
        job = self._handle(state, orphaned=True)
        if not job.status.is_finished:
            self._adopted[state.track_id] = job
        if job.phase is JobPhase.UNCERTAIN and not job.status.is_finished:
            # Its process died mid-submit (or after an uncertain one): the
            # job may be queued on the server, so it keeps its slot as an
            # uncertain submit of ours would. Never sent again: only its
            # webhook can settle it; the journal says uncertain at once.
            self._hold(job)
            if state.phase is JobPhase.SUBMITTING:
                self._write(job.state)
        self.unattended(job)

    def _hold(self, job: JobHandle) -> None:
        """
        Keep an uncertain job's slot for a while.

        The job most likely exists and holds a place in the server's queue,
        where we cannot see it: keep its slot for as long as jobs of its
        endpoint take, unless its webhook settles it first.
        """
        assert job.track_id is not None  # noqa: S101 (journaled)
        eta = self._etas.get(job.endpoint, DEFAULT_ETA)
        grace = 0.0 if job.webhook is None else job.webhook.grace
        hold = min(eta, ETA_MAX) * _UNCERTAIN_HOLD + grace
        earlier = self._holds.get(job.track_id)
        if earlier is not None:
            earlier[0].cancel()
        timer = asyncio.get_running_loop().call_later(hold, self._let_go, job)
        self._holds[job.track_id] = (timer, job)

    def _write(self, state: JobState) -> None:
        """
        Journal *state* without waiting; aclose() waits for it.
        """
        write = asyncio.get_running_loop().create_task(
            self.journal.record(state)
        )
        self._writes.add(write)
        write.add_done_callback(self._written)

    def _heard(self, state: JobState) -> None:
        """
        News from another process: an outcome, or a job to adopt.
        """
        job = self._live.get(state.track_id)
        if job is not None:
            job.settle(state)
        elif not state.phase.is_finished and not self._closing:
            # Closing, the journal hands its jobs on instead: a hold or a
            # write begun now would outlive the client.
            self._adopt(state)

    def unfinished(self) -> list[JobHandle]:
        """
        Every unfinished job this client knows, oldest first.
        """
        jobs = [j for j in self._live.jobs() if not j.status.is_finished]
        return sorted(jobs, key=lambda job: job.state.created_at)

    async def job(self, track_id: str) -> JobHandle | None:
        """
        The job journaled under *track_id*, finished or not.
        """
        live = self._live.get(track_id)
        if live is not None:
            return live
        state = await self.journal.get(track_id)
        return None if state is None else self._handle(state)

    def by_fetch(self, endpoint: Endpoint, response: JobResponse) -> JobHandle:
        """
        A handle for a job re-attached by id: not journaled, no slot.
        """
        return JobHandle(
            self,
            response,
            endpoint=endpoint,
            fetch_path=fetch_path(endpoint),
        )

    # --- webhooks ----------------------------------------------------------

    async def _register(self, track_id: str) -> Registration:
        receiver = self._receiver
        assert receiver is not None  # noqa: S101 (asked for only with one)
        if not receiver.is_ready:
            self._started_receiver = True
            await receiver.start()
        return receiver.register(track_id)

    def _link(self, registration: Registration) -> WebhookLink:
        assert self._receiver is not None  # noqa: S101 (only with one)
        return WebhookLink(
            registration.webhook_id,
            registration.token_hash,
            self._receiver.grace,
            self._receiver.verify == "fetch",
        )

    def _retire(self, registration: Registration | None) -> None:
        if registration is not None:
            self._retire_id(registration.webhook_id)

    def _retire_id(self, webhook_id: str) -> None:
        if self._receiver is not None:
            self._receiver.retire(webhook_id)
