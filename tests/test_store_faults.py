"""
Stores under faults: slots of known jobs, writes that fail, unreadable
records, adoption, and opening or closing cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import anyio
import attrs
import pytest

from hypothesis import given
from hypothesis import strategies as st

from conftest import KEY, held
from modelslab_async import Client, JobPhase, JobState, Text2Img
from modelslab_async._admission import LocalSlots
from modelslab_async._requests import JobRequest
from modelslab_async._state import dump_state, load_state
from modelslab_async.emulator import Emulator, Faults
from modelslab_async.errors import StoreError, SubmitUncertainError
from modelslab_async.stores import Journal, SQLiteStore


pytestmark = pytest.mark.anyio


def state(track_id: str, phase: JobPhase = JobPhase.SUBMITTING) -> JobState:
    now = time.time()
    return JobState(
        track_id=track_id,
        endpoint="v6",
        phase=phase,
        request=Text2Img(prompt="p", track_id=track_id),
        created_at=now,
        updated_at=now,
    )


def uncertain_once() -> Faults:
    """
    The first submit answers 500 after making its job: it is uncertain.
    """
    return Faults(schedule={"submit": ["http_500_after"]})


async def eventually(check: Callable[[], bool]) -> None:
    """
    Wait until *check()* is true; the caller bounds the wait.
    """
    while not check():
        await asyncio.sleep(0.01)


# --- unreadable records raise StoreError, whatever they hold --------------


def _valid() -> dict[str, Any]:
    return json.loads(dump_state(state("t", JobPhase.QUEUED)))


def _deep(depth: int) -> str:
    return '{"format":1,"meta":' + "[" * depth + "]" * depth + "}"


MALFORMED: list[tuple[str, str | bytes]] = [
    ("request is a list", '{"format":1,"request":[1]}'),
    ("request type is a list", '{"format":1,"request":{"type":[]}}'),
    (
        "request fields a list",
        json.dumps(
            {**_valid(), "request": {"type": "Text2Img", "fields": [1]}}
        ),
    ),
    ("deeply nested", _deep(100_000)),
    (
        "deeply nested meta",
        '{"format":1,"meta":' + '{"a":' * 50_000 + "1" + "}" * 50_001,
    ),
    ("not JSON", "{"),
    ("not UTF-8", b"\xff\xfe{}"),
    ("a list", "[1,2]"),
    ("null", "null"),
    (
        "no format",
        json.dumps({k: v for k, v in _valid().items() if k != "format"}),
    ),
    (
        "missing track_id",
        json.dumps({k: v for k, v in _valid().items() if k != "track_id"}),
    ),
    ("phase unknown", json.dumps({**_valid(), "phase": "paused"})),
    ("endpoint unknown", json.dumps({**_valid(), "endpoint": "v9"})),
    ("track_id a number", json.dumps({**_valid(), "track_id": 5})),
    ("track_id a dict", json.dumps({**_valid(), "track_id": {}})),
    ("created_at a string", json.dumps({**_valid(), "created_at": "now"})),
    (
        "created_at huge",
        json.dumps(_valid())[:-1] + ',"created_at":' + "9" * 400 + "}",
    ),
    ("created_at a bool", json.dumps({**_valid(), "created_at": True})),
    ("outputs a string", json.dumps({**_valid(), "outputs": "https://x"})),
    ("outputs of numbers", json.dumps({**_valid(), "outputs": [1]})),
    ("meta a list", json.dumps({**_valid(), "meta": [["a", 1]]})),
    ("eta_at a list", json.dumps({**_valid(), "eta_at": [1]})),
    ("huge integer literal", '{"format":1,"track_id":' + "9" * 5000 + "}"),
]


@pytest.mark.parametrize(
    "text",
    [text for _, text in MALFORMED],
    ids=[name for name, _ in MALFORMED],
)
def test_a_malformed_record_is_a_store_error(text):
    """Each malformed record raises StoreError, never another error."""
    with pytest.raises(StoreError):
        load_state(text)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = st.sampled_from([*sorted(_valid()), "request", "fields"])


def _well_typed(loaded: JobState) -> None:
    strs = ("track_id", "job_id", "message", "webhook_id", "token_hash")
    for name in strs:
        value = getattr(loaded, name)
        assert value is None or type(value) is str, name
    for name in ("eta_at", "generation_time", "created_at", "updated_at"):
        value = getattr(loaded, name)
        assert value is None or type(value) is float, name
    assert all(type(link) is str for link in loaded.outputs)
    assert isinstance(loaded.meta, Mapping)
    assert loaded.request is None or isinstance(loaded.request, JobRequest)
    assert isinstance(loaded.phase, JobPhase)
    assert loaded.endpoint in ("v6", "flux-klein")


@given(field=_FIELDS, value=_JSON)
def test_any_value_in_any_field_loads_well_typed_or_is_a_store_error(
    field, value
):
    """A record with any field set to any JSON loads well typed, or raises StoreError."""
    data = _valid()
    data["request"] = {
        "type": "Text2Img",
        "fields": {"prompt": "p", "track_id": "t"},
    }
    if field == "fields":
        data["request"]["fields"] = value
    else:
        data[field] = value
    try:
        loaded = load_state(json.dumps(data))
    except StoreError:
        return
    _well_typed(loaded)


@given(value=_JSON)
def test_any_json_document_loads_or_is_a_store_error(value):
    """Any JSON document at all loads well typed, or raises StoreError."""
    try:
        loaded = load_state(json.dumps(value))
    except StoreError:
        return
    _well_typed(loaded)


def test_a_valid_record_still_loads():
    """The strict reading keeps every record this version writes."""
    kept = attrs.evolve(
        state("t", JobPhase.SUCCEEDED),
        job_id="42",
        eta_at=time.time(),
        outputs=("https://x/1.png",),
        message="done",
        generation_time=1,
        meta={"seed": 7, "nested": {"a": [1, 2]}},
        webhook_id="w",
        token_hash="h" * 64,
    )

    assert load_state(dump_state(kept)) == kept


async def test_a_lone_surrogate_in_a_record_round_trips(tmp_path):
    """Text SQLite cannot encode (a lone surrogate) is journaled, escaped."""
    kept = attrs.evolve(
        state("t", JobPhase.QUEUED),
        request=Text2Img(prompt="odd \ud800 text", track_id="t"),
        meta={"prompt": "odd \udfff"},
        message="\ud83d",
    )
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    journal = await store.open("acct", max_queued=1)
    try:
        with anyio.fail_after(10):
            await journal.record(kept)
            read = await journal.get("t")
    finally:
        await journal.aclose()

    assert load_state(dump_state(kept)) == kept
    assert read == kept


# --- a write that fails in any way fails typed; the journal goes on -------


def journal_threads(journal: Journal) -> set[threading.Thread]:
    return set(journal._thread._threads)


async def test_a_write_failing_outside_sqlite_fails_typed_and_recovers(
    tmp_path,
):
    """A write raising a non-sqlite3 error fails its caller; later ones work."""
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    journal = await store.open("acct", max_queued=2)
    threads = journal_threads(journal)
    with anyio.fail_after(10):
        # SQLite cannot bind a lone surrogate: UnicodeEncodeError.
        with pytest.raises(StoreError, match="surrogate") as caught:
            await journal.record(state("\ud800"))
        with pytest.raises(StoreError):
            await journal.claim(state("\udfff"))
        assert journal.held == 0  # the failed claim gave its slot back
        assert await journal.claim(state("fine")) is None
        assert await journal.get("fine") is not None
        await journal.aclose()
        await eventually(lambda: not any(t.is_alive() for t in threads))

    assert isinstance(caught.value.__cause__, UnicodeEncodeError)


async def test_a_track_id_the_journal_cannot_keep_is_never_sent(
    emulator, tmp_path
):
    """A submit whose claim cannot be journaled fails typed, sends nothing."""
    async with Client(
        KEY,
        base_url=emulator.url,
        store=SQLiteStore(tmp_path / "jobs.sqlite3"),
        max_queued=1,
    ) as client:
        with anyio.fail_after(10):
            with pytest.raises(StoreError):
                await client.submit(Text2Img(prompt="p", track_id="\ud800"))
            assert held(client) == 0
            job = await client.submit(Text2Img(prompt="p", track_id="ok"))
            await job

    assert len(emulator.requests("submit")) == 1


async def test_writes_of_a_writer_cut_short_fail_typed(tmp_path):
    """Writes whose writer task is cancelled (a loop closing) fail typed."""
    journal = await SQLiteStore(tmp_path / "jobs.sqlite3").open(
        "acct", max_queued=None
    )
    go = threading.Event()
    try:
        with anyio.fail_after(10):
            journal._thread.submit(go.wait)
            first = asyncio.create_task(journal.record(state("a")))
            await asyncio.sleep(0.01)
            second = asyncio.create_task(journal.record(state("b")))
            await asyncio.sleep(0.01)
            journal._flusher.cancel()
            outcomes = await asyncio.gather(
                first, second, return_exceptions=True
            )
            go.set()
            # The journal goes on: a new writer takes the next write.
            await journal.record(state("c"))
            assert await journal.get("c") is not None
    finally:
        go.set()
        await journal.aclose()

    assert [type(outcome) for outcome in outcomes] == [StoreError] * 2


# --- a known job's slot is never freed by a claim of it ------------------


async def test_resubmitting_an_uncertain_job_keeps_its_slot(store):
    """A second submit of an uncertain track_id sends nothing, frees nothing."""
    async with (
        Emulator(eta=30, faults=uncertain_once()) as emulator,
        Client(
            KEY, base_url=emulator.url, store=store, max_queued=1
        ) as client,
    ):
        with anyio.fail_after(10):
            with pytest.raises(SubmitUncertainError):
                await client.submit(Text2Img(prompt="p", track_id="t"))
            assert held(client) == 1
            again = await client.submit(Text2Img(prompt="p", track_id="t"))
            kept = held(client)

    assert again.phase is JobPhase.UNCERTAIN
    assert kept == 1
    assert len(emulator.requests("submit")) == 1


async def test_a_cancelled_claim_of_a_known_job_keeps_its_slot(store):
    """A claim of a held track_id, cancelled, then abandoned, frees nothing."""
    journal = await store.open("acct", max_queued=1)
    try:
        with anyio.fail_after(10):
            assert await journal.claim(state("t")) is None
            await journal.record(state("t", JobPhase.UNCERTAIN))
            claim = asyncio.create_task(journal.claim(state("t")))
            await asyncio.sleep(0)  # the claim is under way
            claim.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await claim
            # What the tracker does after a claim was cancelled.
            await journal.abandon("t")
            kept = journal.held
            known = await journal.get("t")
    finally:
        await journal.aclose()

    assert kept == 1
    assert known is not None
    assert known.phase is JobPhase.UNCERTAIN


async def test_claims_of_one_track_id_waiting_for_a_slot_keep_the_winners(
    store,
):
    """Two claims of one track_id that waited for a slot: one slot, kept."""
    journal = await store.open("acct", max_queued=2)
    try:
        with anyio.fail_after(10):
            assert await journal.claim(state("x")) is None
            assert await journal.claim(state("y")) is None
            claims = [
                asyncio.create_task(journal.claim(state("t"))) for _ in "ab"
            ]
            await asyncio.sleep(0.05)  # both wait for a slot
            # Both refused: two slots free, one for each waiting claim.
            await journal.abandon("x")
            await journal.abandon("y")
            outcomes = await asyncio.gather(*claims)
            kept = journal.held
    finally:
        await journal.aclose()

    assert sorted(o is None for o in outcomes) == [False, True]
    assert kept == 1


async def test_abandon_leaves_another_journals_submitting_record(store):
    """Abandon after a claim came back known keeps the other run's record."""
    first = await store.open("acct", max_queued=2)
    second = await store.open("acct", max_queued=2)
    try:
        with anyio.fail_after(10):
            # A submit under way in another run (or one that crashed
            # mid-submit): its job may exist.
            assert await first.claim(state("t")) is None
            known = await second.claim(state("t"))
            # What the tracker does when a claim is cancelled: it cannot
            # tell whether the claim won.
            await second.abandon("t")
            kept = await second.get("t")
            held_by_first = first.held
    finally:
        await second.aclose()
        await first.aclose()

    assert known is not None
    assert known.phase is JobPhase.SUBMITTING
    assert kept is not None
    assert held_by_first == 1


