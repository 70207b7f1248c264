"""
Property-based: bad input anywhere gives a result or our error, nothing else.
"""

from __future__ import annotations

import asyncio
import gc
import json
import warnings

from typing import Any

import anyio
import attrs
import pytest

from hypothesis import given
from hypothesis import strategies as st

from conftest import FAST_RETRY, KEY, held, session_of
from modelslab_async import (
    Client,
    FluxKleinText2Img,
    JobResponse,
    Text2Img,
)
from modelslab_async._converter import decode_job, request_body
from modelslab_async._http import Requester, _Failed, parse
from modelslab_async.errors import (
    InvalidRequestError,
    ModelsLabError,
    ModelsLabWarning,
    ResponseDecodeError,
)


pytestmark = [pytest.mark.anyio, pytest.mark.property]

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
KEYS = st.sampled_from(
    ["status", "id", "eta", "output", "future_links", "proxy_links",
     "fetch_result", "message", "messege", "tip", "generationTime",
     "track_id", "nsfw_content_detected", "meta", "retry_after"]
)  # fmt: skip
STATUSES = st.sampled_from(["success", "processing", "error", "failed", "ok"])
ANSWERS = st.dictionaries(KEYS, JSON, max_size=8).flatmap(
    lambda body: (
        STATUSES.map(lambda status: {"status": status, **body}) | st.just(body)
    )
)


@given(ANSWERS | JSON)
def test_decoder_gives_a_response_or_its_error(data):
    """Any JSON decodes to a JobResponse or a ResponseDecodeError."""
    try:
        response = decode_job(data)
    except ResponseDecodeError:
        return

    assert isinstance(response, JobResponse)
    assert response.id is None or isinstance(response.id, str)
    assert all(isinstance(link, str) for link in response.output)


@given(
    raw=st.binary(max_size=300)
    | ANSWERS.map(lambda v: json.dumps(v).encode())
    | JSON.map(lambda v: json.dumps(v).encode()),
    http_status=st.sampled_from([200, 201, 204, 301, 400, 401, 402, 403, 404, 409, 418, 429, 500, 502, 503, 504]),
    retry_header=st.none() | st.sampled_from(["3", "-1", "soon", "Wed, 21 Oct 2015 07:28:00 GMT"]),
)  # fmt: skip
def test_any_answer_is_a_dict_or_our_error(raw, http_status, retry_header):
    """Any HTTP answer becomes a JSON object or one of our errors."""
    requester = Requester.__new__(Requester)
    requester.redact = lambda text: text.replace(KEY, "<secret>")
    where = {"endpoint": "x", "job_id": None, "http_status": http_status}

    try:
        data = requester._interpret(
            parse(raw), raw, http_status, retry_header, where
        )
    except _Failed as wrapped:
        error = wrapped.error
    except ModelsLabError as error_:
        error = error_
    else:
        assert isinstance(data, dict)
        return

    assert isinstance(error, ModelsLabError)
    assert error.http_status == http_status
    retry_after = getattr(error, "retry_after", None)
    assert retry_after is None or retry_after >= 0


FIELD_VALUES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-5, max_value=5000)
    | st.floats(min_value=-5, max_value=50)
    | st.text(max_size=12)
    | st.sampled_from(["blur", "enhance", "none", "https://h/x", "yes"])
    | st.lists(st.floats(min_value=0, max_value=1.5), max_size=3)
)


@pytest.mark.parametrize("cls", [Text2Img, FluxKleinText2Img])
@given(data=st.data())
def test_random_parameters_build_or_name_the_field(cls, data):
    """Random fields build a sendable request or name the bad field."""
    # prompt is required: leaving it out is Python's own TypeError.
    optional = {
        f.name: FIELD_VALUES
        for f in attrs.fields(cls)
        if f.name not in ("extra", "prompt")
    }
    fields: dict[str, Any] = data.draw(
        st.fixed_dictionaries({"prompt": FIELD_VALUES}, optional=optional)
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ModelsLabWarning)
        try:
            request = cls(**fields)
        except InvalidRequestError as error:
            refused = error
        else:
            refused = None
    if refused is not None:
        assert refused.field in {*fields, "prompt"}
        assert refused.field in str(refused)
        return

    body = request_body(request, key=KEY)
    assert json.loads(json.dumps(body)) == body
    assert body["prompt"] == fields["prompt"]


@pytest.fixture(name="cancellable")
async def _cancellable(emulator):
    """
    A client with a 2-job cap on the emulator, checked for leaks after.
    """
    emulator.eta = 0.03
    async with Client(
        KEY, base_url=emulator.url, max_queued=2, retry=FAST_RETRY
    ) as client:
        yield client
    assert session_of(client).closed


@given(ticks=st.integers(min_value=0, max_value=80), jobs=st.integers(1, 4))
async def test_cancelling_generate_anywhere_leaves_nothing(
    cancellable, ticks, jobs
):
    """Cancelled anywhere, generate() leaks no socket; slots follow the jobs."""
    client = cancellable
    tasks = [
        asyncio.create_task(client.generate(Text2Img(prompt=f"p{i}")))
        for i in range(jobs)
    ]
    for _ in range(ticks):
        await asyncio.sleep(0.001)

    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    gc.collect()

    # A slot stays taken until its job is seen to leave the queue: the
    # watcher fetches such jobs, so a connection may be in use until then,
    # but none is left once they are done.
    with anyio.fail_after(5):
        while held(client) or session_of(client).connector._acquired:
            await asyncio.sleep(0.01)
    # The client still works afterwards.
    result = await client.generate(Text2Img(prompt="after"), timeout=5)
    assert result.outputs
