"""
Reliability under faults: typed errors only, no duplicate jobs, no leaks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import math
import os
import sys
import tracemalloc

from collections.abc import Iterator

import aiohttp
import anyio
import pytest

from conftest import KEY, session_of, settled_tasks
from modelslab_async import Client, RetryPolicy, Text2Img
from modelslab_async._converter import decode_job
from modelslab_async.emulator import FAULT_KINDS, Emulator, Faults
from modelslab_async.errors import (
    InvalidRequestError,
    ModelsLabError,
    SubmitUncertainError,
)
from modelslab_async.webhooks import WebhookReceiver


pytestmark = pytest.mark.anyio

FULL = os.environ.get("MODELSLAB_SOAK") == "full"
#: (rounds, jobs per round): the normal suite runs a short soak.
ROUNDS, JOBS = (5, 1000) if FULL else (3, 150)
#: The emulator's request log in the soak: a ring far smaller than the
#: requests of a round, whose counters must stay exact all the same.
RECORDS = 200


def is_ours(error: BaseException) -> bool:
    """
    Whether an exception is one of ours and nothing lower-level.
    """
    return (
        isinstance(error, ModelsLabError)
        and type(error).__module__ == "modelslab_async.errors"
        and not isinstance(error, aiohttp.ClientError | asyncio.TimeoutError)
    )


@pytest.mark.parametrize("route", ["submit", "fetch", "download"])
@pytest.mark.parametrize("kind", FAULT_KINDS)
async def test_only_typed_errors_escape(emulator, route, kind):
    """Whatever breaks, on any route, the caller sees one of our errors."""
    emulator.eta = 0.02
    emulator.faults = Faults(schedule={route: [kind] * 4}, stall_seconds=1)
    policy = RetryPolicy(attempts=2, wait_initial=0.001, wait_jitter=0)
    async with Client(
        KEY, base_url=emulator.url, retry=policy, timeout=0.3
    ) as client:
        try:
            result = await client.generate(Text2Img(prompt="p"), timeout=5)
            await result.outputs[0].read(timeout=1)
        except Exception as exc:  # noqa: BLE001 (the point of the test)
            raised = name_of(exc)
        else:
            raised = None

    assert emulator.faults.injected[route, kind] >= 1
    if kind in ("slow_body", "rate_limit"):
        assert raised is None  # not failures: waited out or slow but fine


def name_of(error: BaseException) -> str:
    """
    The error's class name, after checking it is one of ours.
    """
    assert is_ours(error), repr(error)
    return type(error).__name__


async def settle(client, emulator, item, outcomes) -> None:
    """
    Take one batch item to its end, recovering an uncertain submit, and
    count it in exactly one outcome.
    """
    result, error, prefix = item.result, item.error, ""
    if isinstance(error, SubmitUncertainError):
        job = await client.recover(error, timeout=2)
        if job is None:
            made = any(
                j.track_id == error.track_id
                for j in emulator.store.jobs.values()
            )
            outcomes[
                "uncertain: made, but its webhook was dropped"
                if made
                else "uncertain: no job was made"
            ] += 1
            return
        prefix = "uncertain, recovered: "
        try:
            result = await job
        except ModelsLabError as exc:
            outcomes[prefix + name_of(exc)] += 1
            return
    elif error is not None:
        outcomes[name_of(error)] += 1
        return
    try:
        await result.outputs[0].read(timeout=2)
    except ModelsLabError as exc:
        outcomes[f"{prefix}read: {name_of(exc)}"] += 1
    else:
        outcomes[prefix + "success"] += 1


async def soak_round(jobs: int, seed: int) -> dict[str, collections.Counter]:
    """
    One round: *jobs* jobs through a fresh emulator with 10% mixed faults.
    """
    faults = Faults.mixed(
        0.10,
        stall_seconds=1.0,
        seed=seed,
        webhook_drop=0.10,
        webhook_duplicate=0.05,
    )
    outcomes: collections.Counter[str] = collections.Counter()
    policy = RetryPolicy(
        attempts=4, wait_initial=0.005, wait_max=0.05, wait_jitter=0.005
    )
    async with (
        Emulator(
            eta=0.02,
            eta_error=0.5,
            queue_limit=20,
            retry_after=0.01,
            faults=faults,
            record_limit=RECORDS,
        ) as emulator,
        WebhookReceiver(grace=0.2) as receiver,
    ):
        client = Client(
            KEY,
            base_url=emulator.url,
            retry=policy,
            timeout=0.4,
            max_queued=20,
            webhooks=receiver,
        )
        requests = [
            Text2Img(prompt=f"soak {i}", width=64, height=64)
            for i in range(jobs)
        ]
        async with client:
            connector = session_of(client).connector
            async with anyio.create_task_group() as group:
                async for item in client.generate_many(requests, timeout=10):
                    group.start_soon(settle, client, emulator, item, outcomes)
        counts = {
            "jobs asked": jobs,
            "jobs created": emulator.jobs_created,
            "duplicates": sum(n - 1 for n in emulator.duplicates().values()),
            "max queued": emulator.max_queued(KEY),
            "connectors left open": 0 if connector.closed else 1,
            "requests answered": sum(emulator.counts.values()),
        }
        store = emulator.store
        # The ring holds the latest records only; two counters kept apart
        # (per job and overall) still agree exactly.
        assert len(emulator.records) == RECORDS
        assert sum(counts.values()) > RECORDS
        assert sum(store.tracks.values()) == emulator.jobs_created
        assert emulator.fetches_total == sum(
            job.fetches for job in store.jobs.values()
        )
        injected = {f"{r}/{k}": n for (r, k), n in faults.injected.items()}
    counts["tasks left"] = len(await settled_tasks())
    return {
        "outcomes": outcomes,
        "faults": collections.Counter(injected),
        "counts": collections.Counter(counts),
    }


class _Tally(logging.Handler):
    """
    Counts log lines by level and keeps none of them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] += 1