async def test_two_waiting_acquires_of_one_track_id_take_one_slot():
    """Two waits for a slot for one job: one takes it, one passes it on."""
    slots = LocalSlots(2)
    assert slots.try_acquire("x")
    assert slots.try_acquire("y")
    with anyio.fail_after(5):
        first = asyncio.create_task(slots.acquire("t"))
        second = asyncio.create_task(slots.acquire("t"))
        other = asyncio.create_task(slots.acquire("u"))
        await asyncio.sleep(0)  # all three wait, in that order
        slots.release("x")
        slots.release("y")
        took = await asyncio.gather(first, second)
        # The second's slot went to the next waiter, not into the first's.
        assert await other is True
    assert took == [True, False]
    assert slots.held == 2
    slots.release("t")
    assert not slots.holds("t")


# --- adopted uncertain jobs hold their slots ------------------------------


async def test_an_adopted_uncertain_job_holds_its_slot(store):
    """An uncertain job adopted by the next client holds a slot until let go."""
    async with Emulator(eta=30, faults=uncertain_once()) as emulator:
        async with Client(
            KEY, base_url=emulator.url, store=store, max_queued=2
        ) as first:
            with anyio.fail_after(10), pytest.raises(SubmitUncertainError):
                await first.submit(Text2Img(prompt="p", track_id="t"))
        async with Client(
            KEY, base_url=emulator.url, store=store, max_queued=2
        ) as second:
            with anyio.fail_after(10):
                (job,) = await second.unfinished()
            adopted = held(second)
            # Its hold ends: the slot it took is the one given back.
            tracker = second._tracker
            assert tracker is not None
            timer, _ = tracker._holds["t"]
            timer.cancel()
            tracker._let_go(job)
            let_go = held(second)

    assert job.phase is JobPhase.UNCERTAIN
    assert adopted == 1
    assert let_go == 0


