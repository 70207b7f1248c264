"""
Durable jobs: the journal, idempotency keys, resume, uncertain submits.
"""

from __future__ import annotations

import asyncio
import gc
import random
import sqlite3
import time

from collections import Counter
from typing import Any, ClassVar

import anyio
import attrs
import pytest

from conftest import FAST_RETRY, KEY, held
from modelslab_async import (
    Client,
    JobPhase,
    JobState,
    Text2Img,
    WebhookReceiver,
)
from modelslab_async._engine import Secret, account_of
from modelslab_async._requests import JobRequest
from modelslab_async._routes import Route
from modelslab_async._state import hash_token
from modelslab_async._validation import (
    checked,
    field,
    flag,
    number,
    optional,
    text,
    url,
)
from modelslab_async.emulator import (
    DEFAULT_ENDPOINTS,
    V6_TEXT2IMG,
    Emulator,
)
from modelslab_async.errors import (
    ClientStateError,
    StoreError,
    SubmitUncertainError,
)
from modelslab_async.stores import MemoryStore, SQLiteStore


pytestmark = pytest.mark.anyio


def submits_by_track_id(emulator) -> Counter[str]:
    return Counter(r.body.get("track_id") for r in emulator.requests("submit"))


async def test_known_track_ids_send_no_second_job(emulator, store):
    """Resubmitting 100 journaled track_ids sends no new job."""
    requests = [
        Text2Img(prompt=f"p{n}", track_id=f"t-{n}") for n in range(100)
    ]
    async with Client(
        KEY, base_url=emulator.url, store=store, max_queued=None
    ) as client:
        first = await asyncio.gather(*(client.submit(r) for r in requests))
        await asyncio.gather(*first)
        before = emulator.jobs_created

        again = await asyncio.gather(*(client.submit(r) for r in requests))
        results = await asyncio.gather(*again)

    assert before == 100
    assert emulator.jobs_created == 100
    assert [r.track_id for r in results] == [r.track_id for r in requests]
    assert [r.id for r in results] == [j.id for j in first]


async def test_concurrent_submits_of_one_track_id_make_one_job(emulator):
    """Ten concurrent submits of one track_id make one job, one handle."""
    async with Client(KEY, base_url=emulator.url) as client:
        jobs = await asyncio.gather(
            *(
                client.submit(Text2Img(prompt="p", track_id="same"))
                for _ in range(10)
            )
        )

    assert emulator.jobs_created == 1
    assert len({id(job) for job in jobs}) == 1


async def test_the_job_id_is_journaled_before_submit_returns(
    emulator, tmp_path
):
    """submit() returns only after the journal holds the job id."""
    path = tmp_path / "jobs.sqlite3"
    emulator.eta = 30
    async with Client(
        KEY, base_url=emulator.url, store=SQLiteStore(path)
    ) as client:
        job = await client.submit(Text2Img(prompt="p", track_id="order-17"))

        # Another connection, as another process would read it.
        with sqlite3.connect(path) as db:
            ((phase, state),) = db.execute(
                "SELECT phase, state FROM jobs WHERE track_id = 'order-17'"
            )

    assert phase == "queued"
    assert f'"job_id":"{job.id}"' in state
    assert KEY not in state


async def test_a_job_done_in_the_submit_answer_is_journaled_before_return(
    emulator, tmp_path
):
    """A job finished in the submit's answer is journaled before submit()."""
    path = tmp_path / "jobs.sqlite3"
    emulator.eta = 0
    async with Client(
        KEY, base_url=emulator.url, store=SQLiteStore(path), max_queued=1
    ) as client:
        job = await client.submit(Text2Img(prompt="p", track_id="order-18"))

        # Another connection, as the next run would read it after a crash.
        with sqlite3.connect(path) as db:
            ((phase, state),) = db.execute(
                "SELECT phase, state FROM jobs WHERE track_id = 'order-18'"
            )
        # Its slot is back: it left the queue at once.
        assert held(client) == 0

    assert phase == "succeeded"
    assert f'"job_id":"{job.id}"' in state


