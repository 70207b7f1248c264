"""
The error map: every documented answer becomes the right typed error.
"""

from __future__ import annotations

import json
import re

from typing import Any

import pytest

from aiohttp import web

import modelslab_async.errors as errors_module

from conftest import KEY
from modelslab_async import Client, RetryPolicy, Text2Img
from modelslab_async.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    GenerationFailedError,
    InsufficientCreditsError,
    ModelsLabError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
    SubmitUncertainError,
)


pytestmark = pytest.mark.anyio


class Scripted:
    """
    A server that answers every POST with the next scripted answer.
    """

    def __init__(self) -> None:
        self.answers: list[tuple[int, bytes, str, dict[str, str]]] = []
        self.calls = 0

    def then(
        self,
        status: int,
        body: Any,
        content_type: str = "application/json",
        **headers: str,
    ) -> Scripted:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers.append((status, raw, content_type, headers))
        return self

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls += 1
        status, raw, content_type, headers = self.answers.pop(0)
        return web.Response(
            status=status, body=raw, content_type=content_type, headers=headers
        )


@pytest.fixture(name="server")
async def _server():
    """
    A scripted server on loopback, and a client on it that never retries.
    """
    scripted = Scripted()
    app = web.Application()
    app.router.add_post("/{tail:.*}", scripted.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with Client(
        KEY,
        base_url=f"http://127.0.0.1:{port}/api/",
        retry=RetryPolicy.disabled(),
    ) as client:
        yield scripted, client
    await runner.cleanup()


DOCUMENTED = [
    (400, {"status": "error", "message": "prompt is required"}, BadRequestError),
    (401, {"status": "error", "message": "Invalid API key"}, AuthenticationError),
    (402, {"status": "error", "message": "Insufficient credits. Please add more credits to continue."}, InsufficientCreditsError),
    (403, {"status": "error", "message": "This feature requires a premium subscription"}, PermissionDeniedError),
    (404, {"status": "error", "message": "Request not found"}, NotFoundError),
    (429, {"status": "error", "message": "Rate limit exceeded. Maximum 5 queued requests allowed.", "retry_after": 30}, RateLimitError),
    (500, {"status": "error", "message": "Internal server error. Please try again."}, ServerError),
    (503, {"status": "error", "message": "Service temporarily unavailable. Please try again later."}, ServerError),
    (200, {"status": "error", "message": "Invalid API key"}, AuthenticationError),
    (200, {"status": "error", "messege": "Insufficient credits"}, InsufficientCreditsError),
    (200, {"status": "error", "message": "Rate limit exceeded", "retry_after": "2"}, RateLimitError),
    (200, {"status": "error", "message": "Model not found: invalid_model_name"}, BadRequestError),
]  # fmt: skip


@pytest.mark.parametrize(("http_status", "body", "error"), DOCUMENTED)
async def test_documented_errors(server, http_status, body, error):
    """Each documented error answer raises its class, key-free."""
    scripted, client = server
    scripted.then(http_status, body)

    with pytest.raises(error) as caught:
        await client.system_details()

    raised = caught.value
    assert type(raised) is error
    assert raised.http_status == http_status
    assert raised.endpoint == "v1/enterprise/flux_klein/system_details"
    assert raised.message == body.get("message", body.get("messege"))
    assert raised.body == body
    assert KEY not in str(raised)
    if error is RateLimitError:
        assert raised.retry_after == float(body["retry_after"])


async def test_retry_after_header(server):
    """A 429 without a body value takes Retry-After from the header."""
    scripted, client = server
    scripted.then(429, b"", "text/plain", **{"Retry-After": "7"})

    with pytest.raises(RateLimitError) as caught:
        await client.system_details()

    assert caught.value.retry_after == 7.0


@pytest.mark.parametrize(
    ("http_status", "body", "content_type", "error"),
    [
        (502, b"<html><h1>502 Bad Gateway</h1></html>", "text/html", ServerError),
        (200, b"<!DOCTYPE html><p>maintenance</p>", "text/html", ResponseDecodeError),
        (200, b"", "application/json", ResponseDecodeError),
        (200, b'{"status": "succ', "application/json", ResponseDecodeError),
        (500, b"", "text/plain", ServerError),
    ],
)  # fmt: skip
async def test_unreadable_answers(
    server, http_status, body, content_type, error
):
    """HTML, empty or truncated bodies are server errors with a snippet."""
    scripted, client = server
    scripted.then(http_status, body, content_type)

    with pytest.raises(error) as caught:
        await client.system_details()

    assert isinstance(caught.value, ServerError)
    assert caught.value.snippet is not None
    assert caught.value.snippet[:10] in (body.decode() or "<empty body>")


async def test_body_status_beats_http_status(server):
    """An HTTP error carrying a success body is read as success."""
    scripted, client = server
    scripted.then(500, {"status": "ok", "model_count": 2, "queue_time": 0})
    scripted.then(202, {"status": "success", "message": "done"})

    details = await client.system_details()
    message = await client.clear_cache()

    assert details.model_count == 2
    assert message == "done"


async def test_submit_refusal_without_id(server):
    """An error body to a submit, with no job id, is a refusal."""
    scripted, client = server
    scripted.then(200, {"status": "error", "message": "prompt refused"})

    with pytest.raises(BadRequestError, match="prompt refused"):
        await client.submit(Text2Img(prompt="p"))


async def test_submit_failure_with_id(server):
    """An error body to a submit that names a job fails that job."""
    scripted, client = server
    scripted.then(200, {"status": "failed", "id": 9, "message": "NSFW"})

    job = await client.submit(Text2Img(prompt="p"))

    with pytest.raises(GenerationFailedError, match="NSFW"):
        await job


async def test_processing_without_any_id_is_uncertain(server):
    """A queued job whose id we cannot learn is reported, not lost."""
    scripted, client = server
    scripted.then(200, {"status": "processing", "eta": 3})

    with pytest.raises(SubmitUncertainError) as caught:
        await client.submit(Text2Img(prompt="p", track_id="mine"))

    assert caught.value.track_id == "mine"


async def test_id_from_fetch_result(server):
    """A submit answer without id takes it from fetch_result."""
    scripted, client = server
    scripted.then(
        200,
        {
            "status": "processing",
            "eta": 3,
            "fetch_result": "https://modelslab.com/api/v6/images/fetch/4242",
        },
    )

    job = await client.submit(Text2Img(prompt="p"))

    assert job.id == "4242"


async def test_key_echoed_by_the_server_is_redacted(server):
    """A server message that repeats the key is scrubbed."""
    scripted, client = server
    scripted.then(
        401, {"status": "error", "message": f"Invalid API key {KEY}"}
    )

    with pytest.raises(AuthenticationError) as caught:
        await client.clear_queue()

    assert KEY not in str(caught.value)
    assert KEY not in caught.value.message
    assert "<secret>" in caught.value.message


def drawn_tree() -> list[tuple[int, str]]:
    """
    ``(column, class name)`` for each line of the tree in errors' docstring.
    """
    lines = errors_module.__doc__.split("::", 1)[1].splitlines()
    tree = []
    for line in lines[1:]:
        if line and not line.startswith(" "):
            break
        match = re.search(r"\w+Error", line)
        if match:
            tree.append((match.start(), match.group(0)))
    return tree


def test_hierarchy_in_the_docstring_is_true():
    """The tree drawn in errors' docstring matches the real classes."""
    tree = drawn_tree()
    for index, (column, name) in enumerate(tree[1:], start=1):
        parent = next(n for c, n in reversed(tree[:index]) if c < column)
        cls = getattr(errors_module, name)
        public_bases = [
            b for b in cls.__mro__[1:] if b.__name__ in errors_module.__all__
        ]
        assert public_bases[0] is getattr(errors_module, parent), name

    public = {
        name
        for name in errors_module.__all__
        if issubclass(getattr(errors_module, name), ModelsLabError)
    }
    assert {name for _, name in tree} == public


def test_every_api_error_is_a_models_lab_error():
    """One except clause catches everything the library raises."""
    assert issubclass(APIError, ModelsLabError)
    assert issubclass(errors_module.InvalidRequestError, ValueError)
    assert issubclass(errors_module.ClientStateError, RuntimeError)
    assert not issubclass(errors_module.JobTimeoutError, TimeoutError)
    assert not issubclass(errors_module.RequestTimeoutError, TimeoutError)
