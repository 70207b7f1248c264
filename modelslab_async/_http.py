"""
The one place that talks HTTP: JSON POSTs to the API and GETs of outputs.

Every aiohttp and asyncio exception is translated here, every answer is
mapped to a result or a typed error here, and retries happen here. The rule
for retries is the billing rule: a call that may have created a job is
never repeated; see :class:`~modelslab_async.RetryPolicy`.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time

from collections.abc import Callable
from typing import Any, Final

import aiohttp
import anyio
import attrs

from . import _json
from ._converter import error_details
from ._retry import RetryPolicy
from .errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ClientStateError,
    InsufficientCreditsError,
    ModelsLabError,
    NotFoundError,
    OutputError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    ResponseDecodeError,
    ServerError,
    TransportError,
)


__all__ = ["Transport"]

log = logging.getLogger("modelslab_async")

#: API bodies are small; base64 outputs inline in JSON are the big case.
API_BODY_LIMIT: Final = 64 * 1024 * 1024
_SNIPPET = 120
_JSON_BODY: Final = {"Content-Type": "application/json"}
#: Body statuses that mean the call worked, whatever the HTTP code says.
#: A tuple, not a set: a status may be any JSON value, even unhashable.
_GOOD_STATUSES: Final = ("success", "processing", "ok")


class _Refused(Exception):  # noqa: N818
    """
    Strictly private: the server provably did not take the request.
    """

    def __init__(
        self, error: ModelsLabError, retry_after: float | None = None
    ) -> None:
        self.error = error
        self.retry_after = retry_after


class _MaybeTaken(Exception):  # noqa: N818
    """
    Strictly private: the request may have reached the server.
    """

    def __init__(self, error: ModelsLabError) -> None:
        self.error = error


def _snippet(raw: bytes) -> str:
    text = raw[:_SNIPPET].decode("utf-8", "replace")
    return " ".join(text.split()) or "<empty body>"


def _retry_after_header(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_BY_HTTP_STATUS: Final[dict[int, type[APIError]]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientCreditsError,
    403: PermissionDeniedError,
    404: NotFoundError,
    429: RateLimitError,
}


def _classify(http_status: int, message: str | None) -> type[APIError]:
    if http_status >= 500:
        return ServerError
    if http_status in _BY_HTTP_STATUS:
        return _BY_HTTP_STATUS[http_status]
    # HTTP 200 with an error body: the message is all there is to go on.
    lowered = (message or "").lower()
    if "api key" in lowered or "apikey" in lowered:
        return AuthenticationError
    if "credit" in lowered:
        return InsufficientCreditsError
    return BadRequestError


@attrs.define
class Transport:
    """
    Strictly private: an aiohttp session plus the rules for using it.

    Args:
        session: The session; borrowed or owned, the client decides.
        base_url: The API root, ending in ``/``.
        retry: The retry policy.
        timeout: Per-request timeouts.
        redact: Scrubs the API key from text the server sent back.
        download_limit: Concurrent output downloads.
    """

    session: aiohttp.ClientSession
    base_url: str
    retry: RetryPolicy
    timeout: aiohttp.ClientTimeout
    redact: Callable[[str], str]
    download_limit: int = 8
    _downloads: asyncio.Semaphore = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._downloads = asyncio.Semaphore(self.download_limit)

    async def call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        idempotent: bool,
        job_body: bool = False,
        job_id: str | None = None,
        deadline: float | None = None,
        ambiguous: Callable[[ModelsLabError], ModelsLabError] | None = None,
    ) -> dict[str, Any]:
        """
        POST *body* as JSON to *path* and return the decoded JSON object.

        Args:
            idempotent: Whether repeating the call is harmless. If not, it
                is retried only after provable refusals.
            job_body: Whether an error body on HTTP 200 describes a job (a
                fetch of a failed job) rather than a refused call.
            job_id: For error messages.
            deadline: ``time.monotonic()`` after which no retry starts.
            ambiguous: Builds the error for a non-idempotent call that may
                have been taken.

        Raises:
            APIError: The server answered with an error.
            TransportError: No usable answer, after retries.
        """
        started = time.monotonic()
        attempt = failures = 0
        while True:
            attempt += 1
            try:
                return await self._post(path, body, job_body, job_id)
            except _Refused as refused:
                error, retry_after = refused.error, refused.retry_after
            except _MaybeTaken as maybe:
                error, retry_after = maybe.error, None
                if not idempotent:
                    if ambiguous is None:
                        raise error from error.__cause__
                    raise ambiguous(error) from error
            # "Queue full, come back later" is not a failure: only the
            # policy's timeout and the deadline bound how long we wait.
            if not isinstance(error, RateLimitError):
                failures += 1
            delay = self.retry.backoff(attempt, retry_after)
            if not self._may_retry(failures, started, delay, deadline):
                raise error from error.__cause__
            log.info(
                "retrying %s in %.2fs after %s (try %d)",
                path,
                delay,
                type(error).__name__,
                attempt + 1,
            )
            await anyio.sleep(delay)

    def _may_retry(
        self,
        failures: int,
        started: float,
        delay: float,
        deadline: float | None,
    ) -> bool:
        if failures >= self.retry.attempts:
            return False
        resume = time.monotonic() + delay
        if self.retry.timeout is not None and (
            resume - started > self.retry.timeout
        ):
            return False
        return deadline is None or resume < deadline

    async def _post(
        self,
        path: str,
        body: dict[str, Any],
        job_body: bool,
        job_id: str | None,
    ) -> dict[str, Any]:
        where: dict[str, Any] = {"endpoint": path, "job_id": job_id}
        try:
            async with self.session.post(
                self.base_url + path,
                data=_json.dumps(body),
                headers=_JSON_BODY,
                timeout=self.timeout,
            ) as response:
                raw = await _read(response, API_BODY_LIMIT)
                http_status = response.status
                retry_header = (
                    response.headers.get("Retry-After")
                    if http_status >= 400
                    else None
                )
        except _TooLarge as exc:
            raise _MaybeTaken(
                ServerError(f"answer over {exc.limit} bytes", **where)
            ) from None
        except Exception as exc:
            sent, error = self._translate(exc, where)
            error.__cause__ = exc
            raise (_MaybeTaken(error) if sent else _Refused(error)) from exc
        where["http_status"] = http_status
        return self._interpret(raw, retry_header, job_body, where)

    def _translate(
        self, exc: Exception, where: dict[str, Any]
    ) -> tuple[bool, ModelsLabError]:
        """
        Map an aiohttp/asyncio failure to ``(maybe_sent, error)``.
        """
        if self.session.closed:
            # Closed before or during the request (a retry, a wait for a
            # late file): aiohttp's own error varies by version, a bare
            # RuntimeError or, in 3.10, an AttributeError.
            msg = "the client was closed (or its borrowed session)"
            raise ClientStateError(msg) from exc
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            # Raised while connecting or waiting for the pool: nothing sent.
            return False, RequestTimeoutError("timed out connecting", **where)
        if isinstance(exc, aiohttp.ClientConnectorError):
            reason = self.redact(str(exc.os_error))
            return False, TransportError(f"cannot connect: {reason}", **where)
        if isinstance(exc, aiohttp.InvalidURL):
            raise TransportError(f"invalid URL: {exc}", **where) from exc
        if isinstance(exc, TimeoutError):
            return True, RequestTimeoutError(
                f"no answer within {self.timeout.total}s", **where
            )
        if isinstance(exc, aiohttp.ClientError | OSError):
            return True, TransportError(
                f"connection failed: {type(exc).__name__}", **where
            )
        raise exc

    def _interpret(
        self,
        raw: bytes,
        retry_header: str | None,
        job_body: bool,
        where: dict[str, Any],
    ) -> dict[str, Any]:
        http_status: int = where["http_status"]
        try:
            data = _json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            # An HTML page from a proxy, an empty or truncated body.
            snippet = self.redact(_snippet(raw))
            text = f"unreadable answer: {snippet!r}"
            if 400 <= http_status < 500:
                raise self._refusal(text, None, None, retry_header, where)
            unreadable = (
                ServerError if http_status >= 500 else ResponseDecodeError
            )
            raise _MaybeTaken(unreadable(text, snippet=snippet, **where))
        status = data.get("status")
        if status not in ("error", "failed") and (
            http_status < 400 or status in _GOOD_STATUSES
        ):
            # The body's status decides, whatever the HTTP code says.
            return data
        message, retry_after = error_details(data)
        text = self.redact(message or f"HTTP {http_status}")
        if http_status < 400 and retry_after is None:
            cls = _classify(http_status, message)
            if job_body and cls is BadRequestError:
                return data  # A job that failed: the caller reads it.
            raise cls(text, body=data, **where)
        raise self._refusal(text, data, retry_after, retry_header, where)

    @staticmethod
    def _refusal(
        text: str,
        data: dict[str, Any] | None,
        retry_after: float | None,
        retry_header: str | None,
        where: dict[str, Any],
    ) -> Exception:
        """
        The exception for an answer that refuses the call (HTTP >= 400).
        """
        http_status: int = where["http_status"]
        if http_status == 429 or retry_after is not None:
            if retry_after is None:
                retry_after = _retry_after_header(retry_header)
            error: APIError = RateLimitError(
                text, body=data, retry_after=retry_after, **where
            )
            return _Refused(error, retry_after)
        cls = _classify(http_status, text)
        error = cls(text, body=data, **where)
        if cls is ServerError:
            # A JSON error body is the API itself refusing (error-codes:
            # 500 "Please try again.", 503 "temporarily unavailable").
            return _Refused(error)
        return error

    async def download(
        self,
        url: str,
        *,
        limit: int,
        missing_until: float | None,
        decode: Callable[..., bytes],
    ) -> bytes:
        """
        GET an output and return what *decode* makes of its bytes.

        Never sends the API key: it lives only in JSON bodies to the API.

        Args:
            limit: The most bytes to accept.
            missing_until: ``time.monotonic()`` until which a 403/404 means
                "not there yet" (``future_links``) and is retried.
            decode: Turns ``(body, content_type=...)`` into the image, or
                raises :class:`~modelslab_async.errors.OutputError`; a body
                it refuses (an HTML error page, a cut-off file) is fetched
                again like any other transient failure.

        Raises:
            OutputError: The output could not be fetched or decoded.
        """
        started = time.monotonic()
        attempt = failures = 0
        while True:
            attempt += 1
            try:
                # The slot bounds transfers, not waits for late files.
                async with self._downloads:
                    return await self._get(url, limit, decode)
            except _NotYet as missing:
                delay = self.retry.backoff(min(attempt, 16))
                if missing_until is None or (
                    time.monotonic() + delay >= missing_until
                ):
                    raise missing.error from None
            except _Refused as failed:
                # As for the API: a 429 is not a failure, just a wait.
                if getattr(failed.error, "http_status", None) != 429:
                    failures += 1
                delay = self.retry.backoff(attempt, failed.retry_after)
                if not self._may_retry(failures, started, delay, None):
                    raise failed.error from failed.__cause__
            log.debug("retrying download in %.2fs", delay)
            await anyio.sleep(delay)

    async def _get(
        self, url: str, limit: int, decode: Callable[..., bytes]
    ) -> bytes:
        try:
            async with self.session.get(url, timeout=self.timeout) as response:
                http_status = response.status
                if http_status < 400:
                    raw = await _read(response, limit)
                    content_type = response.content_type
        except _TooLarge as exc:
            raise OutputError(
                f"output larger than {exc.limit} bytes", url=url
            ) from None
        except Exception as exc:
            _, error = self._translate(exc, {})
            failed = OutputError(f"download failed: {error}", url=url)
            failed.__cause__ = exc
            # Downloads are idempotent: every transport failure is retried.
            raise _Refused(failed) from exc
        if http_status < 400:
            try:
                return decode(raw, content_type=content_type)
            except OutputError as bad:
                bad.url = url
                raise _Refused(bad) from None
        error = OutputError(
            f"download failed with HTTP {http_status}",
            url=url,
            http_status=http_status,
        )
        if http_status in (403, 404):
            raise _NotYet(error)
        if http_status == 429 or http_status >= 500:
            raise _Refused(error)
        raise error


class _NotYet(Exception):  # noqa: N818
    """
    Strictly private: a 403/404 for an output that may not exist yet.
    """

    def __init__(self, error: OutputError) -> None:
        self.error = error


class _TooLarge(Exception):  # noqa: N818
    """
    Strictly private: a body over its size limit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit


async def _read(response: aiohttp.ClientResponse, limit: int) -> bytes:
    length = response.content_length
    if length is not None:
        if length > limit:
            raise _TooLarge(limit)
        return await response.read()
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        total += len(chunk)
        if total > limit:
            raise _TooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)