async def test_adopted_submitting_and_uncertain_jobs_hold_slots(store):
    """A crashed run's submitting and uncertain jobs hold slots when adopted."""
    journal = await store.open("acct", max_queued=None)
    for track_id, phase in [
        ("s", JobPhase.SUBMITTING),
        ("u", JobPhase.UNCERTAIN),
        ("q", JobPhase.QUEUED),
        ("done", JobPhase.SUCCEEDED),
    ]:
        await journal.record(state(track_id, phase))
    await journal.aclose()

    journal = await store.open("acct", max_queued=2)
    try:
        adopted = await journal.adopt()
        holding = journal.held
        for job in adopted:
            journal.settle(job)
        settled = journal.held
    finally:
        await journal.aclose()

    assert sorted(job.track_id for job in adopted) == ["q", "s", "u"]
    # Past the cap: they are (or may be) on the server's queue regardless.
    assert holding == 3
    assert settled == 0


# --- opening and closing cut short leak no thread, no connection ----------


@attrs.define
class Connections:
    """
    Every SQLite connection opened during a test, and which were closed.
    """

    opened: list[sqlite3.Connection] = attrs.Factory(list)
    closed: list[sqlite3.Connection] = attrs.Factory(list)
    threads: list[threading.Thread] = attrs.Factory(list)
    #: Set to hold up ``connect`` or ``close`` until ``go`` is set.
    hold_connect: bool = False
    hold_close: bool = False
    arrived: threading.Event = attrs.Factory(threading.Event)
    go: threading.Event = attrs.Factory(threading.Event)

    def wait_here(self, held_up: bool) -> None:
        if held_up:
            self.arrived.set()
            self.go.wait(10)

    def all_closed(self) -> bool:
        return len(self.closed) == len(self.opened) and not any(
            thread.is_alive() for thread in self.threads
        )


