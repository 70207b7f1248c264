"""
Retries: what is repeated, what never is, and how long we wait.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket

import anyio
import pytest

from aiohttp import web

from conftest import FAST_RETRY, KEY
from modelslab_async import Client, JobPhase, RetryPolicy, Text2Img
from modelslab_async.emulator import Faults
from modelslab_async.errors import (
    InvalidRequestError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    SubmitUncertainError,
    TransportError,
)


pytestmark = pytest.mark.anyio


def retry_waits(caplog) -> list[float]:
    """
    The waits the client logged before each retry.
    """
    return [
        float(re.search(r"in ([\d.]+)s", r.getMessage()).group(1))
        for r in caplog.records
        if r.getMessage().startswith("retrying")
    ]


def test_backoff_follows_stamina():
    """Backoff is wait_initial * base ** (n - 1) plus jitter, capped."""
    policy = RetryPolicy(
        wait_initial=0.5, wait_exp_base=3, wait_max=10, wait_jitter=0
    )

    waits = [policy.backoff(n) for n in range(1, 6)]

    assert waits == [0.5, 1.5, 4.5, 10, 10]
    assert policy.backoff(1, retry_after=7) == 7
    assert policy.backoff(1, retry_after=500) == policy.retry_after_max
    jittered = RetryPolicy(wait_initial=1, wait_jitter=0.5, wait_max=99)
    assert all(1 <= jittered.backoff(1) <= 1.5 for _ in range(50))


@pytest.mark.parametrize(
    ("field", "value"),
    [("attempts", 0), ("wait_max", -1), ("wait_jitter", -0.1)],
)
def test_policy_limits(field, value):
    """A policy cannot be built with impossible numbers."""
    with pytest.raises(InvalidRequestError, match=field):
        RetryPolicy(**{field: value})


@pytest.mark.parametrize(
    "fault",
    ["reset_after", "stall", "malformed", "html", "empty", "bad_gateway"],
)
async def test_ambiguous_submits_are_never_retried(emulator, fault):
    """A submit that may have made a job is reported, never repeated."""
    emulator.faults = Faults(schedule={"submit": [fault]}, stall_seconds=5)
    async with Client(
        KEY, base_url=emulator.url, retry=FAST_RETRY, timeout=0.5
    ) as client:
        with pytest.raises(SubmitUncertainError) as caught:
            await client.submit(Text2Img(prompt="p", track_id="order-17"))

    assert len(emulator.requests("submit")) == 1
    assert emulator.jobs_created == 1  # made once, and only once
    assert caught.value.track_id == "order-17"
    assert caught.value.request.prompt == "p"
    assert isinstance(caught.value.__cause__, ServerError | TransportError)
    assert str(caught.value).count("endpoint=") == 1


async def test_reset_before_recording_is_still_ambiguous(emulator, client):
    """A dropped connection is ambiguous even when no job was made."""
    emulator.faults = Faults(schedule={"submit": ["reset_before"]})

    with pytest.raises(SubmitUncertainError):
        await client.submit(Text2Img(prompt="p"))

    assert len(emulator.requests("submit")) == 1
    assert emulator.jobs_created == 0


async def test_a_500_may_have_made_the_job(emulator, client):
    """A 500, even with the documented JSON body, is uncertain: no retry."""
    emulator.faults = Faults(schedule={"submit": ["http_500"]})

    with pytest.raises(SubmitUncertainError, match="Internal server error"):
        await client.submit(Text2Img(prompt="p", track_id="t-500"))

    assert len(emulator.requests("submit")) == 1
    assert (await client.job("t-500")).phase is JobPhase.UNCERTAIN


@pytest.mark.parametrize("fault", ["rate_limit", "http_503"])
async def test_provably_refused_submits_are_retried(emulator, client, fault):
    """429 and 503 prove the job was refused: retried, one job made."""
    emulator.faults = Faults(schedule={"submit": [fault, fault]})

    result = await client.generate(Text2Img(prompt="p"))

    assert len(emulator.requests("submit")) == 3
    assert emulator.jobs_created == 1
    assert result.id == emulator.requests("submit")[-1].job_id


#: Fast retries that give up within a second, 429s included.
SHORT_RETRY = RetryPolicy(
    timeout=1.0, wait_initial=0.005, wait_max=0.05, retry_after_max=0.01
)


@contextlib.asynccontextmanager
async def answering(status, body):
    """
    A server on loopback that answers every POST with *status* and the
    JSON *body*; yields its API root and the list of paths posted to.
    """
    posted: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        posted.append(request.path)
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/api/", posted
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("http_status", [500, 502, 504])
async def test_a_5xx_with_retry_after_is_still_uncertain(http_status):
    """A 500/502/504 asking to retry_after is uncertain: one POST only."""
    body = {
        "status": "error",
        "message": "Internal server error. Please try again.",
        "retry_after": 0.01,
    }
    async with (
        answering(http_status, body) as (url, posted),
        Client(KEY, base_url=url, retry=SHORT_RETRY) as client,
    ):
        with (
            anyio.fail_after(10),
            pytest.raises(SubmitUncertainError) as caught,
        ):
            await client.submit(Text2Img(prompt="p", track_id="t-5xx"))

    assert len(posted) == 1
    assert type(caught.value.__cause__) is ServerError
    assert caught.value.__cause__.http_status == http_status
    assert caught.value.track_id == "t-5xx"


async def test_refused_connections_are_retried(caplog):
    """Nothing listening: nothing was sent, so the submit is retried."""
    caplog.set_level(logging.INFO, logger="modelslab_async")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    policy = RetryPolicy(attempts=3, wait_initial=0.01, wait_jitter=0)

    async with Client(
        KEY, base_url=f"http://127.0.0.1:{port}/api/", retry=policy
    ) as client:
        with pytest.raises(TransportError, match="cannot connect"):
            await client.submit(Text2Img(prompt="p"))

    assert len(retry_waits(caplog)) == 2


async def test_queue_full_is_not_a_failure(emulator, caplog):
    """Many 429s in a row are waited out; attempts count real failures."""
    caplog.set_level(logging.INFO, logger="modelslab_async")
    emulator.faults = Faults(schedule={"submit": ["rate_limit"] * 8})
    policy = RetryPolicy(attempts=2, wait_jitter=0, retry_after_max=0.01)

    async with Client(KEY, base_url=emulator.url, retry=policy) as client:
        result = await client.generate(Text2Img(prompt="p"))

    assert result.outputs
    assert len(retry_waits(caplog)) == 8
    assert emulator.jobs_created == 1


async def test_queue_full_until_the_timeout(emulator):
    """429s past the policy's timeout surface as RateLimitError."""
    emulator.faults = Faults(schedule={"submit": ["rate_limit"] * 50})
    policy = RetryPolicy(timeout=0.2, retry_after_max=0.05)

    async with Client(KEY, base_url=emulator.url, retry=policy) as client:
        with pytest.raises(RateLimitError) as caught:
            await client.submit(Text2Img(prompt="p"))

    assert caught.value.retry_after == emulator.retry_after
    assert emulator.jobs_created == 0


