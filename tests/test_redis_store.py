"""
RedisStore against a real redis-server: the journal protocol, the
account-wide cap across OS processes, adoption, skew, outages, the inbox.

No timing is asserted: latency figures live in benchmarks/redis_store.py.
Every test is bounded by ``anyio.fail_after``; every process it starts is
killed when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import time

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from conftest import KEY
from modelslab_async import Client
from modelslab_async._requests import Text2Img
from modelslab_async._state import JobPhase, JobState, hash_token
from modelslab_async.emulator import Emulator, Faults
from modelslab_async.errors import (
    ClientStateError,
    StoreUnavailableError,
    SubmitUncertainError,
)
from modelslab_async.stores import JobStore, Journal, RedisStore


pytestmark = [pytest.mark.anyio, pytest.mark.redis]

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_redis_worker.py"
ROOT = HERE.parent
ACCOUNT = "acct-test"
PREFIX = f"mla:{{{ACCOUNT}}}:"


@pytest.fixture
def anyio_backend():
    """
    redis-py's asyncio client and the store run on asyncio.
    """
    return "asyncio"


def state(track_id: str, phase=JobPhase.SUBMITTING, **fields) -> JobState:
    """
    A job record as the client journals it.
    """
    now = time.time()
    return JobState(
        track_id=track_id,
        endpoint="v6",
        phase=phase,
        created_at=now,
        updated_at=now,
        **fields,
    )


def full_state(track_id: str, phase=JobPhase.SUBMITTING, **fields):
    """
    A record the size a real submit journals: request, webhook, token hash.
    """
    hook = f"reg{track_id[-12:]:0>12}"
    request = Text2Img(
        prompt="a lighthouse at dawn, oil painting, dramatic sky",
        width=768,
        height=512,
        samples=2,
        webhook=f"https://hooks.example.com/modelslab/{hook}/tok0123456789",
        track_id=track_id,
    )
    return state(
        track_id,
        phase,
        request=request,
        webhook_id=hook,
        token_hash=hash_token("tok0123456789"),
        **fields,
    )


@contextlib.asynccontextmanager
async def opened(
    url: str, *, cap: int | None = None, **settings: Any
) -> AsyncIterator[Journal]:
    """
    One journal of the test account, closed at the end.
    """
    settings.setdefault("lease", 10.0)
    journal = await RedisStore(url, **settings).open(ACCOUNT, max_queued=cap)
    try:
        yield journal
    finally:
        await journal.aclose()


class Workers:
    """
    OS processes running tests/_redis_worker.py, killed at the end.
    """

    def __init__(self) -> None:
        self.processes: list[asyncio.subprocess.Process] = []

    async def start(
        self, mode: str, args: dict[str, Any], *, prefix: Sequence[str] = ()
    ) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), env.get("PYTHONPATH", "")]
        )
        process = await asyncio.create_subprocess_exec(
            *prefix,
            sys.executable,
            str(WORKER),
            mode,
            json.dumps(args),
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        self.processes.append(process)
        return process

    @staticmethod
    async def line(process: asyncio.subprocess.Process) -> dict[str, Any]:
        assert process.stdout is not None
        text = await process.stdout.readline()
        assert text, f"worker exited with {await process.wait()}"
        return json.loads(text)

    async def finish(self, process: asyncio.subprocess.Process):
        result = await self.line(process)
        assert await process.wait() == 0
        return result

    async def aclose(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.kill()
            await process.wait()


@pytest.fixture
async def workers():
    """
    Start worker processes; each is killed when the test ends.
    """
    group = Workers()
    try:
        yield group
    finally:
        await group.aclose()


def owner(redis_server, track_id: str) -> str | None:
    with redis_server.client() as admin:
        return admin.hget(f"{PREFIX}job:{track_id}", "o")


def slots(redis_server) -> int:
    with redis_server.client() as admin:
        return int(admin.zcard(f"{PREFIX}slots"))


def every_slot(redis_server) -> int:
    """
    Slots held on every account (a client's is named by its key's hash).
    """
    with redis_server.client() as admin:
        return sum(int(admin.zcard(k)) for k in admin.keys("mla:*:slots"))


async def eventually(check, timeout: float = 10.0, step: float = 0.01):
    """
    Wait until *check()* is true (bounded).
    """
    with anyio.fail_after(timeout):
        while not check():
            await asyncio.sleep(step)


# --- the protocol --------------------------------------------------------


async def test_redis_store_is_a_job_store(redis_url):
    """RedisStore and its journals satisfy the store protocol."""
    with anyio.fail_after(10):
        store = RedisStore(redis_url)
        assert isinstance(store, JobStore)
        async with opened(redis_url) as journal:
            assert isinstance(journal, Journal)
        assert "127.0.0.1" in repr(store)


async def test_claim_wins_once_then_returns_the_journaled_state(redis_url):
    """A second claim of a track_id returns the first one's state."""
    with anyio.fail_after(10):
        async with opened(redis_url, cap=2) as journal:
            first = full_state("t-1")
            assert await journal.claim(first) is None
            assert journal.held == 1

            again = await journal.claim(full_state("t-1", message="later"))

            assert again == first
            assert journal.held == 1


