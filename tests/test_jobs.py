"""
Jobs: eta-aware polling, deadlines, failures, cancellation.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from conftest import FAST_RETRY, KEY, session_of, settled_tasks
from modelslab_async import (
    Client,
    FluxKleinText2Img,
    JobResult,
    JobStatus,
    RetryPolicy,
    Text2Img,
)
from modelslab_async.emulator import ALL_QUIRKS, Faults
from modelslab_async.errors import (
    ClientStateError,
    GenerationFailedError,
    JobTimeoutError,
)


pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("quirks", [ALL_QUIRKS, frozenset()])
async def test_accurate_eta_few_fetches_none_early(emulator, client, quirks):
    """With an accurate eta, at most 3 fetches per job, none before it."""
    emulator.quirks = quirks
    emulator.eta = 0.3

    results = await asyncio.gather(
        *(client.generate(Text2Img(prompt=f"p{i}")) for i in range(5))
    )

    for result in results:
        job = emulator.job(result.id)
        fetches = [
            r for r in emulator.requests("fetch") if r.job_id == result.id
        ]
        assert 1 <= len(fetches) <= 3
        assert all(r.time >= job.ready_at for r in fetches)


async def test_wait_times_out_while_the_job_runs(emulator, client):
    """A wait shorter than the job raises JobTimeoutError before it ends."""
    emulator.eta = 30
    job = await client.submit(Text2Img(prompt="slow"))

    with pytest.raises(JobTimeoutError) as caught:
        await job.wait(timeout=0.2)

    assert emulator.job(job.id).status(asyncio.get_running_loop().time()) == (
        "processing"
    )
    error = caught.value
    assert error.job is job
    assert error.job_id == job.id
    assert error.last_status is JobStatus.PROCESSING
    assert error.timeout == 0.2
    assert job.id in str(error)


async def test_client_job_timeout_is_the_default(emulator):
    """wait() without a timeout uses the client's job_timeout."""
    emulator.eta = 30
    async with Client(KEY, base_url=emulator.url, job_timeout=0.1) as client:
        job = await client.submit(Text2Img(prompt="slow"))

        with pytest.raises(JobTimeoutError) as caught:
            await job

    assert caught.value.timeout == 0.1


async def test_a_failed_job_raises_with_the_job(client):
    """A job the server fails raises GenerationFailedError carrying it."""
    job = await client.submit(Text2Img(prompt="a [fail] job"))

    with pytest.raises(
        GenerationFailedError, match="Processing failed"
    ) as caught:
        await job

    assert caught.value.job is job
    assert job.status is JobStatus.ERROR
    assert job.outputs == ()


async def test_await_refresh_and_state(emulator, client):
    """await job returns a result; status, eta and outputs follow it."""
    emulator.eta = 0.2
    job = await client.submit(FluxKleinText2Img(prompt="p", samples=2))
    assert job.status is JobStatus.PROCESSING
    assert 0 < job.eta <= 0.2
    assert job.outputs == ()
    assert await job.refresh() is JobStatus.PROCESSING

    result = await job

    assert isinstance(result, JobResult)
    assert result.id == job.id
    assert result.endpoint == "flux-klein"
    assert len(result.outputs) == 2
    assert job.eta is None
    assert job.outputs == result.outputs
    assert await job.refresh() is JobStatus.SUCCESS


async def test_instant_success_needs_no_fetch(emulator, client):
    """A job done in the submit answer is never fetched."""
    emulator.eta = 0

    result = await client.generate(Text2Img(prompt="p"))

    assert result.outputs
    assert emulator.requests("fetch") == []


async def test_concurrent_waiters_share_one_job(emulator, client):
    """Several tasks awaiting one job all get its result."""
    emulator.eta = 0.2
    job = await client.submit(Text2Img(prompt="p"))

    results = await asyncio.gather(job.wait(), job.wait(), job.wait())

    assert {r.id for r in results} == {job.id}
    assert emulator.fetches(job.id) <= 3