async def test_retry_after_is_honoured_and_capped(emulator, caplog):
    """The body's retry_after sets the wait, up to retry_after_max."""
    caplog.set_level(logging.INFO, logger="modelslab_async")
    emulator.retry_after = 0.07
    emulator.faults = Faults(schedule={"submit": ["rate_limit"]})
    async with Client(
        KEY, base_url=emulator.url, retry=RetryPolicy(wait_jitter=0)
    ) as client:
        await client.submit(Text2Img(prompt="p"))
    emulator.retry_after = 3600
    emulator.faults = Faults(schedule={"submit": ["rate_limit"]})
    async with Client(
        KEY, base_url=emulator.url, retry=RetryPolicy(retry_after_max=0.05)
    ) as client:
        await client.submit(Text2Img(prompt="p"))

    assert retry_waits(caplog) == [0.07, 0.05]


@pytest.mark.parametrize(
    "fault",
    ["reset_before", "reset_after", "http_500", "http_503", "rate_limit",
     "bad_gateway", "malformed", "html", "empty", "stall", "slow_body"],
)  # fmt: skip
async def test_fetches_survive_every_fault(emulator, fault):
    """A fetch is repeated through any fault and the job still finishes."""
    emulator.eta = 0.05
    emulator.faults = Faults(
        schedule={"fetch": [fault, fault]}, stall_seconds=2
    )
    async with Client(
        KEY, base_url=emulator.url, retry=FAST_RETRY, timeout=0.5
    ) as client:
        result = await client.generate(Text2Img(prompt="p"))

    assert result.outputs
    assert emulator.jobs_created == 1
    # A slow body is slow, not wrong: its first fetch already succeeds.
    assert len(emulator.requests("fetch")) >= (
        1 if fault == "slow_body" else 3
    )


async def test_a_stalled_request_times_out_typed(emulator):
    """A request with no answer in time raises RequestTimeoutError."""
    emulator.eta = 0.05
    emulator.faults = Faults(
        schedule={"fetch": ["stall"] * 5}, stall_seconds=5
    )
    policy = RetryPolicy(attempts=2, wait_initial=0.01, wait_jitter=0)
    async with Client(
        KEY, base_url=emulator.url, retry=policy, timeout=0.2
    ) as client:
        job = await client.submit(Text2Img(prompt="p"))
        with pytest.raises(RequestTimeoutError) as caught:
            await job.refresh()

    assert caught.value.job_id == job.id
    assert "0.2" in str(caught.value)
    assert not isinstance(caught.value, TimeoutError)