async def test_concurrent_claims_from_journals_have_one_winner(redis_url):
    """Claims of the same track_ids from 5 journals: one winner each."""
    with anyio.fail_after(20):
        ids = [f"t-{n}" for n in range(40)]
        async with contextlib.AsyncExitStack() as stack:
            journals = [
                await stack.enter_async_context(opened(redis_url, cap=None))
                for _ in range(5)
            ]

            async def claim(index, journal, track_id):
                mine = state(track_id, message=f"j{index}")
                known = await journal.claim(mine)
                return (
                    track_id,
                    f"j{index}" if known is None else known.message,
                )

            results = await asyncio.gather(
                *(
                    claim(index, journal, track_id)
                    for track_id in ids
                    for index, journal in enumerate(journals)
                )
            )
        winners: dict[str, set[str]] = {}
        for track_id, winner in results:
            winners.setdefault(track_id, set()).add(winner)
        assert all(len(names) == 1 for names in winners.values())
        assert set(winners) == set(ids)
        won = sum(journal.held for journal in journals)
        assert won == len(ids)


async def test_concurrent_claims_from_processes_have_one_winner(
    redis_url, workers
):
    """3 OS processes claim the same 60 track_ids: exactly one wins each."""
    with anyio.fail_after(60):
        ids = [f"t-{n}" for n in range(60)]
        processes = [
            await workers.start(
                "claims",
                {"url": redis_url, "name": f"p{n}", "track_ids": ids},
            )
            for n in range(3)
        ]
        results = [await workers.finish(p) for p in processes]
        tables = [result["winners"] for result in results]
        for track_id in ids:
            assert len({table[track_id] for table in tables}) == 1
        wins = [
            sum(winner == f"p{n}" for winner in tables[0].values())
            for n in range(3)
        ]
        assert sum(wins) == len(ids)


async def test_record_is_first_writer_wins_for_finished_states(redis_url):
    """A finished state is never replaced; unfinished ones advance."""
    with anyio.fail_after(10):
        async with opened(redis_url) as journal:
            await journal.claim(state("t-1"))
            queued = state("t-1", JobPhase.QUEUED, job_id="j-1")
            assert await journal.record(queued) == queued
            done = state("t-1", JobPhase.SUCCEEDED, job_id="j-1")
            assert await journal.record(done) == done

            late = state("t-1", JobPhase.FAILED, message="late")

            assert await journal.record(late) == done
            assert await journal.get("t-1") == done


async def test_settle_frees_the_slot_and_records_in_the_background(
    redis_url, redis_server
):
    """settle() never waits; the slot comes back and the state is kept."""
    with anyio.fail_after(10):
        async with opened(redis_url, cap=1) as journal:
            await journal.claim(state("t-1"))
            assert slots(redis_server) == 1
            done = state("t-1", JobPhase.SUCCEEDED, outputs=("https://x/1",))

            journal.settle(done)

            assert journal.held == 0
            assert await journal.claim(state("t-2")) is None
            assert await journal.get("t-1") == done
            assert slots(redis_server) == 1


async def test_settle_keeps_a_finished_state_that_won_first(redis_url):
    """Settling after another writer finished keeps the first outcome."""
    with anyio.fail_after(10):
        async with opened(redis_url, cap=1) as a, opened(redis_url) as b:
            await a.claim(state("t-1"))
            first = state("t-1", JobPhase.FAILED, message="from webhook")
            await b.record(first)

            a.settle(state("t-1", JobPhase.SUCCEEDED))

            assert await a.claim(state("t-2")) is None
            assert await a.get("t-1") == first


async def test_abandon_forgets_a_submitting_claim_only(
    redis_url, redis_server
):
    """abandon() frees the slot; only a submitting record is removed."""
    with anyio.fail_after(10):
        async with opened(redis_url, cap=1) as journal:
            await journal.claim(full_state("t-1"))
            await journal.abandon("t-1")
            assert await journal.get("t-1") is None
            assert await journal.find("regt-1".rjust(15, "0")) is None
            assert slots(redis_server) == 0
            assert await journal.claim(state("t-1")) is None

            await journal.record(state("t-1", JobPhase.QUEUED, job_id="j"))
            await journal.abandon("t-1")

            kept = await journal.get("t-1")
            assert kept is not None
            assert kept.phase is JobPhase.QUEUED


async def test_find_and_get_read_any_journal_of_the_account(redis_url):
    """find() by webhook id and get() by track_id, from another journal."""
    with anyio.fail_after(10):
        async with opened(redis_url) as a, opened(redis_url) as b:
            job = full_state("t-1")
            await a.claim(job)

            found = await b.find(job.webhook_id)

            assert found == job
            assert found.token_hash == hash_token("tok0123456789")
            assert await b.get("t-1") == job
            assert await b.get("nope") is None
            assert await b.find("nope") is None


async def test_accounts_are_kept_apart(redis_url):
    """The same track_id in two accounts is two jobs."""
    with anyio.fail_after(10):
        store = RedisStore(redis_url)
        one = await store.open("account-one", max_queued=1)
        two = await store.open("account-two", max_queued=1)
        try:
            assert await one.claim(state("t-1")) is None
            assert await two.claim(state("t-1")) is None
        finally:
            await one.aclose()
            await two.aclose()


