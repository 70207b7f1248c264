"""
Closing ends everything: whatever a call was doing, it ends at once.

Each test brings one call into one state (an answer still arriving, a 429
back-off, a late output, a job wait, a queue-slot wait, a wait for a
webhook), closes the client, and checks that the call ends with
``ClientStateError`` soon: ``anyio.fail_after(2)`` bounds ``aclose()`` and
the call's end together, far below every wait the state was in (a 30 s
request timeout, a 60 s ``retry_after``, an hour's ``eta``). How soon is a
figure, measured by ``benchmarks/shutdown.py``, not asserted here.
"""

from __future__ import annotations

import asyncio
import logging

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from conftest import KEY, held, settled_tasks
from modelslab_async import Client, JobPhase, RetryPolicy, Text2Img
from modelslab_async.emulator import Faults
from modelslab_async.errors import ClientStateError, SubmitUncertainError
from modelslab_async.webhooks import WebhookReceiver


pytestmark = pytest.mark.anyio

#: Long enough that a call only ends early because the client closed.
LONG = 60.0
#: A retry policy whose every wait is long, and 429 waits honoured as asked.
SLOW_RETRY = RetryPolicy(
    attempts=5,
    timeout=None,
    wait_initial=LONG,
    wait_max=LONG,
    wait_jitter=0,
    retry_after_max=LONG,
)


async def until(condition: Callable[[], bool]) -> None:
    """
    Wait, at most 10 s, for *condition* to hold.
    """
    with anyio.fail_after(10):
        while not condition():
            await asyncio.sleep(0.005)


async def closes_soon(
    client: Client, call: Awaitable[Any], reached: Callable[[], bool]
) -> BaseException | None:
    """
    Run *call* until *reached*, close the client, and return how the call
    ended; closing and the call's end must both come within 2 s.
    """
    task = asyncio.ensure_future(call)
    try:
        await until(lambda: reached() or task.done())
        # Let the call settle into its wait (a sleep, a body read) first.
        await asyncio.sleep(0.05)
        assert not task.done(), task
        with anyio.fail_after(2):
            await client.aclose()
            try:
                await task
            except BaseException as exc:  # noqa: BLE001 (the point)
                return exc
        return None
    finally:
        task.cancel()
        await client.aclose()


def slow_client(emulator, **options) -> Client:
    """
    A client on the emulator whose waits are all long.
    """
    return Client(KEY, base_url=emulator.url, retry=SLOW_RETRY, **options)


@pytest.mark.parametrize("kind", ["slow_body", "stall"])
async def test_a_submit_whose_answer_is_arriving(emulator, kind):
    """A submit reading a dribbled or stalled answer ends at close."""
    emulator.faults = Faults(schedule={"submit": [kind]}, stall_seconds=400)
    client = slow_client(emulator)

    ended = await closes_soon(
        client,
        client.submit(Text2Img(prompt="p")),
        lambda: emulator.jobs_created == 1,
    )

    assert isinstance(ended, ClientStateError)


@pytest.mark.parametrize("kind", ["slow_body", "stall"])
async def test_a_job_wait_whose_fetch_answer_is_arriving(emulator, kind):
    """A job wait reading a dribbled or stalled fetch answer ends at close."""
    emulator.eta = 0.01
    emulator.faults = Faults(schedule={"fetch": [kind]}, stall_seconds=400)
    client = slow_client(emulator)
    job = await client.submit(Text2Img(prompt="p"))

    ended = await closes_soon(
        client,
        job.wait(timeout=LONG),
        lambda: bool(emulator.faults.injected["fetch", kind]),
    )

    assert isinstance(ended, ClientStateError)


async def test_a_download_whose_body_is_arriving(emulator):
    """An output read whose file dribbles in ends at close."""
    emulator.eta = 0
    emulator.faults = Faults(
        schedule={"download": ["slow_body"]}, stall_seconds=400
    )
    client = slow_client(emulator)
    result = await client.generate(Text2Img(prompt="p"))

    ended = await closes_soon(
        client,
        result.outputs[0].read(timeout=LONG),
        lambda: bool(emulator.faults.injected["download", "slow_body"]),
    )

    assert isinstance(ended, ClientStateError)


async def test_a_submit_waiting_out_a_429(emulator):
    """A submit sleeping out a 60 s retry_after ends at close."""
    emulator.retry_after = LONG
    emulator.faults = Faults(schedule={"submit": ["rate_limit"]})
    client = slow_client(emulator)

    ended = await closes_soon(
        client,
        client.submit(Text2Img(prompt="p")),
        lambda: emulator.rate_limited == 1,
    )

    assert isinstance(ended, ClientStateError)
    assert emulator.jobs_created == 0