async def test_unfinished_jobs_resume_in_a_new_client(emulator, store):
    """Jobs left queued by a closed client finish in the next one."""
    emulator.eta = 0.3
    async with Client(KEY, base_url=emulator.url, store=store) as client:
        left = [
            await client.submit(Text2Img(prompt=f"p{n}", track_id=f"t-{n}"))
            for n in range(5)
        ]
    assert all(job.phase is JobPhase.QUEUED for job in left)

    async with Client(KEY, base_url=emulator.url, store=store) as client:
        resumed = await client.unfinished()
        with anyio.fail_after(10):
            results = await asyncio.gather(*resumed)
        after = await client.unfinished()

    assert [job.track_id for job in resumed] == [f"t-{n}" for n in range(5)]
    assert [r.id for r in results] == [job.id for job in left]
    assert all(r.outputs for r in results)
    assert after == []
    assert emulator.jobs_created == 5


async def test_finished_jobs_stay_readable(emulator, store):
    """A finished job is read back from the journal by its track_id."""
    async with Client(KEY, base_url=emulator.url, store=store) as client:
        done = await client.generate(Text2Img(prompt="p", track_id="keep"))
    async with Client(KEY, base_url=emulator.url, store=store) as client:
        job = await client.job("keep")
        missing = await client.job("never-sent")
        result = await job

    assert job.phase is JobPhase.SUCCEEDED
    assert result.id == done.id
    assert [o.url for o in result.outputs] == [o.url for o in done.outputs]
    assert result.meta["prompt"] == "p"
    assert missing is None
    assert emulator.jobs_created == 1


async def test_a_submit_in_flight_at_a_crash_is_uncertain(emulator, tmp_path):
    """A job journaled as submitting, its process gone, is uncertain."""
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    journal = await store.open(_account(), max_queued=5)
    now = time.time()
    await journal.claim(
        JobState(
            track_id="in-flight",
            endpoint="v6",
            phase=JobPhase.SUBMITTING,
            request=Text2Img(prompt="p"),
            created_at=now,
            updated_at=now,
        )
    )
    await journal.aclose()  # the process "dies" here

    async with Client(KEY, base_url=emulator.url, store=store) as client:
        (job,) = await client.unfinished()
        with pytest.raises(SubmitUncertainError) as caught:
            await job
        again = await client.submit(Text2Img(prompt="p", track_id="in-flight"))

    assert job.phase is JobPhase.UNCERTAIN
    assert caught.value.track_id == "in-flight"
    assert again is job  # never sent a second time
    assert emulator.jobs_created == 0


async def test_a_refused_submit_may_be_sent_again(emulator, store):
    """A submit the server refused leaves no claim behind."""
    async with Client(
        KEY, base_url=emulator.url, store=store, retry=FAST_RETRY
    ) as client:
        with pytest.raises(Exception, match="refused"):
            await client.submit(Text2Img(prompt="[refuse]", track_id="t"))
        assert await client.job("t") is None
        job = await client.submit(Text2Img(prompt="fine", track_id="t"))

    assert job.id is not None
    assert emulator.jobs_created == 1


async def test_callbacks_after_a_restart_are_accepted(emulator, tmp_path):
    """A webhook for a job of the previous run finishes it, no fetch."""
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    emulator.eta = 0.6
    receiver = WebhookReceiver(port=0)
    async with receiver:
        port = int(receiver.url.rsplit(":", 1)[1].split("/", 1)[0])
    async with Client(
        KEY,
        base_url=emulator.url,
        store=store,
        webhooks=WebhookReceiver(port=port, grace=30),
    ) as client:
        job = await client.submit(Text2Img(prompt="p", track_id="w"))
    # The first process is gone; the next one listens on the same port.
    async with Client(
        KEY,
        base_url=emulator.url,
        store=store,
        webhooks=WebhookReceiver(port=port, grace=30),
    ) as client:
        (resumed,) = await client.unfinished()
        with anyio.fail_after(10):
            result = await resumed

    assert result.id == job.id
    assert emulator.fetches(job.id) == 0
    (webhook,) = emulator.requests("webhook")
    assert webhook.status == 200