async def test_every_key_expires_within_retention(redis_url, redis_server):
    """Every key the store writes has a TTL of at most its retention."""
    with anyio.fail_after(10):
        async with (
            opened(redis_url, cap=1, retention=600.0) as a,
            opened(redis_url, cap=1, retention=600.0) as b,
        ):
            await a.claim(full_state("t-1"))
            waiting = asyncio.ensure_future(b.claim(full_state("t-2")))
            await asyncio.sleep(0.1)
            await b.record(state("t-1", JobPhase.SUCCEEDED))
            await waiting
            with redis_server.client() as admin:
                keys = admin.keys("mla:*")
                ttls = {key: admin.pttl(key) for key in keys}
        kinds = {key.removeprefix(PREFIX).split(":")[0] for key in keys}
        assert {"job", "hook", "slots", "procs", "epoch"} <= kinds
        assert all(0 < ttl <= 600_000 for ttl in ttls.values()), ttls


async def test_no_key_holds_the_api_key_or_leaves_the_prefix(
    redis_url, redis_server
):
    """Keys live under mla:{account}: only; values hold records, no key."""
    with anyio.fail_after(10):
        async with opened(redis_url, cap=1) as journal:
            await journal.claim(full_state("t-1"))
            with redis_server.client() as admin:
                keys = admin.keys("*")
        assert keys
        assert all(key.startswith(PREFIX) for key in keys)


# --- slots across processes ----------------------------------------------


async def test_cap_holds_with_three_processes_hammering(redis_url, workers):
    """3 processes claim and settle on one cap: never more holders."""
    with anyio.fail_after(90):
        args = {
            "url": redis_url,
            "cap": 3,
            "jobs": 60,
            "concurrency": 8,
            "hold": 0.01,
        }
        processes = [
            await workers.start("hammer", {**args, "name": f"p{n}"})
            for n in range(3)
        ]
        results = [await workers.finish(p) for p in processes]
        assert max(r["max_holders"] for r in results) <= 3
        assert sum(r["jobs"] for r in results) == 180


@contextlib.asynccontextmanager
async def holding_the_slot(
    redis_url: str,
) -> AsyncIterator[tuple[Journal, list[JobState]]]:
    """
    A journal (cap 1, lease 1 s) holding the slot with "held", and the
    jobs it adopts.
    """
    async with opened(redis_url, cap=1, lease=1.0) as journal:
        adopted: list[JobState] = []
        journal.listen(adopted.append)
        await journal.claim(state("held"))
        yield journal, adopted


async def waiting_elsewhere(
    workers: Workers, redis_url: str, *, lease: float, hang: bool = False
) -> asyncio.subprocess.Process:
    """
    A process whose claim of "wanted" waits for a slot (cap 1); with
    *hang*, it waits to be killed once granted.
    """
    waiter = await workers.start(
        "wait_for_slot",
        {
            "url": redis_url,
            "cap": 1,
            "lease": lease,
            "track_id": "wanted",
            "within": 15.0,
            "hang": hang,
        },
    )
    assert (await workers.line(waiter))["waiting"]
    return waiter


async def test_a_waiter_in_another_process_wakes_on_settle_not_by_polling(
    redis_url, workers
):
    """A settle in this process grants a claim waiting in another one."""
    with anyio.fail_after(30):
        async with opened(redis_url, cap=1, lease=30.0) as journal:
            await journal.claim(state("held"))
            waiter = await waiting_elsewhere(workers, redis_url, lease=30.0)

            journal.settle(state("held", JobPhase.SUCCEEDED))

            result = await workers.finish(waiter)
        assert result["granted"] is not None
        counts = result["counts"]
        # Granted by the settle's script, told by its inbox: it sent no
        # claim of its own after the first (no wake-up to serve), no
        # heartbeat ran (the lease is 30 s), and nothing retried on a timer.
        assert counts["grants"] == 1
        assert counts.get("wakes", 0) == 0
        assert counts.get("fallbacks", 0) == 0
        assert counts["heartbeats"] == 1


async def test_a_dead_waiters_unread_grant_is_undone_not_adopted(
    redis_url, redis_server, workers
):
    """A grant its SIGKILLed waiter never read is undone: nothing was sent."""
    with anyio.fail_after(30):
        async with holding_the_slot(redis_url) as (journal, adopted):
            waiter = await waiting_elsewhere(workers, redis_url, lease=1.0)
            waiter.send_signal(signal.SIGKILL)
            await waiter.wait()

            # Its presence outlives it by up to a lease: the slot freed
            # now is granted to it, as to a live waiter.
            journal.settle(state("held", JobPhase.SUCCEEDED))
            await eventually(lambda: owner(redis_server, "wanted") is not None)
            assert slots(redis_server) == 1

            # Once its lease lapsed, the grant it never read is undone.
            await eventually(lambda: owner(redis_server, "wanted") is None)
            assert adopted == []
            assert slots(redis_server) == 0
            assert await journal.claim(state("next")) is None


async def test_a_grant_read_before_its_waiter_died_is_adopted(
    redis_url, redis_server, workers
):
    """A grant read, then SIGKILL: its submit may have left; it is adopted."""
    with anyio.fail_after(30):
        async with holding_the_slot(redis_url) as (journal, adopted):
            waiter = await waiting_elsewhere(
                workers, redis_url, lease=1.0, hang=True
            )
            journal.settle(state("held", JobPhase.SUCCEEDED))
            granted = await workers.line(waiter)
            assert granted["granted"] is not None
            assert granted["counts"]["grants"] == 1
            waiter.send_signal(signal.SIGKILL)
            await waiter.wait()

            await eventually(lambda: len(adopted) == 1)
            assert adopted[0].track_id == "wanted"
            assert adopted[0].phase is JobPhase.SUBMITTING
            assert owner(redis_server, "wanted") == journal._me
            assert slots(redis_server) == 1


