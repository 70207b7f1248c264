"""
Batches: the account's queue cap kept, failures contained, nothing leaked.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest

from conftest import FAST_RETRY, KEY, held, settled_tasks
from modelslab_async import (
    BatchProgress,
    Client,
    FluxKleinText2Img,
    RetryPolicy,
    Text2Img,
)
from modelslab_async.emulator import Faults
from modelslab_async.errors import (
    BadRequestError,
    ClientStateError,
    GenerationFailedError,
    RateLimitError,
)


pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("rate_limited", [0.0, 0.3])
async def test_gather_of_100_under_a_cap_of_5(emulator, rate_limited):
    """gather of 100 generate() on a 5-job account: 100 results, <= 5 queued."""
    emulator.eta = 0.05
    emulator.queue_limit = 5
    emulator.faults = Faults(rates={"submit": {"rate_limit": rate_limited}})

    async with Client(KEY, base_url=emulator.url, retry=FAST_RETRY) as client:
        results = await asyncio.gather(
            *(client.generate(Text2Img(prompt=f"p{i}")) for i in range(100))
        )

    assert len({r.id for r in results}) == 100
    assert emulator.jobs_created == 100
    assert emulator.max_queued(KEY) <= 5
    refusals = [r for r in emulator.requests("submit") if r.status == 429]
    assert len(refusals) == emulator.faults.injected["submit", "rate_limit"]
    if rate_limited:
        assert refusals  # the 30% really happened, and were absorbed


async def test_without_a_cap_the_account_refuses(emulator):
    """max_queued=None really sends everything: the cap is what saves us."""
    emulator.eta = 5
    emulator.queue_limit = 5
    async with Client(
        KEY,
        base_url=emulator.url,
        max_queued=None,
        retry=RetryPolicy.disabled(),
    ) as client:
        outcomes = await asyncio.gather(
            *(client.submit(Text2Img(prompt=f"p{i}")) for i in range(10)),
            return_exceptions=True,
        )

    refused = [o for o in outcomes if isinstance(o, RateLimitError)]
    assert len(refused) == 5
    assert emulator.jobs_created == 5


async def test_failures_are_contained(emulator, client):
    """Failing prompts give typed errors; every sibling still succeeds."""
    emulator.eta = 0.05
    prompts = ["a", "b [fail]", "c", "d [refuse]", "e", "f [fail]", "g"]
    seen: list[BatchProgress] = []

    items = [
        item
        async for item in client.generate_many(
            [Text2Img(prompt=p) for p in prompts], on_progress=seen.append
        )
    ]

    by_prompt = {item.request.prompt: item for item in items}
    assert sorted(by_prompt) == sorted(prompts)
    for prompt, item in by_prompt.items():
        assert prompts[item.index] == prompt
        if "[fail]" in prompt:
            assert isinstance(item.error, GenerationFailedError)
            assert not item.ok
            with pytest.raises(GenerationFailedError):
                item.unwrap()
        elif "[refuse]" in prompt:
            assert isinstance(item.error, BadRequestError)
        else:
            assert item.unwrap().outputs
            assert item.seconds > 0
    final = seen[-1]
    assert (final.total, final.submitted, final.queued) == (7, 6, 0)
    assert (final.done, final.failed, final.finished) == (4, 3, 7)
    assert [p.finished for p in seen] == sorted(p.finished for p in seen)
    assert await settled_tasks() == set()


async def test_ordered_batches_keep_input_order(emulator, client):
    """ordered=True yields in input order even when jobs end out of it."""
    emulator.eta = 0.05
    emulator.eta_error = 0.9  # durations all over the place

    items = [
        item
        async for item in client.generate_many(
            [FluxKleinText2Img(prompt=f"p{i}") for i in range(12)],
            ordered=True,
        )
    ]

    assert [item.index for item in items] == list(range(12))
    assert all(item.ok for item in items)


async def test_leaving_a_batch_early_cancels_the_rest(emulator, client):
    """Breaking out of a batch stops its other jobs' tasks at once."""
    emulator.eta = 0.05
    requests = [Text2Img(prompt=f"p{i}") for i in range(30)]

    async with contextlib.aclosing(client.generate_many(requests)) as batch:
        async for _ in batch:
            break

    assert await settled_tasks() == set()
    assert emulator.jobs_created < 30


async def test_a_bug_in_a_batch_is_raised_not_swallowed(client):
    """A non-library error stops the batch and reaches the caller."""
    requests = [Text2Img(prompt="p"), {"prompt": "not a request"}]

    with pytest.raises(TypeError, match="Text2Img"):
        async for _ in client.generate_many(requests):  # type: ignore[arg-type]
            pass

    assert await settled_tasks() == set()


async def test_an_empty_batch_yields_nothing(client):
    """No requests, no items, no work."""
    assert [item async for item in client.generate_many([])] == []


async def test_dropped_handles_give_their_slot_back(emulator):
    """A job submitted and forgotten frees its slot when it ends, not before."""
    emulator.eta = 0.3
    async with Client(
        KEY, base_url=emulator.url, max_queued=1, retry=FAST_RETRY
    ) as client:
        await client.submit(Text2Img(prompt="forgotten"))
        gc.collect()

        async with asyncio.timeout(5):
            job = await client.submit(Text2Img(prompt="next"))

        assert job.id is not None
        assert held(client) == 1
    assert emulator.max_queued(KEY) == 1
    assert emulator.jobs_created == 2


async def test_slots_follow_jobs_to_their_end(emulator):
    """A slot is held while a job is queued and given back when it ends."""
    emulator.eta = 0.2
    async with Client(KEY, base_url=emulator.url, max_queued=2) as client:
        first = await client.submit(Text2Img(prompt="a"))
        second = await client.submit(Text2Img(prompt="b"))
        assert held(client) == 2
        third = asyncio.create_task(client.submit(Text2Img(prompt="c")))
        await asyncio.sleep(0.05)
        assert not third.done()  # waits for a slot

        await first
        job = await third
        await asyncio.gather(second, job)

    assert held(client) == 0
    assert emulator.max_queued(KEY) == 2


async def test_closing_wakes_submits_waiting_for_a_slot(emulator):
    """A submit queued behind a held slot fails at once when we close."""
    emulator.eta = 30
    client = Client(KEY, base_url=emulator.url, max_queued=1)
    held = await client.submit(Text2Img(prompt="holds the only slot"))
    waiting = asyncio.create_task(client.submit(Text2Img(prompt="waits")))
    await asyncio.sleep(0.05)
    assert not waiting.done()

    await client.aclose()

    async with asyncio.timeout(2):
        with pytest.raises(ClientStateError, match="closed"):
            await waiting
    assert emulator.jobs_created == 1
    assert held.id is not None