async def test_a_fetch_in_its_back_off(emulator):
    """A job wait backing off after a 503 on its fetch ends at close."""
    emulator.eta = 0.01
    emulator.faults = Faults(schedule={"fetch": ["http_503"]})
    client = slow_client(emulator)
    job = await client.submit(Text2Img(prompt="p"))

    ended = await closes_soon(
        client,
        # Longer than the back-off, which would not start past it.
        job.wait(timeout=10 * LONG),
        lambda: bool(emulator.faults.injected["fetch", "http_503"]),
    )

    assert isinstance(ended, ClientStateError)


@pytest.mark.parametrize("late", ["cdn_delay", "http_503"])
async def test_a_download_retrying(emulator, late):
    """An output read waiting for a late file, or backing off, ends."""
    emulator.eta = 0
    if late == "cdn_delay":
        emulator.cdn_delay = LONG
    else:
        emulator.faults = Faults(schedule={"download": ["http_503"]})
    client = slow_client(emulator)
    result = await client.generate(Text2Img(prompt="p"))

    ended = await closes_soon(
        client,
        # Longer than the back-off, which would not start past it.
        result.outputs[0].read(timeout=10 * LONG),
        lambda: bool(emulator.requests("download")),
    )

    assert isinstance(ended, ClientStateError)


async def test_a_job_wait(emulator):
    """A job sleeping until an hour's eta ends at close."""
    emulator.eta = 3600
    client = slow_client(emulator)
    job = await client.submit(Text2Img(prompt="p"))

    ended = await closes_soon(
        client, job.wait(timeout=LONG), lambda: job.has_waiters
    )

    assert isinstance(ended, ClientStateError)


async def test_a_submit_waiting_for_a_queue_slot(emulator):
    """A submit waiting behind a full queue cap ends at close."""
    emulator.eta = 3600
    client = slow_client(emulator, max_queued=1)
    await client.submit(Text2Img(prompt="first"))

    ended = await closes_soon(
        client,
        client.submit(Text2Img(prompt="second")),
        lambda: held(client) == 1,
    )

    assert isinstance(ended, ClientStateError)
    assert emulator.jobs_created == 1


async def test_a_wait_for_a_webhook_in_recover(emulator):
    """recover() listening for a webhook that never comes ends at close."""
    emulator.faults = Faults(
        schedule={"submit": ["reset_after"]}, webhook_drop=1.0
    )
    client = slow_client(emulator, webhooks=WebhookReceiver())
    with pytest.raises(SubmitUncertainError) as caught:
        await client.submit(Text2Img(prompt="p"))

    ended = await closes_soon(
        client,
        client.recover(caught.value, timeout=LONG),
        lambda: True,
    )

    assert isinstance(ended, ClientStateError)


async def test_a_batch_in_flight_yields_every_outcome(emulator):
    """Each request of a batch closed under it gets ClientStateError."""
    emulator.eta = 3600
    client = slow_client(emulator, max_queued=2)
    requests = [Text2Img(prompt=f"p{i}") for i in range(10)]
    items: list[Any] = []

    async def drain() -> None:
        batch = client.generate_many(requests, concurrency=4)
        items.extend([item async for item in batch])

    ended = await closes_soon(client, drain(), lambda: held(client) == 2)

    assert ended is None  # outcomes, not an exception out of the loop

    assert len(items) == 10
    assert all(isinstance(item.error, ClientStateError) for item in items)
    assert await settled_tasks() == set()


async def test_a_cancel_after_the_job_was_made_leaves_a_trace(
    emulator, caplog
):
    """A submit cancelled after the job exists is journaled uncertain,
    logged, and its webhook still finds the job."""
    emulator.eta = 0.2
    emulator.faults = Faults(schedule={"submit": ["stall"]}, stall_seconds=5)
    receiver = WebhookReceiver(grace=LONG)
    request = Text2Img(prompt="p", track_id="order-17")
    async with Client(KEY, base_url=emulator.url, webhooks=receiver) as client:
        task = asyncio.create_task(client.submit(request))
        await until(lambda: emulator.jobs_created == 1)
        with caplog.at_level(logging.WARNING, logger="modelslab_async"):
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        job = await client.job("order-17")
        assert job is not None
        assert job.phase is JobPhase.UNCERTAIN
        with anyio.fail_after(10):
            result = await job  # its webhook comes when the job ends

    assert result.outputs
    assert result.track_id == "order-17"
    assert emulator.jobs_created == 1
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "order-17" in caplog.records[0].getMessage()