@pytest.fixture
def connections(monkeypatch) -> Iterator[Connections]:
    """
    SQLite connections, watched: opened, closed, and on which threads.
    """
    seen = Connections()
    connect = sqlite3.connect

    class Watched(sqlite3.Connection):
        def close(self) -> None:
            seen.wait_here(seen.hold_close)
            if self not in seen.closed:
                seen.closed.append(self)
            super().close()

    def watched(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        seen.threads.append(threading.current_thread())
        seen.wait_here(seen.hold_connect)
        connection = connect(*args, factory=Watched, **kwargs)
        seen.opened.append(connection)
        return connection

    monkeypatch.setattr(sqlite3, "connect", watched)
    yield seen
    seen.go.set()


async def test_a_cancelled_close_finishes_queued_writes_then_closes(
    tmp_path, connections
):
    """A close cancelled while writes wait finishes them, then lets go."""
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    journal = await store.open("acct", max_queued=None)
    threads = journal_threads(journal)
    go = threading.Event()
    with anyio.fail_after(10):
        # Keep the journal's thread busy: one batch waits on it, one more
        # waits for that one.
        busy = journal._thread.submit(go.wait)
        first = asyncio.create_task(journal.record(state("a")))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(journal.record(state("b")))
        await asyncio.sleep(0.01)
        closing = asyncio.create_task(journal.aclose())
        await asyncio.sleep(0.01)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        go.set()
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        await eventually(lambda: not any(t.is_alive() for t in threads))

    assert busy.done()
    assert [type(outcome) for outcome in outcomes] == [JobState, JobState]
    assert connections.closed == connections.opened


async def test_an_open_cancelled_while_connecting_leaks_nothing(
    tmp_path, connections
):
    """Cancelling open() mid-connect closes the connection and its thread."""
    connections.hold_connect = True
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    with anyio.fail_after(10):
        opening = asyncio.create_task(store.open("acct", max_queued=None))
        await eventually(connections.arrived.is_set)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        connections.go.set()
        await eventually(connections.all_closed)

    assert len(connections.opened) == 1


async def test_an_open_failing_its_first_prune_leaks_nothing(
    tmp_path, connections
):
    """A journal whose first prune fails is closed, its thread ended."""
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:
        # A table of another layout: the schema script keeps it, the
        # prune cannot run on it.
        db.execute(
            "CREATE TABLE jobs (account, track_id, phase, webhook_id, state)"
        )
    db.close()
    connections.opened.clear()
    connections.closed.clear()
    connections.threads.clear()

    with anyio.fail_after(10):
        with pytest.raises(StoreError, match="updated_at"):
            await SQLiteStore(path).open("acct", max_queued=None)
        await eventually(connections.all_closed)

    assert len(connections.opened) == 1


async def test_a_close_cancelled_while_closing_leaks_nothing(
    tmp_path, connections
):
    """Cancelling aclose() as the connection closes still ends the thread."""
    journal = await SQLiteStore(tmp_path / "jobs.sqlite3").open(
        "acct", max_queued=None
    )
    threads = journal_threads(journal)
    connections.threads.extend(threads)
    connections.hold_close = True
    with anyio.fail_after(10):
        closing = asyncio.create_task(journal.aclose())
        await eventually(connections.arrived.is_set)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        connections.go.set()
        await eventually(connections.all_closed)
        await journal.aclose()  # idempotent

    assert len(connections.closed) == 1
