"""
The wire: exact bodies sent, and every documented answer read.
"""

from __future__ import annotations

from typing import Any

import pytest

from conftest import KEY, documented_responses, seed_bodies
from modelslab_async import FluxKleinText2Img, JobStatus, Text2Img
from modelslab_async._converter import (
    decode_job,
    decode_message,
    decode_system_details,
    request_body,
)
from modelslab_async.errors import ResponseDecodeError


pytestmark = pytest.mark.anyio


def normalized(seed: dict[str, Any]) -> dict[str, Any]:
    """
    A seed example as we send it: the documented types, not the examples'
    strings ("512" is a number field), nulls left out for server defaults.
    """
    body = {
        name: int(value)
        if isinstance(value, str) and value.isdigit()
        else value
        for name, value in seed.items()
        if value is not None
    }
    body["key"] = KEY
    return body


async def test_flux_klein_body_matches_seed_000(emulator, client):
    """The Flux Klein body is seed 000's, with JSON booleans."""
    (seed,) = seed_bodies("seed_000_flux_klein_text2img.txt")
    request = FluxKleinText2Img(
        prompt=seed["prompt"],
        negative_prompt=seed["negative_prompt"],
        width=512,
        height=512,
        safety_checker=False,
        samples=1,
        base64=False,
    )

    job = await client.submit(request)

    (record,) = emulator.requests("submit")
    assert record.path == "/api/v1/enterprise/flux_klein/text2img"
    assert record.body == {**normalized(seed), "track_id": job.track_id}
    assert record.body["safety_checker"] is False
    assert record.body["base64"] is False


async def test_v6_body_matches_seed_001(emulator, client):
    """The v6 body is seed 001's, with "yes"/"no" booleans."""
    seed = seed_bodies("seed_001_v6_text2img.txt")[0]
    request = Text2Img(
        prompt=seed["prompt"],
        model_id="flux",
        width=512,
        height=512,
        samples=1,
        num_inference_steps=31,
        safety_checker=False,
        enhance_prompt=True,
        guidance_scale=7.5,
        panorama=False,
        self_attention=False,
        tomesd=True,
        clip_skip=2,
    )

    job = await client.submit(request)

    (record,) = emulator.requests("submit")
    assert record.path == "/api/v6/images/text2img"
    assert record.body == {**normalized(seed), "track_id": job.track_id}
    assert record.body["safety_checker"] == "no"
    assert record.body["tomesd"] == "yes"


def test_v6_second_seed_example():
    """The seed's second (JavaScript) example round-trips the same way."""
    seed = seed_bodies("seed_001_v6_text2img.txt")[1]
    request = Text2Img(
        prompt=seed["prompt"],
        width=512,
        height=512,
        samples=1,
        num_inference_steps=30,
        safety_checker=False,
        enhance_prompt=True,
        guidance_scale=7.5,
        self_attention=False,
    )

    body = request_body(request, key=KEY)

    assert body == normalized(seed)


def test_unset_fields_are_omitted_and_model_id_kept():
    """Only what was set is sent; model_id always is, key first."""
    body = request_body(Text2Img(prompt="p"), key=KEY)

    assert body == {"key": KEY, "prompt": "p", "model_id": "flux"}
    assert next(iter(body)) == "key"


def test_lists_extra_track_id_and_webhook():
    """LoRA lists are comma-joined, extra passes through, ours fill gaps."""
    request = Text2Img(
        prompt="p",
        lora_model=["a", "b"],
        lora_strength=[0.5, 1.0],
        extra={"upscale": "no", "use_karras_sigmas": "yes"},
        track_id="mine",
    )

    body = request_body(
        request, key=KEY, track_id="generated", webhook="http://h/x"
    )

    assert body["lora_model"] == "a,b"
    assert body["lora_strength"] == "0.5,1.0"
    assert body["upscale"] == "no"
    assert body["use_karras_sigmas"] == "yes"
    assert body["track_id"] == "mine"
    assert body["webhook"] == "http://h/x"


async def test_extra_reaches_the_server(emulator, client):
    """Undocumented fields in extra are sent unchanged."""
    emulator.strict = False

    await client.submit(
        FluxKleinText2Img(prompt="p", extra={"temp": False, "n": [1, 2]})
    )

    (record,) = emulator.requests("submit")
    assert record.body["temp"] is False
    assert record.body["n"] == [1, 2]


