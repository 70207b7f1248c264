"""
A ModelsLab-compatible server on loopback: both text2img endpoint families,
their fetch routes, the Flux Klein management calls, a CDN for outputs, and
webhooks back to the caller.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import json
import logging
import math
import random

from collections.abc import Collection
from typing import Any, Final, Literal, Self
from urllib.parse import urlsplit

import aiohttp
import attrs

from aiohttp import web

from modelslab_async._serving import serve

from ._faults import FaultKind, Faults
from ._images import render_png
from ._state import EmulatedJob, Record, Store


__all__ = ["ALL_QUIRKS", "Emulator", "start_emulator"]

log = logging.getLogger("modelslab_async.emulator")

#: The legacy habits of the real service, each switchable:
#:
#: - ``messege``: error and processing bodies spell it ``messege``.
#: - ``thin_fetch``: a fetch of a processing job answers
#:   ``{"status": "processing", "output": "", ...}`` with no id or eta.
#: - ``int_ids``: job ids are JSON integers (else strings).
#: - ``proxy_links_object``: success ``proxy_links`` as ``{"0": url}``.
#: - ``tips``: ``tip``/``tip_1`` advertising in processing bodies.
ALL_QUIRKS: Final = frozenset(
    {"messege", "thin_fetch", "int_ids", "proxy_links_object", "tips"}
)


_TIP: Final = (
    "Get 20x faster image generation using enterprise plan. Click here : "
    "https://modelslab.com/enterprise"
)
_TIP_1: Final = (
    "Your image is processing in background, you can get this image using "
    "fetch API: here is link for fetch api : https://docs.modelslab.com/"
    "image-generation/community-models/dreamboothfetchqueimg"
)

# The fields each seed page documents; strict mode refuses anything else.
# Written from the seeds, not imported from the client, so that the
# emulator checks the client rather than agreeing with it.
_FLUX_KLEIN_FIELDS: Final = frozenset(
    [
        "key",
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "samples",
        "safety_checker",
        "seed",
        "instant_response",
        "base64",
        "webhook",
        "track_id",
    ]
)
_V6_FIELDS: Final = frozenset(
    [
        "key",
        "model_id",
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "samples",
        "num_inference_steps",
        "safety_checker",
        "safety_checker_type",
        "enhance_prompt",
        "enhance_style",
        "seed",
        "guidance_scale",
        "algorithm_type",
        "multi_lingual",
        "panorama",
        "self_attention",
        "clip_skip",
        "base64",
        "scheduler",
        "tomesd",
        "vae",
        "lora_model",
        "lora_strength",
        "temp",
        "webhook",
        "track_id",
    ]
)
_V6_FLAGS: Final = frozenset(
    [
        "safety_checker",
        "enhance_prompt",
        "multi_lingual",
        "panorama",
        "self_attention",
        "base64",
        "tomesd",
        "temp",
    ]
)
_FLUX_KLEIN_FLAGS: Final = frozenset(
    ["safety_checker", "instant_response", "base64"]
)
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

#: The HTTP status of faults answered before any job is looked at; 0 is a
#: dropped connection.
_FAULT_STATUS: Final[dict[FaultKind, int]] = {
    "reset_before": 0,
    "http_500": 500,
    "http_503": 503,
    "rate_limit": 429,
}


class _Refusal(Exception):  # noqa: N818
    """
    Strictly private: an answer given before any job exists.

    Either an error body, or (with *fault*) an injected fault.
    """

    def __init__(
        self,
        status: int,
        message: str = "",
        *,
        fault: FaultKind | None = None,
        **extra: Any,
    ) -> None:
        self.status = status
        self.message = message
        self.fault = fault
        self.extra = extra


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.define(kw_only=True, eq=False)
class Emulator:
    """
    A local ModelsLab for tests, demos and benchmarks.

    Every setting may be changed while it runs.

    Args:
        eta: Seconds each job announces it will take; 0 makes jobs succeed
            in the submit answer itself.
        eta_error: Jobs really take ``eta`` times a random factor in
            ``1 ± eta_error``.
        queue_limit: Queued jobs allowed per key; the next submit gets a
            429 with ``retry_after``. ``None`` for no limit.
        retry_after: Seconds the 429 body asks for.
        keys: Valid API keys; ``None`` accepts any non-empty key.
        quirks: Which legacy habits to show; see :data:`ALL_QUIRKS`.
        strict: Refuse undocumented fields and wrongly spelled booleans,
            to catch a client sending what the docs do not describe.
        base64_delivery: How ``base64`` outputs are delivered: ``url`` (a
            ``.base64`` file), ``url_data_uri`` (the same with a
            ``data:`` prefix), ``inline`` or ``inline_data_uri`` (in the
            ``output`` list itself).
        cdn_delay: Seconds after a job succeeds before its files exist
            (404 until then, like a public bucket).
        faults: Faults to inject; see :class:`Faults`.
        host: Interface to bind.
        port: Port to bind; 0 picks a free one.
        seed: Seeds job durations and random image seeds.

    Prompts containing ``[fail]`` make jobs that fail; ``[refuse]`` makes
    the submit itself refused with a 400.
    """

    eta: float = 2.0
    eta_error: float = 0.0
    queue_limit: int | None = None
    retry_after: float = 1.0
    keys: Collection[str] | None = None
    quirks: Collection[str] = ALL_QUIRKS
    strict: bool = False
    base64_delivery: Literal[
        "url", "url_data_uri", "inline", "inline_data_uri"
    ] = "url"
    cdn_delay: float = 0.0
    faults: Faults = attrs.Factory(Faults)
    host: str = "127.0.0.1"
    port: int = 0
    seed: int = 0

    store: Store = attrs.field(init=False, factory=Store)
    _runner: web.AppRunner | None = attrs.field(init=False, default=None)
    _session: aiohttp.ClientSession | None = attrs.field(
        init=False, default=None
    )
    _deliveries: set[asyncio.Task[None]] = attrs.field(init=False, factory=set)
    _random: random.Random = attrs.field(init=False)
    _url: str | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
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
        """
        if self._runner is not None:
            return self
        # A client that hangs up cancels its handler, so stalls end with it.
        self._runner, origin = await serve(
            self.make_app(), self.host, self.port, handler_cancellation=True
        )
        self._url = f"{origin}/api/"
        self._session = aiohttp.ClientSession()
        return self

    async def aclose(self) -> None:
        """
        Stop serving, and cancel webhooks not yet sent.
        """
        deliveries, self._deliveries = self._deliveries, set()
        for task in deliveries:
            task.cancel()
        await asyncio.gather(*deliveries, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()
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
        app = web.Application(client_max_size=64 * 1024 * 1024)
        api = "/api/"
        klein = api + "v1/enterprise/flux_klein/"
        add = app.router.add_post
        for endpoint, submit, fetch in (
            ("v6", api + "v6/images/text2img", api + "v6/images/fetch"),
            ("flux-klein", klein + "text2img", klein + "fetch"),
        ):
            add(submit, functools.partial(self._submit, endpoint=endpoint))
            fetching = functools.partial(self._fetch, endpoint=endpoint)
            add(fetch + "/{id}", fetching)
            if endpoint == "v6":
                add(fetch, fetching)  # the body form: {"request_id": ...}
        add(klein + "system_details", self._system_details)
        for name in _MANAGEMENT:
            add(klein + name, self._manage)
        add(api + "v1/enterprise/update_s3", self._update_s3)
        app.router.add_get("/cdn/generations/{name}", self._download)
        return app

    # --- what tests look at ----------------------------------------------

    @property
    def records(self) -> list[Record]:
        """
        Every request received (and webhook sent), oldest first.
        """
        return self.store.records

    def requests(self, route: str | None = None) -> list[Record]:
        """
        The records of one route: ``submit``, ``fetch``, ``download``,
        ``manage`` or ``webhook``.
        """
        return [r for r in self.store.records if route in (None, r.route)]

    @property
    def jobs_created(self) -> int:
        """
        Jobs the emulator has created.
        """
        return len(self.store.jobs)

    def job(self, job_id: str | int) -> EmulatedJob:
        """
        A job by id.
        """
        return self.store.jobs[int(job_id)]

    def fetches(self, job_id: str | int) -> int:
        """
        How many times a job was fetched.
        """
        return self.store.jobs[int(job_id)].fetches

    def max_queued(self, key: str | None = None) -> int:
        """
        The most jobs one key (or any key) had queued at once.
        """
        if key is not None:
            return self.store.max_queued[key]
        return max(self.store.max_queued.values(), default=0)

    # --- plumbing --------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _record(
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
        self.store.records.append(
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
            )
        )

    def _message(self, text: str) -> dict[str, str]:
        return {"messege" if "messege" in self.quirks else "message": text}

    def _id(self, job: EmulatedJob) -> int | str:
        return job.id if "int_ids" in self.quirks else str(job.id)

    def _error(self, status: int, message: str, **extra: Any) -> web.Response:
        return web.json_response(
            {"status": "error", **self._message(message), **extra},
            status=status,
        )

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except ValueError:
            raise _Refusal(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _Refusal(400, "request body must be a JSON object")
        return body

    def _check_key(self, body: dict[str, Any]) -> str:
        key = body.get("key")
        if not isinstance(key, str) or not key:
            raise _Refusal(401, "API key required")
        if self.keys is not None and key not in self.keys:
            raise _Refusal(401, "Invalid API key")
        return key

    @staticmethod
    def _fault_first(fault: FaultKind | None) -> None:
        """
        Refuse at once for faults answered before any job exists.
        """
        if fault is not None and fault in _FAULT_STATUS:
            raise _Refusal(_FAULT_STATUS[fault], fault=fault)

    async def _refuse(
        self,
        request: web.Request,
        refusal: _Refusal,
        route: str,
        **record: Any,
    ) -> web.StreamResponse:
        """
        Record a refusal and answer it.
        """
        self._record(
            request,
            route,
            status=refusal.status,
            fault=refusal.fault,
            **record,
        )
        if refusal.fault is not None:
            return await self._faulty(request, refusal.fault, {})
        return self._error(refusal.status, refusal.message, **refusal.extra)

    async def _faulty(  # noqa: C901, PLR0911 (one branch per fault kind)
        self,
        request: web.Request,
        kind: FaultKind,
        answer: dict[str, Any] | bytes,
    ) -> web.StreamResponse:
        """
        Answer *answer* the way fault *kind* says.
        """
        if kind == "http_500":
            return self._error(500, "Internal server error. Please try again.")
        if kind == "http_503":
            return self._error(
                503, "Service temporarily unavailable. Please try again later."
            )
        if kind == "rate_limit":
            return self._error(
                429,
                "Rate limit exceeded. Maximum queued requests reached.",
                retry_after=self.retry_after,
            )
        if kind == "bad_gateway":
            return web.Response(
                status=502,
                text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html",
            )
        if kind == "html":
            return web.Response(
                text="<!DOCTYPE html><html><body>Error</body></html>",
                content_type="text/html",
            )
        if kind == "empty":
            return web.Response(body=b"", content_type="application/json")
        if kind in ("reset_before", "reset_after"):
            assert request.transport is not None  # noqa: S101 (aiohttp sets it)
            request.transport.close()
            return web.Response()
        if kind == "stall":
            await asyncio.sleep(self.faults.stall_seconds)
        raw = (
            answer
            if isinstance(answer, bytes)
            else json.dumps(answer).encode()
        )
        if kind == "malformed":
            return web.Response(
                body=raw[: max(1, len(raw) // 2)],
                content_type="application/json",
            )
        if kind == "slow_body":
            response = web.StreamResponse()
            response.content_length = len(raw)
            response.content_type = (
                "application/json"
                if isinstance(answer, dict)
                else "application/octet-stream"
            )
            await response.prepare(request)
            step = max(1, len(raw) // 4)
            for start in range(0, len(raw), step):
                await response.write(raw[start : start + step])
                await asyncio.sleep(self.faults.stall_seconds / 40)
            await response.write_eof()
            return response
        return (
            web.json_response(answer)
            if isinstance(answer, dict)
            else (web.Response(body=answer))
        )

    # --- text2img --------------------------------------------------------

    async def _submit(
        self, request: web.Request, endpoint: str
    ) -> web.StreamResponse:
        fault = self.faults.pick("submit")
        body: Any = None
        try:
            body = await self._body(request)
            self._fault_first(fault)
            key = self._check_key(body)
            fields = self._validate(body, endpoint)
            now = self._now()
            if (
                self.queue_limit is not None
                and self.store.queued(key, now) >= self.queue_limit
            ):
                raise _Refusal(
                    429,
                    "Rate limit exceeded. Maximum "
                    f"{self.queue_limit} queued requests allowed.",
                    retry_after=self.retry_after,
                )
        except _Refusal as refusal:
            return await self._refuse(
                request, refusal, "submit", endpoint=endpoint, body=body
            )
        duration = self.eta * (
            1 + self._random.uniform(-self.eta_error, self.eta_error)
        )
        job = self.store.add(
            key=key,
            endpoint=endpoint,
            created=now,
            eta=self.eta,
            ready_at=now + duration,
            body=body,
            **fields,
        )
        self._schedule_webhook(job)
        answer = (
            self._success(job)
            if job.status(now) != "processing"
            else self._processing(job)
        )
        self._record(
            request,
            "submit",
            endpoint=endpoint,
            job_id=str(job.id),
            body=body,
            status=200,
            fault=fault,
        )
        if fault is not None:
            return await self._faulty(request, fault, answer)
        return web.json_response(answer)

    def _validate(self, body: dict[str, Any], endpoint: str) -> dict[str, Any]:
        known, flags = (
            (_V6_FIELDS, _V6_FLAGS)
            if endpoint == "v6"
            else (_FLUX_KLEIN_FIELDS, _FLUX_KLEIN_FLAGS)
        )
        if self.strict:
            unknown = sorted(body.keys() - known)
            if unknown:
                raise _Refusal(400, f"unknown fields: {', '.join(unknown)}")
            for name in flags & body.keys():
                if not _spelled_right(body[name], endpoint):
                    raise _Refusal(
                        400, f"{name} must be {_flag_spelling(endpoint)}"
                    )
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _Refusal(400, "prompt is required")
        if "[refuse]" in prompt:
            raise _Refusal(400, "prompt refused by the content policy")
        width = _number(
            body, "width", default=512, low=1, high=1024, strict=self.strict
        )
        height = _number(
            body, "height", default=512, low=1, high=1024, strict=self.strict
        )
        samples = _number(
            body, "samples", default=1, low=1, high=4, strict=self.strict
        )
        seed = body.get("seed")
        if seed is None:
            seed = self._random.randrange(2**32)
        return {
            "prompt": prompt,
            "width": int(width),
            "height": int(height),
            "samples": int(samples),
            "seed": int(seed),
            "base64": _flag(body.get("base64")),
            "webhook": body.get("webhook") or None,
            "track_id": (
                None if body.get("track_id") is None else str(body["track_id"])
            ),
            "outcome": "failed" if "[fail]" in prompt else "success",
        }

    def _links(self, job: EmulatedJob) -> list[str]:
        if job.base64 and self.base64_delivery.startswith("inline"):
            return [
                self._base64_text(job, index).decode()
                for index in range(job.samples)
            ]
        return [
            f"{self.origin}/cdn/generations/{name}" for name in job.files()
        ]

    def _meta(self, job: EmulatedJob) -> dict[str, Any]:
        # The real meta echoes settings, flags as strings, id as a string.
        return {
            "prompt": job.prompt,
            "model_id": job.body.get("model_id", "flux_klein"),
            "width": job.width,
            "height": job.height,
            "n_samples": job.samples,
            "seed": job.seed,
            "base64": "yes" if job.base64 else "no",
            "track_id": job.track_id,
            "webhook": job.webhook,
            "id": str(job.id),
            "file_prefix": job.prefix,
        }

    def _processing(self, job: EmulatedJob) -> dict[str, Any]:
        fetch = (
            "v6/images/fetch/"
            if job.endpoint == "v6"
            else ("v1/enterprise/flux_klein/fetch/")
        )
        links = self._links(job)
        answer: dict[str, Any] = {"status": "processing"}
        if "tips" in self.quirks:
            answer |= {"tip": _TIP, "tip_1": _TIP_1}
        remaining = max(0.0, job.ready_at - self._now())
        answer |= {
            # Rounded up, so a client trusting it never polls too early.
            "eta": math.ceil(max(remaining, job.eta) * 100) / 100,
            **self._message("Try to fetch request after seconds estimated"),
            "webhook_status": "",
            "fetch_result": f"{self.url}{fetch}{job.id}",
            "id": self._id(job),
            "output": [],
            "meta": self._meta(job),
            "future_links": links,
            "proxy_links": links,
        }
        return answer

    def _success(self, job: EmulatedJob) -> dict[str, Any]:
        links = self._links(job)
        proxy: Any = (
            {str(i): link for i, link in enumerate(links)}
            if "proxy_links_object" in self.quirks
            else links
        )
        return {
            "status": "success",
            "generationTime": round(job.ready_at - job.created, 3),
            "id": self._id(job),
            "output": links,
            "proxy_links": proxy,
            "meta": self._meta(job),
            "nsfw_content_detected": False,
        }

    def _failure(self, job: EmulatedJob) -> dict[str, Any]:
        reason = (
            "Queue cleared"
            if job.cancelled
            else "Processing failed: the emulator was told to fail this job"
        )
        return {
            "status": "error",
            **self._message(reason),
            "id": self._id(job),
        }

    # --- fetch -----------------------------------------------------------

    async def _fetch(
        self, request: web.Request, endpoint: str
    ) -> web.StreamResponse:
        fault = self.faults.pick("fetch")
        body: Any = None
        job_id = request.match_info.get("id")
        try:
            body = await self._body(request)
            self._fault_first(fault)
            key = self._check_key(body)
            job_id = job_id or str(body.get("request_id", ""))
            job = (
                self.store.jobs.get(int(job_id)) if job_id.isdigit() else None
            )
            if job is None or job.key != key:
                raise _Refusal(404, "Request not found")
        except _Refusal as refusal:
            return await self._refuse(
                request,
                refusal,
                "fetch",
                endpoint=endpoint,
                job_id=job_id,
                body=body,
            )
        job.fetches += 1
        status = job.status(self._now())
        if status == "processing":
            answer = self._fetch_processing(job)
        elif status == "success":
            answer = self._success(job)
        else:
            answer = self._failure(job)
        self._record(
            request,
            "fetch",
            endpoint=endpoint,
            job_id=job_id,
            body=body,
            status=200,
            fault=fault,
        )
        if fault is not None:
            return await self._faulty(request, fault, answer)
        return web.json_response(answer)

    def _fetch_processing(self, job: EmulatedJob) -> dict[str, Any]:
        if "thin_fetch" in self.quirks:
            answer = {
                "status": "processing",
                **self._message("try again later."),
                "output": "",
            }
            if "tips" in self.quirks:
                answer["tip"] = _TIP
            return answer
        remaining = max(0.0, job.ready_at - self._now())
        return {
            "status": "processing",
            "id": self._id(job),
            "eta": math.ceil(remaining * 100) / 100,
            **self._message("Your request is being processed"),
            "future_links": self._links(job),
        }

    # --- outputs ---------------------------------------------------------

    def _base64_text(self, job: EmulatedJob, index: int) -> bytes:
        encoded = base64.b64encode(self._png(job, index))
        if self.base64_delivery.endswith("data_uri"):
            return b"data:image/png;base64," + encoded
        return encoded

    def _png(self, job: EmulatedJob, index: int) -> bytes:
        return render_png(job.seed + index, job.prompt, job.width, job.height)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        fault = self.faults.pick("download")
        found = self.store.by_file(request.match_info["name"])
        job_id = None if found is None else str(found[0].id)
        if fault is not None and fault in _FAULT_STATUS:
            self._record(
                request,
                "download",
                job_id=job_id,
                status=_FAULT_STATUS[fault],
                fault=fault,
            )
            return await self._faulty(request, fault, b"")
        now = self._now()
        if (
            found is None
            or found[0].status(now) != "success"
            or (now < found[0].ready_at + self.cdn_delay)
        ):
            # A bucket answers 403 or 404 for a file that is not there yet.
            self._record(request, "download", job_id=job_id, status=404)
            return web.Response(status=404, text="Not Found")
        job, index = found
        if job.base64:
            data = self._base64_text(job, index)
            content_type = "text/plain"
        else:
            data = self._png(job, index)
            content_type = "image/png"
        self._record(
            request, "download", job_id=job_id, status=200, fault=fault
        )
        if fault is not None:
            return await self._faulty(request, fault, data)
        return web.Response(body=data, content_type=content_type)

    # --- management ------------------------------------------------------

    async def _system_details(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            key = self._check_key(body)
        except _Refusal as refusal:
            self._record(request, "manage", status=refusal.status)
            return self._error(refusal.status, refusal.message)
        now = self._now()
        queue_time = sum(
            max(0.0, job.ready_at - now)
            for job in self.store.jobs.values()
            if job.key == key and job.status(now) == "processing"
        )
        self._record(
            request, "manage", endpoint="flux-klein", body=body, status=200
        )
        return web.json_response(
            {
                "model_count": 1,
                "queue_time": round(queue_time, 2),
                "status": "ok",
            }
        )

    async def _manage(self, request: web.Request) -> web.Response:
        action = request.path.rsplit("/", 1)[-1]
        try:
            body = await self._body(request)
            key = self._check_key(body)
        except _Refusal as refusal:
            self._record(request, "manage", status=refusal.status)
            return self._error(refusal.status, refusal.message)
        if action == "clear_queue":
            now = self._now()
            for job in self.store.jobs.values():
                if job.key == key and job.status(now) == "processing":
                    job.cancelled = True
        self._record(
            request, "manage", endpoint="flux-klein", body=body, status=200
        )
        return web.json_response(
            {"status": "success", "message": _MANAGEMENT[action]}
        )

    async def _update_s3(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            self._check_key(body)
            missing = [name for name in _S3_REQUIRED if not body.get(name)]
            if missing:
                raise _Refusal(400, f"{missing[0]} is required")
        except _Refusal as refusal:
            self._record(request, "manage", status=refusal.status)
            return self._error(refusal.status, refusal.message)
        self._record(request, "manage", body=body, status=200)
        return web.json_response(
            {"status": "success", "message": "S3 details updated successfully"}
        )

    # --- webhooks --------------------------------------------------------

    def _schedule_webhook(self, job: EmulatedJob) -> None:
        if job.webhook is None or self._session is None:
            return
        if not _is_loopback(job.webhook):
            log.warning("not sending a webhook off loopback: %s", job.webhook)
            return
        if self.faults.roll(self.faults.webhook_drop):
            self.faults.injected["webhook", "drop"] += 1
            return
        copies = 1
        if self.faults.roll(self.faults.webhook_duplicate):
            self.faults.injected["webhook", "duplicate"] += 1
            copies = 2
        delay = (
            max(0.0, job.ready_at - self._now()) + self.faults.webhook_delay
        )
        task = asyncio.get_running_loop().create_task(
            self._deliver(job, delay, copies)
        )
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(
        self, job: EmulatedJob, delay: float, copies: int
    ) -> None:
        await asyncio.sleep(delay)
        if job.status(self._now()) == "success":
            links = self._links(job)
            payload: dict[str, Any] = {
                "status": "success",
                "id": self._id(job),
                "output": links,
                "generationTime": round(job.ready_at - job.created, 3),
                "track_id": job.track_id,
                "meta": self._meta(job),
            }
        else:
            payload = {
                "status": "failed",
                "id": self._id(job),
                "message": "Processing failed: the emulator failed this job",
                "track_id": job.track_id,
            }
        assert job.webhook is not None  # noqa: S101 (checked when scheduled)
        for _ in range(copies):
            status = await self._post_webhook(job.webhook, payload)
            self.store.records.append(
                Record(
                    time=self._now(),
                    route="webhook",
                    endpoint=job.endpoint,
                    path=urlsplit(job.webhook).path,
                    job_id=str(job.id),
                    body=payload,
                    headers={},
                    status=status,
                )
            )

    async def _post_webhook(self, url: str, payload: dict[str, Any]) -> int:
        if self._session is None:
            return 0
        try:
            async with self._session.post(
                url, json=payload, timeout=aiohttp.ClientTimeout(total=30)
            ) as response:
                await response.read()
                return response.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            return 0


def _flag(value: Any) -> bool:
    return value in (True, "yes", "true", 1)


def _spelled_right(value: Any, endpoint: str) -> bool:
    if endpoint == "v6":
        return value in ("yes", "no")
    return isinstance(value, bool)


def _flag_spelling(endpoint: str) -> str:
    return '"yes" or "no"' if endpoint == "v6" else "true or false"


def _number(
    body: dict[str, Any],
    name: str,
    *,
    default: int,
    low: int,
    high: int,
    strict: bool,
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if strict and (isinstance(value, bool) or not isinstance(value, int)):
        raise _Refusal(400, f"{name} must be an integer")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _Refusal(400, f"{name} must be a number") from None
    if not low <= number <= high:
        raise _Refusal(400, f"{name} must be between {low} and {high}")
    return number


async def start_emulator(**settings: Any) -> Emulator:
    """
    Start an :class:`Emulator` with *settings* and return it, running.

    Close it with ``await emulator.aclose()``, or use
    ``async with Emulator(**settings) as emulator``.
    """
    return await Emulator(**settings).start()