async def test_reattach_by_id(emulator, client):
    """fetch(id) re-attaches to a job submitted earlier."""
    emulator.eta = 0.2
    emulator.quirks = ALL_QUIRKS - {"thin_fetch"}  # answers carry an eta
    submitted = await client.submit(FluxKleinText2Img(prompt="p"))

    job = await client.fetch(int(submitted.id), endpoint="flux-klein")
    result = await job

    assert result.id == submitted.id
    assert result.request is None


async def test_unbounded_wait(emulator, client):
    """math.inf waits as long as it takes."""
    emulator.eta = 0.1

    result = await client.generate(Text2Img(prompt="p"), timeout=math.inf)

    assert result.outputs


async def test_cancelled_wait_leaves_nothing_behind(emulator):
    """Cancelling a waiting task stops it; no task, no connection left."""
    emulator.eta = 30
    client = Client(KEY, base_url=emulator.url, retry=FAST_RETRY)
    job = await client.submit(Text2Img(prompt="slow"))
    waiter = asyncio.create_task(job.wait())
    await asyncio.sleep(0.05)

    waiter.cancel()

    with pytest.raises(asyncio.CancelledError):
        await waiter
    connector = session_of(client).connector
    assert not connector._acquired  # no connection checked out
    await client.aclose()
    assert session_of(client).closed
    assert connector.closed
    assert await settled_tasks() == set()


async def test_cancel_during_a_fetch_in_flight(emulator):
    """Cancelling mid-fetch drops that connection and leaks nothing."""
    emulator.eta = 0.05
    emulator.faults = Faults(schedule={"fetch": ["stall"]}, stall_seconds=30)
    client = Client(KEY, base_url=emulator.url, retry=FAST_RETRY)
    job = await client.submit(Text2Img(prompt="p"))
    waiter = asyncio.create_task(job.wait())
    while not emulator.requests("fetch"):
        await asyncio.sleep(0.01)

    waiter.cancel()

    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not session_of(client).connector._acquired
    await client.aclose()
    # The emulator's stalled handler ends with its connection.
    assert await settled_tasks() == set()


async def test_closing_during_retries_is_a_client_state_error(emulator):
    """A fetch retrying when the client closes ends in ClientStateError."""
    emulator.eta = 0.01
    emulator.faults = Faults(schedule={"fetch": ["http_503"] * 50})
    policy = RetryPolicy(wait_initial=0.05, wait_jitter=0, attempts=50)
    client = Client(KEY, base_url=emulator.url, retry=policy)
    job = await client.submit(Text2Img(prompt="p"))
    waiter = asyncio.create_task(job.wait(timeout=60))
    while not emulator.requests("fetch"):
        await asyncio.sleep(0.01)

    await client.aclose()

    with pytest.raises(ClientStateError, match="closed"):
        await waiter


async def test_closing_while_an_output_is_late(emulator):
    """A download waiting for a late file ends in ClientStateError."""
    emulator.eta = 0
    emulator.cdn_delay = 60
    client = Client(KEY, base_url=emulator.url, retry=FAST_RETRY)
    result = await client.generate(Text2Img(prompt="p"))
    reader = asyncio.create_task(result.outputs[0].read(timeout=30))
    while not emulator.requests("download"):
        await asyncio.sleep(0.01)

    await client.aclose()

    with pytest.raises(ClientStateError, match="closed"):
        await reader


async def test_closing_the_client_wakes_waiters(emulator):
    """aclose() makes pending waits raise ClientStateError at once."""
    emulator.eta = 30
    client = Client(KEY, base_url=emulator.url)
    job = await client.submit(Text2Img(prompt="slow"))
    waiter = asyncio.create_task(job.wait(timeout=60))
    await asyncio.sleep(0.05)

    await client.aclose()

    with pytest.raises(ClientStateError, match="closed"):
        await waiter
    assert job.id is not None  # kept: fetch it later with a new client
