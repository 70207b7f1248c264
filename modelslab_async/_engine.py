"""
The engine: the key, the HTTP transport, and one method per API call.

Strictly private. The public :class:`~modelslab_async.Client` is a façade
over it; job handles, outputs and the job tracker use its public methods,
never the client's. It knows where each request goes (the request's
route), how to read what comes back (the converter), and the billing rule
for submits; it keeps no job state.
"""

from __future__ import annotations

import hashlib
import logging

from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp
import attrs

from ._closing import Closing
from ._converter import (
    decode_job,
    decode_message,
    decode_system_details,
    key_body,
    read_answer,
    request_body,
    s3_body,
)
from ._http import Call, Requester, api_error
from ._requests import JobRequest, S3Settings
from ._responses import JobResponse, JobStatus, SystemDetails
from ._retry import RetryPolicy
from ._routes import FLUX_KLEIN_MANAGEMENT, UPDATE_S3
from .errors import (
    AuthenticationError,
    ClientStateError,
    InsufficientCreditsError,
    PermissionDeniedError,
    ResponseDecodeError,
    SubmitUncertainError,
)


__all__ = ["Engine", "Secret"]

log = logging.getLogger("modelslab_async")

_REDACT_FROM: Final = 6
#: Reasons an error body on HTTP 200 refuses the call itself, rather than
#: describing a job that failed.
_REFUSALS: Final = (
    AuthenticationError,
    InsufficientCreditsError,
    PermissionDeniedError,
)


class Secret:
    """
    Strictly private: a string that never shows itself.
    """

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<secret>"

    def redact(self, text: str) -> str:
        """
        *text* with the secret replaced by ``<secret>``.
        """
        # A key of a few characters would mangle every message it occurs
        # in by chance; real keys are long.
        if len(self.value) < _REDACT_FROM:
            return text
        return text.replace(self.value, "<secret>")


def _user_agent() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return f"modelslab-async/{version('modelslab-async')}"
    except PackageNotFoundError:
        return "modelslab-async"


@attrs.define(eq=False)
class Engine:
    """
    Strictly private: talks to the API for one client.

    The HTTP session is made on first use, inside the event loop.
    """

    key: Secret
    base_url: str
    timeout: float
    retry: RetryPolicy
    session: aiohttp.ClientSession | None = None
    trust_env: bool = True
    download_concurrency: int = 8
    max_output_bytes: int = 64 * 1024 * 1024
    decode: Callable[[bytes, str | None], Awaitable[bytes]] | None = None
    closing: Closing = attrs.Factory(Closing)
    _requester: Requester | None = attrs.field(init=False, default=None)

    @property
    def requester(self) -> Requester:
        """
        The transport, opened on first use.

        Raises:
            ClientStateError: The client is closed.
        """
        if self._requester is None:
            self.closing.check()
            self._requester = Requester.open(
                session=self.session,
                user_agent=_user_agent(),
                trust_env=self.trust_env,
                timeout=self.timeout,
                base_url=self.base_url,
                retry=self.retry,
                redact=self.key.redact,
                closing=self.closing,
                download_limit=self.download_concurrency,
            )
        return self._requester

    async def aclose(self) -> None:
        """
        End every sleep and call in flight, and close an owned session.
        """
        self.closing.close()
        if self._requester is not None:
            await self._requester.aclose()

    # --- jobs --------------------------------------------------------------

    async def submit(
        self,
        request: JobRequest,
        *,
        track_id: str,
        webhook_url: str | None,
    ) -> JobResponse:
        """
        POST a job once and read the answer; raise unless a job exists.

        Raises:
            SubmitUncertainError: The job may or may not exist.
            APIError: The server refused the job.
            TransportError: The server could not be reached.
        """
        route = request.route.submit
        body = request_body(
            request, key=self.key.value, track_id=track_id, webhook=webhook_url
        )
        try:
            data = await self.requester.call(route, body, "submit")
            response = decode_job(data)
            if response.id is None and not response.status.is_finished:
                msg = "the server queued the job but gave no id"
                raise ResponseDecodeError(msg, endpoint=route)
        except SubmitUncertainError as error:
            error.track_id, error.request = track_id, request
            raise
        except ResponseDecodeError as error:
            raise SubmitUncertainError(
                f"the submit may have created a job: {error.message}",
                endpoint=route,
                track_id=track_id,
                request=request,
            ) from error
        if (
            response.status.is_finished
            and response.id is None
            and (response.status is not JobStatus.SUCCESS)
        ):
            # An error body on HTTP 200 without a job: a refusal.
            answer = read_answer(data)
            text = self.key.redact(response.message or "refused")
            raise api_error(200, answer, text, body=data, endpoint=route)
        return response

    async def fetch(
        self, fetch_path: str, job_id: str, *, deadline: float | None = None
    ) -> JobResponse:
        """
        Ask the fetch endpoint about a job once (with retries).

        Raises:
            APIError: The fetch was refused (not found, bad key, ...).
            TransportError: No answer, after retries.
        """
        path = fetch_path + job_id
        data = await self.requester.call(
            path,
            key_body(self.key.value),
            "idempotent",
            job_id=job_id,
            deadline=deadline,
        )
        answer = read_answer(data)
        if answer.ok is False:
            error = api_error(
                200,
                answer,
                self.key.redact(answer.message or "refused"),
                body=data,
                endpoint=path,
                job_id=job_id,
            )
            if isinstance(error, _REFUSALS):
                raise error
            # Otherwise the error body describes the job: it failed.
        try:
            return decode_job(data, job_id)
        except ResponseDecodeError as exc:
            exc.endpoint, exc.job_id = path, job_id
            raise

    async def download(
        self, url: str, *, missing_until: float | None
    ) -> bytes:
        """
        An output's image bytes, base64 decoded; never sends the key.

        Raises:
            OutputError: It could not be fetched or decoded.
        """
        decode = self.decode
        if decode is None:
            msg = "this client cannot decode outputs"
            raise ClientStateError(msg)
        return await self.requester.download(
            url,
            limit=self.max_output_bytes,
            missing_until=missing_until,
            decode=decode,
        )

    # --- Enterprise server management ------------------------------------

    async def _manage(
        self, path: str, body: dict[str, Any], call: Call
    ) -> dict[str, Any]:
        data = await self.requester.call(path, body, call)
        answer = read_answer(data)
        if answer.ok is False:
            text = self.key.redact(answer.message or "refused")
            raise api_error(200, answer, text, body=data, endpoint=path)
        return data

    async def system_details(self) -> SystemDetails:
        """
        The Flux Klein server's ``system_details``.
        """
        path = FLUX_KLEIN_MANAGEMENT + "system_details"
        data = await self._manage(path, key_body(self.key.value), "idempotent")
        return decode_system_details(data)

    async def management_call(self, name: str) -> str:
        """
        A Flux Klein management call that takes only the key; its message.
        """
        path = FLUX_KLEIN_MANAGEMENT + name
        data = await self._manage(path, key_body(self.key.value), "once")
        return decode_message(data)

    async def update_s3(self, settings: S3Settings) -> str:
        """
        ``update_s3``; its message.
        """
        body = s3_body(settings, key=self.key.value)
        return decode_message(await self._manage(UPDATE_S3, body, "once"))


def account_of(key: Secret) -> str:
    """
    The account id stores see: a hash of the key, never the key.
    """
    digest = hashlib.sha256(b"modelslab-async account\0" + key.value.encode())
    return digest.hexdigest()[:32]
