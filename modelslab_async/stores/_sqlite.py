"""
A durable journal in one SQLite file, for jobs that outlive the process.

The stdlib ``sqlite3`` module runs on a worker thread, never on the event
loop. Writes that arrive together share one transaction (group commit): a
``gather`` of 100 submits costs a few commits, not 300. The file is in WAL
mode with ``synchronous=NORMAL`` by default: a committed job survives the
process being killed; with ``synchronous="full"`` it survives a power cut
too, at several times the cost per commit (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import sqlite3
import time

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from modelslab_async._admission import LocalSlots
from modelslab_async._state import JobPhase, JobState, dump_state, load_state
from modelslab_async.errors import StoreError

from ._memory import DEFAULT_RETENTION
from ._protocol import Journal


__all__ = ["SQLiteStore"]

_T = TypeVar("_T")

log = logging.getLogger("modelslab_async")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    account TEXT NOT NULL,
    track_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    webhook_id TEXT,
    updated_at REAL NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (account, track_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobs_by_webhook ON jobs (account, webhook_id)
    WHERE webhook_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_phase ON jobs (account, phase);
"""
_FINISHED: Final = ("succeeded", "failed")
#: Records between two prunes of what is past retention.
_PRUNE_EVERY: Final = 1000


class SQLiteStore:
    """
    Jobs journaled in a SQLite file: they survive crashes and restarts.

    ``Client(store=SQLiteStore("jobs.sqlite3"))`` journals every job before
    its submit is sent, and its id before :meth:`Client.submit
    <modelslab_async.Client.submit>` returns. A client opened later on the
    same file adopts the jobs a killed run left and finishes them
    (:meth:`Client.unfinished <modelslab_async.Client.unfinished>`).

    The file is for one process at a time per API key (many keys may share
    it); for several processes on one account use
    :class:`~modelslab_async.stores.RedisStore`.

    Args:
        path: The database file; created with its folder if missing.
        retention: Seconds a job stays after its last change (24 hours,
            the life of its outputs); older rows are pruned.
        synchronous: ``"normal"`` survives the process being killed;
            ``"full"`` also a power cut, and costs more per commit.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention: float = DEFAULT_RETENTION,
        synchronous: Literal["normal", "full"] = "normal",
    ) -> None:
        if synchronous not in ("normal", "full"):
            msg = (
                f"synchronous must be 'normal' or 'full', not {synchronous!r}"
            )
            raise StoreError(msg)
        self.path = Path(path)
        self.retention = retention
        self.synchronous = synchronous

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r}>"

    async def open(self, account: str, *, max_queued: int | None) -> Journal:
        """
        Open the journal of *account*; see :class:`JobStore
        <modelslab_async.stores.JobStore>`.

        Raises:
            StoreError: The file cannot be opened or is not a journal.
        """
        # One thread per journal, for its whole life: the connection stays
        # on it, and a hop to it costs a third less than anyio's pool.
        thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="modelslab-journal"
        )
        connecting = thread.submit(self._connect)
        try:
            connection = await asyncio.wrap_future(connecting)
        except BaseException as exc:
            # Cancelled, the connect may still finish: the thread closes
            # what it opened, then ends.
            thread.submit(_close_opened, connecting)
            thread.shutdown(wait=False)
            if isinstance(exc, OSError | sqlite3.Error):
                msg = f"cannot open the journal {str(self.path)!r}: {exc}"
                raise StoreError(msg) from None
            raise
        journal = _SQLiteJournal(
            connection, thread, account, self.retention, LocalSlots(max_queued)
        )
        try:
            await journal.prune()
        except BaseException:
            journal.close_soon()
            raise
        return journal

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None
        )
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={self.synchronous}")
            connection.executescript(_SCHEMA)
        except BaseException:
            connection.close()
            raise
        return connection


_Op = Callable[[sqlite3.Connection], Any]


class _SQLiteJournal:
    """
    Strictly private: one client's view of a :class:`SQLiteStore` account.

    Every statement goes through :meth:`_run`, which batches what arrives
    while a transaction is in progress into the next one.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        thread: concurrent.futures.ThreadPoolExecutor,
        account: str,
        retention: float,
        slots: LocalSlots,
    ) -> None:
        self._connection = connection
        self._thread = thread
        self._account = account
        self._retention = retention
        self._slots = slots
        self._pending: list[tuple[_Op, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._writes = 0
        self._adopted = False
        self._closed = False
        self._shut = False
        # Claims under way, by track_id, and the event a later claim of the
        # same track_id waits on (made only when one does).
        self._claiming: dict[str, asyncio.Event | None] = {}
        # Claims this journal won and has not journaled anything of since:
        # the only ones abandon() undoes; and claims' inserts still queued
        # (their caller may have been cancelled), by track_id.
        self._claimed: set[str] = set()
        self._inserting: dict[str, asyncio.Future[str | None]] = {}

    @property
    def held(self) -> int:
        return self._slots.held

    # --- the one way in --------------------------------------------------

    async def _run(self, op: Callable[[sqlite3.Connection], _T]) -> _T:
        # Shielded: the statement runs whether or not this caller stays.
        return await asyncio.shield(self._enqueue(op))

    def _enqueue(
        self, op: Callable[[sqlite3.Connection], _T]
    ) -> asyncio.Future[_T]:
        if self._closed:
            msg = "the journal is closed"
            raise StoreError(msg)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._pending.append((op, future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[tuple[_Op, asyncio.Future[Any]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                outcomes = await loop.run_in_executor(
                    self._thread,
                    _transaction,
                    self._connection,
                    [op for op, _ in batch],
                )
                for (_, future), (ok, value) in zip(
                    batch, outcomes, strict=True
                ):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        except Exception as exc:  # noqa: BLE001 (every caller is told)
            # The thread is gone (the loop is closing, say): no write
            # waits for ever.
            batch += self._pending
            self._pending = []
            _fail(batch, exc)
        except BaseException as exc:
            batch += self._pending
            self._pending = []
            _fail(batch, exc)
            raise
        finally:
            self._flusher = None
            if self._closed:
                self._shut_down()

    def close_soon(self) -> concurrent.futures.Future[None] | None:
        """
        Take no more writes, and close the connection and end the thread
        once the writes under way are done: now, if there are none.

        Returns:
            The connection's close, if it was begun here.
        """
        self._closed = True
        return None if self._flusher is not None else self._shut_down()

    def _shut_down(self) -> concurrent.futures.Future[None] | None:
        if self._shut:
            return None
        self._shut = True
        closed = self._thread.submit(_close, self._connection)
        self._thread.shutdown(wait=False)
        return closed

    # --- the protocol ----------------------------------------------------

    async def claim(self, state: JobState) -> JobState | None:
        track_id = state.track_id
        # One claim of a track_id at a time in this journal. Its record is
        # written on the store's thread after its slot is taken: a second
        # claim let through meanwhile would find the slot held (and take
        # none), then win the record if the first one's write failed, and
        # send a job that holds no slot.
        while track_id in self._claiming:
            busy = self._claiming[track_id]
            if busy is None:
                busy = self._claiming[track_id] = asyncio.Event()
            await busy.wait()
        self._claiming[track_id] = None
        try:
            return await self._claim(state)
        finally:
            done = self._claiming.pop(track_id)
            if done is not None:
                done.set()

    async def _claim(self, state: JobState) -> JobState | None:
        track_id = state.track_id
        row = _row(self._account, state)
        # A track_id holding a slot is a known job (uncertain, queued):
        # its claim takes nothing, and must give nothing back.
        took = False
        if not self._slots.holds(track_id):
            if not self._slots.try_acquire(track_id):
                # No slot now: learn first whether the job is known, so
                # that a known one never waits for a slot it does not need.
                known = await self.get(track_id)
                if known is not None:
                    return known
                # False: its track_id came to hold a slot meanwhile (a job
                # adopted), which this claim must not give back.
                took = await self._slots.acquire(track_id)
            else:
                took = True

        def claim(db: sqlite3.Connection) -> str | None:
            inserted = db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                row,
            ).rowcount
            return None if inserted else _one(db, self._account, row[1])

        inserting = self._enqueue(claim)
        self._inserting[track_id] = inserting
        inserting.add_done_callback(
            functools.partial(self._inserted, track_id)
        )
        try:
            won = await asyncio.shield(inserting)
        except BaseException:
            if took:
                self._slots.release(track_id)
            raise
        if won is None:
            return None
        # Known already: the slot taken for it (if any) goes back.
        if took:
            self._slots.release(track_id)
        return load_state(won)

    def _inserted(
        self, track_id: str, inserting: asyncio.Future[str | None]
    ) -> None:
        if self._inserting.get(track_id) is inserting:
            del self._inserting[track_id]
        if (
            not inserting.cancelled()
            and inserting.exception() is None
            and inserting.result() is None
        ):
            self._claimed.add(track_id)

    async def record(self, state: JobState) -> JobState:
        self._claimed.discard(state.track_id)
        winner = await self._run(self._recording(state))
        self._writes += 1
        if self._writes % _PRUNE_EVERY == 0:
            await self.prune()
        return state if winner is None else load_state(winner)

    def settle(self, state: JobState) -> None:
        self._claimed.discard(state.track_id)
        self._slots.release(state.track_id)
        written = self._enqueue(self._recording(state))
        written.add_done_callback(_log_failure)

    def _recording(
        self, state: JobState
    ) -> Callable[[sqlite3.Connection], str | None]:
        """
        The write of *state*, first writer wins: returns the stored state's
        text if a finished one was there already.
        """
        row = _row(self._account, state)

        def record(db: sqlite3.Connection) -> str | None:
            written = db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (account, track_id) DO UPDATE SET "
                "phase = excluded.phase, webhook_id = excluded.webhook_id, "
                "updated_at = excluded.updated_at, state = excluded.state "
                "WHERE jobs.phase NOT IN (?, ?)",
                (*row, *_FINISHED),
            ).rowcount
            return None if written else _one(db, self._account, row[1])

        return record

    async def abandon(self, track_id: str) -> None:
        inserting = self._inserting.get(track_id)
        if inserting is not None:
            # A claim cancelled while its insert was queued: it may win.
            await asyncio.wait([inserting])
        if track_id not in self._claimed:
            # Not this journal's claim: another's submitting record may be
            # a job that exists.
            return
        self._claimed.discard(track_id)

        def abandon(db: sqlite3.Connection) -> bool:
            db.execute(
                "DELETE FROM jobs WHERE account = ? AND track_id = ? "
                "AND phase = ?",
                (self._account, track_id, JobPhase.SUBMITTING.value),
            )
            # A queued or uncertain job keeps its slot: it is not a claim
            # to undo, whoever asks (a cancelled claim that found it).
            return _one(db, self._account, track_id) is None

        try:
            undone = await self._run(abandon)
        except BaseException:
            self._slots.release(track_id)
            raise
        if undone:
            self._slots.release(track_id)

    async def get(self, track_id: str) -> JobState | None:
        text = await self._run(lambda db: _one(db, self._account, track_id))
        return None if text is None else load_state(text)

    async def find(self, webhook_id: str) -> JobState | None:
        def find(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT state FROM jobs WHERE account = ? AND webhook_id = ?",
                (self._account, webhook_id),
            ).fetchone()
            return None if row is None else str(row[0])

        text = await self._run(find)
        return None if text is None else load_state(text)

    async def adopt(self) -> list[JobState]:
        if self._adopted:
            return []
        self._adopted = True

        def unfinished(db: sqlite3.Connection) -> list[str]:
            return [
                str(text)
                for (text,) in db.execute(
                    "SELECT state FROM jobs WHERE account = ? "
                    "AND phase NOT IN (?, ?)",
                    (self._account, *_FINISHED),
                )
            ]

        states = [load_state(text) for text in await self._run(unfinished)]
        states.sort(key=lambda state: state.created_at)
        for state in states:
            # Queued, or (uncertain, submitting) perhaps queued: each holds
            # a slot until the tracker settles it.
            self._slots.hold(state.track_id)
        return states

    async def prune(self) -> None:
        """
        Delete what is past retention.
        """
        oldest = time.time() - self._retention
        await self._run(
            lambda db: db.execute(
                "DELETE FROM jobs WHERE account = ? AND updated_at < ?",
                (self._account, oldest),
            )
        )

    def listen(self, deliver: Callable[[JobState], object]) -> None:
        pass  # One process per account: nobody else settles our jobs.

    async def aclose(self) -> None:
        if self._closed:
            return
        closed = None
        try:
            await self._slots.close()
            # Writes already queued are finished, then nothing more is
            # taken.
            while (flusher := self._flusher) is not None:
                await asyncio.wait([flusher])
        finally:
            # Cancelled, the writes under way still finish, and then the
            # connection is closed and the thread ends all the same.
            closed = self.close_soon()
        if closed is not None:
            await asyncio.shield(asyncio.wrap_future(closed))


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("journal write failed: %s", str(future.exception()))


def _row(account: str, state: JobState) -> tuple[Any, ...]:
    return (
        account,
        state.track_id,
        state.phase.value,
        state.webhook_id,
        state.updated_at,
        dump_state(state),
    )


def _one(db: sqlite3.Connection, account: str, track_id: str) -> str | None:
    row = db.execute(
        "SELECT state FROM jobs WHERE account = ? AND track_id = ?",
        (account, track_id),
    ).fetchone()
    return None if row is None else str(row[0])


def _transaction(
    db: sqlite3.Connection, ops: list[_Op]
) -> list[tuple[bool, Any]]:
    """
    Run *ops* in one transaction, each in a savepoint of its own, so one
    failing statement fails only its caller.

    Whatever an op raises (a ``sqlite3.Error``, or a value it cannot bind:
    ``UnicodeEncodeError``, ``OverflowError``) fails that op alone, as a
    :class:`StoreError`; the connection is left out of any transaction.
    """
    outcomes: list[tuple[bool, Any]] = []
    try:
        db.execute("BEGIN IMMEDIATE")
        for op in ops:
            db.execute("SAVEPOINT op")
            try:
                outcomes.append((True, op(db)))
            except Exception as exc:  # noqa: BLE001 (told to its caller)
                db.execute("ROLLBACK TO op")
                outcomes.append((False, _error("journal write failed", exc)))
            db.execute("RELEASE op")
        db.execute("COMMIT")
    except Exception as exc:  # noqa: BLE001 (told to every caller)
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        return [
            (False, _error("journal transaction failed", exc)) for _ in ops
        ]
    return outcomes


def _error(what: str, cause: BaseException) -> StoreError:
    """
    A StoreError for each caller, with *cause* but not its frames (which
    would keep the connection and the batch alive).
    """
    error = StoreError(f"{what}: {cause}")
    error.__cause__ = cause.with_traceback(None)
    return error


def _fail(
    batch: list[tuple[_Op, asyncio.Future[Any]]], cause: BaseException
) -> None:
    """
    Fail every caller of *batch* not answered yet: its write may or may
    not have been made.
    """
    for _, future in batch:
        if not future.done():
            msg = f"journal writer stopped: {type(cause).__name__}"
            future.set_exception(StoreError(msg))


def _close(connection: sqlite3.Connection) -> None:
    try:
        connection.close()
    except sqlite3.Error as exc:
        msg = f"cannot close the journal: {exc}"
        raise StoreError(msg) from None


def _close_opened(
    connecting: concurrent.futures.Future[sqlite3.Connection],
) -> None:
    """
    Close the connection *connecting* opened, if it did: on the journal's
    thread, after it.
    """
    if connecting.cancelled() or connecting.exception() is not None:
        return
    with contextlib.suppress(sqlite3.Error):
        connecting.result().close()