@pytest.mark.parametrize(
    "example",
    documented_responses(),
    ids=lambda e: f"{e['source'][:24]}:{e['body']['status']}",
)
def test_every_documented_response_is_read(example):
    """Each documented answer decodes, with ids as strings."""
    body = example["body"]

    if body["status"] == "ok":
        details = decode_system_details(body)
        assert details.status == "ok"
        assert details.model_count == body["model_count"]
        return
    job = decode_job(body)

    assert job.status is JobStatus(body["status"])
    assert job.id == (None if "id" not in body else str(body["id"]))
    assert job.message == body.get("message", body.get("messege"))
    assert job.output == tuple(body.get("output") or ())
    assert set(job.extra) == body.keys() - {
        "status", "id", "eta", "output", "future_links", "proxy_links",
        "fetch_result", "message", "messege", "tip", "generationTime",
        "track_id", "nsfw_content_detected", "meta",
    }  # fmt: skip


def test_legacy_processing_shape():
    """The old processing body: messege, float eta, links, tips kept."""
    (example,) = [e for e in documented_responses() if e["body"].get("tip_1")]

    job = decode_job(example["body"])

    assert job.status is JobStatus.PROCESSING
    assert job.eta == 2.75
    assert job.message == "Try to fetch request after seconds estimated"
    assert job.future_links[0].endswith(".jpg")
    assert job.extra["tip_1"].startswith("Your image is processing")
    assert job.extra["webhook_status"] == ""


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"status": "success", "id": 7}, {"id": "7"}),
        ({"status": "success", "id": "abc-1"}, {"id": "abc-1"}),
        ({"status": "success", "id": 7.0}, {"id": "7"}),
        ({"status": "processing", "output": ""}, {"output": ()}),
        ({"status": "processing", "eta": "35"}, {"eta": 35.0}),
        ({"status": "success", "generationTime": "1.5"}, {"generation_time": 1.5}),
        (
            {"status": "success", "proxy_links": {"1": "b", "0": "a"}},
            {"proxy_links": ("a", "b")},
        ),
        ({"status": "success", "proxy_links": ["a"]}, {"proxy_links": ("a",)}),
        ({"status": "success", "meta": []}, {"meta": {}}),
        ({"status": "success", "track_id": 12}, {"track_id": "12"}),
        ({"status": "success", "nsfw_content_detected": "no"}, {"nsfw_content_detected": False}),
        ({"status": "error", "message": {"prompt": ["required"]}}, {"message": '{"prompt": ["required"]}'}),
        ({"status": "error", "messege": "typo", "message": "right"}, {"message": "right"}),
        ({"status": "processing", "id": 9, "eta": "soon"}, {"id": "9", "eta": None}),
        ({"status": "processing", "id": 9, "eta": -1}, {"id": "9", "eta": None}),
        ({"status": "processing", "id": 9, "eta": 10**400}, {"id": "9", "eta": None}),
        ({"status": "processing", "id": 9, "eta": float("nan")}, {"id": "9", "eta": None}),
        ({"status": "processing", "id": 9, "eta": True}, {"id": "9", "eta": None}),
        ({"status": "processing", "fetch_result": "https://h/api/v6/images/fetch/77"}, {"id": "77"}),
    ],
)  # fmt: skip
def test_tolerant_reading(raw, expected):
    """Shifting types and legacy spellings read as one shape."""
    job = decode_job(raw)

    for name, value in expected.items():
        assert getattr(job, name) == value


@pytest.mark.parametrize(
    "raw",
    [
        {"status": "banana"},
        {"id": 1},
        {"status": "success", "id": True},
        {"status": "success", "output": [1, 2]},
        {"status": "success", "meta": "x"},
        {"status": "success", "proxy_links": {"a": "b"}},
        ["status", "success"],
        "success",
        None,
    ],
)
def test_undecodable_answers(raw):
    """A body of no documented shape is a ResponseDecodeError."""
    with pytest.raises(ResponseDecodeError, match="unexpected"):
        decode_job(raw)


def test_management_message():
    """A management answer yields its message."""
    assert decode_message(
        {"status": "success", "message": "server restarting"}
    ) == ("server restarting")
