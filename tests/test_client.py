"""
The client: key handling, lifecycle, loops, management calls.
"""

from __future__ import annotations

import asyncio
import gc
import logging

import aiohttp
import pytest

from conftest import FAST_RETRY, KEY, session_of
from modelslab_async import (
    Client,
    FluxKleinText2Img,
    JobStatus,
    S3Settings,
    SystemDetails,
    Text2Img,
)
from modelslab_async.errors import (
    BadRequestError,
    ClientStateError,
    GenerationFailedError,
    InvalidRequestError,
)


pytestmark = pytest.mark.anyio


def test_key_from_the_environment(monkeypatch):
    """With no argument the key comes from MODELSLAB_API_KEY."""
    monkeypatch.setenv("MODELSLAB_API_KEY", "from-env-1234")

    assert Client()._key.value == "from-env-1234"
    assert Client("explicit-5678")._key.value == "explicit-5678"


def test_no_key_is_a_clear_error(monkeypatch):
    """Without any key, construction says how to give one."""
    monkeypatch.delenv("MODELSLAB_API_KEY", raising=False)

    with pytest.raises(
        InvalidRequestError, match="MODELSLAB_API_KEY"
    ) as caught:
        Client()

    assert caught.value.field == "api_key"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("timeout", 0),
        ("timeout", -1),
        ("job_timeout", "600"),
        ("max_queued", 0),
        ("max_queued", True),
        ("download_concurrency", 0),
    ],
)
def test_settings_are_checked(setting, value):
    """Out-of-range settings are refused at construction, by name."""
    with pytest.raises(InvalidRequestError) as caught:
        Client(KEY, **{setting: value})

    assert caught.value.field == setting


async def test_the_key_never_shows(emulator, caplog):
    """The key is in no repr, no log line at DEBUG, no error message."""
    caplog.set_level(logging.DEBUG, logger="modelslab_async")
    emulator.eta = 0.05
    async with Client(KEY, base_url=emulator.url, retry=FAST_RETRY) as client:
        result = await client.generate(Text2Img(prompt="p"))
        await result.outputs[0].read()
        with pytest.raises(GenerationFailedError) as failed:
            await client.generate(Text2Img(prompt="[fail]"))
        with pytest.raises(BadRequestError) as refused:
            await client.generate(Text2Img(prompt="[refuse]"))

        shown = [
            repr(client),
            str(vars(client)),
            repr(result),
            str(failed.value),
            str(refused.value),
            caplog.text,
        ]
    assert caplog.records  # DEBUG logging happened
    for text in shown:
        assert KEY not in text


async def test_closed_client_refuses_reuse(emulator):
    """A closed client cannot send, reopen or be entered again."""
    client = Client(KEY, base_url=emulator.url)
    async with client:
        pass

    with pytest.raises(ClientStateError, match="closed"):
        await client.submit(Text2Img(prompt="p"))
    with pytest.raises(ClientStateError, match="closed"):
        async with client:
            pass
    await client.aclose()  # closing twice is harmless


async def test_borrowed_session_is_not_closed(emulator):
    """A session passed in is used and left open."""
    async with aiohttp.ClientSession() as session:
        async with Client(KEY, base_url=emulator.url, session=session) as c:
            await c.generate(Text2Img(prompt="p"))

        assert not session.closed
        assert emulator.jobs_created == 1


def test_another_event_loop_is_refused():
    """A client opened in one loop refuses another, saying why."""
    client = Client(KEY, base_url="http://127.0.0.1:9/api/")

    async def open_in_first_loop() -> None:
        await client.__aenter__()
        await session_of(client).close()

    async def use_in_second_loop() -> None:
        await client.system_details()

    asyncio.run(open_in_first_loop())
    with pytest.raises(ClientStateError, match="another event loop"):
        asyncio.run(use_in_second_loop())
    asyncio.run(client.aclose())


async def test_unclosed_client_warns_where_it_was_made(emulator):
    """A client dropped while open warns with its creation site."""
    client = Client(KEY, base_url=emulator.url)
    await client.system_details()
    session = session_of(client)

    # Deleting may or may not need the collector: do both inside.
    with pytest.warns(ResourceWarning, match=r"test_client\.py:\d+"):  # noqa: PT031
        del client
        gc.collect()
    await session.close()


async def test_management_calls(emulator, client):
    """Each Flux Klein management call returns its documented answer."""
    emulator.eta = 30
    queued = await client.submit(FluxKleinText2Img(prompt="p"))

    details = await client.system_details()
    messages = [
        await client.clear_cache(),
        await client.restart_server(),
        await client.update_server(),
        await client.clear_queue(),
    ]

    assert isinstance(details, SystemDetails)
    assert details.status == "ok"
    assert 0 < details.queue_time <= 30
    assert messages == [
        "Cache cleared successfully",
        "server restarting",
        "Server updated successfully",
        "Queue cleared, server is restarting",
    ]
    paths = [r.path.rsplit("/", 1)[-1] for r in emulator.requests("manage")]
    assert paths == [
        "system_details",
        "clear_cache",
        "restart_server",
        "update_server",
        "clear_queue",
    ]
    assert await queued.refresh() is JobStatus.ERROR
    with pytest.raises(GenerationFailedError, match="Queue cleared"):
        await queued


async def test_update_s3(emulator, client):
    """update_s3 sends every setting with the key."""
    settings = S3Settings(
        public_url="https://cdn.example.com/generations/",
        region_name="us-east-1",
        endpoint_url="https://s3.example.com",
        aws_access_key_id="AKIAEXAMPLE",
        aws_secret_access_key="secret-value",
        image_directory="generations",
        deploy_type="text_to_image",
    )

    message = await client.update_s3(settings)

    (record,) = emulator.requests("manage")
    assert record.path == "/api/v1/enterprise/update_s3"
    assert record.body == {
        "key": KEY,
        "public_url": "https://cdn.example.com/generations/",
        "region_name": "us-east-1",
        "endpoint_url": "https://s3.example.com",
        "aws_access_key_id": "AKIAEXAMPLE",
        "aws_secret_access_key": "secret-value",
        "image_directory": "generations",
        "deploy_type": "text_to_image",
    }
    assert message == "S3 details updated successfully"


async def test_submit_takes_only_requests(client):
    """Passing something else than a request is a TypeError."""
    with pytest.raises(TypeError, match="Text2Img"):
        await client.submit({"prompt": "p"})  # type: ignore[arg-type]


@pytest.mark.parametrize("job_id", ["", "../x", " "])
async def test_fetch_checks_the_id(client, job_id):
    """fetch() refuses an id that is no id, before sending."""
    with pytest.raises(InvalidRequestError, match="job_id"):
        await client.fetch(job_id)


async def test_fetch_checks_the_endpoint(client):
    """fetch() refuses an unknown endpoint family."""
    with pytest.raises(InvalidRequestError, match="endpoint"):
        await client.fetch(1, endpoint="v7")  # type: ignore[arg-type]


def test_redaction_leaves_short_keys_alone():
    """A real key is scrubbed from text; a toy key never mangles it."""
    long_key = Client(KEY)._key
    toy_key = Client("k")._key

    assert long_key.redact(f"bad key {KEY}!") == "bad key <secret>!"
    assert toy_key.redact("Invalid API key") == "Invalid API key"
    assert repr(long_key) == "<secret>"
