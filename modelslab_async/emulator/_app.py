"""
A ModelsLab-compatible server on loopback: the job endpoints of its table,
their fetch routes, the Flux Klein management calls, a CDN for outputs,
webhooks back to the caller, and an inspection API for tests in other
processes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time

from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Final, Self
from urllib.parse import urlsplit

import attrs

from aiohttp import web

from modelslab_async._serving import QuietLog, serve

from ._endpoints import DEFAULT_ENDPOINTS, EmulatedEndpoint
from ._faults import (
    EARLY,
    FaultKind,
    Faults,
    Refusal,
    Route,
    answered_status,
    render,
)
from ._images import require_pillow
from ._settings import (
    FAULT_SETTABLE,
    SETTABLE,
    check_endpoints,
    check_keys,
    check_quirks,
    fault_settings,
    integer,
    number,
)
from ._state import EmulatedJob, Record, Store
from ._validate import (
    Submission,
    check_key,
    check_submit,
    job_id,
    parse_body,
    request_id,
)
from ._webhooks import Delivery, WebhookSender, is_loopback
from ._wire import ALL_QUIRKS, Announce, Base64Delivery, Images, Wire


__all__ = ["Emulator", "start_emulator"]

log = logging.getLogger("modelslab_async.emulator")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_MANAGEMENT: Final = {
    "clear_cache": "Cache cleared successfully",
    "clear_queue": "Queue cleared, server is restarting",
    "restart_server": "server restarting",
    "update_server": "Server updated successfully",
}
_S3_REQUIRED: Final = [
    "public_url",
    "region_name",
    "endpoint_url",
    "aws_access_key_id",
    "aws_secret_access_key",
    "image_directory",
]


@attrs.define(kw_only=True, eq=False)
class Emulator:
    """
    A local ModelsLab for tests, demos and benchmarks.

    Every setting but *host*, *port*, *seed* and *endpoints* may be changed
    while it runs, by assignment, :meth:`configure`, or ``POST
    /_emulator/settings``; a bad value raises at once.

    Args:
        eta: Seconds each job announces it will take; 0 makes jobs succeed
            in the submit answer itself.
        eta_error: Jobs really take their time times a random factor in
            ``1 ± eta_error`` (0 to 1).
        eta_bias: How optimistic the estimates are: a job really takes
            ``eta * (1 + eta_bias)`` times that factor, so 0.2 makes every
            job 20% later than announced on average.
        announce: What processing answers announce as ``eta``: ``"max"``,
            the larger of the real time left and the nominal ``eta``
            (never early), or ``"nominal"``, the nominal ``eta`` (wrong
            both ways, as real estimates are).
        queue_limit: Queued jobs allowed per key; the next submit gets a
            429 with ``retry_after``. ``None`` for no limit.
        retry_after: Seconds the 429 body asks for.
        keys: Valid API keys; ``None`` accepts any non-empty key.
        quirks: Which legacy habits to show; see :data:`ALL_QUIRKS`.
        strict: Refuse fields the vendor does not document for the
            endpoint, a v6 submit without ``model_id``, values of the
            wrong type, and booleans spelled the other endpoint's way.
        base64_delivery: How ``base64`` outputs are delivered: ``url`` (a
            ``.base64`` file), ``url_data_uri`` (the same with a
            ``data:`` prefix), ``inline`` or ``inline_data_uri`` (in the
            ``output`` list itself).
        images: ``"gradient"`` draws small PNGs, cheap to make;
            ``"noise"`` draws random pixels, which compress as badly as a
            photo: about 3 MB at 1024 x 1024, the size of real outputs, for
            measuring what big answers cost a client.
        cdn_delay: Seconds after a job succeeds before its files exist
            (404 until then, like a public bucket).
        faults: Faults to inject; see :class:`Faults`.
        record_limit: How many of the latest requests :attr:`records`
            keeps; ``None`` keeps all. The counts are exact regardless.
        job_ttl: Seconds a job is kept (the service deletes outputs after
            24 hours); its counts are kept regardless.
        endpoints: The job endpoints to serve; see
            :class:`EmulatedEndpoint`.
        on_webhook_sent: Called with a job's id just before each of its
            webhook POSTs leaves.
        host: Interface to bind.
        port: Port to bind; 0 picks a free one.
        seed: Seeds job durations and random image seeds.

    Prompts containing ``[fail]`` make jobs that fail; ``[refuse]`` makes
    the submit itself refused with a 400.

    Raises:
        ImportError: Pillow, which draws the images, is not installed.
    """

    eta: float = attrs.field(default=2.0, validator=number(0))
    eta_error: float = attrs.field(default=0.0, validator=number(0, 1))
    eta_bias: float = attrs.field(default=0.0, validator=number(-1))
    announce: Announce = attrs.field(
        default="max", validator=attrs.validators.in_(("max", "nominal"))
    )
    queue_limit: int | None = attrs.field(
        default=None, validator=integer(1, optional=True)
    )
    retry_after: float = attrs.field(default=1.0, validator=number(0))
    keys: Collection[str] | None = attrs.field(
        default=None, validator=check_keys
    )
    quirks: Collection[str] = attrs.field(
        default=ALL_QUIRKS, validator=check_quirks
    )
    strict: bool = attrs.field(
        default=False, validator=attrs.validators.instance_of(bool)
    )
    base64_delivery: Base64Delivery = attrs.field(
        default="url",
        validator=attrs.validators.in_(
            ("url", "url_data_uri", "inline", "inline_data_uri")
        ),
    )
    images: Images = attrs.field(
        default="gradient",
        validator=attrs.validators.in_(("gradient", "noise")),
    )
    cdn_delay: float = attrs.field(default=0.0, validator=number(0))
    faults: Faults = attrs.field(
        factory=Faults, validator=attrs.validators.instance_of(Faults)
    )
    record_limit: int | None = attrs.field(
        default=10_000, validator=integer(0, optional=True)
    )
    job_ttl: float = attrs.field(default=24 * 3600.0, validator=number(0))
    endpoints: Sequence[EmulatedEndpoint] = attrs.field(
        default=DEFAULT_ENDPOINTS,
        converter=tuple,
        validator=check_endpoints,
        on_setattr=attrs.setters.frozen,
    )
    on_webhook_sent: Callable[[str], object] | None = None
    host: str = "127.0.0.1"
    port: int = 0
    seed: int = 0

    store: Store = attrs.field(init=False, factory=Store)
    _runner: web.AppRunner | None = attrs.field(init=False, default=None)
    _webhooks: WebhookSender = attrs.field(init=False, factory=WebhookSender)
    _random: random.Random = attrs.field(init=False)
    _url: str | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        # Fail here, not at the first image: the fix is one install away.
        require_pillow()
        self._random = random.Random(self.seed)

    # --- lifecycle -------------------------------------------------------

    @property
    def url(self) -> str:
        """
        The API root to give a client as ``base_url``.
        """
        if self._url is None:
            msg = "the emulator is not running; await start()"
            raise RuntimeError(msg)
        return self._url

    @property
    def origin(self) -> str:
        """
        ``http://host:port``, the root of the emulator's CDN.
        """
        return self.url.removesuffix("/api/")

    async def start(self) -> Self:
        """
        Bind and serve; idempotent.

        Raises:
            OSError: The port is taken.
        """
        if self._runner is not None:
            return self
        # A client that hangs up cancels its handler, so stalls end with
        # it; what clients do to us is logged as debug lines.
        self._runner, origin = await serve(
            self.make_app(),
            self.host,
            self.port,
            handler_cancellation=True,
            logger=QuietLog(logging.getLogger(f"{log.name}.http"), {}),
        )
        self._url = f"{origin}/api/"
        self._webhooks.start()
        return self

    async def aclose(self) -> None:
        """
        Stop serving, and cancel webhooks not yet sent.
        """
        await self._webhooks.aclose()
        runner, self._runner = self._runner, None
        self._url = None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def make_app(self) -> web.Application:
        """
        The emulator's aiohttp application, to run or mount yourself.
        """
        # No middleware: aiohttp caches the handlers of an app that has
        # one for the life of the process, and the emulator with them.
        app = web.Application(client_max_size=64 * 1024 * 1024)
        api = "/api/"
        routes: list[tuple[str, str, Handler]] = []
        fetched_at: dict[str, list[EmulatedEndpoint]] = {}
        for endpoint in self.endpoints:
            submit = functools.partial(self._submit, endpoint=endpoint)
            routes.append(("POST", api + endpoint.submit, submit))
            fetched_at.setdefault(endpoint.fetch, []).append(endpoint)
        for prefix, served in fetched_at.items():
            fetching = functools.partial(
                self._fetch, families=[e.family for e in served]
            )
            routes.append(("POST", api + prefix + "{id}", fetching))
            if any(endpoint.fetch_by_body for endpoint in served):
                routes.append(("POST", api + prefix.rstrip("/"), fetching))
        klein = api + "v1/enterprise/flux_klein/"
        routes.append(("POST", klein + "system_details", self._system_details))
        routes += [
            ("POST", klein + name, self._manage) for name in _MANAGEMENT
        ]
        routes += [
            ("POST", api + "v1/enterprise/update_s3", self._update_s3),
            ("GET", "/cdn/generations/{name}", self._download),
            ("GET", "/_emulator/stats", self._stats_route),
            ("GET", "/_emulator/settings", self._settings_route),
            ("POST", "/_emulator/settings", self._settings_route),
            ("GET", "/_emulator/jobs/{id}", self._job_route),
            ("GET", "/_emulator/tracks", self._tracks_route),
        ]
        allowed: dict[str, set[str]] = {}
        for method, path, handler in routes:
            if method == "GET":  # and HEAD, as aiohttp's add_get does
                app.router.add_get(path, self._guarded(handler))
            else:
                app.router.add_route(method, path, self._guarded(handler))
            methods = {method, "HEAD"} if method == "GET" else {method}
            allowed.setdefault(path, set()).update(methods)
        for path, methods in allowed.items():
            # Any other method on a known path: the JSON error body.
            refuse = functools.partial(self._not_allowed, methods=methods)
            app.router.add_route("*", path, refuse)
        app.router.add_route("*", "/{path:.*}", self._not_found)
        return app

    # --- what tests look at ----------------------------------------------

    @property
    def records(self) -> list[Record]:
        """
        The latest requests received (and webhooks sent), oldest first:
        at most :attr:`record_limit` of them.
        """
        return list(self.store.records)

    def requests(self, route: str | None = None) -> list[Record]:
        """
        The kept records of one route: ``submit``, ``fetch``,
        ``download``, ``manage``, ``webhook``, or ``other`` (unknown paths
        and methods).
        """
        return [r for r in self.store.records if route in (None, r.route)]

    @property
    def counts(self) -> Counter[tuple[str, int, str | None]]:
        """
        Every answer ever given, counted by ``(route, HTTP status,
        fault)``; status 0 is a dropped connection, and webhooks sent
        count under route ``webhook``.
        """
        return Counter(self.store.counts)

    @property
    def jobs_created(self) -> int:
        """
        Jobs the emulator has created, expired ones included.
        """
        return self.store.jobs_created

    @property
    def rate_limited(self) -> int:
        """
        429 answers given, for a full queue or an injected fault.
        """
        return self.store.rate_limited()

    @property
    def fetches_total(self) -> int:
        """
        Fetches of existing jobs answered, over all jobs.
        """
        return self.store.fetches

    def duplicates(self) -> dict[str, int]:
        """
        The ``track_id`` values that made more than one job, with how many:
        what a client that bills twice leaves behind.
        """
        return self.store.duplicates()

    def jobs_for(self, track_id: str) -> int:
        """
        How many jobs were created with *track_id*.
        """
        return self.store.tracks[track_id]

    def job(self, job_id: str | int) -> EmulatedJob:
        """
        A job by id.

        Raises:
            KeyError: No such job, or it expired.
        """
        return self.store.jobs[int(job_id)]

    def fetches(self, job_id: str | int) -> int:
        """
        How many times a job was fetched.
        """
        return self.job(job_id).fetches

    def max_queued(self, key: str | None = None) -> int:
        """
        The most jobs one key (or any key) had queued at once.
        """
        if key is not None:
            return self.store.max_queued[key]
        return max(self.store.max_queued.values(), default=0)

    def queued(self, key: str | None = None) -> int:
        """
        The jobs one key (or all keys) have queued now.
        """
        now = self._now()
        if key is not None:
            return self.store.queued(key, now)
        return sum(self.store.queued_by_key(now).values())

    def stats(self) -> dict[str, Any]:
        """
        The exact counters as JSON, as ``GET /_emulator/stats`` answers.
        """
        return self.store.stats(self._now())

    def settings(self) -> dict[str, Any]:
        """
        The settings that may change while running, as JSON.
        """
        values: dict[str, Any] = {
            name: getattr(self, name) for name in sorted(SETTABLE)
        }
        values["quirks"] = sorted(self.quirks)
        values["keys"] = None if self.keys is None else sorted(self.keys)
        values["faults"] = {
            name: getattr(self.faults, name) for name in sorted(FAULT_SETTABLE)
        }
        return values

    def configure(self, **settings: Any) -> None:
        """
        Change several settings at once, all or none, with JSON values
        (lists for ``keys`` and ``quirks``; ``faults`` a mapping of
        :class:`Faults` settings).

        Raises:
            TypeError: A value of the wrong type.
            ValueError: An unknown setting, or a value out of range.
        """
        unknown = settings.keys() - SETTABLE - {"faults"}
        if unknown:
            msg = f"unknown settings {sorted(unknown)}"
            raise ValueError(msg)
        fields = attrs.fields_dict(type(self))
        changes: dict[str, Any] = {}
        for name, value in settings.items():
            if name == "faults":
                continue
            if name in ("keys", "quirks") and isinstance(value, list):
                value = frozenset(value)  # noqa: PLW2901 (JSON to Python)
            validator = fields[name].validator
            if validator is not None:
                validator(self, fields[name], value)
            changes[name] = value
        fault_changes = fault_settings(settings.get("faults", {}))
        for name, value in changes.items():
            setattr(self, name, value)
        for name, value in fault_changes.items():
            setattr(self.faults, name, value)

    # --- plumbing --------------------------------------------------------

    def _now(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # asked from outside the loop
            return time.monotonic()

    def _wire(self) -> Wire:
        return Wire(
            quirks=self.quirks,
            base64_delivery=self.base64_delivery,
            images=self.images,
            origin=self.origin,
            announce=self.announce,
        )

    def _guarded(self, handler: Handler) -> Handler:
        """
        *handler*, noting a client that hangs up in one debug line.
        """

        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except (asyncio.CancelledError, ConnectionError) as exc:
                log.debug(
                    "client hung up during %s %s (%s)",
                    request.method,
                    request.path,
                    type(exc).__name__,
                )
                raise

        return guarded

    async def _not_allowed(
        self, request: web.Request, methods: set[str]
    ) -> web.StreamResponse:
        self._log(request, "other", status=405)
        allow = ", ".join(sorted(methods))
        return web.json_response(
            self._wire().error("Method Not Allowed"),
            status=405,
            headers={"Allow": allow},
        )

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        self._log(request, "other", status=404)
        return web.json_response(self._wire().error("Not Found"), status=404)

    def _log(
        self,
        request: web.Request,
        route: str,
        *,
        endpoint: str = "",
        job_id: str | None = None,
        body: Any = None,
        status: int,
        fault: str | None = None,
    ) -> None:
        self.store.log(
            Record(
                time=self._now(),
                route=route,
                endpoint=endpoint,
                path=request.path,
                job_id=job_id,
                body=body,
                headers=dict(request.headers),
                status=status,
                fault=fault,
            ),
            self.record_limit,
        )

    async def _read(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refusal(413, "request body is too large") from None
        except web.RequestPayloadError:
            # A body declared gzip that is not, and the like.
            raise Refusal(400, "request body could not be read") from None
        return parse_body(raw)

    @staticmethod
    def _early(fault: FaultKind | None) -> None:
        """
        Refuse at once for faults answered before any work is done.
        """
        if fault is not None and fault in EARLY:
            raise Refusal(EARLY[fault], fault=fault)

    async def _refuse(
        self,
        request: web.Request,
        refusal: Refusal,
        route: Route | str,
        wire: Wire,
        **record: Any,
    ) -> web.StreamResponse:
        """
        Record a refusal and answer it.
        """
        fault = refusal.fault
        self._log(request, route, status=refusal.status, fault=fault, **record)
        if fault is None:
            return web.json_response(
                wire.error(refusal.message, **refusal.extra),
                status=refusal.status,
            )
        self.faults.count(route, fault)
        return await self._render(request, fault, {}, wire)

    async def _answer(
        self,
        request: web.Request,
        route: Route,
        answer: dict[str, Any],
        fault: FaultKind | None,
        wire: Wire,
        **record: Any,
    ) -> web.StreamResponse:
        """
        Record *answer* and give it, as fault *fault* says if any.
        """
        status = 200 if fault is None else answered_status(fault)
        self._log(request, route, status=status, fault=fault, **record)
        if fault is None:
            return web.json_response(answer)
        self.faults.count(route, fault)
        return await self._render(request, fault, answer, wire)

    async def _render(
        self,
        request: web.Request,
        fault: FaultKind,
        answer: dict[str, Any] | bytes,
        wire: Wire,
    ) -> web.StreamResponse:
        return await render(
            request,
            fault,
            answer,
            wire=wire,
            stall_seconds=self.faults.stall_seconds,
            retry_after=self.retry_after,
        )

    # --- jobs ------------------------------------------------------------

    async def _submit(
        self, request: web.Request, endpoint: EmulatedEndpoint
    ) -> web.StreamResponse:
        fault = self.faults.choose("submit")
        wire = self._wire()
        body: Any = None
        try:
            body = await self._read(request)
            self._early(fault)
            key = check_key(body, self.keys)
            submission = check_submit(
                body,
                fields=endpoint.fields,
                required=endpoint.required,
                booleans=endpoint.booleans,
                strict=self.strict,
            )
            now = self._now()
            if (
                self.queue_limit is not None
                and self.store.queued(key, now) >= self.queue_limit
            ):
                raise Refusal(
                    429,
                    "Rate limit exceeded. Maximum "
                    f"{self.queue_limit} queued requests allowed.",
                    retry_after=self.retry_after,
                )
        except Refusal as refusal:
            return await self._refuse(
                request,
                refusal,
                "submit",
                wire,
                endpoint=endpoint.family,
                body=body,
            )
        # Everything that can refuse has run: from here on, the job exists.
        job = self._create(key, endpoint, submission, body, now)
        answer = (
            wire.processing(job, now, self.url + endpoint.fetch)
            if job.status(now) == "processing"
            else wire.success(job)
        )
        return await self._answer(
            request,
            "submit",
            answer,
            fault,
            wire,
            endpoint=endpoint.family,
            job_id=str(job.id),
            body=body,
        )

    def _create(
        self,
        key: str,
        endpoint: EmulatedEndpoint,
        submission: Submission,
        body: dict[str, Any],
        now: float,
    ) -> EmulatedJob:
        # The seed is drawn first, then the duration: the order of the
        # draws makes a seeded run repeat itself.
        seed = submission.seed
        if seed is None:
            seed = self._random.randrange(2**32)
        duration = (
            self.eta
            * (1 + self.eta_bias)
            * (1 + self._random.uniform(-self.eta_error, self.eta_error))
        )
        job = self.store.add(
            ttl=self.job_ttl,
            key=key,
            endpoint=endpoint.family,
            prompt=submission.prompt,
            width=submission.width,
            height=submission.height,
            samples=submission.samples,
            seed=seed,
            base64=submission.base64,
            webhook=submission.webhook,
            track_id=submission.track_id,
            outcome=submission.outcome,
            created=now,
            eta=self.eta,
            ready_at=now + duration,
            body=body,
        )
        self._schedule_webhook(job, now)
        return job

    async def _fetch(
        self, request: web.Request, families: Sequence[str]
    ) -> web.StreamResponse:
        fault = self.faults.choose("fetch")
        wire = self._wire()
        body: Any = None
        text_id = request.match_info.get("id")
        try:
            body = await self._read(request)
            self._early(fault)
            key = check_key(body, self.keys)
            if text_id is None:
                text_id = request_id(body)
            number = job_id(text_id)
            job = None if number is None else self.store.jobs.get(number)
            if job is None or job.key != key or job.endpoint not in families:
                raise Refusal(404, "Request not found")
        except Refusal as refusal:
            return await self._refuse(
                request,
                refusal,
                "fetch",
                wire,
                endpoint=families[0],
                job_id=text_id,
                body=body,
            )
        job.fetches += 1
        self.store.fetches += 1
        return await self._answer(
            request,
            "fetch",
            wire.outcome(job, self._now()),
            fault,
            wire,
            endpoint=job.endpoint,
            job_id=text_id,
            body=body,
        )

    async def _download(self, request: web.Request) -> web.StreamResponse:
        fault = self.faults.choose("download")
        wire = self._wire()
        found = self.store.by_file(request.match_info["name"])
        job_id = None if found is None else str(found[0].id)
        if fault is not None and fault in EARLY:
            refusal = Refusal(EARLY[fault], fault=fault)
            return await self._refuse(
                request, refusal, "download", wire, job_id=job_id
            )
        now = self._now()
        if (
            found is None
            or found[0].status(now) != "success"
            or (now < found[0].ready_at + self.cdn_delay)
        ):
            # A bucket answers 403 or 404 for a file that is not there yet.
            self._log(request, "download", job_id=job_id, status=404)
            return web.Response(status=404, text="Not Found")
        job, index = found
        if job.base64:
            data = wire.base64_text(job, index)
            content_type = "text/plain"
        else:
            data = wire.png(job, index)
            content_type = "image/png"
        status = 200 if fault is None else answered_status(fault)
        self._log(
            request, "download", job_id=job_id, status=status, fault=fault
        )
        if fault is None:
            return web.Response(body=data, content_type=content_type)
        self.faults.count("download", fault)
        return await self._render(request, fault, data, wire)

    # --- management ------------------------------------------------------

    async def _keyed(self, request: web.Request) -> tuple[dict[str, Any], str]:
        body = await self._read(request)
        return body, check_key(body, self.keys)

    async def _system_details(
        self, request: web.Request
    ) -> web.StreamResponse:
        try:
            body, key = await self._keyed(request)
        except Refusal as refusal:
            return await self._refuse(request, refusal, "manage", self._wire())
        queue_time = self.store.queue_time(key, self._now())
        self._log(
            request, "manage", endpoint="flux-klein", body=body, status=200
        )
        return web.json_response(
            {
                "model_count": 1,
                "queue_time": round(queue_time, 2),
                "status": "ok",
            }
        )

    async def _manage(self, request: web.Request) -> web.StreamResponse:
        action = request.path.rsplit("/", 1)[-1]
        try:
            body, key = await self._keyed(request)
        except Refusal as refusal:
            return await self._refuse(request, refusal, "manage", self._wire())
        if action == "clear_queue":
            self.store.cancel(key, self._now())
        self._log(
            request, "manage", endpoint="flux-klein", body=body, status=200
        )
        return web.json_response(
            {"status": "success", "message": _MANAGEMENT[action]}
        )

    async def _update_s3(self, request: web.Request) -> web.StreamResponse:
        try:
            body, _ = await self._keyed(request)
            missing = [name for name in _S3_REQUIRED if not body.get(name)]
            if missing:
                raise Refusal(400, f"{missing[0]} is required")
        except Refusal as refusal:
            return await self._refuse(request, refusal, "manage", self._wire())
        self._log(request, "manage", body=body, status=200)
        return web.json_response(
            {"status": "success", "message": "S3 details updated successfully"}
        )

    # --- inspection, for tests in other processes --------------------------

    async def _stats_route(self, _: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _settings_route(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                changes = parse_body(await request.read())
                self.configure(**changes)
            except Refusal as refusal:
                return web.json_response(
                    {"status": "error", "message": refusal.message},
                    status=refusal.status,
                )
            except (TypeError, ValueError) as exc:
                return web.json_response(
                    {"status": "error", "message": str(exc)}, status=400
                )
        return web.json_response(
            {"status": "success", "settings": self.settings()}
        )

    async def _tracks_route(self, _: web.Request) -> web.Response:
        # Every track_id a job was made for, with how many: the oracle of
        # a test that must find each job finished by someone.
        return web.json_response({"tracks": dict(self.store.tracks)})

    async def _job_route(self, request: web.Request) -> web.Response:
        number = job_id(request.match_info["id"])
        job = None if number is None else self.store.jobs.get(number)
        if job is None:
            return web.json_response(
                {"status": "error", "message": "Request not found"},
                status=404,
            )
        return web.json_response(
            {
                "id": str(job.id),
                "endpoint": job.endpoint,
                "status": job.status(self._now()),
                "track_id": job.track_id,
                "webhook": job.webhook,
                "created": job.created,
                "eta": job.eta,
                "ready_at": job.ready_at,
                "fetches": job.fetches,
            }
        )

    # --- webhooks --------------------------------------------------------

    def _schedule_webhook(self, job: EmulatedJob, now: float) -> None:
        if job.webhook is None:
            return
        if not is_loopback(job.webhook):
            log.warning("not sending a webhook off loopback: %s", job.webhook)
            return
        if self.faults.roll(self.faults.webhook_drop):
            self.faults.count("webhook", "drop")
            self.store.webhooks["dropped"] += 1
            return
        copies = 1
        if self.faults.roll(self.faults.webhook_duplicate):
            self.faults.count("webhook", "duplicate")
            self.store.webhooks["duplicated"] += 1
            copies = 2
        self._webhooks.schedule(
            Delivery(
                job_id=str(job.id),
                url=job.webhook,
                copies=copies,
                delay=max(0.0, job.ready_at - now) + self.faults.webhook_delay,
                payload=lambda: self._wire().webhook(job, self._now()),
                on_sent=self._webhook_sent,
                on_answer=functools.partial(self._webhook_answered, job),
            )
        )

    def _webhook_sent(self, job_id: str) -> None:
        # Read at send time: the hook may be set after the job was made.
        if self.on_webhook_sent is not None:
            self.on_webhook_sent(job_id)

    def _webhook_answered(
        self, job: EmulatedJob, payload: dict[str, Any], status: int
    ) -> None:
        assert job.webhook is not None  # noqa: S101 (checked when scheduled)
        self.store.webhooks["sent" if 200 <= status < 300 else "failed"] += 1
        self.store.log(
            Record(
                time=self._now(),
                route="webhook",
                endpoint=job.endpoint,
                path=urlsplit(job.webhook).path,
                job_id=str(job.id),
                body=payload,
                headers={},
                status=status,
            ),
            self.record_limit,
        )


async def start_emulator(**settings: Any) -> Emulator:
    """
    Start an :class:`Emulator` with *settings* and return it, running.

    Close it with ``await emulator.aclose()``, or use
    ``async with Emulator(**settings) as emulator``.
    """
    return await Emulator(**settings).start()