@contextlib.contextmanager
def tallied_logs() -> Iterator[collections.Counter[str]]:
    """
    The library's log lines counted, not kept.

    pytest keeps every record of a test for its report, and a record of a
    failed fetch holds the error, its traceback, and through the frames a
    whole round's client: megabytes the soak's memory check would charge
    to the library. So the soak's records go to a tally instead.
    """
    logger = logging.getLogger("modelslab_async")
    tally, propagate = _Tally(), logger.propagate
    logger.addHandler(tally)
    logger.propagate = False
    try:
        yield tally.counts
    finally:
        logger.propagate = propagate
        logger.removeHandler(tally)


@pytest.mark.soak
async def test_soak_nothing_lost_nothing_doubled_nothing_leaked():
    """Rounds of jobs under 10% faults: typed outcomes, 0 duplicates, no leaks."""
    with tallied_logs() as lines:
        totals, memory = await soak()
    totals["log lines"] = lines

    # The first round warms caches; after it, memory must stay flat.
    growth = memory[-1] - memory[1]
    assert growth < 512 * 1024, memory
    assert totals["outcomes"]["success"] > 0.5 * ROUNDS * JOBS
    report(totals, memory)


async def soak() -> tuple[dict[str, collections.Counter[str]], list[int]]:
    """
    Every round, each checked; the totals, and memory after each round.
    """
    tracemalloc.start()
    memory = []
    totals: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    try:
        for seed in range(ROUNDS):
            figures = await soak_round(JOBS, seed)
            counts = figures.pop("counts")
            for name, counter in figures.items():
                totals[name].update(counter)
            for name, value in counts.items():
                merge = max if name == "max queued" else int.__add__
                totals["counts"][name] = merge(totals["counts"][name], value)
            assert sum(figures["outcomes"].values()) == JOBS
            assert counts["jobs created"] <= JOBS
            assert counts["duplicates"] == 0
            assert counts["max queued"] <= 20
            assert counts["connectors left open"] == 0
            assert counts["tasks left"] == 0
            gc.collect()
            memory.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    return totals, memory


def report(totals, memory) -> None:
    """
    Print the soak figures (``nox -s soak`` shows them; docs quote them).
    """
    print(f"\nsoak: {ROUNDS} rounds x {JOBS} jobs")  # noqa: T201
    for name, counter in totals.items():
        print(f"  {name}:")  # noqa: T201
        for key, value in sorted(counter.items()):
            print(f"    {key}: {value}")  # noqa: T201
    print(  # noqa: T201
        "  memory after each round (KiB): "
        + ", ".join(str(m // 1024) for m in memory)
    )


# --- smaller points of issue 10 ----------------------------------------------


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_an_infinite_request_timeout_is_refused_by_name(value):
    """Client(timeout=inf) is refused at construction, naming the field."""
    with pytest.raises(InvalidRequestError, match="timeout") as caught:
        Client(KEY, timeout=value)

    assert caught.value.field == "timeout"


def test_texts_are_shared_without_the_intern_table():
    """Decoding unique texts adds nothing to the interpreter's intern table
    (on Python 3.12 interned strings are never freed)."""
    unique = f"job {os.urandom(8).hex()} failed"
    fetch_result = f"https://example.test/fetch/{os.urandom(8).hex()}"

    response = decode_job(
        {
            "status": "error",
            "message": unique,
            "fetch_result": fetch_result,
            "tip": "t",
        }
    )

    assert response.message == unique
    for text in (unique, fetch_result):
        copy = "".join(list(text))  # equal, but a distinct object
        assert sys.intern(copy) is copy  # so no equal string was interned


async def test_noise_images_are_photo_sized():
    """images="noise" serves PNGs as big as real outputs (about 3 MB)."""
    async with Emulator(eta=0, images="noise") as emulator:
        client = Client(KEY, base_url=emulator.url)
        async with client:
            result = await client.generate(
                Text2Img(prompt="p", width=1024, height=1024)
            )
            image = await result.outputs[0].read()

    assert image.startswith(b"\x89PNG")
    assert len(image) > 3_000_000