async def test_no_slot_is_stranded_while_one_journal_churns(
    redis_url, redis_server
):
    """100 claims on cap 5, each settled soon after: no slot is left held."""
    rng = random.Random(7)  # noqa: S311 (delays, not secrets)
    with anyio.fail_after(40):
        async with opened(redis_url, cap=5, lease=30.0) as journal:

            async def job(n: int) -> None:
                assert await journal.claim(state(f"c-{n}")) is None
                await asyncio.sleep(rng.uniform(0, 0.01))
                journal.settle(state(f"c-{n}", JobPhase.SUCCEEDED))

            await asyncio.gather(*(job(n) for n in range(100)))
            # A slot held for a claim that turned out not to need it would
            # stay until its journal's presence lapsed (30 s).
            await eventually(lambda: slots(redis_server) == 0, timeout=5)


def record_of(redis_server, track_id: str) -> dict[str, str]:
    with redis_server.client() as admin:
        return admin.hgetall(f"{PREFIX}job:{track_id}")


async def unmanaged(redis_url: str, *, lease: float) -> Journal:
    """
    A journal of the test account (cap 1) that the test closes itself.
    """
    return await RedisStore(redis_url, lease=lease).open(ACCOUNT, max_queued=1)


async def stop_reading(journal: Journal) -> None:
    """
    Stop the journal's inbox reader, as if it lagged far behind.
    """
    reader = journal._tasks[0]
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader


def late_claim_replies(journal: Journal, delay: float) -> None:
    """
    Hold back the replies of the journal's claims, as a loaded command
    connection would: its inbox is read first.
    """
    link = journal._link
    send = link._pipeline

    async def slow(batch):
        replies = await send(batch)
        if any(op.script == "claim" for op in batch):
            await asyncio.sleep(delay)
        return replies

    link._pipeline = slow


async def test_a_claim_in_flight_when_closing_starts_does_not_hang(
    redis_url,
):
    """A claim whose try comes back full after aclose() began ends at once."""
    with anyio.fail_after(30):
        async with opened(redis_url, cap=1) as holder:
            await holder.claim(state("held"))
            for n in range(5):
                journal = await unmanaged(redis_url, lease=10.0)
                claim = asyncio.create_task(journal.claim(state(f"x-{n}")))
                await asyncio.sleep(0)  # its try is on its way
                await journal.aclose()
                with pytest.raises(ClientStateError):
                    await claim


async def test_a_grant_read_before_the_full_reply_survives_closing(
    redis_url, redis_server
):
    """Granted before its try's reply: closing hands the job over, keeps it."""
    with anyio.fail_after(30):
        async with opened(redis_url, cap=1) as holder:
            await holder.claim(state("held"))
            journal = await unmanaged(redis_url, lease=10.0)
            late_claim_replies(journal, 0.3)
            claim = asyncio.create_task(journal.claim(state("wanted")))
            await asyncio.sleep(0.1)  # its claim ran: full, offer left
            holder.settle(state("held", JobPhase.SUCCEEDED))
            assert await claim is None  # granted: its submit goes out
            # The client closes while that submit is in flight.
            await journal.aclose()
            kept = record_of(redis_server, "wanted")
            held_slots = slots(redis_server)
    # Handed over as a submit that may have left, not undone: its slot
    # stays taken until someone finishes it.
    assert kept.get("p") == "submitting"
    assert held_slots == 1


async def test_a_grant_found_by_its_own_retry_is_never_undone(
    redis_url, redis_server
):
    """A grant learnt from a re-claim, owner then killed: adopted, kept."""
    with anyio.fail_after(30):
        async with opened(redis_url, cap=1, lease=1.5) as holder:
            adopted: list[JobState] = []
            holder.listen(adopted.append)
            await holder.claim(state("held"))
            journal = await unmanaged(redis_url, lease=1.5)
            try:
                # Its reader lags: the grant's entry is not read.
                await stop_reading(journal)
                claim = asyncio.create_task(journal.claim(state("wanted")))
                await asyncio.sleep(0.1)
                holder.settle(state("held", JobPhase.SUCCEEDED))
                # The heartbeat's re-claim finds the grant: it submits.
                assert await claim is None
                assert journal.counts["fallbacks"] >= 1
                # Then it dies before journaling the job id.
                for task in journal._tasks:
                    task.cancel()
                await eventually(lambda: len(adopted) == 1)
            finally:
                journal._closed = True  # dead: nothing more goes out
                await journal._link.redis.aclose()
                await journal._reader.aclose()
    assert adopted[0].track_id == "wanted"
    assert adopted[0].phase is JobPhase.SUBMITTING


async def test_a_self_grant_lost_with_its_reply_is_undone_on_cancel(
    redis_url, redis_server
):
    """A grant lost with a cut reply, its waiter then cancelled: undone."""
    from redis import exceptions as rex  # noqa: PLC0415

    with anyio.fail_after(30):
        async with opened(redis_url, cap=1, lease=30.0) as journal:
            await journal.claim(state("held"))
            waiting = asyncio.create_task(journal.claim(state("wanted")))
            await asyncio.sleep(0.1)  # waiting, its offer left
            link = journal._link
            send = link._pipeline
            cut = []

            async def lossy(batch):
                replies = await send(batch)
                if not cut and any(op.script == "record" for op in batch):
                    cut.append(True)
                    # The script ran (and granted the offer); its reply is
                    # lost, and the retry finds nothing left to do.
                    raise rex.ConnectionError("cut after the script ran")
                return replies

            link._pipeline = lossy
            journal.settle(state("held", JobPhase.SUCCEEDED))
            await eventually(lambda: bool(cut))
            await asyncio.sleep(0.1)
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            # What the tracker does when a claim is cancelled.
            await journal.abandon("wanted")
            await eventually(lambda: not record_of(redis_server, "wanted"))
            await eventually(lambda: slots(redis_server) == 0)


