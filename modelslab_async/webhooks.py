"""
A webhook receiver, so jobs finish when ModelsLab calls back.

ModelsLab's webhooks are unsigned and best-effort, and may come twice. So
each job gets its own callback URL with an unguessable token in the path, a
callback is believed only if its token and its ids match the job, and the
job keeps polling (from its ``eta`` plus a grace period) in case the
webhook never comes.

The receiver is a mailbox: it finds the job a callback belongs to and hands
the payload to whoever subscribed to it, knowing nothing of job handles.
Only a hash of each token is kept, so a receiver started after a restart, or
on another replica, checks a callback against the client's journal.

Run it embedded (``async with WebhookReceiver() as receiver``), behind a
tunnel (``public_url=``), inside your aiohttp app (:meth:`add_routes`), or
behind any framework (:meth:`receive`, or :meth:`dispatch`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets

from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Literal, Self

import attrs

from aiohttp import web

from . import _json
from ._converter import decode_job
from ._serving import QuietLog, serve
from ._state import JobState, hash_token, token_matches, with_outcome
from .errors import ResponseDecodeError, WebhookError


if TYPE_CHECKING:
    from ._responses import JobResponse
    from .stores import Journal


__all__ = ["Registration", "WebhookReceiver"]

log = logging.getLogger("modelslab_async")

DEFAULT_PATH: Final = "/modelslab/webhooks/"
#: Payloads kept for a job whose handle does not exist yet (a webhook that
#: beats the submit's answer).
_EARLY: Final = 4
_JSON_TYPES: Final = ("application/json", "text/json")
_CLOSE: Final = {"Connection": "close"}

#: A subscriber: takes a payload, says whether it was for its job.
Deliver = Callable[["JobResponse"], bool]


@attrs.define(eq=False)
class Registration:
    """
    One job's callback URL, and the mailbox behind it.

    Made by :meth:`WebhookReceiver.register` for the client; you never make
    one yourself.

    Attributes:
        webhook_id: The registration id in the URL.
        token_hash: SHA-256 (hex) of the URL's token.
        track_id: The job's ``track_id``.
        url: The callback URL (``None`` for a job registered again after a
            restart: its URL was sent long ago).
    """

    webhook_id: str
    token_hash: str
    track_id: str
    url: str | None = None
    _deliver: Deliver | None = None
    _early: list[JobResponse] = attrs.Factory(list)

    def subscribe(self, deliver: Deliver) -> None:
        """
        Hand every payload to *deliver*, those that came first included.
        """
        self._deliver = deliver
        early, self._early = self._early, []
        for response in early:
            deliver(response)

    def put(self, response: JobResponse) -> bool:
        """
        Deliver *response*, or keep it for the subscriber to come.
        """
        if self._deliver is None:
            if len(self._early) < _EARLY:
                self._early.append(response)
            return True
        return self._deliver(response)


class WebhookReceiver:
    """
    Receives ModelsLab's webhooks and hands each to its waiting job.

    Args:
        host: Interface to bind. Loopback unless you choose otherwise.
        port: Port to bind; 0 picks a free one. Behind a tunnel or a load
            balancer, pick a fixed one, and the same after a restart.
        public_url: The URL ModelsLab should call, when it is not where we
            bind: a tunnel, a proxy, a load balancer, or your own app's
            route. Must lead to the route under *path*.
        serve: Start our own aiohttp server. ``False`` when you route
            requests to :meth:`add_routes` or :meth:`receive` yourself, or
            when other replicas serve the callbacks (then *public_url* is
            required).
        path: The URL path prefix the callbacks use.
        verify: ``"fetch"`` to confirm every webhook's result with a fetch
            before believing it.
        grace: Seconds after a job's ``eta`` before polling starts when no
            webhook has come.
        max_body_size: Larger bodies are refused with 413.
        body_timeout: Seconds a sender may take to send a body; slower
            ones get 408, so a dribbling sender holds nothing for long.
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
        body_timeout: float = 10.0,
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
        self.body_timeout = body_timeout
        self._public_url = public_url
        self._serve = serve
        self._remember = remember
        self._url: str | None = (
            None if public_url is None or serve else _with_slash(public_url)
        )
        self._runner: web.AppRunner | None = None
        self._starting = asyncio.Lock()
        self._live: dict[str, Registration] = {}
        self._retired: collections.OrderedDict[str, str] = (
            collections.OrderedDict()
        )
        self._journal: Journal | None = None

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
                self.app(),
                self.host,
                self.port,
                # A sender that hangs up cancels its handler; closing waits
                # for no straggler longer than a second.
                handler_cancellation=True,
                shutdown_timeout=1.0,
                lingering_time=0,
                # What senders do to us (garbage, a negative length, a
                # hang-up) is one debug line each, never a traceback.
                logger=QuietLog(logging.getLogger(f"{log.name}.http"), {}),
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
        try:
            return await self._answer(request)
        except Exception as exc:  # noqa: BLE001 (answered, and logged once)
            _failed("webhook handling failed", exc)
            return web.Response(status=503, headers=_CLOSE)

    async def _answer(self, request: web.Request) -> web.Response:
        # Path, token and content type are judged before a byte of the
        # body is read: a stranger costs us nothing but this.
        reg_id = request.match_info["reg_id"]
        token = request.match_info["token"]
        verdict, known = await self._judge(reg_id, token)
        status = _STATUS[verdict]
        content_type = request.headers.get("Content-Type")
        if status == 200 and content_type and not _is_json_type(content_type):
            status = 415
        if status != 200:
            # Refused unread: the connection cannot carry another request.
            return web.Response(status=status, headers=_CLOSE)
        # A token that checks out is a sender we know (a duplicate for a
        # finished job included): its bounded body is read, so a sender
        # that keeps its connection alive gets its 200, not a reset.
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await request.read()
        except TimeoutError:
            return web.Response(status=408, headers=_CLOSE)
        except web.HTTPRequestEntityTooLarge:
            return web.Response(status=413, headers=_CLOSE)
        except Exception:  # noqa: BLE001 (a bad gzip, a hang-up: the sender's)
            log.debug("unreadable webhook body for %s", reg_id)
            return web.Response(status=400, headers=_CLOSE)
        if verdict == "done":
            return web.Response(status=200)
        if known is None:
            status = self._deliver(self._live.get(reg_id), body)
        else:
            status = await self._record(known, body)
        return web.Response(status=status)

    # --- the rules -------------------------------------------------------

    def dispatch(
        self, path: str, body: bytes, content_type: str | None = None
    ) -> int:
        """
        Judge one callback and return the HTTP status to answer with.

        Framework-neutral and synchronous: call it from any handler with
        the request's path, raw body and ``Content-Type``. It never waits,
        never raises, and resolves at most the job the token belongs to.
        It knows the jobs of this process only; :meth:`receive` also checks
        the client's journal (jobs of an earlier run, or another replica).

        Returns:
            200 accepted, or a duplicate or late call for a finished job;
            400 not JSON, or ids that do not match the job; 404 unknown
            token; 413 too large; 415 not JSON by content type.
        """
        try:
            reg_id, token = _split(path)
            verdict = self._judge_here(reg_id, token)
            status = self._admit(verdict, body, content_type)
            if status != 200 or verdict == "done":
                return status
            return self._deliver(self._live.get(reg_id), body)
        except Exception:
            log.exception("webhook dispatch failed")
            return 400

    async def receive(
        self, path: str, body: bytes, content_type: str | None = None
    ) -> int:
        """
        Judge one callback, like :meth:`dispatch`, for any job in the
        client's journal: also those submitted before a restart or by
        another process on a shared store.

        Await it from any framework's handler (FastAPI, Starlette, ...).
        Returns the HTTP status to answer with, those of :meth:`dispatch`
        and 503 when the journal cannot be reached (or fails); never
        raises.
        """
        try:
            reg_id, token = _split(path)
            verdict, known = await self._judge(reg_id, token)
            status = self._admit(verdict, body, content_type)
            if status != 200 or verdict == "done":
                return status
            if known is None:
                return self._deliver(self._live.get(reg_id), body)
            return await self._record(known, body)
        except Exception as exc:  # noqa: BLE001 (answered, and logged once)
            _failed("webhook receive failed", exc)
            return 503

    def _admit(
        self, verdict: _Verdict, body: bytes, content_type: str | None
    ) -> int:
        status = _STATUS[verdict]
        if status != 200 or verdict == "done":
            return status
        if content_type is not None and not _is_json_type(content_type):
            return 415
        if len(body) > self.max_body_size:
            return 413
        return 200

    def _judge_here(self, reg_id: str, token: str) -> _Verdict:
        """
        Whose callback this is, among the jobs this process knows.
        """
        registration = self._live.get(reg_id)
        if registration is not None:
            if token_matches(token, registration.token_hash):
                return "live"
            return "unknown"
        retired = self._retired.get(reg_id)
        if retired is not None and token_matches(token, retired):
            return "done"
        return "unknown"

    async def _judge(
        self, reg_id: str, token: str
    ) -> tuple[_Verdict, _Known | None]:
        """
        :meth:`_judge_here`, then the journal; for a job only the journal
        knows, that journal and the job's state are returned, so the
        callback is recorded where it was judged even if the client
        unbinds the receiver meanwhile.
        """
        verdict = self._judge_here(reg_id, token)
        journal = self._journal
        if verdict != "unknown" or journal is None or (reg_id in self._live):
            return verdict, None
        try:
            state = await journal.find(reg_id)
        except Exception as exc:  # noqa: BLE001 (any store, any failure)
            # Neither believed nor refused: the sender may try again.
            _failed("webhook lookup failed", exc)
            return "unreachable", None
        if (
            state is None
            or state.token_hash is None
            or not token_matches(token, state.token_hash)
        ):
            return "unknown", None
        if state.phase.is_finished:
            return "done", None
        return "journal", (journal, state)

    def _read(self, body: bytes, track_id: str) -> JobResponse | None:
        """
        A payload for the job *track_id*, or ``None`` if it is not one.
        """
        try:
            response = decode_job(_json.loads(body))
        except (ValueError, RecursionError, ResponseDecodeError):
            return None
        if response.track_id is not None and response.track_id != track_id:
            return None
        if response.id is None and response.track_id is None:
            return None
        return response

    def _deliver(self, registration: Registration | None, body: bytes) -> int:
        if registration is None:  # retired while the body arrived
            return 200
        response = self._read(body, registration.track_id)
        if response is None or not registration.put(response):
            return 400
        log.debug("webhook for job %s: %s", response.id, response.status.value)
        return 200

    async def _record(self, known: _Known, body: bytes) -> int:
        """
        Take a callback for a job this process does not wait for: record
        its outcome in the journal it was found in, first writer wins; its
        watcher (after a restart, or on another replica) learns it from
        there.
        """
        journal, state = known
        response = self._read(body, state.track_id)
        if response is None or (
            response.id is not None
            and state.job_id is not None
            and response.id != state.job_id
        ):
            return 400
        if not response.status.is_finished or self.verify == "fetch":
            return 200  # Nothing to believe yet: its watcher polls.
        try:
            await journal.record(with_outcome(state, response))
        except Exception as exc:  # noqa: BLE001 (any store; closed, too)
            _failed("webhook outcome not recorded", exc)
            return 503  # The sender may try again.
        return 200

    # --- registrations (for the client) ----------------------------------

    def register(self, track_id: str) -> Registration:
        """
        A new callback URL for the job *track_id*. Used by the client.
        """
        reg_id = secrets.token_hex(8)
        token = secrets.token_urlsafe(24)
        registration = Registration(
            reg_id, hash_token(token), track_id, f"{self.url}{reg_id}/{token}"
        )
        self._live[reg_id] = registration
        return registration

    def watch(
        self, webhook_id: str, token_hash: str, track_id: str
    ) -> Registration:
        """
        Listen again on a callback URL made before (a job resumed from the
        journal). Used by the client.
        """
        registration = self._live.get(webhook_id)
        if registration is None:
            registration = Registration(webhook_id, token_hash, track_id)
            self._live[webhook_id] = registration
        return registration

    def retire(self, webhook_id: str) -> None:
        """
        The job ended: answer its late and duplicate calls with a quiet
        200. Used by the client.
        """
        registration = self._live.pop(webhook_id, None)
        if registration is None:
            return
        self._retired[webhook_id] = registration.token_hash
        while len(self._retired) > self._remember:
            self._retired.popitem(last=False)

    def bind(self, journal: Journal | None) -> None:
        """
        Check callbacks of jobs this process does not know against
        *journal*. Used by the client that owns the receiver.
        """
        self._journal = journal


#: Whose callback a request is: a job waiting here, one that ended, one
#: only the journal knows, nobody's, or unknown for want of the journal.
_Verdict = Literal["live", "done", "journal", "unknown", "unreachable"]
#: A job only the journal knows: that journal, and the job's state there.
_Known = tuple["Journal", JobState]
_STATUS: Final[dict[_Verdict, int]] = {
    "live": 200,
    "done": 200,
    "journal": 200,
    "unknown": 404,
    "unreachable": 503,
}


def _failed(what: str, exc: Exception) -> None:
    """
    Log *exc* as one line, no traceback: a store that is down would
    otherwise write one per callback.
    """
    log.warning("%s: %s: %s", what, type(exc).__name__, exc)


def _split(path: str) -> tuple[str, str]:
    parts = path.rstrip("/").rsplit("/", 2)
    if len(parts) != 3:
        return "", ""
    return parts[1], parts[2]


def _is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in _JSON_TYPES or media.endswith("+json")


def _with_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"
