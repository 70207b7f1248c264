"""
The emulator fuzzed over HTTP: bodies generated from the vendor's OpenAPI
request schemas by Schemathesis, valid and not, plus mutated ones. Whatever
arrives on a submit or fetch route, the answer is no 5xx and nothing is
logged with a traceback.
"""

from __future__ import annotations

import json
import logging

from typing import Any

import aiohttp
import pytest
import schemathesis

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from yarl import URL

from conftest import DATA, seed_bodies


pytestmark = [pytest.mark.anyio, pytest.mark.property]

SUBMITS = ("v6/images/text2img", "v1/enterprise/flux_klein/text2img")
FETCHES = ("v6/images/fetch/", "v1/enterprise/flux_klein/fetch/")
#: A few hundred examples by default; more with HYPOTHESIS_PROFILE=soak.
EXAMPLES = 5 * settings.default.max_examples


def operation(name: str, path: str) -> schemathesis.APIOperation:
    """
    One POST operation of a vendor OpenAPI file in tests/data/openapi.
    """
    document = json.loads(
        (DATA / "openapi" / name).read_text(encoding="utf-8")
    )
    return schemathesis.openapi.from_dict(document)[path]["POST"]


def cases(op: schemathesis.APIOperation) -> st.SearchStrategy[Any]:
    """
    Requests the schema allows, and requests it does not.
    """
    return st.one_of(
        op.as_strategy(generation_mode=mode)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    )


SUBMIT_CASES = st.one_of(
    cases(operation("community-models.json", "/text2img")),
    cases(operation("flux.json", "/text2img")),
    # Flux Klein's file has no text2img; its img2img is the closest body.
    cases(operation("flux-klein.json", "/flux_klein/img2img")),
)
FETCH_BODY_CASES = cases(operation("community-models.json", "/fetch"))
FETCH_PATH_CASES = cases(
    operation("flux-klein.json", "/flux_klein/fetch/{id}")
)

#: Values that have broken a server: wrong types, huge and NaN-ish
#: numbers, digits that are not ASCII, URLs that do not parse.
WEIRD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**400, -(10**400), 2**64, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        ["NaN", "nan", "Infinity", "-inf", "1e400", "0x10", "²", "١٢", "",
         " ", "512px", "yes", "no", "true", "http://[::1", "ftp://x",
         "http://127.0.0.1:99999/", "http://127.0.0.1:9/closed"]
    ),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)  # fmt: skip
FIELDS = st.sampled_from(
    ["key", "prompt", "model_id", "width", "height", "samples", "seed",
     "base64", "webhook", "track_id", "safety_checker", "guidance_scale",
     "num_inference_steps", "lora_strength", "upscale", "request_id"]
) | st.text(max_size=10)  # fmt: skip
SEEDS = [
    {**body, "key": "k"}
    for name in (
        "seed_000_flux_klein_text2img.txt",
        "seed_001_v6_text2img.txt",
    )
    for body in seed_bodies(name)
]


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """
    A seed body with fields set to weird values, or removed.
    """
    body = dict(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(FIELDS)
        if draw(st.booleans()) and name in body:
            del body[name]
        else:
            body[name] = draw(WEIRD)
    return body


RAW = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [b"", b"[" * 3_000 + b"]" * 3_000, b'{"key": "\xff"}', b"null",
         b'{"key": "k", "prompt": ', b"\x1f\x8b garbage"]
    ),
)  # fmt: skip


def encoded(body: Any) -> bytes:
    """
    *body* as the bytes to send: JSON, or bytes as they are.
    """
    if isinstance(body, bytes):
        return body
    return json.dumps(body).encode()


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """
    A path below the API root and a raw body to POST there.
    """
    kind = draw(st.sampled_from(["submit", "fetch body", "fetch path"]))
    if kind == "submit":
        source = draw(
            st.sampled_from(["schema", "mutated", "raw"]), label="source"
        )
        if source == "schema":
            body: Any = draw(SUBMIT_CASES).body
        elif source == "mutated":
            body = draw(mutated())
        else:
            body = draw(RAW)
        return draw(st.sampled_from(SUBMITS)), encoded(body)
    if kind == "fetch body":
        case = draw(FETCH_BODY_CASES | mutated())
        body = case if isinstance(case, dict) else case.body
        return "v6/images/fetch", encoded(body)
    case = draw(FETCH_PATH_CASES)
    job_id = draw(
        st.just(str(case.path_parameters.get("id", "")))
        | st.sampled_from(["134700000", "134700001", "0", "9" * 30])
    )
    body = draw(st.just(case.body) | mutated() | RAW)
    return draw(st.sampled_from(FETCHES)) + job_id, encoded(body)


@pytest.fixture(name="http")
async def _http():
    """
    A plain aiohttp session.
    """
    async with aiohttp.ClientSession() as session:
        yield session


@settings(
    max_examples=EXAMPLES,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(request=requests(), strict=st.booleans())
async def test_no_input_gets_a_5xx_or_a_traceback(
    emulator, http, caplog, request, strict
):
    """Schema-made and mutated requests get no 5xx and log no traceback."""
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    emulator.strict = strict
    path, body = request

    url = URL(emulator.url + path, encoded=True)
    answered = sum(emulator.counts.values())
    async with http.post(url, data=body) as response:
        status = response.status
        answer = await response.read()

    assert status < 500, (path, body[:300], answer[:300])
    if status >= 400 and sum(emulator.counts.values()) > answered:
        # What reached the emulator is answered with the error shape.
        error = json.loads(answer)
        assert error["status"] == "error"
    broken = [
        r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR
    ]
    assert broken == [], [r.getMessage() for r in broken]