async def test_closing_undoes_a_grant_its_reader_never_got(
    redis_url, redis_server
):
    """A grant still unread in the inbox at close is undone, not handed on."""
    with anyio.fail_after(30):
        async with opened(redis_url, cap=1) as holder:
            await holder.claim(state("held"))
            journal = await unmanaged(redis_url, lease=10.0)
            # Its reader lags: the grant's entry stays in the inbox.
            await stop_reading(journal)
            claim = asyncio.create_task(journal.claim(state("wanted")))
            await asyncio.sleep(0.1)  # waiting, its offer left
            holder.settle(state("held", JobPhase.SUCCEEDED))
            await eventually(lambda: bool(record_of(redis_server, "wanted")))
            # As if the offer's reply had come after closing listed them.
            journal._offers.clear()
            await journal.aclose()
            with pytest.raises(ClientStateError):
                await claim
            kept = record_of(redis_server, "wanted")
            left = slots(redis_server)
    assert kept == {}
    assert left == 0


async def test_cancelled_waiting_claim_passes_its_turn_on(redis_url):
    """A waiter cancelled in one journal does not strand a slot."""
    with anyio.fail_after(10):
        async with (
            opened(redis_url, cap=1, lease=30.0) as a,
            opened(redis_url, cap=1, lease=30.0) as b,
            opened(redis_url, cap=1, lease=30.0) as c,
        ):
            await a.claim(state("held"))
            gone = asyncio.ensure_future(b.claim(state("gone")))
            await asyncio.sleep(0.05)
            later = asyncio.ensure_future(c.claim(state("later")))
            await asyncio.sleep(0.05)
            gone.cancel()

            a.settle(state("held", JobPhase.SUCCEEDED))

            assert await later is None
            assert b.held == 0
            assert await b.get("gone") is None


async def test_closing_wakes_waiting_claims_with_client_state_error(
    redis_url,
):
    """aclose() makes claims waiting for a slot raise ClientStateError."""
    with anyio.fail_after(10):
        journal = await RedisStore(redis_url).open(ACCOUNT, max_queued=1)
        await journal.claim(state("held"))
        waiting = [
            asyncio.ensure_future(journal.claim(state(f"w{n}")))
            for n in range(3)
        ]
        await asyncio.sleep(0.05)

        await journal.aclose()

        for claim in waiting:
            with pytest.raises(ClientStateError):
                await claim
        with pytest.raises(ClientStateError):
            await journal.claim(state("after"))


# --- leases and adoption -------------------------------------------------


async def test_lease_renewal_keeps_a_live_owners_jobs(redis_url, redis_server):
    """Jobs of a live journal are never adopted, however many leases pass."""
    with anyio.fail_after(30):
        adopted: list[JobState] = []
        async with (
            opened(redis_url, cap=2, lease=1.5) as owner_journal,
            opened(redis_url, cap=2, lease=1.5) as other,
        ):
            other.listen(adopted.append)
            await owner_journal.claim(state("t-1"))
            await owner_journal.record(state("t-1", JobPhase.QUEUED))

            await asyncio.sleep(5.0)

            assert adopted == []
            assert await other.adopt() == []
            assert owner(redis_server, "t-1") == owner_journal._me
            assert owner_journal.held == 1


async def test_killed_owners_jobs_are_adopted_and_keep_their_slots(
    redis_url, redis_server, workers
):
    """SIGKILL an owner: after its lease another journal adopts its jobs."""
    with anyio.fail_after(30):
        ids = ["k-1", "k-2"]
        holder = await workers.start(
            "hold",
            {"url": redis_url, "cap": 3, "lease": 1.0, "track_ids": ids},
        )
        assert (await workers.line(holder))["held"] == 2
        holder.send_signal(signal.SIGKILL)
        await holder.wait()

        adopted: list[JobState] = []
        async with opened(redis_url, cap=3, lease=1.0) as survivor:
            survivor.listen(adopted.append)
            await eventually(lambda: len(adopted) == 2)

            assert sorted(job.track_id for job in adopted) == ids
            assert all(job.phase is JobPhase.QUEUED for job in adopted)
            assert all(job.job_id == f"job-{job.track_id}" for job in adopted)
            assert {owner(redis_server, t) for t in ids} == {survivor._me}
            # The dead owner's jobs are still queued: their slots stay.
            assert slots(redis_server) == 2
            assert survivor.held == 2

            for job in adopted:
                survivor.settle(
                    state(job.track_id, JobPhase.SUCCEEDED, job_id=job.job_id)
                )
            await eventually(lambda: slots(redis_server) == 0)


