"""
The one place that talks HTTP: JSON POSTs to the API and GETs of outputs.

It owns (or borrows) the aiohttp session, translates every aiohttp and
asyncio exception, maps every HTTP answer to data or a typed error, and
retries. What a body's ``status`` means is the converter's business; here
only HTTP-level facts count: the status code, the size, and whether the
request may have left us.

The rule for retries is the billing rule. A call that cannot bill (a fetch,
a download, ``system_details``) is retried on any transient failure. A
submit is retried only when the answer *proves* the server did not take it;
anything else raises :class:`~modelslab_async.errors.SubmitUncertainError`.
:data:`RULES` has one row per kind of answer, with its source.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import logging
import time
import urllib.request

from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import aiohttp
import anyio
import attrs
import yarl

from aiohttp import hdrs

from . import _json
from ._closing import Closing
from ._converter import Answer, read_answer
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
    SubmitUncertainError,
    TransportError,
)


__all__ = ["RULES", "Call", "Kind", "Requester", "api_error", "parse"]

log = logging.getLogger("modelslab_async")

_T = TypeVar("_T")

#: API bodies are small; base64 outputs inline in JSON are the big case.
API_BODY_LIMIT: Final = 64 * 1024 * 1024
#: Bodies larger than this are parsed on a worker thread: a 12 MB answer of
#: inline base64 takes ~40 ms to parse, which would stall the event loop.
PARSE_OFF_LOOP: Final = 1 << 20
_SNIPPET = 120
_JSON_BODY: Final = {"Content-Type": "application/json"}
#: No proxy: what most requests are sent with.
_DIRECT: Final[dict[str, Any]] = {}

#: How a call may be repeated: ``"idempotent"`` calls cannot bill; a
#: ``"submit"`` may create a paid job; a ``"once"`` call (restart the
#: server) must not run twice, but raises its own error when unsure.
Call = Literal["idempotent", "submit", "once"]


class Kind(enum.Enum):
    """
    Strictly private: the kinds of answer a call can get.
    """

    NOT_SENT = "the connection failed before the request left"
    LOST = "the connection failed or timed out after the request left"
    QUEUE_FULL = "HTTP 429, or a retry_after in a body of no 5xx but 503"
    UNAVAILABLE = "HTTP 503: the service is unavailable"
    SERVER_ERROR = "HTTP 500 or another 5xx"
    UNREADABLE = "HTTP < 400 with a body that is not a JSON object"
    REFUSED = "HTTP 4xx other than 429: the request itself was refused"


class _Do(enum.Enum):
    RETRY = "retry, counting a failed attempt"
    WAIT = "wait as asked and retry, not counting a failure"
    RAISE = "raise the error"
    UNCERTAIN = "raise SubmitUncertainError: a job may exist"


#: What to do with each kind of answer: (idempotent call, submit).
#:
#: - NOT_SENT: nothing reached the server (connection refused, DNS, a
#:   connect timeout), so even a submit is safe to repeat.
#: - LOST: the server may have taken the request and created the job.
#: - QUEUE_FULL: rate-limits.mdx and error-codes.mdx: "Rate limit exceeded.
#:   Maximum 5 queued requests allowed", with ``retry_after``: the 6th job
#:   "will be rejected". A refusal; we wait as asked.
#: - UNAVAILABLE: error-codes.mdx: 503 "The service is temporarily
#:   unavailable, usually due to high load or maintenance": the request was
#:   turned away before any processing.
#: - SERVER_ERROR: error-codes.mdx: 500 "An internal server error occurred
#:   during processing": processing had begun, so a job may exist, whatever
#:   the body says ("Internal server error. Please try again.") or asks
#:   (a ``retry_after``). 502 and 504 come from proxies after the request
#:   went through.
#: - UNREADABLE: the server answered, so it may have created the job.
#: - REFUSED: error-codes.mdx: 400 (bad parameters), 401 (key), 402
#:   (credits), 403 (plan): refused, and repeating cannot help.
RULES: Final[dict[Kind, tuple[_Do, _Do]]] = {
    Kind.NOT_SENT: (_Do.RETRY, _Do.RETRY),
    Kind.LOST: (_Do.RETRY, _Do.UNCERTAIN),
    Kind.QUEUE_FULL: (_Do.WAIT, _Do.WAIT),
    Kind.UNAVAILABLE: (_Do.RETRY, _Do.RETRY),
    Kind.SERVER_ERROR: (_Do.RETRY, _Do.UNCERTAIN),
    Kind.UNREADABLE: (_Do.RETRY, _Do.UNCERTAIN),
    Kind.REFUSED: (_Do.RAISE, _Do.RAISE),
}


class _Failed(Exception):  # noqa: N818
    """
    Strictly private: one attempt's failure, of a known kind.
    """

    def __init__(
        self,
        kind: Kind,
        error: ModelsLabError,
        retry_after: float | None = None,
    ) -> None:
        self.kind = kind
        self.error = error
        self.retry_after = retry_after


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


_BY_HTTP_STATUS: Final[dict[int, type[APIError]]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientCreditsError,
    403: PermissionDeniedError,
    404: NotFoundError,
    429: RateLimitError,
}
_BY_REASON: Final[dict[str, type[APIError]]] = {
    "auth": AuthenticationError,
    "credits": InsufficientCreditsError,
    "plan": PermissionDeniedError,
}


def api_error(
    http_status: int,
    answer: Answer,
    text: str,
    *,
    body: dict[str, Any] | None,
    **where: Any,
) -> APIError:
    """
    The typed error for an answer that refuses a call.

    The HTTP status decides when it is an error status; ModelsLab also
    answers errors with HTTP 200, and then the message is all there is.
    """
    if http_status >= 500:
        return ServerError(text, body=body, http_status=http_status, **where)
    cls = _BY_HTTP_STATUS.get(http_status)
    if cls is None:
        cls = _BY_REASON.get(answer.reason or "", BadRequestError)
    return cls(text, body=body, http_status=http_status, **where)


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


@attrs.define
class Requester:
    """
    Strictly private: an aiohttp session plus the rules for using it.

    Made inside the event loop with :meth:`open`; :meth:`aclose` closes an
    owned session and never a borrowed one.

    Args:
        session: The session.
        owned: Whether we made it (and so close it).
        base_url: The API root, ending in ``/``.
        retry: The retry policy.
        timeout: Seconds for each HTTP request.
        redact: Scrubs the API key from text the server sent back.
        closing: What closing the client ends.
        download_limit: Concurrent output downloads.
    """

    session: aiohttp.ClientSession
    owned: bool
    base_url: str
    retry: RetryPolicy
    timeout: aiohttp.ClientTimeout
    redact: Callable[[str], str]
    closing: Closing
    download_limit: int = 8
    #: The environment's proxies (``HTTP(S)_PROXY``), by URL scheme; empty
    #: when the environment is not trusted or the session is borrowed.
    proxies: dict[str, str] = attrs.Factory(dict)
    _downloads: asyncio.Semaphore = attrs.field(init=False)
    _routes: dict[str, dict[str, Any]] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self._downloads = asyncio.Semaphore(self.download_limit)

    def _via(self, url: str) -> dict[str, Any]:
        """
        The proxy settings for *url*: ``HTTP(S)_PROXY`` unless ``NO_PROXY``
        exempts its host, read once per origin.

        aiohttp's own ``trust_env`` reads the environment and ``.netrc`` in
        a worker thread on every request (two thread hops per call); the
        environment does not change under a running client.
        """
        if not self.proxies:
            return _DIRECT
        # "scheme://host:port": the part of a URL a proxy choice depends on,
        # without parsing the whole URL on every request.
        origin = url.split("/", 3)[:3]
        key = "/".join(origin)
        via = self._routes.get(key)
        if via is None:
            parts = urlsplit(key)
            proxy = self.proxies.get(parts.scheme)
            via = {}
            if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
                proxied = urlsplit(proxy)
                login, _, where = proxied.netloc.rpartition("@")
                via["proxy"] = proxied._replace(netloc=where).geturl()
                if login:
                    user, _, password = login.partition(":")
                    via["proxy_auth"] = aiohttp.BasicAuth(
                        unquote(user), unquote(password)
                    )
            self._routes[key] = via
        return via

    @classmethod
    def open(
        cls,
        *,
        session: aiohttp.ClientSession | None,
        user_agent: str,
        trust_env: bool,
        timeout: float,
        **settings: Any,
    ) -> Requester:
        """
        A requester on *session*, or on a session of our own.
        """
        client_timeout = aiohttp.ClientTimeout(
            total=timeout, connect=min(timeout, 10.0)
        )
        if session is not None:
            return cls(session, False, timeout=client_timeout, **settings)
        own = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": user_agent},
        )
        proxies = {
            scheme: url
            for scheme, url in urllib.request.getproxies().items()
            if scheme in ("http", "https")
        }
        return cls(
            own,
            True,
            timeout=client_timeout,
            proxies=proxies if trust_env else {},
            **settings,
        )

    async def aclose(self) -> None:
        """
        Close the session if it is ours.
        """
        if self.owned:
            await self.session.close()

    # --- the one retry loop ----------------------------------------------

    async def _retrying(
        self,
        attempt: Callable[[], Awaitable[_T]],
        call: Call,
        *,
        deadline: float | None = None,
        what: str = "",
    ) -> _T:
        """
        Run *attempt* until it succeeds or :data:`RULES` say stop.
        """
        started = time.monotonic()
        tries = failures = 0
        rule = 0 if call == "idempotent" else 1
        while True:
            tries += 1
            task = self.closing.enter()
            try:
                return await attempt()
            except asyncio.CancelledError as cancelled:
                closed = self.closing.closed_it(task, cancelled)
                if closed is not None:
                    raise closed from None
                raise
            except _Failed as failed:
                do = RULES[failed.kind][rule]
                error = failed.error
                if do is _Do.RAISE:
                    raise error from error.__cause__
                if do is _Do.UNCERTAIN:
                    if call == "once":
                        raise error from error.__cause__
                    reason = getattr(error, "message", None) or str(error)
                    raise SubmitUncertainError(
                        f"the submit may have created a job: {reason}",
                        endpoint=getattr(error, "endpoint", None),
                    ) from error
                if do is _Do.RETRY:
                    failures += 1
                delay = self.retry.backoff(tries, failed.retry_after)
            finally:
                self.closing.leave(task)
            if not self._may_retry(failures, started, delay, deadline):
                raise error from error.__cause__
            log.info(
                "retrying %s in %.2fs after %s (try %d)",
                what,
                delay,
                type(error).__name__,
                tries + 1,
            )
            await self.closing.sleep(delay)

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

    # --- API calls -------------------------------------------------------

    async def call(
        self,
        path: str,
        body: dict[str, Any],
        call: Call,
        *,
        job_id: str | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """
        POST *body* as JSON to *path*; return the decoded JSON object.

        Answers the HTTP layer cannot judge (HTTP 200 with an error body)
        are returned too: what they mean depends on the call.

        Args:
            call: Whether repeating the call could bill twice.
            job_id: For error messages.
            deadline: ``time.monotonic()`` after which no retry starts.

        Raises:
            APIError: The server refused the call.
            SubmitUncertainError: A submit may have created a job.
            TransportError: No usable answer, after retries.
            ClientStateError: The client was closed.
        """
        where: dict[str, Any] = {"endpoint": path, "job_id": job_id}
        return await self._retrying(
            lambda: self._post(path, body, where),
            call,
            deadline=deadline,
            what=path,
        )

    async def _post(
        self, path: str, body: dict[str, Any], where: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            url = self.base_url + path
            async with self.session.post(
                url,
                data=_json.dumps(body),
                headers=_JSON_BODY,
                timeout=self.timeout,
                **self._via(url),
            ) as response:
                raw = await _read(response, API_BODY_LIMIT)
                http_status = response.status
                retry_header = (
                    response.headers.get("Retry-After")
                    if http_status >= 400
                    else None
                )
        except _TooLarge as exc:
            error = ServerError(f"answer over {exc.limit} bytes", **where)
            raise _Failed(Kind.UNREADABLE, error) from None
        except Exception as exc:
            raise self._failure(exc, where) from exc
        where["http_status"] = http_status
        return self._interpret(
            await _parse(raw), raw, http_status, retry_header, where
        )

    def _interpret(
        self,
        data: Any,
        raw: bytes,
        http_status: int,
        retry_header: str | None,
        where: dict[str, Any],
    ) -> dict[str, Any]:
        """
        The JSON object an answer carries, or the failure it means.
        """
        if not isinstance(data, dict):
            raise self._unreadable(raw, http_status, retry_header, where)
        answer = read_answer(data)
        if answer.ok or (http_status < 400 and answer.retry_after is None):
            # The body's status decides, whatever the HTTP code says; an
            # error body on HTTP 200 is for the caller to read.
            return data
        text = self.redact(answer.message or f"HTTP {http_status}")
        raise self._refused(
            http_status,
            answer,
            text,
            data=data,
            retry_header=retry_header,
            where=where,
        )

    def _failure(self, exc: Exception, where: dict[str, Any]) -> _Failed:
        """
        The failure an aiohttp/asyncio exception means, or raise it typed.
        """
        if self.session.closed:
            # Closed before or during the request (a retry, a wait for a
            # late file): aiohttp's own error varies by version, a bare
            # RuntimeError or, in 3.10, an AttributeError.
            msg = "the client was closed (or its borrowed session)"
            raise ClientStateError(msg) from exc
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            # Raised while connecting or waiting for the pool: nothing sent.
            error: ModelsLabError = RequestTimeoutError(
                "timed out connecting", **where
            )
            kind = Kind.NOT_SENT
        elif isinstance(exc, aiohttp.ClientConnectorError):
            reason = self.redact(str(exc.os_error))
            error = TransportError(f"cannot connect: {reason}", **where)
            kind = Kind.NOT_SENT
        elif isinstance(
            exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError
        ):
            raise TransportError(f"invalid URL: {exc}", **where) from exc
        elif isinstance(exc, TimeoutError):
            error = RequestTimeoutError(
                f"no answer within {self.timeout.total}s", **where
            )
            kind = Kind.LOST
        elif isinstance(exc, aiohttp.ClientError | OSError):
            error = TransportError(
                f"connection failed: {type(exc).__name__}", **where
            )
            kind = Kind.LOST
        else:
            raise exc
        error.__cause__ = exc
        return _Failed(kind, error)

    def _unreadable(
        self,
        raw: bytes,
        http_status: int,
        retry_header: str | None,
        where: dict[str, Any],
    ) -> _Failed:
        """
        The failure of a body that is no JSON object: an HTML page from a
        proxy, an empty or truncated body.
        """
        snippet = self.redact(_snippet(raw))
        text = f"unreadable answer: {snippet!r}"
        if http_status >= 400:
            empty = Answer(None, None, None, None)
            return self._refused(
                http_status,
                empty,
                text,
                data=None,
                retry_header=retry_header,
                where=where,
                snippet=snippet,
            )
        error = ResponseDecodeError(text, snippet=snippet, **where)
        return _Failed(Kind.UNREADABLE, error)

    @staticmethod
    def _refused(
        http_status: int,
        answer: Answer,
        text: str,
        *,
        data: dict[str, Any] | None,
        retry_header: str | None,
        where: dict[str, Any],
        snippet: str | None = None,
    ) -> _Failed:
        """
        The failure of an error answer: an error status, or a retry_after.
        """
        where = {k: v for k, v in where.items() if k != "http_status"}
        if http_status >= 500 and http_status != 503:
            # Judged before any retry_after: a 500 (or a proxy's 502, 504)
            # came after the request went through, so a submit may have
            # made a job whatever the body asks for. Only the wait of an
            # idempotent call follows the body.
            error: APIError = ServerError(
                text,
                snippet=snippet,
                body=data,
                http_status=http_status,
                **where,
            )
            return _Failed(Kind.SERVER_ERROR, error, answer.retry_after)
        if http_status == 429 or answer.retry_after is not None:
            retry_after = answer.retry_after
            if retry_after is None:
                retry_after = _retry_after_header(retry_header)
            error = RateLimitError(
                text,
                body=data,
                retry_after=retry_after,
                http_status=http_status,
                **where,
            )
            return _Failed(Kind.QUEUE_FULL, error, retry_after)
        error = api_error(http_status, answer, text, body=data, **where)
        if isinstance(error, ServerError):  # a 503: turned away unprocessed
            error.snippet = snippet
            return _Failed(Kind.UNAVAILABLE, error)
        return _Failed(Kind.REFUSED, error)

    # --- outputs ---------------------------------------------------------

    def _cannot(self, url: str, reason: str) -> str:
        """
        The message of a download that can never work, naming *url*.
        """
        return self.redact(f"cannot download {url!r}: {reason}")

    def _download_failure(self, exc: Exception, url: str) -> Exception:
        """
        What an exception while downloading *url* means: a failure to
        retry when the connection is to blame, else an
        :class:`~modelslab_async.errors.OutputError` to raise at once.
        """
        try:
            failed = self._failure(exc, {})
        except ClientStateError:
            raise
        except Exception:  # noqa: BLE001 (typed below, whatever it was)
            # Not the network's doing: aiohttp refused the URL, or failed
            # on it (a host IDNA cannot encode). Trying again cannot help.
            reason = type(exc).__name__
            if str(exc):
                reason += f": {exc}"
            error = OutputError(self._cannot(url, reason), url=url)
            error.__cause__ = exc
            return error
        error = OutputError(f"download failed: {failed.error}", url=url)
        error.__cause__ = exc
        # Downloads are idempotent: every transport failure is retried.
        return _Failed(Kind.NOT_SENT, error)

    async def download(
        self,
        url: str,
        *,
        limit: int,
        missing_until: float | None,
        decode: Callable[[bytes, str | None], Awaitable[bytes]],
    ) -> bytes:
        """
        GET an output and return what *decode* makes of its bytes.

        Never sends the API key: it lives only in JSON bodies to the API.

        Args:
            limit: The most bytes to accept.
            missing_until: ``time.monotonic()`` until which a 403/404 means
                "not there yet" (``future_links``) and is retried.
            decode: Turns ``(body, content_type)`` into the image, or raises
                :class:`~modelslab_async.errors.OutputError`; a body it
                refuses (an HTML error page, a cut-off file) is fetched
                again like any other transient failure.

        Raises:
            OutputError: The output could not be fetched or decoded.
            ClientStateError: The client was closed.
        """
        target = _fetchable(url)
        if isinstance(target, str):
            raise OutputError(self._cannot(url, target), url=url)
        missing = 0
        while True:
            try:
                return await self._retrying(
                    lambda: self._get(target, url, limit, decode),
                    "idempotent",
                    what="download",
                )
            except _NotYet as not_yet:
                missing += 1
                delay = self.retry.backoff(min(missing, 16))
                if missing_until is None or (
                    time.monotonic() + delay >= missing_until
                ):
                    raise not_yet.error from None
            log.debug("output not there yet; again in %.2fs", delay)
            await self.closing.sleep(delay)

    async def _get(
        self,
        target: yarl.URL,
        url: str,
        limit: int,
        decode: Callable[[bytes, str | None], Awaitable[bytes]],
    ) -> bytes:
        try:
            # The slot bounds transfers, not waits for late files.
            async with (
                self._downloads,
                self.session.get(
                    target, timeout=self.timeout, **self._via(url)
                ) as response,
            ):
                http_status = response.status
                if http_status < 400:
                    raw = await _read(response, limit)
                    content_type = response.content_type
        except _TooLarge as exc:
            raise OutputError(
                f"output larger than {exc.limit} bytes", url=url
            ) from None
        except Exception as exc:
            raise self._download_failure(exc, url) from exc
        if http_status < 400:
            try:
                return await decode(raw, content_type)
            except OutputError as bad:
                bad.url = url
                raise _Failed(Kind.UNREADABLE, bad) from None
        error = OutputError(
            f"download failed with HTTP {http_status}",
            url=url,
            http_status=http_status,
        )
        if http_status in (403, 404):
            raise _NotYet(error)
        if http_status == 429:
            raise _Failed(Kind.QUEUE_FULL, error)
        if http_status >= 500:
            raise _Failed(Kind.SERVER_ERROR, error)
        raise error


async def _read(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """
    The body of *response*, decoded, or :class:`_TooLarge` past *limit*
    bytes of it.

    ``Content-Length`` counts what is sent, so it refuses early but proves
    nothing about a compressed body: 20 KB of gzip can hold 20 MiB. Only a
    body sent as it is (the usual API answer) is read at once.
    """
    length = response.content_length
    if length is not None:
        if length > limit:
            raise _TooLarge(limit)
        if hdrs.CONTENT_ENCODING not in response.headers:
            return await response.read()
    # Compressed, or of unknown length: count what comes out, and stop
    # reading as soon as it is too much.
    chunks: list[bytes] = []
    total = 0
    content = response.content
    while chunk := await content.readany():
        total += len(chunk)
        if total > limit:
            raise _TooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _fetchable(url: str) -> yarl.URL | str:
    """
    *url* parsed, or why no download from it can work.
    """
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    if parsed.scheme not in ("http", "https"):
        return "not an http(s) URL"
    if not parsed.raw_host:
        return "no host"
    return parsed


def parse(raw: bytes) -> Any:
    """
    The JSON value of *raw*, or ``None`` if it is not JSON.
    """
    try:
        return _json.loads(raw)
    except (ValueError, RecursionError):
        return None


async def _parse(raw: bytes) -> Any:
    """
    :func:`parse`, with big bodies off the event loop.
    """
    if len(raw) > PARSE_OFF_LOOP:
        return await anyio.to_thread.run_sync(parse, raw)
    return parse(raw)
