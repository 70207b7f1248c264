"""
Everything :mod:`modelslab_async` raises on purpose.

All errors derive from :class:`ModelsLabError`; no ``aiohttp`` or
``asyncio`` exception escapes a public call. The hierarchy::

    ModelsLabError
    ├── InvalidRequestError (ValueError)   bad input, raised before sending
    ├── ClientStateError (RuntimeError)    closed client, foreign event loop
    ├── TransportError                     no usable answer came back
    │   └── RequestTimeoutError            ... because a timeout expired
    ├── SubmitUncertainError               a submit may have created a job
    ├── APIError                           the server answered with an error
    │   ├── BadRequestError                400, or a refused request body
    │   ├── AuthenticationError            401, invalid or missing key
    │   ├── InsufficientCreditsError       402
    │   ├── PermissionDeniedError          403, feature not in the plan
    │   ├── NotFoundError                  404, unknown job or route
    │   ├── RateLimitError                 429, queue full (``retry_after``)
    │   └── ServerError                    5xx, or a body nobody can read
    │       └── ResponseDecodeError        body is not the JSON we expect
    ├── JobError                           a job did not give a result
    │   ├── GenerationFailedError          it ended in ``error``/``failed``
    │   └── JobTimeoutError                the deadline passed first
    ├── OutputError                        an image could not be fetched/read
    ├── StoreError                         a job store failed or holds junk
    │   └── StoreUnavailableError          ... because it cannot be reached
    └── WebhookError                       a webhook receiver was misused

Errors carry what is known: the endpoint, the HTTP status, the job id and
the server's message. They never carry the API key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict, Unpack


if TYPE_CHECKING:
    from ._jobs import JobHandle


__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "ClientStateError",
    "GenerationFailedError",
    "InsufficientCreditsError",
    "InvalidRequestError",
    "JobError",
    "JobTimeoutError",
    "ModelsLabError",
    "ModelsLabWarning",
    "NotFoundError",
    "OutputError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "ResponseDecodeError",
    "ServerError",
    "StoreError",
    "StoreUnavailableError",
    "SubmitUncertainError",
    "TransportError",
    "WebhookError",
]


class ModelsLabWarning(UserWarning):
    """
    Warned when something is valid but will not do what it says.

    No request warns any more (a value past a documented limit is refused
    instead); kept so that code filtering it keeps working.
    """


class ModelsLabError(Exception):
    """
    The root of every error this library raises.
    """


class InvalidRequestError(ModelsLabError, ValueError):
    """
    Raised when building a request with a value outside a documented limit.

    Raised at construction, so no request is ever sent with it.

    Attributes:
        field: The request field, e.g. ``"width"``.
        value: The rejected value.
        limit: The documented limit, in words.
    """

    def __init__(
        self, field: str = "", value: object = None, limit: str = ""
    ) -> None:
        self.field = field
        self.value = value
        self.limit = limit
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field}={shown} is invalid: {limit}")


class ClientStateError(ModelsLabError, RuntimeError):
    """
    Raised when a client is used after
    :meth:`~modelslab_async.Client.aclose` or from an
    event loop other than the one it was opened in.
    """


class _LocatedError(ModelsLabError):
    """
    Strictly private: the context every network-facing error carries.
    """

    def __init__(
        self,
        message: str = "",
        *,
        endpoint: str | None = None,
        http_status: int | None = None,
        job_id: str | None = None,
    ) -> None:
        self.message = message
        self.endpoint = endpoint
        self.http_status = http_status
        self.job_id = job_id
        super().__init__(message)

    def __str__(self) -> str:
        where = [
            f"{name}={value}"
            for name, value in (
                ("endpoint", self.endpoint),
                ("http_status", self.http_status),
                ("job_id", self.job_id),
            )
            if value is not None
        ]
        if not where:
            return self.message
        return f"{self.message} ({', '.join(where)})"


class TransportError(_LocatedError):
    """
    Raised when no usable answer came back: connection refused or reset,
    DNS failure, TLS failure. Retried for fetches and downloads.
    """


class RequestTimeoutError(TransportError):
    """
    Raised when a single HTTP request took longer than the client's
    ``timeout``. Deliberately not a subclass of the builtin
    :class:`TimeoutError`, which :mod:`anyio` raises for cancel scopes.
    """


class SubmitUncertainError(_LocatedError):
    """
    Raised when a submit failed after its body may have reached the server.

    The job may exist and be billed, so it is never retried automatically.
    Reconcile with :attr:`track_id`: it comes back in the job's webhook, and
    :meth:`Client.recover <modelslab_async.Client.recover>` waits for it.

    Attributes:
        track_id: The ``track_id`` sent with the request.
        request: The request that was being submitted.
    """

    def __init__(
        self,
        message: str = "",
        *,
        endpoint: str | None = None,
        track_id: str | None = None,
        request: object = None,
    ) -> None:
        super().__init__(message, endpoint=endpoint)
        self.track_id = track_id
        self.request = request

    def __str__(self) -> str:
        return f"{super().__str__()} (track_id={self.track_id})"


class APIError(_LocatedError):
    """
    Raised when the server answered with ``"status": "error"`` or an HTTP
    error status. The body's ``status`` decides, whatever the HTTP code.

    Attributes:
        body: The decoded JSON body, if there was one.
    """

    def __init__(
        self,
        message: str = "",
        *,
        endpoint: str | None = None,
        http_status: int | None = None,
        job_id: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            message, endpoint=endpoint, http_status=http_status, job_id=job_id
        )
        self.body = body


class _Answer(TypedDict, total=False):
    """
    Strictly private: the context of an APIError, for its subclasses.
    """

    endpoint: str | None
    http_status: int | None
    job_id: str | None
    body: dict[str, Any] | None


class BadRequestError(APIError):
    """
    Raised for HTTP 400 or an error body that refuses the request's fields.
    """


class AuthenticationError(APIError):
    """
    Raised for HTTP 401: the API key is invalid, revoked or missing.
    """


class InsufficientCreditsError(APIError):
    """
    Raised for HTTP 402: the account has no credits left.
    """


class PermissionDeniedError(APIError):
    """
    Raised for HTTP 403: the feature is not in the account's plan.
    """


class NotFoundError(APIError):
    """
    Raised for HTTP 404: unknown job id, model or route.
    """


class RateLimitError(APIError):
    """
    Raised for HTTP 429: the account's queue is full.

    Submits that get it are retried after :attr:`retry_after`; this error
    reaches you only when the retry budget or the deadline ran out.

    Attributes:
        retry_after: Seconds the server asked us to wait, if it said.
    """

    def __init__(
        self,
        message: str = "",
        *,
        retry_after: float | None = None,
        **context: Unpack[_Answer],
    ) -> None:
        super().__init__(message, **context)
        self.retry_after = retry_after


class ServerError(APIError):
    """
    Raised for HTTP 5xx and for answers nobody can read (an HTML page from a
    proxy, an empty or truncated body). :attr:`snippet` shows the start.

    Attributes:
        snippet: The first characters of an unreadable body, or ``None``.
    """

    def __init__(
        self,
        message: str = "",
        *,
        snippet: str | None = None,
        **context: Unpack[_Answer],
    ) -> None:
        super().__init__(message, **context)
        self.snippet = snippet


class ResponseDecodeError(ServerError):
    """
    Raised when a body is not JSON, or is JSON of a shape no documented
    response has (say, ``"status": "banana"``).
    """


class JobError(ModelsLabError):
    """
    Raised when a job did not give a result.

    Attributes:
        job: The :class:`~modelslab_async.JobHandle`; ``job.id`` re-attaches
            with :meth:`Client.fetch <modelslab_async.Client.fetch>`.
    """

    def __init__(
        self, message: str = "", *, job: JobHandle | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.job = job

    @property
    def job_id(self) -> str | None:
        """
        The job's id, if the server gave one.
        """
        return None if self.job is None else self.job.id


class GenerationFailedError(JobError):
    """
    Raised when the server reports the job as ``error`` or ``failed``.
    """


class JobTimeoutError(JobError):
    """
    Raised when :meth:`JobHandle.wait <modelslab_async.JobHandle.wait>` ran
    out of time. The job may still finish on the server: its id is on
    :attr:`~modelslab_async.errors.JobError.job`, and :attr:`last_status`
    says what it was doing.

    Attributes:
        timeout: The deadline that passed, in seconds.
        last_status: The last status seen, e.g. ``JobStatus.PROCESSING``.
    """

    def __init__(
        self,
        message: str = "",
        *,
        job: JobHandle | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(message, job=job)
        self.timeout = timeout
        self.last_status = None if job is None else job.status


class OutputError(ModelsLabError):
    """
    Raised when an output image cannot be downloaded, decoded or saved.

    Attributes:
        url: The output's URL (never carries the API key).
        http_status: The CDN's HTTP status, if it answered.
    """

    def __init__(
        self,
        message: str = "",
        *,
        url: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        self.http_status = http_status


class StoreError(ModelsLabError):
    """
    Raised when a job store (the journal) fails: a record it holds cannot be
    read, or a write did not happen. The API key is never in a store, so it
    is never in this error either.
    """


class StoreUnavailableError(StoreError):
    """
    Raised when a shared store cannot be reached for longer than its
    timeout. Admission fails closed: no submit is sent without the shared
    queue cap, and jobs already submitted keep waiting by polling.
    """


class WebhookError(ModelsLabError):
    """
    Raised when a webhook receiver is misused, e.g. used before it has a
    public URL.
    """
