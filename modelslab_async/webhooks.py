"""
A webhook receiver, so jobs finish when ModelsLab calls back.

ModelsLab's webhooks are unsigned and best-effort, and may come twice. So
each job gets its own callback URL with an unguessable token in the path, a
callback is believed only if its token and its ids match the job, and the
job keeps polling (from its ``eta`` plus a grace period) in case the
webhook never comes.

Run it embedded (``async with WebhookReceiver() as receiver``), behind a
tunnel (``public_url=``), inside your aiohttp app (:meth:`add_routes`), or
behind any framework (:meth:`dispatch`).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import secrets
import weakref

from typing import TYPE_CHECKING, Final, Literal, Self

import anyio
import attrs

from aiohttp import web

from . import _json
from ._converter import decode_job
from ._serving import serve
from .errors import ResponseDecodeError, WebhookError


if TYPE_CHECKING:
    from ._jobs import JobHandle
    from ._responses import JobResponse


__all__ = ["WebhookReceiver"]

log = logging.getLogger("modelslab_async")

DEFAULT_PATH: Final = "/modelslab/webhooks/"
#: Uncertain submits whose callbacks we keep listening for.
_MAX_ORPHANS: Final = 1000
_JSON_TYPES: Final = ("application/json", "text/json")


@attrs.define(eq=False)
class _Registration:
    """
    Strictly private: one job's callback URL and what arrived on it.
    """

    receiver: WebhookReceiver
    reg_id: str
    token: str
    track_id: str
    url: str
    _job: weakref.ref[JobHandle] | None = None
    _early: list[JobResponse] = attrs.Factory(list)
    # Made only when recovery waits: most jobs never need one.
    _arrived: asyncio.Event | None = None

    @property
    def grace(self) -> float:
        return self.receiver.grace

    @property
    def verify(self) -> bool:
        return self.receiver.verify == "fetch"

    async def first_payload(self, timeout: float) -> JobResponse | None:
        """
        The first valid payload, waiting up to *timeout* seconds for it
        (recovery of a job nobody attached).
        """
        if not self._early:
            self._arrived = asyncio.Event()
            with anyio.move_on_after(timeout):
                await self._arrived.wait()
        return self._early[0] if self._early else None

    def attach(self, job: JobHandle) -> None:
        self._job = weakref.ref(job)
        early, self._early = self._early, []
        for response in early:
            job._on_webhook(response)  # noqa: SLF001

    def deliver(self, response: JobResponse) -> bool:
        job = None if self._job is None else self._job()
        if job is None:
            if self._job is None and len(self._early) < 4:
                self._early.append(response)
                if self._arrived is not None:
                    self._arrived.set()
            return True
        return job._on_webhook(response)  # noqa: SLF001

    def close(self) -> None:
        self.receiver._retire(self)  # noqa: SLF001

    def orphan(self) -> None:
        """
        Keep listening with no job attached, for ``Client.recover``.
        """
        self.receiver._adopt(self)  # noqa: SLF001


class WebhookReceiver:
    """
    Receives ModelsLab's webhooks and hands each to its waiting job.

    Args:
        host: Interface to bind. Loopback unless you choose otherwise.
        port: Port to bind; 0 picks a free one.
        public_url: The URL ModelsLab should call, when it is not where we
            bind: a tunnel, a proxy, a load balancer, or your own app's
            route. Must lead to the route under *path*.
        serve: Start our own aiohttp server. ``False`` when you route
            requests to :meth:`add_routes` or :meth:`dispatch` yourself
            (then *public_url* is required).
        path: The URL path prefix the callbacks use.
        verify: ``"fetch"`` to confirm every webhook's result with a fetch
            before believing it.
        grace: Seconds after a job's ``eta`` before polling starts when no
            webhook has come.
        max_body_size: Larger bodies are refused with 413.
        remember: How many finished jobs' tokens to keep, so late and
            duplicate webhooks get a quiet 200.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        public_url: str | None = None,
        serve: bool = True,
        path: str = DEFAULT_PATH,
        verify: Literal["fetch"] | None = None,
        grace: float = 5.0,
        max_body_size: int = 1024 * 1024,
        remember: int = 10_000,
    ) -> None:
        if verify not in (None, "fetch"):
            raise WebhookError(
                f"verify must be None or 'fetch', not {verify!r}"
            )
        if not serve and public_url is None:
            raise WebhookError(
                "serve=False needs public_url: the URL your app routes to us"
            )
        self.host = host
        self.port = port
        self.path = "/" + path.strip("/") + "/"
        self.verify = verify
        self.grace = grace
        self.max_body_size = max_body_size
        self._public_url = public_url
        self._serve = serve
        self._remember = remember
        self._url: str | None = (
            None if public_url is None or serve else _with_slash(public_url)
        )
        self._runner: web.AppRunner | None = None
        self._starting = asyncio.Lock()
        self._live: dict[str, _Registration] = {}
        self._retired: collections.OrderedDict[str, str] = (
            collections.OrderedDict()
        )
        self._orphans: collections.deque[_Registration] = collections.deque()

    def __repr__(self) -> str:
        return f"<WebhookReceiver url={self._url!r} jobs={len(self._live)}>"

    @property
    def url(self) -> str:
        """
        The base URL callbacks go to.

        Raises:
            WebhookError: The receiver is not started yet.
        """
        if self._url is None:
            raise WebhookError("the receiver is not started; await start()")
        return self._url

    @property
    def is_ready(self) -> bool:
        """
        Whether callbacks can reach us, started or served by your app.
        """
        return self._url is not None

    async def start(self) -> Self:
        """
        Start the embedded server (idempotent) and return the receiver.
        """
        async with self._starting:
            if self._url is not None:
                return self
            self._runner, origin = await serve(
                self.app(), self.host, self.port
            )
            self._url = _with_slash(self._public_url or origin + self.path)
        return self

    async def aclose(self) -> None:
        """
        Stop the embedded server; waiting jobs fall back to polling.
        """
        runner, self._runner = self._runner, None
        if self._serve:
            self._url = None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- mounting --------------------------------------------------------

    def app(self) -> web.Application:
        """
        An aiohttp application with the callback route, to serve or to
        mount with ``app.add_subapp()``.
        """
        app = web.Application(client_max_size=self.max_body_size)
        self.add_routes(app)
        return app

    def add_routes(self, app: web.Application) -> None:
        """
        Add the callback route to your own aiohttp application.

        Its ``client_max_size`` decides when aiohttp answers 413 first.
        """
        app.router.add_post(self.path + "{reg_id}/{token}", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.dispatch(
            request.path, body, request.headers.get("Content-Type")
        )
        return web.Response(status=status)

    # --- the rules -------------------------------------------------------

    def dispatch(  # noqa: C901, PLR0911 (one return per HTTP answer)
        self, path: str, body: bytes, content_type: str | None = None
    ) -> int:
        """
        Judge one callback and return the HTTP status to answer with.

        Framework-neutral and synchronous: call it from any handler with
        the request's path, raw body and ``Content-Type``. It never waits,
        never raises for anything the sender did, and resolves at most the
        job the token belongs to.

        Returns:
            200 accepted, or a duplicate or late call for a finished job;
            400 not JSON, or ids that do not match the job; 404 unknown
            token; 413 too large; 415 not JSON by content type.
        """
        if len(body) > self.max_body_size:
            return 413
        parts = path.rstrip("/").rsplit("/", 2)
        if len(parts) != 3:
            return 404
        _, reg_id, token = parts
        registration = self._live.get(reg_id)
        if registration is None:
            retired = self._retired.get(reg_id)
            if retired is not None and hmac.compare_digest(retired, token):
                return 200
            return 404
        if not hmac.compare_digest(registration.token, token):
            return 404
        if content_type is not None and not _is_json(content_type):
            return 415
        try:
            response = decode_job(_json.loads(body))
        except (ValueError, RecursionError, ResponseDecodeError):
            return 400
        if response.track_id is not None and (
            response.track_id != registration.track_id
        ):
            return 400
        if response.id is None and response.track_id is None:
            return 400
        if not registration.deliver(response):
            return 400
        log.debug("webhook for job %s: %s", response.id, response.status.value)
        return 200

    # --- registrations ---------------------------------------------------

    def _register(self, track_id: str) -> _Registration:
        reg_id = secrets.token_hex(8)
        token = secrets.token_urlsafe(24)
        registration = _Registration(
            self,
            reg_id,
            token,
            track_id,
            f"{self.url}{reg_id}/{token}",
        )
        self._live[reg_id] = registration
        return registration

    def _retire(self, registration: _Registration) -> None:
        if self._live.pop(registration.reg_id, None) is None:
            return
        self._retired[registration.reg_id] = registration.token
        while len(self._retired) > self._remember:
            self._retired.popitem(last=False)

    def _adopt(self, registration: _Registration) -> None:
        # Bounded: a flapping network must not grow this without limit.
        self._orphans.append(registration)
        while len(self._orphans) > _MAX_ORPHANS:
            self._orphans.popleft().close()

    def _registration_for(self, track_id: str) -> _Registration | None:
        for registration in self._live.values():
            if registration.track_id == track_id:
                return registration
        return None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in _JSON_TYPES or media.endswith("+json")


def _with_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"
