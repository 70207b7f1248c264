"""
The client: session lifecycle, the key, and one method per endpoint.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import secrets
import sys
import warnings

from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Self

import aiohttp
import attrs

from ._admission import QueueSlots
from ._batch import BatchItem, ProgressCallback, generate_many
from ._converter import (
    decode_job,
    decode_message,
    decode_system_details,
    key_body,
    request_body,
    s3_body,
)
from ._http import Transport
from ._jobs import JobHandle, JobResult
from ._outputs import decode_image
from ._requests import (
    Endpoint,
    FluxKleinText2Img,
    S3Settings,
    Text2Img,
    Text2ImgRequest,
)
from ._responses import JobResponse, JobStatus, SystemDetails
from ._retry import RetryPolicy
from .errors import (
    BadRequestError,
    ClientStateError,
    InvalidRequestError,
    ModelsLabError,
    ResponseDecodeError,
    SubmitUncertainError,
    WebhookError,
)


if TYPE_CHECKING:
    from .webhooks import WebhookReceiver


__all__ = ["Client"]

log = logging.getLogger("modelslab_async")

DEFAULT_BASE_URL: Final = "https://modelslab.com/api/"
API_KEY_VARIABLE: Final = "MODELSLAB_API_KEY"

#: (submit path, fetch path prefix) per endpoint family, below base_url.
_ROUTES: Final[dict[str, tuple[str, str]]] = {
    "v6": ("v6/images/text2img", "v6/images/fetch/"),
    "flux-klein": (
        "v1/enterprise/flux_klein/text2img",
        "v1/enterprise/flux_klein/fetch/",
    ),
}
_FLUX_KLEIN: Final = "v1/enterprise/flux_klein/"
_UPDATE_S3: Final = "v1/enterprise/update_s3"
_REDACT_FROM: Final = 6


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class _Secret:
    """
    Strictly private: a string that never shows itself.
    """

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<secret>"

    def redact(self, text: str) -> str:
        # A key of a few characters would mangle every message it occurs
        # in by chance; real keys are long.
        if len(self.value) < _REDACT_FROM:
            return text
        return text.replace(self.value, "<secret>")


def _creation_site() -> str:
    """
    The first caller outside this package, for the unclosed-client warning.
    """
    frame = sys._getframe(2)  # noqa: SLF001
    package = os.path.dirname(__file__)  # noqa: PTH120
    while frame.f_back is not None and frame.f_code.co_filename.startswith(
        package
    ):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _positive(name: str, value: object) -> float:
    # Checked at run time too: settings often come from config files.
    if isinstance(value, bool) or not (
        isinstance(value, int | float) and value > 0
    ):
        raise InvalidRequestError(name, value, "must be a number above 0")
    return float(value)


def _queue_cap(value: object) -> int | None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < 1
    ):
        raise InvalidRequestError(
            "max_queued", value, "must be None or an integer of at least 1"
        )
    return value


def _submit_route(request: object) -> str:
    if not isinstance(request, Text2Img | FluxKleinText2Img):
        msg = (
            "submit() takes a Text2Img or FluxKleinText2Img, "
            f"not {type(request).__name__}"
        )
        raise TypeError(msg)
    return _ROUTES[request.endpoint][0]


def _with_id(response: JobResponse, job_id: str | None) -> JobResponse:
    """
    Fill in the id when the body has none, from ``fetch_result`` if need be.
    """
    if response.id is not None:
        return response
    if job_id is None and response.fetch_result:
        job_id = response.fetch_result.rstrip("/").rsplit("/", 1)[-1] or None
    return response if job_id is None else attrs.evolve(response, id=job_id)


class Client:
    """
    An asyncio client for ModelsLab's text2img endpoints.

    Use it as ``async with Client() as client:`` or close it with
    :meth:`aclose`. Open one per event loop; it refuses use from another.

    Args:
        api_key: Your API key; read from ``MODELSLAB_API_KEY`` when
            ``None``. It is sent only in request bodies to the API and never
            appears in a repr, a log line or an exception.
        base_url: The API root. Point it at the emulator in tests.
        timeout: Seconds for each HTTP request.
        job_timeout: Seconds :meth:`JobHandle.wait` waits by default.
        retry: When and how to retry; see :class:`RetryPolicy`.
        max_queued: Jobs this client keeps queued at once: 5 on
            pay-as-you-go, 10 on Standard, 15 on Premium. ``None`` turns
            admission control off.
        webhooks: A :class:`~modelslab_async.webhooks.WebhookReceiver`; jobs
            then finish on the first of webhook or poll.
        session: An aiohttp session to use instead of our own. It is
            borrowed: we never close it.
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
        session: aiohttp.ClientSession | None = None,
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
        self._key = _Secret(key)
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.timeout = _positive("timeout", timeout)
        self.job_timeout = (
            math.inf
            if job_timeout == math.inf
            else _positive("job_timeout", job_timeout)
        )
        self.retry = retry if retry is not None else RetryPolicy()
        self.max_queued = _queue_cap(max_queued)
        self._slots = QueueSlots(self.max_queued)
        self._webhooks = webhooks
        self._owns_receiver = False
        self._session = session
        self._download_concurrency = int(
            _positive("download_concurrency", download_concurrency)
        )
        self._max_output_bytes = int(
            _positive("max_output_bytes", max_output_bytes)
        )
        self._transport: Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = _State.UNOPENED
        #: The futures waiting jobs sleep on, woken when we close.
        self._sleepers: set[asyncio.Future[None]] = set()
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
        self._open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """
        Close the client: wake waiting jobs, and submits waiting for a
        queue slot, with :class:`~modelslab_async.errors.ClientStateError`;
        stop an owned
        webhook receiver, close our session (never a borrowed one).
        Closing twice is harmless; a closed client cannot be reopened.
        """
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        for sleeper in self._sleepers:
            if not sleeper.done():
                sleeper.set_result(None)
        self._slots.close()
        if self._owns_receiver and self._webhooks is not None:
            await self._webhooks.aclose()
        if self._session is None and self._transport is not None:
            await self._transport.session.close()

    def __del__(self) -> None:
        # getattr: __init__ may have raised before setting anything.
        if (
            getattr(self, "_state", None) is _State.OPEN
            and self._session is None
        ):
            warnings.warn(
                f"unclosed modelslab_async.Client created at "
                f"{self._created_at}; use 'async with Client()' or "
                f"'await client.aclose()'",
                ResourceWarning,
                source=self,
                stacklevel=1,
            )

    def _open(self) -> Transport:
        if self._state is _State.CLOSED:
            raise ClientStateError("this Client is closed; create a new one")
        loop = asyncio.get_running_loop()
        if self._transport is None:
            self._loop = loop
            session = self._session or aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": _user_agent()},
            )
            self._transport = Transport(
                session,
                self.base_url,
                self.retry,
                aiohttp.ClientTimeout(
                    total=self.timeout,
                    connect=min(self.timeout, 10.0),
                ),
                self._key.redact,
                self._download_concurrency,
            )
            self._state = _State.OPEN
        elif loop is not self._loop:
            raise ClientStateError(
                "this Client was opened in another event loop; create one "
                "Client per event loop (per asyncio.run)"
            )
        return self._transport

    # --- jobs ------------------------------------------------------------

    async def submit(self, request: Text2ImgRequest) -> JobHandle:
        """
        Send a text2img job and return its handle at once.

        Waits first for a free queue slot when ``max_queued`` jobs are
        already queued. A 429 is waited out and retried; the submit is
        never repeated when it may have reached the server.

        Raises:
            SubmitUncertainError: The job may or may not exist; reconcile
                by its ``track_id``.
            APIError: The server refused the job.
            TransportError: The server could not be reached.
        """
        route = _submit_route(request)
        transport = self._open()
        track_id = request.track_id or f"mla-{secrets.token_hex(16)}"
        slot = None if self.max_queued is None else await self._slots.acquire()
        link = None
        try:
            if self._webhooks is not None and request.webhook is None:
                await self._serve_webhooks()
                link = self._webhooks._register(track_id)  # noqa: SLF001
            response = await self._send(
                transport,
                route,
                request,
                track_id,
                None if link is None else link.url,
            )
        except BaseException as exc:
            if slot is not None:
                slot.release()
            if link is not None:
                if isinstance(exc, SubmitUncertainError):
                    link.orphan()  # It may still call back: see recover().
                else:
                    link.close()
            raise
        job = JobHandle(
            self,
            response,
            endpoint=request.endpoint,
            request=request,
            track_id=track_id,
            slot=slot,
            webhook=link,
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "submitted job %s (track_id %s) to %s: %s, eta %s",
                job.id,
                track_id,
                route,
                response.status.value,
                response.eta,
            )
        if link is not None:
            link.attach(job)
        return job

    async def _send(
        self,
        transport: Transport,
        route: str,
        request: Text2ImgRequest,
        track_id: str,
        webhook_url: str | None,
    ) -> JobResponse:
        """
        POST the job once and read the answer; raise unless a job exists.
        """

        def uncertain(error: ModelsLabError) -> SubmitUncertainError:
            reason = getattr(error, "message", None) or str(error)
            return SubmitUncertainError(
                f"the submit may have created a job: {reason}",
                endpoint=route,
                track_id=track_id,
                request=request,
            )

        data = await transport.call(
            route,
            request_body(
                request,
                key=self._key.value,
                track_id=track_id,
                webhook=webhook_url,
            ),
            idempotent=False,
            job_body=True,
            ambiguous=uncertain,
        )
        try:
            response = _with_id(decode_job(data), None)
        except ResponseDecodeError as exc:
            raise uncertain(exc) from exc
        if response.id is not None:
            return response
        if not response.status.is_finished:
            error = ResponseDecodeError(
                "the server queued the job but gave no id", endpoint=route
            )
            raise uncertain(error) from error
        if response.status is not JobStatus.SUCCESS:
            raise BadRequestError(
                self._key.redact(response.message or "refused"),
                endpoint=route,
                http_status=200,
                body=data,
            )
        return response

    async def generate(
        self, request: Text2ImgRequest, *, timeout: float | None = None
    ) -> JobResult:
        """
        Submit a job and wait for its result: ``submit()`` then ``wait()``.

        *timeout* bounds the wait once the job is sent; time spent waiting
        for a queue slot behind your own jobs does not count.

        Raises:
            JobTimeoutError: The job did not finish within *timeout*.
            GenerationFailedError: The server reports the job failed.
            SubmitUncertainError: See :meth:`submit`.
        """
        return await self._generate(request, timeout)

    async def _generate(
        self,
        request: Text2ImgRequest,
        timeout: float | None,
        sent: Callable[[], object] | None = None,
    ) -> JobResult:
        """
        generate(), telling *sent* when the server has taken the job.
        """
        job = await self.submit(request)
        if sent is not None:
            sent()
        try:
            return await job.wait(timeout)
        finally:
            # Nobody else holds this handle: a cancelled or failed wait
            # must not pin a queue slot until the traceback is collected.
            job._let_go()  # noqa: SLF001

    async def recover(
        self, error: SubmitUncertainError, *, timeout: float | None = None
    ) -> JobHandle | None:
        """
        Learn whether an uncertain submit created a job after all.

        The submit carried a callback URL; if the server made the job, it
        calls back when the job ends. This listens for that call for up to
        *timeout* seconds (the client's ``job_timeout`` by default).

        Returns:
            The job's handle, already finished, if its webhook came; ``None``
            if it did not, in which case the job most likely does not exist
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
        link = self._webhooks._registration_for(error.track_id or "")  # noqa: SLF001
        if link is None:
            return None
        response = await link.first_payload(
            self.job_timeout if timeout is None else timeout
        )
        link.close()
        if response is None:
            return None
        request = error.request
        return JobHandle(
            self,
            response,
            endpoint=getattr(request, "endpoint", "v6"),
            request=request
            if isinstance(request, Text2Img | FluxKleinText2Img)
            else None,
            track_id=error.track_id,
        )

    def generate_many(
        self,
        requests: Iterable[Text2ImgRequest],
        *,
        timeout: float | None = None,
        ordered: bool = False,
        concurrency: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> AsyncIterator[BatchItem]:
        """
        Generate many images; yield each outcome as it completes.

        Use as ``async for item in client.generate_many(requests)``. Each
        :class:`BatchItem` carries its request and index, and either a
        result or the typed error in its place: one failure never cancels
        the others. The client's ``max_queued`` keeps the account's queue
        cap, so any number of requests is safe.

        Args:
            timeout: Per job, as in :meth:`generate`.
            ordered: Yield in input order instead of completion order.
            concurrency: Jobs in flight at once; twice ``max_queued`` by
                default, so a freed queue slot is refilled at once.
            on_progress: Called with a :class:`BatchProgress` on every
                change. Called synchronously: keep it quick.
        """
        return generate_many(
            self,
            requests,
            timeout=timeout,
            ordered=ordered,
            concurrency=concurrency,
            on_progress=on_progress,
        )

    async def fetch(
        self, job_id: str | int, *, endpoint: Endpoint = "v6"
    ) -> JobHandle:
        """
        Re-attach to a job by id, e.g. after a restart or from a webhook.

        Fetches it once; wait for it with ``await handle``.

        Raises:
            NotFoundError: No such job.
        """
        if endpoint not in _ROUTES:
            raise InvalidRequestError(
                "endpoint", endpoint, "must be 'v6' or 'flux-klein'"
            )
        job_id = str(job_id).strip()
        if not job_id or "/" in job_id:
            raise InvalidRequestError("job_id", job_id, "must be a job id")
        response = await self._fetch_by_id(endpoint, job_id, None)
        return JobHandle(self, response, endpoint=endpoint)

    async def _fetch_response(self, job: JobHandle) -> JobResponse:
        if job.id is None:
            raise ClientStateError("this job has no id to fetch it by")
        return await self._fetch_by_id(job.endpoint, job.id, job._deadline)  # noqa: SLF001

    async def _fetch_by_id(
        self, endpoint: Endpoint, job_id: str, deadline: float | None
    ) -> JobResponse:
        transport = self._open()
        data = await transport.call(
            _ROUTES[endpoint][1] + job_id,
            key_body(self._key.value),
            idempotent=True,
            job_body=True,
            job_id=job_id,
            deadline=deadline,
        )
        try:
            return _with_id(decode_job(data), job_id)
        except ResponseDecodeError as exc:
            exc.endpoint, exc.job_id = _ROUTES[endpoint][1] + job_id, job_id
            raise

    async def download(
        self, url: str, *, missing_until: float | None
    ) -> bytes:
        """
        Fetch and decode one output; what :class:`Output` reads through.
        """
        return await self._download(url, missing_until=missing_until)

    async def _download(
        self, url: str, *, missing_until: float | None
    ) -> bytes:
        return await self._open().download(
            url,
            limit=self._max_output_bytes,
            missing_until=missing_until,
            decode=decode_image,
        )

    async def _serve_webhooks(self) -> None:
        receiver = self._webhooks
        if receiver is not None and not receiver.is_ready:
            self._owns_receiver = True
            await receiver.start()

    # --- Enterprise server management ------------------------------------

    async def _manage(
        self, path: str, body: dict[str, Any], *, idempotent: bool = False
    ) -> dict[str, Any]:
        return await self._open().call(path, body, idempotent=idempotent)

    async def system_details(self) -> SystemDetails:
        """
        Ask the Flux Klein server about itself (``system_details``).
        """
        return decode_system_details(
            await self._manage(
                _FLUX_KLEIN + "system_details",
                key_body(self._key.value),
                idempotent=True,
            )
        )

    async def clear_cache(self) -> str:
        """
        Clear the Flux Klein server's cache; return its message.
        """
        return await self._management_call("clear_cache")

    async def clear_queue(self) -> str:
        """
        Clear the Flux Klein server's queue (it restarts); return its
        message.
        """
        return await self._management_call("clear_queue")

    async def restart_server(self) -> str:
        """
        Restart the Flux Klein server; return its message.
        """
        return await self._management_call("restart_server")

    async def update_server(self) -> str:
        """
        Update the Flux Klein server to its latest version; return its
        message.
        """
        return await self._management_call("update_server")

    async def update_s3(self, settings: S3Settings) -> str:
        """
        Tell the Enterprise server where to store images; return its
        message. Without S3 details, images are deleted after 24 hours.
        """
        data = await self._manage(
            _UPDATE_S3, s3_body(settings, key=self._key.value)
        )
        return decode_message(data)

    async def _management_call(self, name: str) -> str:
        data = await self._manage(
            _FLUX_KLEIN + name, key_body(self._key.value)
        )
        return decode_message(data)


def _user_agent() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return f"modelslab-async/{version('modelslab-async')}"
    except PackageNotFoundError:
        return "modelslab-async"
