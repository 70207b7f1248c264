"""
The emulator against bad input and the vendor's OpenAPI: 4xx, never 5xx.
"""

from __future__ import annotations

import gzip
import json
import re

import aiohttp
import pytest

from yarl import URL

from conftest import DATA, seed_bodies
from modelslab_async.emulator import (
    FLUX_KLEIN_TEXT2IMG,
    V6_TEXT2IMG,
    Emulator,
)


pytestmark = pytest.mark.anyio

V6 = "v6/images/"
KLEIN = "v1/enterprise/flux_klein/"
V6_BODY = {"key": "k", "model_id": "flux", "prompt": "p"}
OPENAPI = DATA / "openapi"


@pytest.fixture(name="http")
async def _http():
    """
    A plain aiohttp session.
    """
    async with aiohttp.ClientSession() as session:
        yield session


async def raw_post(http, url, data, headers=None):
    """
    POST raw bytes; return (status, body parsed as JSON or None).
    """
    async with http.post(url, data=data, headers=headers) as response:
        text = await response.read()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, None


def assert_error_body(status, answer, *, low=400, high=499):
    """
    A 4xx with the documented error shape.
    """
    assert low <= status <= high, (status, answer)
    assert isinstance(answer, dict), answer
    assert answer["status"] == "error"
    assert answer.get("message") or answer.get("messege")


#: Bodies the emulator answered with a 500 (and some made a job first).
MALFORMED = {
    "seed a word": b'{"key": "k", "prompt": "p", "seed": "abc"}',
    "seed a list": b'{"key": "k", "prompt": "p", "seed": []}',
    "seed 1e400": b'{"key": "k", "prompt": "p", "seed": 1e400}',
    "width 10**400": b'{"key": "k", "prompt": "p", "width": 1%s}' % (b"0" * 400),
    "webhook a number": b'{"key": "k", "prompt": "p", "webhook": 5}',
    "webhook true": b'{"key": "k", "prompt": "p", "webhook": true}',
    "webhook no closing bracket": b'{"key": "k", "prompt": "p", "webhook": "http://[::1"}',
    "webhook port too big": b'{"key": "k", "prompt": "p", "webhook": "http://127.0.0.1:99999/x"}',
    "track_id an object": b'{"key": "k", "prompt": "p", "track_id": {"a": 1}}',
    "prompt a number": b'{"key": "k", "prompt": 5}',
    "width NaN": b'{"key": "k", "prompt": "p", "width": NaN}',
    "a list": b"[1, 2]",
    "a string": b'"text"',
    "null": b"null",
    "not UTF-8": b'{"key": "\xff\xfe", "prompt": "p"}',
    "truncated": b'{"key": "k", "prompt": ',
    "empty": b"",
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "5000-digit integer": b'{"key": "k", "prompt": "p", "samples": %s}' % (b"9" * 5000),
}  # fmt: skip


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
@pytest.mark.parametrize("path", [V6 + "text2img", KLEIN + "text2img"])
@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_submits_get_4xx_and_no_job(http, path, body, strict):
    """A malformed submit gets a 4xx error body and makes no job."""
    async with Emulator(eta=5, strict=strict) as emulator:
        status, answer = await raw_post(http, emulator.url + path, body)

        assert_error_body(status, answer)
        assert emulator.jobs_created == 0
        assert [r.status for r in emulator.requests("submit")] == [status]


@pytest.mark.parametrize(
    "encoding", ["gzip", "deflate", "br"], ids=lambda e: f"{e} garbage"
)
async def test_a_body_that_does_not_decompress_gets_400(
    emulator, http, encoding
):
    """A body declared compressed that is not gets a 4xx, not a 500."""
    headers = {
        "Content-Encoding": encoding,
        "Content-Type": "application/json",
    }

    status, answer = await raw_post(
        http, emulator.url + V6 + "text2img", b"garbage", headers
    )

    assert 400 <= status < 500
    if emulator.requests("submit"):
        # Without brotli installed, aiohttp refuses "br" before the
        # emulator sees the request; what reaches it gets the JSON shape.
        assert_error_body(status, answer)
    assert emulator.jobs_created == 0


