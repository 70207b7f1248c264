"""
generate_many(batch_id=...): a batch run again attaches, never pays twice.
"""

from __future__ import annotations

import pytest

from conftest import FAST_RETRY, KEY
from modelslab_async import (
    BatchFailure,
    BatchSuccess,
    Client,
    FluxKleinText2Img,
    Text2Img,
    batch_track_id,
)
from modelslab_async.stores import SQLiteStore


pytestmark = pytest.mark.anyio


def test_derived_track_ids_depend_on_content_and_place():
    """Same batch, place and fields: same id; anything else: another."""
    request = Text2Img(prompt="a lighthouse", width=512, seed=3)
    same = Text2Img(prompt="a lighthouse", seed=3, width=512)
    ids = {
        batch_track_id("b", 0, request),
        batch_track_id("b", 0, Text2Img(prompt="a lighthouse", width=512)),
        batch_track_id("b", 1, request),
        batch_track_id("c", 0, request),
        batch_track_id("b", 0, FluxKleinText2Img(prompt="a lighthouse")),
    }

    assert batch_track_id("b", 0, request) == batch_track_id("b", 0, same)
    assert len(ids) == 5
    assert all(i.startswith("mlb-") and len(i) == 36 for i in ids)
    # Where results go is not what is asked for.
    hooked = Text2Img(
        prompt="a lighthouse", width=512, seed=3, webhook="https://h/x"
    )
    assert batch_track_id("b", 0, hooked) == batch_track_id("b", 0, request)


async def test_a_batch_run_again_attaches_to_its_jobs(emulator, tmp_path):
    """Run twice on one journal: 12 jobs made, the same ids both times."""
    emulator.eta = 0.05
    requests = [Text2Img(prompt=f"p{n}") for n in range(12)]
    requests[3] = Text2Img(prompt="p3", track_id="mine")  # kept as given
    runs = []
    for _ in range(2):
        async with Client(
            KEY,
            base_url=emulator.url,
            retry=FAST_RETRY,
            store=SQLiteStore(tmp_path / "jobs.sqlite3"),
        ) as client:
            items = [
                item
                async for item in client.generate_many(
                    requests, batch_id="nightly", ordered=True
                )
            ]
        runs.append(items)

    first, second = runs
    assert all(isinstance(item, BatchSuccess) for item in first + second)
    assert emulator.jobs_created == 12
    assert [i.unwrap().id for i in first] == [i.unwrap().id for i in second]
    assert first[3].request.track_id == "mine"
    assert first[0].request.track_id == batch_track_id(
        "nightly", 0, requests[0]
    )


async def test_failures_are_batch_failures(emulator, client):
    """A failed request is a BatchFailure: no result, unwrap() raises."""
    emulator.eta = 0.05
    items = [
        item
        async for item in client.generate_many(
            [Text2Img(prompt="a [fail] one")]
        )
    ]

    (item,) = items
    assert isinstance(item, BatchFailure)
    assert item.ok is False
    assert item.result is None
    with pytest.raises(type(item.error)):
        item.unwrap()
