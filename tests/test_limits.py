"""
Size limits hold for what a body decodes to, not what it declares.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import zlib

import anyio
import pytest

from aiohttp import web

from conftest import KEY
from modelslab_async import Client, Output, RetryPolicy, Text2Img
from modelslab_async import _http as http_module
from modelslab_async.errors import (
    OutputError,
    ServerError,
    SubmitUncertainError,
)


pytestmark = pytest.mark.anyio

LIMIT = 1 << 20
#: 20 MiB of zeros: about 20 KB once gzipped.
BOMB = bytes(20 << 20)


def _deflate(raw: bytes) -> bytes:
    packer = zlib.compressobj()
    return packer.compress(raw) + packer.flush()


ENCODINGS = {"gzip": gzip.compress, "deflate": _deflate}


@contextlib.asynccontextmanager
async def serving(raw: bytes, encoding: str, *, chunked: bool = False):
    """
    A server on loopback answering every request with *raw*, compressed
    as *encoding* says (with a Content-Length, or chunked); yields its
    root URL.
    """
    packed = ENCODINGS[encoding](raw)

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        headers = {"Content-Encoding": encoding}
        if not chunked:
            return web.Response(
                body=packed, content_type="application/json", headers=headers
            )
        response = web.StreamResponse(headers=headers)
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(packed)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
async def test_a_compressed_output_over_the_limit_is_refused(
    encoding, chunked
):
    """A 20 MiB output sent as 20 KB of gzip is over a 1 MiB limit."""
    async with (
        serving(BOMB, encoding, chunked=chunked) as root,
        Client(
            KEY,
            base_url=root,
            max_output_bytes=LIMIT,
            retry=RetryPolicy.disabled(),
        ) as client,
    ):
        url = root + "bomb.png"
        with (
            anyio.fail_after(10),
            pytest.raises(OutputError, match=f"larger than {LIMIT}") as caught,
        ):
            await Output(url, downloader=client._engine).read()

    assert caught.value.url == url


async def test_a_compressed_output_under_the_limit_is_read():
    """A gzipped output that decodes under the limit comes back whole."""
    png = (
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
        + bytes(LIMIT // 2)
        + b"\x00\x00\x00\x00IEND\xaeB`\x82"
    )
    async with (
        serving(png, "gzip") as root,
        Client(
            KEY,
            base_url=root,
            max_output_bytes=LIMIT,
            retry=RetryPolicy.disabled(),
        ) as client,
    ):
        with anyio.fail_after(10):
            data = await client._engine.download(
                root + "fine.png", missing_until=None
            )

    assert data == png


def _padded_answer(size: int) -> bytes:
    answer = {"status": "success", "id": 1, "output": [], "pad": ""}
    text = json.dumps(answer).encode()
    return text.replace(b'"pad": ""', b'"pad": "' + b" " * size + b'"')


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_compressed_api_answer_over_the_limit_is_refused(
    monkeypatch, chunked
):
    """An API answer that gunzips past its limit is unreadable, typed."""
    monkeypatch.setattr(http_module, "API_BODY_LIMIT", LIMIT)
    async with (
        serving(_padded_answer(2 * LIMIT), "gzip", chunked=chunked) as root,
        Client(KEY, base_url=root, retry=RetryPolicy.disabled()) as client,
    ):
        with anyio.fail_after(10):
            with pytest.raises(ServerError, match=f"over {LIMIT} bytes"):
                await client.fetch("1")
            with pytest.raises(SubmitUncertainError, match="over"):
                await client.submit(Text2Img(prompt="p"))


async def test_a_compressed_api_answer_under_the_limit_is_read(monkeypatch):
    """A gzipped API answer under its limit is read as usual."""
    monkeypatch.setattr(http_module, "API_BODY_LIMIT", LIMIT)
    async with (
        serving(_padded_answer(LIMIT // 2), "gzip") as root,
        Client(KEY, base_url=root, retry=RetryPolicy.disabled()) as client,
    ):
        with anyio.fail_after(10):
            response = await client.fetch("1")

    assert response.id == "1"