async def test_a_gzip_body_is_read(emulator, http):
    """A well-formed gzip body is a submit like any other."""
    status, answer = await raw_post(
        http,
        emulator.url + V6 + "text2img",
        gzip.compress(json.dumps(V6_BODY).encode()),
        {"Content-Encoding": "gzip"},
    )

    assert status == 200, answer
    assert emulator.jobs_created == 1


@pytest.mark.parametrize(
    "job_id", ["%C2%B2", "%D9%A1%D9%A2", "12a", "-1", "1" * 40, "%00", "%FF"]
)
@pytest.mark.parametrize("prefix", [V6 + "fetch/", KLEIN + "fetch/"])
async def test_fetch_of_an_id_that_is_no_id_is_404(
    emulator, http, prefix, job_id
):
    """A fetch id that is no job id (not ASCII digits) gets a JSON 404."""
    url = URL(emulator.url + prefix + job_id, encoded=True)

    status, answer = await raw_post(http, url, b'{"key": "k"}')

    assert status == 404
    assert_error_body(status, answer)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"key": "k"}, 400),
        ({"key": "k", "request_id": None}, 400),
        ({"key": "k", "request_id": ["1"]}, 400),
        ({"key": "k", "request_id": True}, 400),
        ({"key": "k", "request_id": "²"}, 404),
        ({"key": "k", "request_id": 134700000}, 404),
    ],
)
async def test_fetch_by_body_checks_request_id(emulator, http, body, status):
    """The v6 body form needs a request_id string: else 400, unknown 404."""
    answer = await raw_post(
        http, emulator.url + V6 + "fetch", json.dumps(body).encode()
    )

    assert_error_body(*answer, low=status, high=status)


async def test_unknown_routes_and_methods_answer_json(emulator, http):
    """Unknown paths and methods answer the error shape, 404 and 405."""
    status, answer = await raw_post(
        http, emulator.url + "v6/images/nothing", b"{}"
    )
    async with http.get(emulator.url + V6 + "text2img") as response:
        method = response.status, await response.json()

    assert_error_body(status, answer, low=404, high=404)
    assert_error_body(*method, low=405, high=405)
    assert response.headers["Allow"] == "POST"


# --- strict mode, against the vendor's own documents --------------------


def openapi(name):
    """
    One of the vendor's OpenAPI files in tests/data/openapi.
    """
    return json.loads((OPENAPI / name).read_text(encoding="utf-8"))


def request_properties(document, schema):
    """
    The properties of a request schema, with those it extends.
    """
    schemas = document["components"]["schemas"]
    found = dict(schemas[schema].get("properties", {}))
    for part in schemas[schema].get("allOf", []):
        found |= request_properties(document, part["$ref"].rsplit("/", 1)[1])
    return found


def resolved(document, spec):
    """
    A property's schema with a $ref to an enum followed.
    """
    if "$ref" in spec:
        target = document["components"]["schemas"][
            spec["$ref"].rsplit("/")[-1]
        ]
        return {**target, **{k: v for k, v in spec.items() if k != "$ref"}}
    return spec


def valid_value(spec, booleans):
    """
    A value the vendor's schema allows, spelled as the endpoint spells it.
    """
    kind = spec.get("type") or spec["oneOf"][0]["type"]
    if "enum" in spec:
        return spec["enum"][0]
    if kind == "boolean":
        return "no" if booleans == "yes-no" else False
    if kind in ("integer", "number"):
        return spec.get("default", spec.get("minimum", 1))
    if spec.get("format") == "uri":
        return "http://127.0.0.1:9/hook"
    return "text"


V6_DOCUMENTED = {
    **request_properties(
        openapi("community-models.json"), "TextToImageRequest"
    ),
    **request_properties(openapi("flux.json"), "FluxTextToImageRequest"),
}
V6_SPECS = {
    name: resolved(
        openapi("community-models.json")
        if "$ref" in spec and "IPAdapter" in spec["$ref"]
        else openapi("flux.json")
        if name in request_properties(openapi("flux.json"), "FluxTextToImageRequest")
        else openapi("community-models.json"),
        spec,
    )
    for name, spec in V6_DOCUMENTED.items()
}  # fmt: skip


def seed_fields(name, pattern):
    """
    The fields a seed page documents: its table or tags, and its bodies.
    """
    text = (DATA / name).read_text(encoding="utf-8")
    listed = {field.replace("\\_", "_") for field in re.findall(pattern, text)}
    return listed | {field for body in seed_bodies(name) for field in body}


