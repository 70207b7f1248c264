"""
The emulator, spoken to with raw aiohttp: shapes, quirks, caps, images.
"""

from __future__ import annotations

import asyncio
import io

import aiohttp
import pytest

from PIL import Image

from modelslab_async.emulator import ALL_QUIRKS, Emulator, start_emulator


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