async def test_unawaited_handles_give_their_slots_back(emulator):
    """max_queued handles never awaited: the next submit still goes through."""
    emulator.eta = 0.1
    async with Client(KEY, base_url=emulator.url, max_queued=5) as client:
        kept = [
            await client.submit(Text2Img(prompt=f"p{n}")) for n in range(5)
        ]
        with anyio.fail_after(5):
            extra = await client.submit(Text2Img(prompt="sixth"))
        with anyio.fail_after(5):
            await extra

    assert extra.id is not None
    assert all(job.status.is_finished for job in kept)
    assert emulator.max_queued(KEY) == 5


async def test_a_cancelled_wait_keeps_the_slot_until_the_job_ends(emulator):
    """A cancelled wait does not free the slot of a job still queued."""
    emulator.eta = 0.4
    async with Client(KEY, base_url=emulator.url, max_queued=1) as client:
        job = await client.submit(Text2Img(prompt="p"))
        waiter = asyncio.create_task(job.wait())
        await asyncio.sleep(0.05)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert held(client) == 1
        started = time.monotonic()

        with anyio.fail_after(5):
            second = await client.submit(Text2Img(prompt="q"))
        waited = time.monotonic() - started

        assert job.status.is_finished  # seen to end by the watcher
        await second
    assert waited > 0.2  # the slot came back when the job ended
    assert emulator.max_queued(KEY) == 1


async def test_a_storm_of_cancellations_meets_no_429(emulator):
    """500 jobs on a 5-job account, 300 waits cancelled: 0 429s, all slots back."""
    rng = random.Random(7)  # noqa: S311 (timing, not secrets)
    emulator.eta = 0.05
    emulator.eta_error = 0.5
    emulator.queue_limit = 5
    async with Client(
        KEY, base_url=emulator.url, max_queued=5, retry=FAST_RETRY
    ) as client:
        tasks = [
            asyncio.create_task(client.generate(Text2Img(prompt=f"p{n}")))
            for n in range(500)
        ]
        loop = asyncio.get_running_loop()
        for task in rng.sample(tasks, 300):
            loop.call_later(rng.uniform(0, 4), task.cancel)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        with anyio.fail_after(10):
            while held(client):
                await asyncio.sleep(0.01)
        cancelled = sum(
            isinstance(o, asyncio.CancelledError) for o in outcomes
        )

    assert emulator.rate_limited == 0
    assert [r for r in emulator.requests("submit") if r.status == 429] == []
    assert emulator.max_queued(KEY) <= 5
    assert cancelled > 100  # most cancels landed before their job ended
    assert all(
        not isinstance(o, BaseException)
        or isinstance(o, asyncio.CancelledError)
        for o in outcomes
    )


async def test_closing_wakes_a_claim_waiting_for_a_slot(emulator, store):
    """A submit waiting for a slot in a journal fails at once on close."""
    emulator.eta = 30
    client = Client(KEY, base_url=emulator.url, store=store, max_queued=1)
    await client.submit(Text2Img(prompt="holds it"))
    waiting = asyncio.create_task(client.submit(Text2Img(prompt="waits")))
    await asyncio.sleep(0.05)

    await client.aclose()

    with anyio.fail_after(2), pytest.raises(ClientStateError):
        await waiting


async def test_a_record_of_another_version_is_a_store_error(tmp_path):
    """A journal row this version cannot read raises StoreError, typed."""
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    journal = await store.open("acct", max_queued=None)
    await journal.aclose()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute(
            "INSERT INTO jobs VALUES ('acct', 'x', 'queued', NULL, ?, '{}')",
            (time.time(),),
        )

    journal = await store.open("acct", max_queued=None)
    with pytest.raises(StoreError, match="version"):
        await journal.get("x")
    await journal.aclose()