def test_the_field_sets_are_what_the_vendor_documents():
    """v6 takes the OpenAPI fields and seed 001's; Flux Klein seed 000's."""
    seed_001 = seed_fields(
        "seed_001_v6_text2img.txt", r"(?m)^\| \*\*(.+?)\*\* \|"
    )
    seed_000 = seed_fields(
        "seed_000_flux_klein_text2img.txt", r'ParamField query="(\w+)"'
    )

    assert len(seed_001) > 20
    assert V6_TEXT2IMG.fields == set(V6_DOCUMENTED) | seed_001
    assert FLUX_KLEIN_TEXT2IMG.fields == seed_000
    assert V6_TEXT2IMG.required == {"key", "prompt", "model_id"}


@pytest.mark.parametrize("name", sorted(set(V6_SPECS) - {"key", "prompt"}))
async def test_strict_v6_takes_every_field_the_openapi_documents(
    emulator, http, name
):
    """Strict v6 accepts each field of the community and Flux OpenAPI."""
    body = {**V6_BODY, name: valid_value(V6_SPECS[name], "yes-no")}

    status, answer = await raw_post(
        http, emulator.url + V6 + "text2img", json.dumps(body).encode()
    )

    assert status == 200, answer
    assert emulator.jobs_created == 1


KLEIN_IMG2IMG = openapi("flux-klein.json")["paths"]["/flux_klein/img2img"]
KLEIN_DOCUMENTED = KLEIN_IMG2IMG["post"]["requestBody"]["content"][
    "application/json"
]["schema"]["properties"]


@pytest.mark.parametrize(
    "name",
    # img2img's fields but its image inputs: text2img is not in the file.
    sorted(set(KLEIN_DOCUMENTED) - {"key", "prompt", "init_image", "strength", "temp"}),
)  # fmt: skip
async def test_strict_flux_klein_takes_its_documented_fields(
    emulator, http, name
):
    """Strict Flux Klein accepts the fields its pages document."""
    body = {
        "key": "k",
        "prompt": "p",
        name: valid_value(KLEIN_DOCUMENTED[name], "json"),
    }

    status, answer = await raw_post(
        http, emulator.url + KLEIN + "text2img", json.dumps(body).encode()
    )

    assert status == 200, answer


@pytest.mark.parametrize(
    ("path", "body"),
    [
        *((V6 + "text2img", b) for b in seed_bodies("seed_001_v6_text2img.txt")),
        *((KLEIN + "text2img", b) for b in seed_bodies("seed_000_flux_klein_text2img.txt")),
    ],
)  # fmt: skip
async def test_strict_takes_the_seed_bodies_verbatim(
    emulator, http, path, body
):
    """The seeds' example bodies, numbers as strings and all, pass strict."""
    body = {**body, "key": "k"}

    status, answer = await raw_post(
        http, emulator.url + path, json.dumps(body).encode()
    )

    assert status == 200, answer


@pytest.mark.parametrize(
    ("field", "value", "complaint"),
    [
        ("width", "512px", "width must be an integer"),
        ("width", 512.5, "width must be an integer"),
        ("num_inference_steps", [], "num_inference_steps must be an integer"),
        ("guidance_scale", "NaN", "guidance_scale must be a number"),
        ("guidance_scale", "1e400", "guidance_scale must be a number"),
        ("true_cfg_scale", True, "true_cfg_scale must be a number"),
        ("lora_strength", {}, "lora_strength must be a number"),
        ("use_karras_sigmas", "true", 'must be "yes" or "no"'),
        ("upscale", "2x", "upscale must be"),
        ("model_id", 5, "model_id must be a string"),
        ("ip_adapter_image", "not a url", "ip_adapter_image must be an http"),
        ("seed", -1, "seed must be a non-negative integer"),
    ],
)
async def test_strict_v6_refuses_wrong_types(
    emulator, http, field, value, complaint
):
    """Strict v6 refuses values of the wrong type, naming the field."""
    body = {**V6_BODY, field: value}

    status, answer = await raw_post(
        http, emulator.url + V6 + "text2img", json.dumps(body).encode()
    )

    assert_error_body(status, answer, low=400, high=400)
    assert complaint in answer["messege"]
    assert emulator.jobs_created == 0