async def test_adopt_at_open_returns_lapsed_jobs(redis_url, redis_server):
    """A journal opened after a crash adopts the lapsed jobs at once."""
    with anyio.fail_after(20):
        async with opened(redis_url, cap=2, lease=0.5) as first:
            await first.claim(state("t-1"))
            await first.record(state("t-1", JobPhase.QUEUED, job_id="j"))
            # A crash, as seen from Redis: the renewals stop.
            for task in first._tasks:
                task.cancel()
            await asyncio.sleep(0.8)
            async with opened(redis_url, cap=2, lease=0.5) as second:
                adopted = await second.adopt()
                assert [job.track_id for job in adopted] == ["t-1"]
                assert await second.adopt() == []
                assert owner(redis_server, "t-1") == second._me
                assert slots(redis_server) == 1


async def test_a_closed_journal_hands_its_jobs_over_at_once(redis_url):
    """Closing with unfinished jobs ends their leases: others adopt them."""
    with anyio.fail_after(20):
        async with opened(redis_url, cap=2, lease=30.0) as other:
            async with opened(redis_url, cap=2, lease=30.0) as first:
                await first.claim(state("t-1"))
            adopted = await other.adopt()
            assert [job.track_id for job in adopted] == ["t-1"]


async def test_undoing_a_claim_that_came_back_known_frees_no_slot(
    redis_url, redis_server
):
    """Undoing a claim that lost to another journal's leaves its slot be."""
    with anyio.fail_after(10):
        async with (
            opened(redis_url, cap=2) as a,
            opened(redis_url, cap=2) as b,
        ):
            assert await a.claim(state("t-1")) is None
            assert await b.claim(state("t-1")) is not None  # known: a's
            # What closing does with a claim whose reply it never read:
            # undo it by its own nonce, which is not the winner's.
            b._forget("t-1", "not-the-winners-nonce")
            await b.get("t-1")  # after the undo, on the same connection

            assert slots(redis_server) == 1
            assert owner(redis_server, "t-1") is not None


async def test_a_job_its_journal_lost_track_of_is_adopted_again(
    redis_url, redis_server
):
    """A lapsed job owned by a journal that no longer lists it is re-adopted."""
    heard: list[str] = []
    with anyio.fail_after(10):
        async with opened(redis_url, cap=2, lease=0.6) as journal:
            await journal.claim(state("lost"))
            # As after a reply lost in flight: the journal forgets it owns
            # the job, so it stops renewing it and its lease lapses.
            journal._owned.pop("lost")
            journal.listen(lambda s: heard.append(s.track_id))
            before = journal.counts["heartbeats"]
            await eventually(lambda: heard == ["lost"])
            await asyncio.sleep(0.3)
            beats = journal.counts["heartbeats"] - before

    assert heard == ["lost"]
    # A heartbeat every 0.2 s, not one every 10 ms on a job it skips.
    assert beats < 20, beats


async def test_closing_gives_back_an_uncertain_submits_slot(
    redis_url, redis_server
):
    """A client closed on an uncertain submit with no webhook frees its slot."""
    faults = Faults(schedule={"submit": ["http_500_after"]})
    with anyio.fail_after(15):
        async with Emulator(eta=30.0, faults=faults) as emulator:
            store = RedisStore(redis_url, lease=10.0)
            async with Client(
                KEY, base_url=emulator.url, store=store, max_queued=2
            ) as client:
                with pytest.raises(SubmitUncertainError):
                    await client.generate(Text2Img(prompt="p", track_id="u"))
                assert every_slot(redis_server) == 1
            assert emulator.jobs_created == 1

    # Given back at close, not handed to another process to hold again.
    assert every_slot(redis_server) == 0


async def test_an_adopted_submitting_job_is_returned_as_is(redis_url):
    """A job whose owner died mid-submit is adopted in phase submitting."""
    with anyio.fail_after(20):
        async with opened(redis_url, cap=2, lease=0.5) as first:
            await first.claim(state("t-1"))
            for task in first._tasks:
                task.cancel()
            await asyncio.sleep(0.8)
            async with opened(redis_url, cap=2, lease=0.5) as second:
                (adopted,) = await second.adopt()
        assert adopted.phase is JobPhase.SUBMITTING


async def test_abandon_leaves_an_adopted_submitting_job(
    redis_url, redis_server
):
    """Abandon of an adopted maybe-sent job (a cancelled resubmit) keeps it."""
    with anyio.fail_after(20):
        async with opened(redis_url, cap=2, lease=0.5) as first:
            await first.claim(state("t-1"))
            for task in first._tasks:
                task.cancel()
            await asyncio.sleep(0.8)
            async with opened(redis_url, cap=2, lease=0.5) as second:
                (adopted,) = await second.adopt()
                # What the tracker does when a resubmit of it is cancelled
                # during its claim: it cannot tell whether the claim won.
                await second.abandon("t-1")
                kept = await second.get("t-1")
                slots_held = slots(redis_server)
    assert adopted.phase is JobPhase.SUBMITTING
    assert kept is not None
    assert slots_held == 1


