"""
The client: settings, lifecycle, and one method per capability.

A façade: the engine (``_engine``) talks to the API, the tracker
(``_tracker``) keeps the jobs and the journal, job handles wait. Nothing
below calls back into the client.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import os
import warnings

from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Final, Self

import aiohttp

from ._batch import BatchItem, ProgressCallback, generate_many
from ._engine import Engine, Secret, account_of
from ._jobs import JobHandle, JobResult
from ._outputs import decode_image_async
from ._requests import JobRequest, S3Settings
from ._responses import SystemDetails
from ._retry import RetryPolicy
from ._routes import Endpoint
from ._tracker import Tracker, fetch_path
from ._validation import integer, positive
from .errors import (
    ClientStateError,
    GenerationFailedError,
    InvalidRequestError,
    SubmitUncertainError,
    WebhookError,
)
from .stores import MemoryStore


if TYPE_CHECKING:
    from .stores import JobStore
    from .webhooks import WebhookReceiver


__all__ = ["API_KEY_VARIABLE", "DEFAULT_BASE_URL", "Client"]

log = logging.getLogger("modelslab_async")

DEFAULT_BASE_URL: Final = "https://modelslab.com/api/"
API_KEY_VARIABLE: Final = "MODELSLAB_API_KEY"


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


def _creation_site() -> str:
    """
    The first caller outside this package, for the unclosed-client warning.
    """
    frame = inspect.currentframe()
    package = os.path.dirname(__file__)  # noqa: PTH120
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


async def _decode(raw: bytes, content_type: str | None) -> bytes:
    return await decode_image_async(raw, content_type=content_type)


class Client:
    """
    An asyncio client for ModelsLab's text2img endpoints.

    Use it as ``async with Client() as client:`` or close it with
    :meth:`aclose`. Open one per event loop; it refuses use from another.

    Args:
        api_key: Your API key; read from ``MODELSLAB_API_KEY`` when
            ``None``. It is sent only in request bodies to the API and never
            appears in a repr, a log line, an exception or a store.
        base_url: The API root. Point it at the emulator in tests.
        timeout: Seconds for each HTTP request.
        job_timeout: Seconds :meth:`JobHandle.wait` waits by default;
            ``math.inf`` for no limit.
        retry: When and how to retry; see :class:`RetryPolicy`.
        max_queued: Jobs queued at once on the account: 5 on pay-as-you-go,
            10 on Standard, 15 on Premium. ``None`` turns admission control
            off.
        webhooks: A :class:`~modelslab_async.WebhookReceiver`; jobs then
            finish on the first of webhook or poll.
        store: Where jobs are journaled: in memory by default;
            :class:`~modelslab_async.stores.SQLiteStore` for jobs that
            outlive the process, :class:`~modelslab_async.stores.RedisStore`
            for many processes on one account.
        session: An aiohttp session to use instead of our own. It is
            borrowed: we never close it.
        trust_env: Honour ``HTTP(S)_PROXY``, ``NO_PROXY`` and ``.netrc``
            for our own session, as aiohttp's ``trust_env`` does.
        download_concurrency: Output downloads at once.
        max_output_bytes: The largest output accepted.

    Raises:
        InvalidRequestError: No key, or a setting out of range.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 30.0,
        job_timeout: float = 600.0,
        retry: RetryPolicy | None = None,
        max_queued: int | None = 5,
        webhooks: WebhookReceiver | None = None,
        store: JobStore | None = None,
        session: aiohttp.ClientSession | None = None,
        trust_env: bool = True,
        download_concurrency: int = 8,
        max_output_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        key = (
            api_key
            if api_key is not None
            else os.environ.get(API_KEY_VARIABLE)
        )
        if not key:
            raise InvalidRequestError(
                "api_key",
                None,
                f"pass api_key= or set the {API_KEY_VARIABLE} variable",
            )
        positive()("timeout", timeout)
        positive(infinite=True)("job_timeout", job_timeout)
        if max_queued is not None:
            integer(1)("max_queued", max_queued)
        integer(1)("download_concurrency", download_concurrency)
        integer(1)("max_output_bytes", max_output_bytes)
        self._key = Secret(key)
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.timeout = float(timeout)
        self.job_timeout = float(job_timeout)
        self.retry = retry if retry is not None else RetryPolicy()
        self.max_queued = max_queued
        self.store: JobStore = MemoryStore() if store is None else store
        self._webhooks = webhooks
        self._engine = Engine(
            self._key,
            self.base_url,
            self.timeout,
            self.retry,
            session=session,
            trust_env=trust_env,
            download_concurrency=download_concurrency,
            max_output_bytes=max_output_bytes,
            decode=_decode,
        )
        self._tracker: Tracker | None = None
        self._opening = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = _State.UNOPENED
        self._owns_session = session is None
        self._created_at = _creation_site()

    def __repr__(self) -> str:
        return (
            f"<modelslab_async.Client base_url={self.base_url!r} "
            f"state={self._state.value}>"
        )

    @property
    def is_closed(self) -> bool:
        """
        Whether :meth:`aclose` was called.
        """
        return self._state is _State.CLOSED

    # --- lifecycle -------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._opened()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """
        Close the client: every wait, back-off, queued submit and request
        in flight ends at once with
        :class:`~modelslab_async.errors.ClientStateError`; the journal's
        pending writes are finished; an embedded webhook receiver the
        client started is stopped; our session (never a borrowed one) is
        closed. Closing twice is harmless; a closed client cannot reopen.
        """
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._engine.closing.close()
        if self._tracker is not None:
            await self._tracker.aclose()
        await self._engine.aclose()

    def __del__(self) -> None:
        # getattr: __init__ may have raised before setting anything.
        if getattr(self, "_state", None) is _State.OPEN and self._owns_session:
            warnings.warn(
                f"unclosed modelslab_async.Client created at "
                f"{self._created_at}; use 'async with Client()' or "
                f"'await client.aclose()'",
                ResourceWarning,
                source=self,
                stacklevel=1,
            )

    async def _opened(self) -> Tracker:
        """
        The tracker, opening the client (and its journal) on first use.
        """
        tracker = self._tracker
        if tracker is not None and self._state is _State.OPEN:
            if asyncio.get_running_loop() is not self._loop:
                raise ClientStateError(
                    "this Client was opened in another event loop; create "
                    "one Client per event loop (per asyncio.run)"
                )
            return tracker
        if self._state is _State.CLOSED:
            raise ClientStateError("this Client is closed; create a new one")
        async with self._opening:
            if self._tracker is None:
                self._loop = asyncio.get_running_loop()
                journal = await self.store.open(
                    account_of(self._key), max_queued=self.max_queued
                )
                tracker = Tracker(
                    self._engine,
                    journal,
                    job_timeout=self.job_timeout,
                    capped=self.max_queued is not None,
                    receiver=self._webhooks,
                )
                self._tracker = tracker
                self._state = _State.OPEN
                await tracker.open()
        if self._state is _State.CLOSED:
            raise ClientStateError("this Client is closed; create a new one")
        assert self._tracker is not None  # noqa: S101 (set just above)
        return self._tracker

    # --- jobs ------------------------------------------------------------

    async def submit(self, request: JobRequest) -> JobHandle:
        """
        Send a job and return its handle at once.

        The job is journaled before it is sent, and its id before this
        returns. A ``track_id`` already journaled is an idempotency key:
        no second job is sent, and the handle of the journaled one is
        returned (finished or not). Waits first for a free queue slot when
        ``max_queued`` jobs are already queued. A 429 is waited out and
        retried; the submit is never repeated when it may have reached the
        server.

        Raises:
            SubmitUncertainError: The job may or may not exist; its
                ``track_id`` is journaled as ``uncertain``.
            APIError: The server refused the job.
            TransportError: The server could not be reached.
            StoreError: The journal failed.
        """
        given: object = request  # typed, but callers may not be
        if not isinstance(given, JobRequest):
            msg = (
                "submit() takes a request such as Text2Img or "
                f"FluxKleinText2Img, not {type(request).__name__}"
            )
            raise TypeError(msg)
        tracker = await self._opened()
        return await tracker.submit(request)

    async def generate(
        self, request: JobRequest, *, timeout: float | None = None
    ) -> JobResult:
        """
        Submit a job and wait for its result: ``submit()`` then ``wait()``.

        *timeout* bounds the wait once the job is sent; time spent waiting
        for a queue slot behind your own jobs does not count. If the wait
        is cancelled or times out, the job keeps its queue slot until the
        client sees it end.

        Raises:
            JobTimeoutError: The job did not finish within *timeout*.
            GenerationFailedError: The server reports the job failed.
            SubmitUncertainError: See :meth:`submit`.
        """
        job = await self.submit(request)
        return await job.wait(timeout)

    async def unfinished(self) -> list[JobHandle]:
        """
        A handle for every journaled job that has not finished, oldest
        first: those of this run, and those a crashed or killed run left
        (rebuilt from the journal; awaiting one finishes it as if nothing
        had happened). A job whose submit was in flight when its process
        died is ``uncertain``: awaiting it raises
        :class:`~modelslab_async.errors.SubmitUncertainError`, unless its
        webhook settles it.
        """
        tracker = await self._opened()
        return tracker.unfinished()

    async def job(self, track_id: str) -> JobHandle | None:
        """
        The journaled job with this ``track_id``, finished or not, or
        ``None``. Finished jobs stay readable for at least 24 hours, the
        life of their outputs (see the store's ``retention``).
        """
        tracker = await self._opened()
        return await tracker.job(track_id)

    async def recover(
        self, error: SubmitUncertainError, *, timeout: float | None = None
    ) -> JobHandle | None:
        """
        Learn whether an uncertain submit created a job after all.

        The submit carried a callback URL; if the server made the job, it
        calls back when the job ends. This listens for that call for up to
        *timeout* seconds (the client's ``job_timeout`` by default).

        Returns:
            The job's handle, finished, if its webhook came; ``None`` if it
            did not, in which case the job most likely does not exist
            (webhooks are best-effort, so "most likely").

        Raises:
            WebhookError: The client has no webhook receiver: ModelsLab has
                no other way to find a job by its ``track_id``.
        """
        if self._webhooks is None:
            raise WebhookError(
                "recover() listens for the job's webhook: create the "
                "Client with webhooks=WebhookReceiver()"
            )
        job = await self.job(error.track_id or "")
        if job is None:
            return None
        try:
            await job.wait(self.job_timeout if timeout is None else timeout)
        except SubmitUncertainError:
            return None
        except GenerationFailedError:
            pass
        return job

    def generate_many(
        self,
        requests: Iterable[JobRequest],
        *,
        timeout: float | None = None,
        ordered: bool = False,
        concurrency: int | None = None,
        on_progress: ProgressCallback | None = None,
        batch_id: str | None = None,
    ) -> AsyncIterator[BatchItem]:
        """
        Generate many images; yield each outcome as it completes.

        Use as ``async for item in client.generate_many(requests)``. Each
        :data:`BatchItem` carries its request and index, and either a
        result (``item.ok``) or the typed error in its place: one failure
        never cancels the others. The client's ``max_queued`` keeps the
        account's queue cap, so any number of requests is safe.

        A batch is resumable: give it a *batch_id* (or each request a
        ``track_id``) and a durable ``store``, and running it again after
        a crash, a kill or a Ctrl-C sends no job twice. Requests whose job
        is journaled are attached to (waited for, or their result read
        back), not sent again; only the others are sent.

        Args:
            timeout: Per job, as in :meth:`generate`.
            ordered: Yield in input order instead of completion order.
            concurrency: Jobs in flight at once; twice ``max_queued`` by
                default, so a freed queue slot is refilled at once.
            on_progress: Called with a :class:`BatchProgress` on every
                change. Called synchronously: keep it quick.
            batch_id: Names the batch: each request without a
                ``track_id`` gets one derived from *batch_id*, its position
                and its fields (:func:`batch_track_id
                <modelslab_async.batch_track_id>`), the same on every run.
        """
        if concurrency is None:
            concurrency = 2 * (self.max_queued or 16)
        return generate_many(
            self.submit,
            requests,
            timeout=timeout,
            ordered=ordered,
            concurrency=concurrency,
            on_progress=on_progress,
            batch_id=batch_id,
        )

    async def fetch(
        self, job_id: str | int, *, endpoint: Endpoint = "v6"
    ) -> JobHandle:
        """
        Re-attach to a job by id, e.g. from a webhook or another tool.

        Fetches it once; wait for it with ``await handle``. The job is not
        journaled and holds no queue slot: it was not sent by this client.

        Raises:
            NotFoundError: No such job.
        """
        path = fetch_path(endpoint)
        job_id = str(job_id).strip()
        if not job_id or "/" in job_id:
            raise InvalidRequestError("job_id", job_id, "must be a job id")
        tracker = await self._opened()
        response = await self._engine.fetch(path, job_id)
        return tracker.by_fetch(endpoint, response)

    # --- Enterprise server management ------------------------------------

    async def system_details(self) -> SystemDetails:
        """
        Ask the Flux Klein server about itself (``system_details``).
        """
        await self._opened()
        return await self._engine.system_details()

    async def clear_cache(self) -> str:
        """
        Clear the Flux Klein server's cache; return its message.
        """
        await self._opened()
        return await self._engine.management_call("clear_cache")

    async def clear_queue(self) -> str:
        """
        Clear the Flux Klein server's queue (it restarts); return its
        message.
        """
        await self._opened()
        return await self._engine.management_call("clear_queue")

    async def restart_server(self) -> str:
        """
        Restart the Flux Klein server; return its message.
        """
        await self._opened()
        return await self._engine.management_call("restart_server")

    async def update_server(self) -> str:
        """
        Update the Flux Klein server to its latest version; return its
        message.
        """
        await self._opened()
        return await self._engine.management_call("update_server")

    async def update_s3(self, settings: S3Settings) -> str:
        """
        Tell the Enterprise server where to store images; return its
        message. Without S3 details, images are deleted after 24 hours.
        """
        await self._opened()
        return await self._engine.update_s3(settings)