async def test_the_journal_prunes_what_is_past_retention(tmp_path):
    """Jobs older than the retention are pruned when a journal opens."""
    store = SQLiteStore(tmp_path / "jobs.sqlite3", retention=0.2)
    journal = await store.open("acct", max_queued=None)
    now = time.time()
    old = JobState(
        track_id="old",
        endpoint="v6",
        phase=JobPhase.SUCCEEDED,
        created_at=now - 10,
        updated_at=now - 10,
    )
    await journal.record(old)
    await journal.record(attrs.evolve(old, track_id="new", updated_at=now))
    await journal.aclose()

    journal = await store.open("acct", max_queued=None)
    kept = [await journal.get("old"), await journal.get("new")]
    await journal.aclose()

    assert kept[0] is None
    assert kept[1] is not None


def _account() -> str:
    return account_of(Secret(KEY))


@checked
@attrs.frozen(kw_only=True)
class Img2Img(JobRequest):
    """
    A third request class, defined here, for an endpoint the package does
    not know: a new endpoint is a class and its route row, and nothing
    else.
    """

    route: ClassVar[Route] = Route(
        "v6",
        submit="v6/images/img2img",
        fetch="v6/images/fetch/",
        booleans="yes-no",
    )

    prompt: str = field(text(required=True))
    model_id: str = field(text(required=True), default="flux")
    init_image: str = field(url)
    strength: float | None = optional(number(0, 1))
    safety_checker: bool | None = optional(flag)
    webhook: str | None = None
    track_id: str | None = None
    extra: Any = attrs.field(factory=dict)


async def test_a_new_request_class_needs_no_other_module():
    """A request class and route row defined outside the package just work."""
    img2img = attrs.evolve(
        V6_TEXT2IMG,
        submit="v6/images/img2img",
        fields=V6_TEXT2IMG.fields | {"init_image", "strength"},
    )
    request = Img2Img(
        prompt="p",
        init_image="https://example.com/in.png",
        strength=0.7,
        safety_checker=False,
    )
    async with (
        Emulator(
            eta=0.1, strict=True, endpoints=(*DEFAULT_ENDPOINTS, img2img)
        ) as emulator,
        Client(KEY, base_url=emulator.url) as client,
    ):
        job = await client.submit(request)
        result = await job

    (submit,) = emulator.requests("submit")
    assert submit.path == "/api/v6/images/img2img"
    assert submit.body["safety_checker"] == "no"
    assert submit.body["init_image"] == "https://example.com/in.png"
    assert submit.body["model_id"] == "flux"
    assert emulator.fetches(job.id) >= 1
    assert result.request == request
    assert result.outputs


async def test_the_journal_keeps_callback_tokens_only_as_hashes(
    emulator, tmp_path
):
    """A job's callback token is journaled as its SHA-256, never itself."""
    path = tmp_path / "jobs.sqlite3"
    emulator.eta = 30
    async with Client(
        KEY,
        base_url=emulator.url,
        store=SQLiteStore(path),
        webhooks=WebhookReceiver(),
    ) as client:
        await client.submit(Text2Img(prompt="p", track_id="hooked"))
        (submit,) = emulator.requests("submit")
        token = submit.body["webhook"].rstrip("/").rsplit("/", 1)[-1]

        with sqlite3.connect(path) as db:
            (state,) = db.execute("SELECT state FROM jobs").fetchone()

    assert len(token) >= 24
    assert token not in state
    assert hash_token(token) in state
    assert KEY not in state


async def test_jobs_done_in_the_submit_answer_free_their_slot(emulator):
    """Jobs that succeed in the submit's answer give their slot back at once."""
    emulator.eta = 0
    async with Client(KEY, base_url=emulator.url, max_queued=1) as client:
        with anyio.fail_after(5):
            results = [
                await client.generate(Text2Img(prompt=f"p{n}"))
                for n in range(3)
            ]

        assert held(client) == 0
    assert [r.id for r in results] == [
        r.job_id for r in emulator.requests("submit")
    ]
    assert emulator.requests("fetch") == []


