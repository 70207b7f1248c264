"""
The emulator, spoken to with raw aiohttp: shapes, quirks, caps, images.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import subprocess
import sys

import aiohttp
import anyio
import attrs
import pytest

from aiohttp import web
from PIL import Image

from modelslab_async.emulator import (
    ALL_QUIRKS,
    DEFAULT_ENDPOINTS,
    FAULT_KINDS,
    MIXED_KINDS,
    V6_TEXT2IMG,
    EmulatedEndpoint,
    Emulator,
    Faults,
    start_emulator,
)


pytestmark = pytest.mark.anyio

V6 = "v6/images/"
KLEIN = "v1/enterprise/flux_klein/"
#: The least a strict v6 submit takes: model_id is required there.
V6_BODY = {"key": "k", "model_id": "flux", "prompt": "p"}


@pytest.fixture(name="http")
async def _http():
    """
    A plain aiohttp session.
    """
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http, url, body):
    """
    POST JSON and return (status, decoded body).
    """
    async with http.post(url, json=body) as response:
        return response.status, await response.json(content_type=None)


async def test_legacy_processing_then_success(emulator, http):
    """A v6 job answers the legacy processing shape, then succeeds."""
    emulator.eta = 0.2

    status, queued = await post(http, emulator.url + V6 + "text2img", V6_BODY)
    _, thin = await post(
        http, emulator.url + V6 + f"fetch/{queued['id']}", {"key": "k"}
    )
    await asyncio.sleep(0.25)
    _, done = await post(
        http,
        emulator.url + V6 + "fetch",
        {"key": "k", "request_id": str(queued["id"])},
    )

    assert status == 200
    assert queued["status"] == "processing"
    assert isinstance(queued["id"], int)
    assert queued["messege"].startswith("Try to fetch")
    assert queued["tip_1"]
    assert queued["eta"] >= 0.2
    assert queued["output"] == []
    assert queued["fetch_result"].endswith(f"/fetch/{queued['id']}")
    assert len(queued["future_links"]) == 1
    assert thin == {
        "status": "processing",
        "messege": "try again later.",
        "output": "",
        "tip": queued["tip"],
    }
    assert done["status"] == "success"
    assert done["proxy_links"] == {"0": done["output"][0]}
    assert emulator.fetches(queued["id"]) == 2


async def test_modern_shapes_without_quirks(emulator, http):
    """With the quirks off, answers use message, string ids, eta on fetch."""
    emulator.quirks = frozenset()
    emulator.eta = 0.2

    _, queued = await post(
        http, emulator.url + KLEIN + "text2img", {"key": "k", "prompt": "p"}
    )
    _, fetched = await post(
        http, emulator.url + KLEIN + f"fetch/{queued['id']}", {"key": "k"}
    )

    assert isinstance(queued["id"], str)
    assert "messege" not in queued
    assert "tip" not in queued
    assert fetched["id"] == queued["id"]
    assert 0 < fetched["eta"] <= 0.2


async def test_queue_cap_answers_429(emulator, http):
    """Past its queue cap a key gets 429 with retry_after; others do not."""
    emulator.eta = 5
    emulator.queue_limit = 2
    url = emulator.url + V6 + "text2img"

    answers = [
        await post(http, url, {**V6_BODY, "key": "a"}) for _ in range(3)
    ]
    other = await post(http, url, {**V6_BODY, "key": "b"})

    assert [status for status, _ in answers] == [200, 200, 429]
    assert answers[2][1]["retry_after"] == emulator.retry_after
    assert "Maximum 2 queued requests" in answers[2][1]["messege"]
    assert other[0] == 200
    assert emulator.max_queued("a") == 2
    assert emulator.jobs_created == 3


@pytest.mark.parametrize(
    ("path", "body", "complaint"),
    [
        (V6 + "text2img", {**V6_BODY, "colour": "red"}, "unknown fields: colour"),
        (V6 + "text2img", {**V6_BODY, "base64": True}, 'must be "yes" or "no"'),
        (KLEIN + "text2img", {"key": "k", "prompt": "p", "base64": "no"}, "true or false"),
        (KLEIN + "text2img", {"key": "k", "prompt": "p", "width": "wide"}, "must be an integer"),
        (KLEIN + "text2img", {"key": "k", "prompt": "p", "temp": False}, "unknown fields: temp"),
        (V6 + "text2img", {**V6_BODY, "samples": 5}, "between 1 and 4"),
        (V6 + "text2img", {"key": "k"}, "prompt is required"),
        (V6 + "text2img", {"key": "k", "prompt": "p"}, "model_id is required"),
        (V6 + "text2img", {**V6_BODY, "guidance_scale": "high"}, "guidance_scale must be a number"),
        (V6 + "text2img", {**V6_BODY, "webhook": "ftp://h/x"}, "webhook must be an http"),
    ],
)  # fmt: skip
async def test_strict_mode_refuses_what_seeds_do_not_document(
    emulator, http, path, body, complaint
):
    """Strict mode answers 400 to undocumented fields and spellings."""
    status, answer = await post(http, emulator.url + path, body)

    assert status == 400
    assert answer["status"] == "error"
    assert complaint in answer["messege"]
    assert emulator.jobs_created == 0


async def test_keys_and_unknown_jobs(emulator, http):
    """Bad keys get 401; unknown or foreign jobs 404."""
    emulator.keys = {"good"}
    emulator.eta = 5
    _, job = await post(
        http, emulator.url + V6 + "text2img", {**V6_BODY, "key": "good"}
    )

    assert (await post(http, emulator.url + V6 + "text2img", {"prompt": "p"}))[
        0
    ] == 401
    assert (
        await post(
            http, emulator.url + V6 + "text2img", {**V6_BODY, "key": "bad"}
        )
    )[0] == 401
    assert (
        await post(http, emulator.url + V6 + "fetch/999", {"key": "good"})
    )[0] == 404
    emulator.keys = None
    assert (
        await post(
            http, emulator.url + V6 + f"fetch/{job['id']}", {"key": "x"}
        )
    )[0] == 404


async def test_real_deterministic_pngs(emulator, http):
    """Outputs are PNGs of the requested size; same seed, same bytes."""
    emulator.eta = 0
    images = []
    for seed in (5, 5, 6):
        _, done = await post(
            http,
            emulator.url + V6 + "text2img",
            {
                **V6_BODY,
                "width": 80,
                "height": 48,
                "seed": seed,
            },
        )
        async with http.get(done["output"][0]) as response:
            assert response.content_type == "image/png"
            images.append(await response.read())

    with Image.open(io.BytesIO(images[0])) as image:
        assert image.format == "PNG"
        assert image.size == (80, 48)
    assert images[0] == images[1]
    assert images[0] != images[2]


async def test_files_appear_after_the_job_and_the_cdn_delay(emulator, http):
    """Future links answer 404 until the job ends plus the CDN delay."""
    emulator.eta = 0.1
    emulator.cdn_delay = 0.2
    _, queued = await post(http, emulator.url + V6 + "text2img", V6_BODY)
    link = queued["future_links"][0]

    statuses = []
    for pause in (0, 0.15, 0.25):
        await asyncio.sleep(pause)
        async with http.get(link) as response:
            statuses.append(response.status)

    assert statuses == [404, 404, 200]


async def test_start_emulator_handle():
    """start_emulator() returns a running handle; aclose() stops it."""
    emulator = await start_emulator(eta=0, quirks=ALL_QUIRKS)
    url = emulator.url
    async with aiohttp.ClientSession() as http:
        status, _ = await post(http, url + V6 + "text2img", V6_BODY)
        await emulator.aclose()
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, url + V6 + "text2img", V6_BODY)

    assert status == 200
    with pytest.raises(RuntimeError, match="not running"):
        _ = emulator.url


async def test_requests_are_logged(emulator, http):
    """Every request is recorded with route, job id, body and status."""
    emulator.eta = 5
    _, job = await post(
        http, emulator.url + KLEIN + "text2img", {"key": "k", "prompt": "p"}
    )
    await post(http, emulator.url + KLEIN + f"fetch/{job['id']}", {"key": "k"})
    await post(http, emulator.url + KLEIN + "system_details", {"key": "k"})

    routes = [
        (r.route, r.endpoint, r.job_id, r.status) for r in emulator.records
    ]
    assert routes == [
        ("submit", "flux-klein", str(job["id"]), 200),
        ("fetch", "flux-klein", str(job["id"]), 200),
        ("manage", "flux-klein", None, 200),
    ]
    assert emulator.records[0].body == {"key": "k", "prompt": "p"}
    assert Emulator().eta == 2.0  # the documented default


# --- the fault a client cannot tell from a refusal -------------------------


@pytest.mark.parametrize(
    "quirks", [ALL_QUIRKS, frozenset()], ids=["legacy", "modern"]
)
async def test_http_500_after_makes_the_job_then_answers_500(http, quirks):
    """http_500_after: the job exists, then the documented 500 body."""
    faults = Faults(schedule={"submit": ["http_500_after"]})
    async with Emulator(eta=5, faults=faults, quirks=quirks) as emulator:
        status, answer = await post(
            http,
            emulator.url + KLEIN + "text2img",
            {"key": "k", "prompt": "p", "track_id": "t-1"},
        )
        (record,) = emulator.requests("submit")

    spelling = "messege" if "messege" in quirks else "message"
    assert status == 500
    assert answer == {
        "status": "error",
        spelling: "Internal server error. Please try again.",
    }
    assert emulator.jobs_created == 1
    assert emulator.jobs_for("t-1") == 1
    assert (record.status, record.fault) == (500, "http_500_after")
    assert emulator.counts["submit", 500, "http_500_after"] == 1
    assert emulator.faults.injected["submit", "http_500_after"] == 1


@pytest.mark.parametrize(
    ("kind", "made"),
    [("http_500", 0), ("reset_before", 0), ("reset_after", 1)],
)
async def test_which_faults_make_the_job(http, kind, made):
    """http_500 and reset_before refuse first; reset_after cuts after."""
    faults = Faults(schedule={"submit": [kind]})
    async with Emulator(eta=5, faults=faults) as emulator:
        with contextlib.suppress(aiohttp.ClientError):
            await post(
                http,
                emulator.url + KLEIN + "text2img",
                {"key": "k", "prompt": "p"},
            )
        (record,) = emulator.requests("submit")

    assert emulator.jobs_created == made
    assert record.fault == kind
    assert record.status == {"http_500": 500}.get(kind, 0)


def test_the_default_mix_includes_http_500_after():
    """Faults.mixed() spreads over every kind, 500-after-creation too."""
    default = Faults.mixed(0.5)
    chosen = Faults.mixed(0.5, kinds=["http_503"])

    assert set(MIXED_KINDS) == set(FAULT_KINDS)
    assert set(default.rates["submit"]) == set(FAULT_KINDS)
    assert "http_500_after" in default.rates["submit"]
    assert set(chosen.rates["submit"]) == {"http_503"}


# --- realistic estimates -----------------------------------------------------


async def test_eta_bias_makes_every_job_later_than_its_eta(http):
    """With eta_bias, a job takes eta * (1 + bias); "max" announces that."""
    async with Emulator(eta=10, eta_bias=0.5) as emulator:
        _, queued = await post(http, emulator.url + V6 + "text2img", V6_BODY)
        job = emulator.job(queued["id"])

    assert job.ready_at - job.created == pytest.approx(15)
    assert job.eta == 10
    assert queued["eta"] == 15


@pytest.mark.parametrize("announce", ["max", "nominal"])
async def test_announced_estimates(http, announce):
    """ "max" is never early; "nominal" is wrong both ways, as real ones are."""
    async with Emulator(
        eta=10, eta_error=0.5, announce=announce, seed=7
    ) as emulator:
        answers = [
            (await post(http, emulator.url + V6 + "text2img", V6_BODY))[1]
            for _ in range(40)
        ]
        real = [
            emulator.job(a["id"]).ready_at - emulator.job(a["id"]).created
            for a in answers
        ]

    late = [r > a["eta"] for a, r in zip(answers, real, strict=True)]
    if announce == "max":
        assert not any(late)
    else:
        assert {a["eta"] for a in answers} == {10}
        assert any(late)
        assert not all(late)


async def test_on_webhook_sent_comes_just_before_each_post(http):
    """on_webhook_sent gets the job id before each webhook POST leaves."""
    events = []

    async def receive(request):
        events.append(("received", str((await request.json())["id"])))
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    faults = Faults(webhook_duplicate=1.0)
    try:
        async with Emulator(
            eta=0,
            faults=faults,
            on_webhook_sent=lambda job_id: events.append(("sent", job_id)),
        ) as emulator:
            _, done = await post(
                http,
                emulator.url + KLEIN + "text2img",
                {
                    "key": "k",
                    "prompt": "p",
                    "webhook": f"http://127.0.0.1:{port}/hook",
                },
            )
            with anyio.fail_after(10):
                while len(emulator.requests("webhook")) < 2:
                    await asyncio.sleep(0.01)
    finally:
        await runner.cleanup()

    job_id = str(done["id"])
    assert events == [("sent", job_id), ("received", job_id)] * 2
    assert emulator.stats()["webhooks"] == {"duplicated": 1, "sent": 2}


# --- the endpoint table ----------------------------------------------------


async def test_a_third_endpoint_is_one_row(http):
    """An endpoint added to the table is served, checked and fetched."""
    img2img = attrs.evolve(
        V6_TEXT2IMG,
        submit="v6/images/img2img",
        fields=V6_TEXT2IMG.fields | {"init_image", "strength"},
    )
    body = {
        **V6_BODY,
        "init_image": "http://127.0.0.1:9/a.png",
        "strength": 0.5,
    }
    async with Emulator(
        eta=5, strict=True, endpoints=(*DEFAULT_ENDPOINTS, img2img)
    ) as emulator:
        status, job = await post(http, emulator.url + V6 + "img2img", body)
        refused, _ = await post(http, emulator.url + V6 + "text2img", body)
        _, fetched = await post(
            http, emulator.url + V6 + f"fetch/{job['id']}", {"key": "k"}
        )
        foreign, _ = await post(
            http, emulator.url + KLEIN + f"fetch/{job['id']}", {"key": "k"}
        )
        (record, _) = emulator.requests("submit")

    assert status == 200
    assert job["fetch_result"].endswith(f"/api/v6/images/fetch/{job['id']}")
    assert (record.path, record.endpoint) == ("/api/v6/images/img2img", "v6")
    assert refused == 400  # text2img documents no init_image
    assert fetched["status"] == "processing"
    assert foreign == 404  # a v6 job is not a Flux Klein server's


async def test_without_the_row_the_path_is_404(emulator, http):
    """The default table serves no img2img: an unknown path, JSON 404."""
    status, answer = await post(http, emulator.url + V6 + "img2img", V6_BODY)

    assert status == 404
    assert answer["status"] == "error"


@pytest.mark.parametrize(
    "changes",
    [
        {"submit": "/api/v6/x"},
        {"fetch": "v6/images/fetch"},
        {"booleans": "0/1"},
    ],
)
def test_a_bad_row_is_refused(changes):
    """An endpoint row with a bad path or spelling raises at once."""
    with pytest.raises(ValueError):  # noqa: PT011 (the message names the field)
        attrs.evolve(V6_TEXT2IMG, **changes)


def test_two_rows_on_one_path_are_refused():
    """Two endpoints submitting on one path cannot both be served."""
    with pytest.raises(ValueError, match="distinct submit paths"):
        Emulator(endpoints=(*DEFAULT_ENDPOINTS, V6_TEXT2IMG))
    with pytest.raises(TypeError):
        Emulator(endpoints=(*DEFAULT_ENDPOINTS, "v6/images/img2img"))
    assert isinstance(DEFAULT_ENDPOINTS[0], EmulatedEndpoint)


# --- no Pillow -------------------------------------------------------------


def test_without_pillow_construction_names_the_fix():
    """Without Pillow, importing works; Emulator() fails in one line."""
    script = (
        "import sys; sys.modules['PIL'] = None\n"
        "import modelslab_async.emulator as emulator\n"
        "print('imported', flush=True)\n"
        "emulator.Emulator()\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert process.stdout == "imported\n"
    assert process.returncode == 1
    assert process.stderr.splitlines()[-1] == (
        "ImportError: the emulator draws real PNGs with Pillow: "
        'pip install "modelslab-async[emulator]"'
    )


# --- quiet logs --------------------------------------------------------------


def noisy(records):
    """
    Log records with a traceback, or above debug and info.
    """
    return [r for r in records if r.exc_info or r.levelno >= logging.WARNING]


async def test_a_client_hanging_up_logs_one_debug_line(caplog, http):
    """A client hanging up mid-request: one debug line, no traceback."""
    caplog.set_level(logging.DEBUG)
    faults = Faults(schedule={"submit": ["stall"]}, stall_seconds=60)
    async with Emulator(eta=5, faults=faults) as emulator:
        with anyio.move_on_after(0.2):
            await post(http, emulator.url + V6 + "text2img", V6_BODY)
        with anyio.fail_after(10):
            while not any("hung up" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.01)

    (line,) = [r for r in caplog.records if "hung up" in r.getMessage()]
    assert line.levelno == logging.DEBUG
    assert "POST /api/v6/images/text2img" in line.getMessage()
    assert noisy(caplog.records) == []


async def test_a_receiver_that_is_gone_logs_one_debug_line(caplog, http):
    """A webhook to a closed port: one debug line, no traceback."""
    caplog.set_level(logging.DEBUG)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    async with Emulator(eta=0) as emulator:
        await post(
            http,
            emulator.url + KLEIN + "text2img",
            {
                "key": "k",
                "prompt": "p",
                "webhook": f"http://127.0.0.1:{port}/x",
            },
        )
        with anyio.fail_after(10):
            while not emulator.requests("webhook"):
                await asyncio.sleep(0.01)

    (record,) = emulator.requests("webhook")
    assert record.status == 0
    assert emulator.stats()["webhooks"] == {"failed": 1}
    lines = [r for r in caplog.records if "not delivered" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.DEBUG]
    assert noisy(caplog.records) == []


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32,
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["header too long", "TLS hello", "no HTTP"],
)
async def test_garbage_on_the_port_logs_no_traceback(caplog, garbage):
    """What is not HTTP gets a 400 and a debug line, no traceback."""
    caplog.set_level(logging.DEBUG)
    async with Emulator() as emulator:
        host, port = emulator.origin.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(garbage)
        await writer.drain()
        answer = await reader.read(100)
        writer.close()
        await writer.wait_closed()

    assert answer.split(b" ")[1:2] in ([b"400"], [])
    assert noisy(caplog.records) == []