@pytest.mark.skipif(
    shutil.which("faketime") is None,
    reason="libfaketime's `faketime` is not installed (apt-get install "
    "faketime): the skewed-clock test needs it",
)
@pytest.mark.parametrize("skew", ["+30s", "-30s"])
async def test_a_skewed_clock_cannot_steal_or_break_slots(
    redis_url, redis_server, workers, skew
):
    """A process 30 s off neither adopts live jobs nor passes the cap."""
    with anyio.fail_after(40):
        async with opened(redis_url, cap=2, lease=2.0) as holder:
            await holder.claim(state("t-1"))
            await holder.claim(state("t-2"))
            skewed = await workers.start(
                "wait_for_slot",
                {
                    "url": redis_url,
                    "cap": 2,
                    "lease": 2.0,
                    "track_id": "t-3",
                    "within": 20.0,
                },
                prefix=["faketime", "-f", skew],
            )
            ready = await workers.line(skewed)
            assert abs(ready["ready"] - time.time()) > 25  # really skewed
            assert ready["waiting"]

            # Two and a half leases: a process timing leases by its own
            # clock, 30 s off, would have broken them long ago.
            await asyncio.sleep(5.0)
            assert slots(redis_server) == 2
            assert owner(redis_server, "t-1") == holder._me
            assert owner(redis_server, "t-2") == holder._me
            assert holder.held == 2

            holder.settle(state("t-1", JobPhase.SUCCEEDED))
            result = await workers.finish(skewed)
        assert result["granted"] is not None
        assert result["adopted"] == []


# --- Redis failures ------------------------------------------------------


async def test_redis_stopped_for_3_s_claims_wait_and_the_cap_holds(
    redis_url, redis_server
):
    """Redis down 3 s mid-run: nothing passes the cap, all jobs finish."""
    with anyio.fail_after(90):
        cap, jobs = 3, 45
        holders = peak = done = 0
        todo = list(range(jobs))

        async def worker(journal):
            nonlocal holders, peak, done
            while todo:
                track_id = f"t-{todo.pop()}"
                await journal.claim(state(track_id))
                holders += 1
                peak = max(peak, holders)
                await asyncio.sleep(0.05)
                holders -= 1
                journal.settle(state(track_id, JobPhase.SUCCEEDED))
                done += 1

        async with contextlib.AsyncExitStack() as stack:
            journals = [
                await stack.enter_async_context(opened(redis_url, cap=cap))
                for _ in range(3)
            ]
            run = asyncio.gather(
                *(worker(j) for j in journals for _ in range(4))
            )
            await eventually(lambda: done >= 10)
            await anyio.to_thread.run_sync(
                lambda: redis_server.restart(3.0, keep_data=True)
            )
            await run
        assert done == jobs
        assert peak <= cap
        assert slots(redis_server) == 0


async def test_a_restart_without_persistence_keeps_the_cap(
    redis_url, redis_server
):
    """Redis loses everything: owners put their jobs back, the cap holds."""
    with anyio.fail_after(40):
        async with (
            opened(redis_url, cap=2, lease=3.0) as holder,
            opened(redis_url, cap=2, lease=3.0) as other,
        ):
            await holder.claim(state("t-1"))
            await holder.record(state("t-1", JobPhase.QUEUED, job_id="j-1"))
            await holder.claim(state("t-2"))
            await anyio.to_thread.run_sync(
                lambda: redis_server.restart(0.2, keep_data=False)
            )
            waiting = asyncio.ensure_future(other.claim(state("t-3")))

            await eventually(lambda: slots(redis_server) == 2)
            await asyncio.sleep(2.5)  # past the recovery window

            assert not waiting.done()
            assert (await other.get("t-1")).job_id == "j-1"
            holder.settle(state("t-1", JobPhase.SUCCEEDED))
            assert await waiting is None
            assert slots(redis_server) == 2


async def test_claim_fails_closed_when_redis_stays_unreachable(
    redis_url, redis_server
):
    """No Redis for longer than unavailable_timeout: StoreUnavailableError."""
    with anyio.fail_after(30):
        from _redis_server import CutProxy  # noqa: PLC0415

        proxy = CutProxy(redis_server.port)
        await proxy.start()
        try:
            async with opened(
                proxy.url, cap=1, unavailable_timeout=0.5, flush_timeout=0.5
            ) as journal:
                await proxy.cut()
                with pytest.raises(StoreUnavailableError):
                    await journal.claim(state("t-1"))
                assert journal.held == 0
        finally:
            await proxy.aclose()


async def test_open_fails_closed_without_redis(redis_server):
    """Opening on an unreachable server raises StoreUnavailableError."""
    with anyio.fail_after(20):
        from _redis_server import free_port  # noqa: PLC0415

        url = f"redis://127.0.0.1:{free_port()}/0"
        store = RedisStore(url, unavailable_timeout=0.3)
        with pytest.raises(StoreUnavailableError):
            await store.open(ACCOUNT, max_queued=1)


async def test_settles_are_written_once_redis_is_back(redis_url, redis_server):
    """A settle made while Redis is unreachable lands when it returns."""
    with anyio.fail_after(30):
        from _redis_server import CutProxy  # noqa: PLC0415

        proxy = CutProxy(redis_server.port)
        await proxy.start()
        try:
            async with opened(proxy.url, cap=1) as journal:
                await journal.claim(state("t-1"))
                await proxy.cut()
                done = state("t-1", JobPhase.SUCCEEDED)
                journal.settle(done)
                await asyncio.sleep(1.0)
                assert slots(redis_server) == 1
                await proxy.start()
                await eventually(lambda: slots(redis_server) == 0)
                assert await journal.get("t-1") == done
        finally:
            await proxy.aclose()


async def test_an_evicting_memory_policy_is_warned_about(
    redis_url, redis_server, caplog
):
    """Opening on a server that evicts keys logs a warning."""
    with anyio.fail_after(10):
        with redis_server.client() as admin:
            admin.config_set("maxmemory-policy", "allkeys-lru")
        with caplog.at_level(logging.WARNING, "modelslab_async"):
            async with opened(redis_url):
                pass
        assert "noeviction" in caplog.text