async def test_a_cancelled_first_submit_does_not_cancel_its_twins(emulator):
    """Twins of a cancelled submit of one track_id are not cancelled."""
    emulator.eta = 30
    async with Client(KEY, base_url=emulator.url, retry=FAST_RETRY) as client:
        first = asyncio.create_task(
            client.submit(Text2Img(prompt="p", track_id="twin"))
        )
        await asyncio.sleep(0)  # the first is sending
        second = asyncio.create_task(
            client.submit(Text2Img(prompt="p", track_id="twin"))
        )
        await asyncio.sleep(0)
        first.cancel()

        outcome = await asyncio.gather(second, return_exceptions=True)

    assert first.cancelled()
    assert not isinstance(outcome[0], asyncio.CancelledError)
    assert emulator.jobs_created <= 1


class _SlowRecords:
    """
    A store whose journal holds each record of a job id until let go, and
    finishes it even when its caller is cancelled (as real journals do).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()

    async def open(self, account: str, *, max_queued: int | None) -> Any:
        journal = await self.inner.open(account, max_queued=max_queued)
        return _SlowJournal(journal, self)


class _SlowJournal:
    def __init__(self, inner: Any, store: _SlowRecords) -> None:
        self._inner = inner
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def record(self, state: Any) -> Any:
        return await asyncio.shield(self._record(state))

    async def _record(self, state: Any) -> Any:
        if state.phase is JobPhase.QUEUED and not self._store.gate.is_set():
            self._store.reached.set()
            await self._store.gate.wait()
        return await self._inner.record(state)


async def test_a_submit_cancelled_while_its_id_is_journaled_keeps_watch(
    emulator,
):
    """A job whose submit was cancelled at the journal write is watched."""
    emulator.eta = 0.05
    store = _SlowRecords(MemoryStore())
    async with Client(
        KEY, base_url=emulator.url, store=store, max_queued=1
    ) as client:
        first = asyncio.ensure_future(
            client.submit(Text2Img(prompt="p", track_id="cut"))
        )
        with anyio.fail_after(10):
            await store.reached.wait()
        first.cancel()
        store.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        # The job is queued on the server and holds the only slot: only a
        # watcher gives it back, so the next submit goes through.
        with anyio.fail_after(10):
            second = await client.generate(Text2Img(prompt="q"))

    assert second.outputs
    assert emulator.jobs_created == 2


async def test_a_twin_submit_returns_once_the_id_is_journaled(emulator):
    """A second submit of a track_id waits for the first's journal write."""
    store = _SlowRecords(MemoryStore())
    async with Client(KEY, base_url=emulator.url, store=store) as client:
        first = asyncio.ensure_future(
            client.submit(Text2Img(prompt="p", track_id="twin"))
        )
        with anyio.fail_after(10):
            await store.reached.wait()
        twin = asyncio.ensure_future(
            client.submit(Text2Img(prompt="p", track_id="twin"))
        )
        await asyncio.sleep(0.05)
        early = twin.done()
        store.gate.set()
        with anyio.fail_after(10):
            jobs = await asyncio.gather(first, twin)

    assert not early
    assert jobs[0] is jobs[1]
    assert emulator.jobs_created == 1


async def test_an_uncapped_client_resumes_every_unfinished_job(
    emulator, tmp_path
):
    """Without a queue cap, unfinished() still returns the adopted jobs."""
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    emulator.eta = 0.3
    async with Client(
        KEY, base_url=emulator.url, store=store, max_queued=None
    ) as client:
        for n in range(3):
            await client.submit(Text2Img(prompt=f"p{n}", track_id=f"u-{n}"))

    async with Client(
        KEY, base_url=emulator.url, store=store, max_queued=None
    ) as client:
        await asyncio.sleep(0)  # a turn for anything held only weakly
        gc.collect()
        resumed = await client.unfinished()
        with anyio.fail_after(10):
            results = await asyncio.gather(*resumed)

    assert [job.track_id for job in resumed] == ["u-0", "u-1", "u-2"]
    assert all(r.outputs for r in results)
    assert emulator.jobs_created == 3