# --- the inbox -----------------------------------------------------------


async def test_an_outcome_recorded_elsewhere_reaches_the_owner(redis_url):
    """A finished state recorded by another journal is delivered."""
    with anyio.fail_after(10):
        delivered: list[JobState] = []
        async with opened(redis_url, cap=1) as a, opened(redis_url) as b:
            a.listen(delivered.append)
            await a.claim(full_state("t-1"))
            job = await b.find(full_state("t-1").webhook_id)
            done = state("t-1", JobPhase.SUCCEEDED, job_id="j-1")

            assert await b.record(done) == done

            await eventually(lambda: delivered == [done])
            # The job left the queue: its slot is free for the next one.
            assert await a.claim(state("t-2")) is None
        assert job is not None


async def test_the_inbox_replays_what_came_while_disconnected(
    redis_url, redis_server
):
    """An outcome recorded while the owner is cut off is delivered later."""
    with anyio.fail_after(30):
        from _redis_server import CutProxy  # noqa: PLC0415

        proxy = CutProxy(redis_server.port)
        await proxy.start()
        delivered: list[JobState] = []
        try:
            async with (
                opened(proxy.url, cap=2) as owner_journal,
                opened(redis_url) as other,
            ):
                owner_journal.listen(delivered.append)
                await owner_journal.claim(state("t-1"))
                await owner_journal.claim(state("t-2"))
                await proxy.cut()
                first = state("t-1", JobPhase.SUCCEEDED)
                second = state("t-2", JobPhase.FAILED, message="nsfw")
                await other.record(first)
                await other.record(second)
                await asyncio.sleep(1.0)
                assert delivered == []

                await proxy.start()

                await eventually(lambda: len(delivered) == 2)
                assert delivered == [first, second]
        finally:
            await proxy.aclose()


# --- what it costs, and closing ------------------------------------------


async def test_cost_per_job_round_trips_memory_and_connections(
    redis_url, redis_server
):
    """3 round trips a job, under 2 KiB a job, 2 connections a process."""
    with anyio.fail_after(30):
        async with opened(redis_url, cap=100) as journal:
            trips = []
            for n in range(10):
                before = journal.round_trips
                await journal.claim(full_state(f"rt-{n}"))
                await journal.record(
                    full_state(f"rt-{n}", JobPhase.QUEUED, job_id=f"j{n}")
                )
                journal.settle(full_state(f"rt-{n}", JobPhase.SUCCEEDED))
                await eventually(lambda: journal._link._sender is None)
                trips.append(journal.round_trips - before)
            assert max(trips) <= 3

            async def one(n):
                await journal.claim(full_state(f"open-{n}"))
                await journal.record(
                    full_state(
                        f"open-{n}",
                        JobPhase.QUEUED,
                        job_id=f"{n:010d}",
                        eta_at=time.time() + 20,
                    )
                )

            await asyncio.gather(*(one(n) for n in range(100)))
            with redis_server.client() as admin:
                clients = [
                    c
                    for c in admin.client_list()
                    if c["name"].endswith(journal._me)
                ]
                used = sum(
                    admin.memory_usage(f"{PREFIX}job:open-{n}")
                    + admin.memory_usage(
                        f"{PREFIX}hook:reg{f'open-{n}'[-12:]:0>12}"
                    )
                    for n in range(100)
                )
                used += admin.memory_usage(f"{PREFIX}slots")
        assert len(clients) <= 2
        assert used / 100 <= 2048


async def test_aclose_leaves_no_task_and_no_connection(
    redis_url, redis_server
):
    """After aclose() the journal has no task and no server connection."""
    with anyio.fail_after(20):
        before = {
            t for t in asyncio.all_tasks() if t is not asyncio.current_task()
        }
        journal = await unmanaged(redis_url, lease=0.3)
        me = journal._me
        await journal.claim(state("t-1"))
        journal.settle(state("t-1", JobPhase.SUCCEEDED))
        await journal.claim(state("t-2"))
        pending = asyncio.ensure_future(journal.claim(state("t-3")))
        await asyncio.sleep(0.5)  # heartbeats run; the claim waits

        await journal.aclose()
        await journal.aclose()  # idempotent

        with pytest.raises(ClientStateError):
            await pending
        left = {
            t
            for t in asyncio.all_tasks()
            if t is not asyncio.current_task() and not t.done()
        }
        assert left <= before
        with redis_server.client() as admin:
            names = [c["name"] for c in admin.client_list()]
            assert not any(name.endswith(me) for name in names)
            assert admin.exists(f"{PREFIX}inbox:{me}") == 0
            assert admin.zscore(f"{PREFIX}procs", me) is None


# --- the benchmark ---------------------------------------------------------


def test_the_benchmark_runs_at_a_tiny_size(redis_server, tmp_path):
    """benchmarks/redis_store.py runs and reports every figure."""
    import subprocess  # noqa: PLC0415

    out = tmp_path / "redis_store.json"
    env = dict(os.environ)
    env["MODELSLAB_REDIS_SERVER"] = redis_server.binary
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.redis_store",
            "--quick",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    data = json.loads(out.read_text(encoding="utf-8"))
    figures = data["figures"]
    for name in (
        "handoff_ms",
        "inbox_ms",
        "round_trips_per_job",
        "bytes_per_open_job",
        "connections_per_process",
        "cap",
    ):
        assert name in figures, name
    assert figures["cap"]["max_holders"] <= figures["cap"]["cap"]
