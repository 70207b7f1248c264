"""
The journal, the account-wide queue cap and a cross-process inbox in Redis:
for several processes on one ModelsLab account.

Everything an account needs lives under ``<prefix>:{<account>}:``, so one
account's keys share a cluster slot and every script touches only them. A
queue slot belongs to a *job*: it is a member of one sorted set, and only
seeing the job leave the server's queue frees it. Processes hold leases on
the jobs they watch, timed by the server's clock; a process that dies
leaves its jobs to be adopted, never its slots to be freed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import random
import secrets
import time

from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs

from redis import exceptions as rex
from redis.asyncio import ConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import KeyT, StreamIdT

from modelslab_async._requests import FluxKleinText2Img, Text2Img
from modelslab_async._state import JobPhase, JobState, dump_state, load_state
from modelslab_async.errors import (
    ClientStateError,
    StoreError,
    StoreUnavailableError,
)
from modelslab_async.stores import _redis_lua as lua
from modelslab_async.stores._memory import DEFAULT_RETENTION
from modelslab_async.stores._protocol import Journal


__all__ = ["RedisStore"]

log = logging.getLogger("modelslab_async")

_CLOSED: Final = "the client was closed while the submit waited for a slot"
#: How long one blocking read of the inbox waits on the server, in ms:
#: well inside the reader's socket timeout, so a quiet inbox never looks
#: like a dead connection.
_BLOCK_MS: Final = 1000
#: The reader's socket timeout, seconds: a read that takes this long
#: means the connection is gone (the server blocks for _BLOCK_MS at most).
_READ_TIMEOUT: Final = _BLOCK_MS / 1000 + 4.0
#: Socket timeouts of the command connection, seconds: every command is a
#: short script, so a reply this late means the server or the network is
#: gone, and the command is retried on a new connection.
_COMMAND_TIMEOUT: Final = 2.0
_CONNECT_TIMEOUT: Final = 1.0
#: Retry waits while Redis is unreachable, seconds: short enough that work
#: resumes within half a second of its return.
_BACKOFF_FIRST: Final = 0.02
_BACKOFF_MAX: Final = 0.5
#: How long after a lease's end (server time) a journal comes back for
#: the jobs: a little late rather than early, and never in a tight loop.
_LAPSE_MARGIN: Final = 0.01
#: Heartbeats come at most this many times a third of a lease.
_LAPSE_FLOOR: Final = 50
#: The consumer group (and its one consumer) reading a journal's inbox.
_GROUP: Final = "reader"
#: Inbox entries read per call, and lapsed jobs adopted per heartbeat.
_READ_COUNT: Final = 100
_ADOPT_BATCH: Final = 100
#: Errors that mean "Redis cannot be reached now": retried.
_UNREACHABLE: Final = (rex.ConnectionError, rex.TimeoutError, OSError)
_EVICTING: Final = frozenset(
    {
        "allkeys-lru",
        "allkeys-lfu",
        "allkeys-random",
        "volatile-lru",
        "volatile-lfu",
        "volatile-random",
        "volatile-ttl",
    }
)
_SCRIPTS: Final = {
    "claim": lua.CLAIM,
    "record": lua.RECORD,
    "abandon": lua.ABANDON,
    "find": lua.FIND,
    "adopt": lua.ADOPT,
    "restore": lua.RESTORE,
    "kick": lua.KICK,
    "leave": lua.LEAVE,
}


class RedisStore:
    """
    Jobs journaled in Redis: every process on one account shares one queue
    cap, one journal and each other's webhooks.

    ``Client(max_queued=5, store=RedisStore("redis://host:6379/0"))`` in
    any number of processes keeps at most 5 jobs queued on the account, all
    processes together. A slot is taken before a submit is sent and freed
    when the job is seen to leave the server's queue, by whichever process
    sees it; a waiting submit in any process is woken at once (a stream
    entry, not a poll: the script that frees a slot grants the waiting
    claim there and then). A process that dies leaves its jobs' slots taken:
    after its lease lapses, a live process adopts the jobs and finishes
    them. Any server 6.2 or newer; Redis Cluster works key-wise (one
    account's keys share a hash tag) but needs a cluster-aware URL handled
    by you.

    What it costs, measured (``benchmarks/redis_store.py``, 2 cores,
    loopback, Redis 7.0, redis-py 8.1): 3 round trips per job on the happy
    path (claim, record the job id, settle), fewer under load, where
    concurrent calls share one pipeline; 1.1 KiB of Redis memory per open
    job; 2 connections per open client, whatever the concurrency; a freed
    slot is granted to a waiter in another process in about 1.3 ms (p99
    about 2 ms; 1.6-1.8 ms to a waiting submit of a whole client), an
    outcome recorded in one process reaches its owner in another in under
    1 ms (p99 1-3 ms).

    Connections (redis-py's defaults suit neither): one command connection,
    from a pool of size 1 used by one task (redis-py's default pool opens a
    connection per concurrent command and refuses them past 100; here
    concurrent calls queue in this journal and go out together as one
    pipeline), with 2 s socket timeouts, since every command is a short
    script; and one reader connection for the process's inbox stream,
    blocking at most 1 s per ``XREADGROUP`` in a loop, under a 5 s socket
    timeout (redis-py's default 5 s timeout would otherwise kill a longer
    block). redis-py's own retries
    are off: a call is retried here, with backoff, knowing which calls may
    run twice.

    Deploy with ``appendonly yes`` (a restart without persistence loses
    the journal: live processes put back the jobs they watch, and the cap
    waits one lease for them; finished jobs' records are gone) and
    ``maxmemory-policy noeviction`` (an evicting policy is warned about
    at open).

    Args:
        url: A ``redis://`` or ``rediss://`` URL (``unix://`` too).
        lease: Seconds a process's hold on the jobs it watches lasts
            without renewal (renewed every third of it); a dead process's
            jobs are adopted that long after its last renewal.
        retention: Seconds every key lives after its last write (24 hours,
            the life of the outputs).
        key_prefix: The first part of every key.
        unavailable_timeout: Seconds a call keeps trying while Redis is
            unreachable before it raises
            :class:`~modelslab_async.errors.StoreUnavailableError`.
        flush_timeout: Seconds closing waits for writes still pending
            (settled jobs) while Redis is unreachable.
    """

    def __init__(
        self,
        url: str,
        *,
        lease: float = 10.0,
        retention: float = DEFAULT_RETENTION,
        key_prefix: str = "mla",
        unavailable_timeout: float = 30.0,
        flush_timeout: float = 5.0,
    ) -> None:
        if not lease > 0:
            msg = f"lease must be positive, not {lease!r}"
            raise StoreError(msg)
        if not retention > lease:
            msg = f"retention must be longer than the lease, not {retention!r}"
            raise StoreError(msg)
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            msg = (
                f"key_prefix must be non-empty, without braces: {key_prefix!r}"
            )
            raise StoreError(msg)
        self.url = url
        self.lease = lease
        self.retention = retention
        self.key_prefix = key_prefix
        self.unavailable_timeout = unavailable_timeout
        self.flush_timeout = flush_timeout

    def __repr__(self) -> str:
        # The URL may carry a password: show where, never who.
        where = self.url.rsplit("@", 1)[-1]
        return f"<RedisStore {where!r} prefix={self.key_prefix!r}>"

    async def open(self, account: str, *, max_queued: int | None) -> Journal:
        """
        Open the journal of *account*; see :class:`JobStore
        <modelslab_async.stores.JobStore>`.

        Raises:
            StoreUnavailableError: Redis stayed unreachable for
                ``unavailable_timeout``.
            StoreError: The URL is not a Redis URL.
        """
        me = secrets.token_hex(8)
        try:
            command = _client(
                self.url,
                me,
                socket_timeout=_COMMAND_TIMEOUT,
            )
            reader = _client(self.url, me, socket_timeout=_READ_TIMEOUT)
        except (ValueError, rex.RedisError) as exc:
            msg = f"not a Redis URL: {exc}"
            raise StoreError(msg) from None
        journal = _RedisJournal(
            self,
            account=account,
            cap=max_queued,
            me=me,
            link=_Link(command, self),
            reader=reader,
        )
        try:
            await journal.start()
        except BaseException:
            await journal.aclose()
            raise
        return journal


@functools.cache
def _warm_records() -> None:
    """
    Have the record converter build its hooks now, once per process.

    cattrs builds them on first use: 30-40 ms of CPU here for reading a
    record, 10 for writing one. A shared store first reads a record
    written elsewhere on the path of a webhook taken for another process,
    or of an outcome delivered from one; paid there, it made the first
    callbacks after a start take 60-150 ms instead of a few (measured by
    benchmarks/many_processes.py). Opening pays it instead.
    """
    now = time.time()
    for request in (
        Text2Img(prompt="warm-up", track_id="warm-up"),
        FluxKleinText2Img(prompt="warm-up", track_id="warm-up"),
    ):
        load_state(
            dump_state(
                JobState(
                    track_id="warm-up",
                    endpoint=request.route.family,
                    phase=JobPhase.SUCCEEDED,
                    request=request,
                    job_id="0",
                    outputs=("https://example.com/0.png",),
                    meta={"seed": 0},
                    webhook_id="0",
                    token_hash="0" * 64,
                    created_at=now,
                    updated_at=now,
                )
            )
        )


def _client(url: str, me: str, *, socket_timeout: float) -> Redis:
    # One connection, used by one task at a time (the link's sender, or the
    # inbox reader): a second user would be a bug, and the plain pool says
    # so (MaxConnectionsError) where BlockingConnectionPool would wait. Its
    # redis-py 5.0.1 version also deadlocks when a connect fails.
    pool = ConnectionPool.from_url(
        url,
        max_connections=1,
        socket_timeout=socket_timeout,
        socket_connect_timeout=_CONNECT_TIMEOUT,
        socket_keepalive=True,
        decode_responses=True,
        # Retried here, where it is known which calls may run twice.
        retry=Retry(NoBackoff(), 0),
        client_name=f"modelslab-async:{me}",
    )
    return Redis.from_pool(pool)


@attrs.define(eq=False)
class _Op:
    """
    Strictly private: one command waiting for the command connection.
    """

    args: tuple[Any, ...]
    #: The script's name, when the command runs one.
    script: str | None
    future: asyncio.Future[Any]
    #: When to give up while Redis is unreachable (monotonic); None: keep
    #: trying until the journal closes.
    deadline: float | None


class _Link:
    """
    Strictly private: the command connection, one sender at a time.

    Calls queue here and one task sends what is queued as one pipeline per
    round trip, as SQLiteStore groups its commits. Callers wait on a
    shielded future, so a cancelled caller never cuts a reply in half
    (redis-py then drops the connection). While Redis is unreachable the
    sender retries the whole batch with backoff: every script is safe to
    run twice (claims carry a nonce; records are first-writer-wins).
    """

    def __init__(self, redis: Redis, store: RedisStore) -> None:
        self.redis = redis
        self._store = store
        self._pending: collections.deque[_Op] = collections.deque()
        self._sender: asyncio.Task[None] | None = None
        self._shas: dict[str, str] = {}
        self.round_trips = 0
        self.closed = False

    async def load(self) -> None:
        """
        Load the scripts (again after a restart or SCRIPT FLUSH).
        """
        for name, text in _SCRIPTS.items():
            self._shas[name] = await self.redis.script_load(text)

    def sha(self, name: str) -> str | None:
        """
        The loaded script's SHA-1, if it is loaded.
        """
        return self._shas.get(name)

    def send(
        self,
        *args: Any,
        script: str | None = None,
        patient: bool = False,
    ) -> asyncio.Future[Any]:
        """
        Queue one command (or script, by name, with ``keys, args``).

        Args:
            patient: Keep trying until the journal closes, rather than
                for ``unavailable_timeout``.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.closed:
            future.set_exception(StoreError("the journal is closed"))
            return future
        deadline = (
            None if patient else loop.time() + self._store.unavailable_timeout
        )
        self._pending.append(_Op(args, script, future, deadline))
        if self._sender is None:
            self._sender = loop.create_task(self._send())
        return future

    async def call(self, *args: Any, script: str | None = None) -> Any:
        """
        Run one command and return its reply.
        """
        return await asyncio.shield(self.send(*args, script=script))

    async def _send(self) -> None:
        delay = _BACKOFF_FIRST
        try:
            while self._pending:
                batch = list(self._pending)
                self._pending.clear()
                try:
                    replies = await self._pipeline(batch)
                except _UNREACHABLE as exc:
                    self._retry(batch, exc)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                delay = _BACKOFF_FIRST
                again = self._settle(batch, replies)
                if again:
                    await self.load()
                    self._pending.extendleft(reversed(again))
        finally:
            self._sender = None

    async def _pipeline(self, batch: list[_Op]) -> list[Any]:
        if not self._shas:
            await self.load()
        commands = [self._command(op) for op in batch]
        self.round_trips += 1
        if len(commands) == 1:
            # A lone command skips the pipeline's own work: 0.25 of the
            # 0.9 ms a pipeline of one costs in redis-py here, measured.
            # redis-py leaves execute_command untyped.
            run = self.redis.execute_command
            try:
                return [await run(*commands[0])]  # type: ignore[no-untyped-call]
            except rex.ResponseError as exc:
                return [exc]
        async with self.redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=False)

    def _command(self, op: _Op) -> tuple[Any, ...]:
        if op.script is None:
            return op.args
        keys, args = op.args
        return ("EVALSHA", self._shas[op.script], len(keys), *keys, *args)

    def _retry(self, batch: list[_Op], exc: BaseException) -> None:
        """
        Put back what may wait longer; fail what may not.
        """
        now = asyncio.get_running_loop().time()
        keep = []
        for op in batch:
            if op.future.done():
                continue
            if self.closed or (op.deadline is not None and now >= op.deadline):
                op.future.set_exception(_unavailable(exc))
            else:
                keep.append(op)
        self._pending.extendleft(reversed(keep))

    def _settle(self, batch: list[_Op], replies: list[Any]) -> list[_Op]:
        """
        Hand each reply to its caller; return the ops to run again.
        """
        again = []
        for op, reply in zip(batch, replies, strict=True):
            if isinstance(reply, rex.NoScriptError):
                # The server lost its scripts (a restart): nothing ran.
                self._shas.clear()
                again.append(op)
            elif op.future.done():
                continue
            elif isinstance(reply, BaseException):
                op.future.set_exception(_failed(reply))
            else:
                op.future.set_result(reply)
        return again

    async def flush(self, timeout: float) -> None:
        """
        Wait up to *timeout* for queued calls, then fail those left.
        """
        sender = self._sender
        if sender is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(sender), timeout)
        self.closed = True
        sender = self._sender
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        while self._pending:
            op = self._pending.popleft()
            if not op.future.done():
                op.future.set_exception(
                    StoreUnavailableError("the store was closed first")
                )


class _Fallback(Exception):  # noqa: N818 (a signal, not an error)
    """
    Strictly private: the reader could not claim; the pump will.
    """


def _unavailable(exc: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError(f"Redis is unreachable: {exc}")


def _failed(exc: BaseException) -> StoreError:
    return StoreError(f"Redis refused a journal command: {exc}")


@attrs.define(eq=False)
class _Owned:
    """
    Strictly private: what a journal keeps of a job it watches, enough to
    put it back if Redis loses it.
    """

    text: str
    phase: str
    nonce: str
    hook: str


@attrs.define(eq=False)
class _Waiter:
    """
    Strictly private: a claim waiting for a slot.
    """

    state: JobState
    text: str
    nonce: str
    future: asyncio.Future[str | None]
    #: The slot a wake-up held for this journal, taken by this claim.
    held: str = ""
    #: Granted by a freed slot's script, from this journal's offer.
    granted: bool = False


class _RedisJournal:
    """
    Strictly private: one client's view of a :class:`RedisStore` account.
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        account: str,
        cap: int | None,
        me: str,
        link: _Link,
        reader: Redis,
    ) -> None:
        self._store = store
        self._cap = cap
        self._me = me
        self._link = link
        self._reader = reader
        self._prefix = f"{store.key_prefix}:{{{account}}}:"
        self._inbox = f"{self._prefix}inbox:{me}"
        self._lease_ms = math.ceil(store.lease * 1000)
        # After Redis lost the account's keys, live journals put their jobs
        # back on their next heartbeat (every third of a lease), retried
        # within _BACKOFF_MAX of the server's return: claims wait that long.
        self._window_ms = math.ceil(store.lease * 1000 / 3) + 1000
        self._retention_ms = math.ceil(store.retention * 1000)
        # Jobs this journal watches: claimed or adopted, not yet settled.
        self._owned: dict[str, _Owned] = {}
        self._queue: collections.deque[_Waiter] = collections.deque()
        # One server of waiting claims at a time: the pump or the reader.
        self._serving = asyncio.Lock()
        # Claims the reader has sent and not heard back about.
        self._claiming: dict[str, _Waiter] = {}
        # Every claim in progress, by nonce, and the claims left as this
        # journal's offer that a freed slot's script may have granted
        # (nonce: track_id): closing undoes those it never took.
        self._claims: dict[str, _Waiter] = {}
        self._offers: dict[str, str] = {}
        # Claims a retry of their own found granted: their grant's inbox
        # entry is old news.
        self._foreseen: set[str] = set()
        self._poke = asyncio.Event()
        self._trying = 0
        self._owed = False
        # Slots held for this journal by wake-ups (members of `slots`, see
        # _redis_lua): each is taken by a waiting claim or passed on.
        self._held: collections.deque[str] = collections.deque()
        self._mark = f"~{me}:"
        self._deliver: Callable[[JobState], object] | None = None
        self._undelivered: list[JobState] = []
        self._read_to = ""
        # Seconds until another journal's lease lapses, when one is due
        # before the next heartbeat.
        self._lapse: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._started = False
        self._closed = False
        #: What happened, for tests and benchmarks: wake-ups read from the
        #: inbox, heartbeats, and claims retried by a heartbeat rather than
        #: a wake-up (a lost wake-up's safety net).
        self.counts: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return f"<RedisJournal {self._me} held={self.held}>"

    @property
    def held(self) -> int:
        """
        Queue slots held by jobs this journal watches (this process's
        share; the account's total is the ``slots`` set's size).
        """
        return len(self._owned)

    @property
    def round_trips(self) -> int:
        """
        Round trips made on the command connection so far.
        """
        return self._link.round_trips

    # --- opening and closing ----------------------------------------------

    async def start(self) -> None:
        """
        Reach Redis, load the scripts, say we are alive, start the tasks.
        """
        _warm_records()
        deadline = time.monotonic() + self._store.unavailable_timeout
        delay = _BACKOFF_FIRST
        while True:
            try:
                await self._link.load()
                policy = await self._policy()
                await self._make_inbox(self._link.redis)
                break
            except _UNREACHABLE as exc:
                if time.monotonic() >= deadline:
                    raise _unavailable(exc) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
            except rex.ResponseError as exc:
                raise _failed(exc) from None
        if policy.get("maxmemory-policy") in _EVICTING:
            log.warning(
                "Redis evicts keys (maxmemory-policy %s): journaled jobs and "
                "queue slots may vanish; use noeviction",
                policy["maxmemory-policy"],
            )
        await self._heartbeat(adopt=False)
        self._started = True
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read()),
            loop.create_task(self._renew()),
        ]
        if self._cap is not None:
            self._tasks.append(loop.create_task(self._pump()))

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        # A cancel that lands while redis-py connects can be lost (redis-py
        # 8 on Python 3.11, seen here): cutting the reader's socket ends its
        # read too, and every loop checks that the journal is closed.
        await self._reader.connection_pool.disconnect()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # noqa: BLE001 (a stopped task's end)
                # The cut socket can surface as anything redis-py raises
                # for it (5.0.1: an AttributeError on the closed writer);
                # the task is over either way, and closing goes on.
                log.debug("a store task ended on closing: %s", str(exc))

    async def _policy(self) -> dict[str, str]:
        try:
            policy = await self._link.redis.config_get("maxmemory-policy")
        except rex.ResponseError:
            # CONFIG is often disabled on managed Redis: nothing to see.
            return {}
        return {str(k): str(v) for k, v in policy.items()}

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._fail_waiters(lambda: ClientStateError(_CLOSED))
        await self._stop_tasks()
        if self._started:
            offered = [
                item
                for nonce, track_id in self._offers.items()
                for item in (track_id, nonce)
            ]
            left = self._link.send(
                (self._prefix + "slots",),
                (*self._base(), len(self._owned), *self._owned, *offered),
                script="leave",
                patient=True,
            )
            left.add_done_callback(_quiet)
            for track_id, waiter in self._claiming.items():
                self._forget(track_id, waiter.nonce)
        await self._link.flush(self._store.flush_timeout)
        await self._link.redis.aclose()
        await self._reader.aclose()

    # --- the protocol -----------------------------------------------------

    async def claim(self, state: JobState) -> JobState | None:
        if self._closed:
            raise ClientStateError(_CLOSED)
        future: asyncio.Future[str | None] = (
            asyncio.get_running_loop().create_future()
        )
        waiter = _Waiter(
            state, dump_state(state), secrets.token_hex(6), future
        )
        self._claims[waiter.nonce] = waiter
        try:
            return await self._wait_for(waiter)
        finally:
            del self._claims[waiter.nonce]

    async def _wait_for(self, waiter: _Waiter) -> JobState | None:
        """
        Try at once; when the cap is full, wait in line for a grant.
        """
        state, future = waiter.state, waiter.future
        reply = await self._try(waiter)
        verdict = reply[0]
        if verdict == "won" and self._shut():
            # Won while closing: nobody will submit it, and it must not
            # be handed to another process as a job that may exist.
            self._forget(state.track_id, waiter.nonce)
            raise ClientStateError(_CLOSED)
        if verdict == "won":
            self._kick_if_owed()
            return None
        if verdict == "known":
            self._kick_if_owed()
            return load_state(reply[1])
        if self._shut():
            # Closing: nothing will serve the line any more.
            self._give_up(waiter)
            raise ClientStateError(_CLOSED)
        # Full (or the store recovering): wait in line, woken by the inbox.
        self._queue.append(waiter)
        if verdict == "wait":
            self._poke_later(int(reply[1]) / 1000)
        if self._owed:
            self._owed = False
            self._poke.set()
        try:
            known = await future
        except BaseException:
            # Cancelled, failed or closed: a grant it took (or one that may
            # have been lost with a reply) is given back.
            self._give_up(waiter)
            raise
        if known is None and self._shut():
            # Granted as the client closed: nobody will submit it.
            self._give_up(waiter)
            raise ClientStateError(_CLOSED)
        return None if known is None else load_state(known)

    def _give_up(self, waiter: _Waiter) -> None:
        """
        A claim leaves without a slot: undo its grant, if it had one.
        """
        if _won(waiter.future):
            self._forget(waiter.state.track_id, waiter.nonce)
        else:
            self._leave_offer(waiter)

    async def _try(self, waiter: _Waiter) -> list[str]:
        """
        A claim's first try, at once: a slot handed here meanwhile is owed
        to it if it comes back full.
        """
        self._trying += 1
        try:
            # Left as the offer only when it would wait first in line here.
            reply = await self._claim(waiter, "try", offer=not self._waiting())
        except BaseException:
            self._trying -= 1
            self._pay_owed()
            raise
        self._trying -= 1
        return reply

    def _pay_owed(self) -> None:
        """
        A claim left without the slot owed to it: the next one takes it.
        """
        if not self._owed or self._trying:
            return
        self._owed = False
        if self._waiting():
            self._poke.set()
        else:
            self._kick()
            self._pass_held()

    def _claim_args(
        self, waiter: _Waiter, mode: str, *, more: bool, offer: bool
    ) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        state = waiter.state
        return (
            (self._job(state.track_id),),
            (
                *self._base(),
                state.track_id,
                waiter.text,
                state.phase.value,
                waiter.nonce,
                -1 if self._cap is None else self._cap,
                self._lease_ms,
                mode,
                "1" if more else "0",
                self._hook(state.webhook_id),
                self._window_ms,
                waiter.held if mode == "next" else "",
                "1" if offer else "0",
            ),
        )

    def _own(self, waiter: _Waiter) -> None:
        state = waiter.state
        self._owned[state.track_id] = _Owned(
            waiter.text,
            state.phase.value,
            waiter.nonce,
            self._hook(state.webhook_id),
        )

    async def _claim(
        self,
        waiter: _Waiter,
        mode: str,
        *,
        more: bool = False,
        offer: bool = True,
    ) -> list[str]:
        """
        Run the claim script; a win is owned before anyone can cancel it.
        """
        future = self._link.send(
            *self._claim_args(waiter, mode, more=more, offer=offer),
            script="claim",
        )

        def answered(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None:
                self._answered(waiter, done.result())

        future.add_done_callback(answered)
        try:
            reply: list[str] = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The claim may still win: then nobody will submit it.
            future.add_done_callback(
                lambda done: self._forget_if_won(
                    done, waiter.state.track_id, waiter.nonce
                )
            )
            raise
        return reply

    def _answered(self, waiter: _Waiter, reply: list[str]) -> None:
        """
        Note what a claim's reply says: a win to own, an offer left.
        """
        verdict = reply[0]
        if verdict in {"won", "known"}:
            self._on_woke(reply[2])
        if verdict == "won":
            self._offers.pop(waiter.nonce, None)
            if waiter.granted:
                # Owned since its grant, and perhaps written again since.
                return
            if reply[1]:
                # Granted before this retry of it: the grant's entry in
                # the inbox is news no more.
                self._foreseen.add(waiter.nonce)
            self._own(waiter)
        elif verdict == "known":
            self._offers.pop(waiter.nonce, None)
        elif verdict == "full" and len(reply) > 1:
            if reply[1] != waiter.nonce:
                self._offers.pop(reply[1], None)
            if not waiter.granted:
                self._offers[waiter.nonce] = waiter.state.track_id

    def _leave_offer(self, waiter: _Waiter) -> None:
        # Its offer may have been granted by a reply that was lost: undo
        # (nonce-guarded: only a record this very claim's grant wrote).
        if self._offers.pop(waiter.nonce, None) is not None:
            self._forget(waiter.state.track_id, waiter.nonce)

    def _forget_if_won(
        self, done: asyncio.Future[Any], track_id: str, nonce: str
    ) -> None:
        if _won(done):
            self._forget(track_id, nonce)

    def _forget(self, track_id: str, nonce: str) -> None:
        """
        Undo a claim whose caller left before submitting anything.
        """
        self._owned.pop(track_id, None)
        if self._link.closed:
            return
        undone = self._link.send(
            (self._job(track_id),),
            (*self._base(), track_id, nonce),
            script="abandon",
            patient=True,
        )
        undone.add_done_callback(self._woke)

    async def record(self, state: JobState) -> JobState:
        self._check_open()
        text = dump_state(state)
        reply = await self._link.call(
            *self._recording(state, text, release=False), script="record"
        )
        kept, woke = reply
        self._on_woke(woke)
        if kept:
            self._owned.pop(state.track_id, None)
            return load_state(kept)
        owned = self._owned.get(state.track_id)
        if state.phase.is_finished:
            self._owned.pop(state.track_id, None)
        elif owned is not None:
            owned.text, owned.phase = text, state.phase.value
        return state

    def settle(self, state: JobState) -> None:
        if self._closed:
            log.warning("a job settled after its journal closed was lost")
            return
        self._owned.pop(state.track_id, None)
        written = self._link.send(
            *self._recording(state, dump_state(state), release=True),
            script="record",
            patient=True,
        )
        written.add_done_callback(self._settled)

    def _settled(self, done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            return
        exc = done.exception()
        if exc is not None:
            log.warning("a settled job was not journaled: %s", str(exc))
            return
        self._on_woke(done.result()[1])

    def _recording(
        self, state: JobState, text: str, *, release: bool
    ) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        return (
            (self._job(state.track_id),),
            (
                *self._base(),
                state.track_id,
                text,
                state.phase.value,
                "1" if release else "0",
                self._hook(state.webhook_id),
            ),
        )

    async def abandon(self, track_id: str) -> None:
        self._check_open()
        owned = self._owned.get(track_id)
        if owned is None or not owned.nonce:
            # Not our claim (or none was made): another process's claim of
            # the same track_id is not ours to withdraw, nor its slot; nor
            # is a job adopted (it has no nonce of ours), whose submit may
            # have left.
            return
        del self._owned[track_id]
        nonce = owned.nonce
        woke = await self._link.call(
            (self._job(track_id),),
            (*self._base(), track_id, nonce),
            script="abandon",
        )
        self._on_woke(woke)

    async def get(self, track_id: str) -> JobState | None:
        self._check_open()
        text = await self._link.call("HGET", self._job(track_id), "s")
        return None if text is None else load_state(text)

    async def find(self, webhook_id: str) -> JobState | None:
        self._check_open()
        text = await self._link.call(
            (self._hook(webhook_id),), (self._prefix,), script="find"
        )
        return None if text is None else load_state(text)

    async def adopt(self) -> list[JobState]:
        self._check_open()
        adopted: list[JobState] = []
        while True:
            batch = await self._heartbeat(adopt=True)
            adopted += batch
            if len(batch) < _ADOPT_BATCH:
                break
        adopted.sort(key=lambda state: state.created_at)
        return adopted

    def listen(self, deliver: Callable[[JobState], object]) -> None:
        self._deliver = deliver
        undelivered, self._undelivered = self._undelivered, []
        for state in undelivered:
            self._hand(state)

    # --- slots: waiting, waking -------------------------------------------

    async def _pump(self) -> None:
        """
        Serve waiting claims, oldest first, each time a slot may be free.
        """
        while not self._closed:
            await self._poke.wait()
            self._poke.clear()
            async with self._serving:
                while self._queue and await self._serve(self._queue[0]):
                    pass
                self._pass_held()

    async def _serve_now(self) -> None:
        """
        A wake-up just read: serve the oldest claims from the reader.

        The reader's connection is idle between two reads, so the woken
        claim goes out on it at once, without the hops through the pump
        and the command connection's sender (a third of a hand-off here).
        """
        if self._serving.locked() or not self._waiting():
            self._on_wake()
            return
        self.counts["wakes"] += 1
        async with self._serving:
            while self._queue and await self._serve(
                self._queue[0], direct=True
            ):
                pass
            self._pass_held()

    async def _serve(self, waiter: _Waiter, *, direct: bool = False) -> bool:
        """
        Try the oldest waiting claim; whether to go on with the next.
        """
        if waiter.future.done():
            self._queue.popleft()
            self._unhold(waiter)
            return True
        if not waiter.held and self._held:
            waiter.held = self._held.popleft()
        reply = await self._next(waiter, direct=direct)
        if reply is None:
            return False
        verdict = reply[0]
        if verdict in {"won", "known", "full"}:
            # The claim took the held slot, passed it on, or found it gone.
            waiter.held = ""
        if verdict == "full":
            # Still full: the claim left its offer and waits for a grant.
            # (A claim sent with a held slot ends so only when the slot
            # lapsed before it came: try the next one held, if any.)
            return bool(self._held)
        if verdict == "wait":
            self._poke_later(int(reply[1]) / 1000)
            return False
        self._queue.popleft()
        self._unhold(waiter)
        if verdict == "failed":
            return True
        if not waiter.future.done():
            waiter.future.set_result(None if verdict == "won" else reply[1])
        elif verdict == "won" and not waiter.granted:
            # Its caller left meanwhile: nobody will submit it.
            self._forget(waiter.state.track_id, waiter.nonce)
        return True

    async def _next(
        self, waiter: _Waiter, *, direct: bool
    ) -> list[str] | None:
        """
        The claim of a waiter at the front; None: stop serving for now.
        """
        more = len(self._queue) > 1
        try:
            if direct:
                return await self._claim_direct(waiter, more=more)
            return await self._claim(waiter, _mode(waiter), more=more)
        except _Fallback:
            self._poke.set()
        except StoreUnavailableError as exc:
            # Redis stayed away: every waiting claim fails closed.
            message = str(exc)
            self._fail_waiters(lambda: StoreUnavailableError(message))
        except StoreError as exc:
            if not waiter.future.done():
                waiter.future.set_exception(exc)
            return ["failed"]
        return None

    async def _claim_direct(self, waiter: _Waiter, *, more: bool) -> list[str]:
        """
        The claim script on the reader's connection; any trouble hands the
        claim back to the pump (which knows how to retry).
        """
        sha = self._link.sha("claim")
        if sha is None:
            raise _Fallback
        keys, args = self._claim_args(
            waiter, _mode(waiter), more=more, offer=True
        )
        track_id = waiter.state.track_id
        # Closing cuts this connection: a claim whose answer is lost then
        # stays here, and is undone (see aclose). On a connection error the
        # pump sends it again, with the same nonce: a win is recognised.
        self._claiming[track_id] = waiter
        run = self._reader.execute_command
        try:
            reply: list[str] = await run(  # type: ignore[no-untyped-call]
                "EVALSHA", sha, len(keys), *keys, *args
            )
        except (rex.RedisError, OSError):
            self._claiming.pop(track_id, None)
            raise _Fallback from None
        self._claiming.pop(track_id, None)
        self._answered(waiter, reply)
        return reply

    def _fail_waiters(self, error: Callable[[], Exception]) -> None:
        waiters, self._queue = self._queue, collections.deque()
        for waiter in waiters:
            self._unhold(waiter)
            if not waiter.future.done():
                # One error each: a shared one would collect every
                # waiter's traceback.
                waiter.future.set_exception(error())
        self._pass_held()

    def _unhold(self, waiter: _Waiter) -> None:
        """
        A claim leaves the line without taking its held slot: the next
        one takes it.
        """
        if waiter.held:
            self._held.appendleft(waiter.held)
            waiter.held = ""

    def _pass_held(self) -> None:
        """
        Pass on every held slot no claim here waits for.
        """
        if self._waiting():
            return
        if self._trying:
            # A claim on its way may come back full: it takes one.
            self._owed = self._owed or bool(self._held)
            return
        while self._held:
            self._kick()

    def _poke_later(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay, self._poke.set)

    def _waiting(self) -> bool:
        return any(not w.future.done() for w in self._queue)

    def _on_wake(self) -> None:
        """
        A freed slot was handed to this journal.
        """
        self.counts["wakes"] += 1
        if self._waiting():
            self._poke.set()
        elif self._trying:
            # A claim on its way may come back full: it takes this turn.
            self._owed = True
        elif self._held:
            self._pass_held()
        else:
            self._kick()

    def _kick_if_owed(self) -> None:
        if self._owed and not self._trying and not self._waiting():
            self._owed = False
            self._kick()
            self._pass_held()

    def _kick(self) -> None:
        """
        Pass on a wake-up nobody here needs, and the slot held for it.
        """
        held = self._held.popleft() if self._held else ""
        if self._cap is None or self._closed:
            return
        passed = self._link.send(
            (self._prefix + "slots",),
            (*self._base(), self._cap, held),
            script="kick",
            patient=True,
        )
        passed.add_done_callback(self._woke)

    def _woke(self, done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and done.exception() is None:
            self._on_woke(done.result())

    def _on_woke(self, woke: str | list[str]) -> None:
        # A script that freed a slot hands it to the first waiting journal:
        # grants its offer, or holds the slot for it. When that is this
        # one, no stream entry is written: act here.
        for held in [woke] if isinstance(woke, str) else woke:
            if held.startswith("="):
                nonce, _, track_id = held[1:].partition(":")
                self._granted(track_id, nonce)
            elif held.startswith(self._mark) and not self._closed:
                self._held.append(held)
                self._on_wake()

    def _granted(self, track_id: str, nonce: str) -> None:
        """
        A freed slot's script granted this journal's offer: the claim
        *nonce* of *track_id* won, its record and slot written.
        """
        self.counts["grants"] += 1
        self._offers.pop(nonce, None)
        if nonce in self._foreseen:
            self._foreseen.discard(nonce)
            return
        waiter = self._claims.get(nonce)
        if waiter is not None and not waiter.future.done():
            waiter.granted = True
            self._own(waiter)
            waiter.future.set_result(None)
            if self._waiting():
                # The next in line leaves its own offer.
                self._poke.set()
            return
        if waiter is not None and _won(waiter.future):
            # Its own claim won it first (a retry that found the grant).
            return
        # The claim left (cancelled, failed, closed) before its grant.
        self._forget(track_id, nonce)

    # --- background: heartbeat, inbox ---------------------------------------

    async def _renew(self) -> None:
        period = self._store.lease / 3
        delay = period
        while not self._closed:
            await asyncio.sleep(delay)
            delay = period
            with contextlib.suppress(StoreError):
                adopted = await self._heartbeat(
                    adopt=self._deliver is not None
                )
                for state in adopted:
                    self._hand(state)
                if self._lapse is not None:
                    # Another journal stopped renewing: come back for its
                    # jobs as their leases lapse, not up to a third of a
                    # lease later.
                    delay = max(
                        period / _LAPSE_FLOOR,
                        min(period, self._lapse + _LAPSE_MARGIN),
                    )
            if self._waiting():
                # A lost wake-up's safety net, not the way waiters wake.
                self.counts["fallbacks"] += 1
                self._poke.set()

    async def _heartbeat(self, *, adopt: bool) -> list[JobState]:
        """
        Renew, adopt, restore: see ``ADOPT``. Returns the jobs adopted.
        """
        self.counts["heartbeats"] += 1
        cap = -1 if self._cap is None else self._cap
        owned = list(self._owned)
        reply = await self._link.call(
            (self._prefix + "slots",),
            (
                *self._base(),
                self._lease_ms,
                self._read_to,
                _ADOPT_BATCH if adopt else 0,
                cap,
                *owned,
            ),
            script="adopt",
        )
        missing, lost, texts, woke, soon = reply
        # Slots held for this journal first: nothing below may lose them.
        self._on_woke(woke)
        self._lapse = None if int(soon) < 0 else int(soon) / 1000
        for track_id in lost:
            # Another journal adopted it (we were away past our lease): it
            # finishes the job now; two watchers would be harmless, but
            # renewing would steal it back and forth.
            self._owned.pop(track_id, None)
        if missing:
            await self._restore(missing)
        adopted = []
        for text in texts:
            state = load_state(text)
            self._owned[state.track_id] = _Owned(
                text, state.phase.value, "", self._hook(state.webhook_id)
            )
            adopted.append(state)
        return adopted

    async def _restore(self, missing: Sequence[str]) -> None:
        args: list[Any] = []
        for track_id in missing:
            owned = self._owned.get(track_id)
            if owned is not None:
                args += [
                    track_id,
                    owned.text,
                    owned.phase,
                    owned.nonce,
                    owned.hook,
                ]
        if args:
            log.warning(
                "Redis lost %d journaled jobs (a restart without "
                "persistence?); putting them back",
                len(args) // 5,
            )
            await self._link.call(
                (self._prefix + "slots",),
                (*self._base(), self._lease_ms, *args),
                script="restore",
            )

    async def _read(self) -> None:
        """
        Read this journal's inbox from where it left off, for ever.

        A stream, not Pub/Sub: entries written while the connection was
        down are read when it is back. Read through a consumer group, so
        the server knows what it handed over (``ADOPT`` asks whether a
        dead journal ever read a grant); what was handed over and not
        acted on (a reply lost with its connection) is read again first,
        and what was acted on is acknowledged with the next read.
        """
        delay = _BACKOFF_FIRST
        last = "0-0"
        backlog = True
        acted: list[str] = []
        while not self._closed:
            try:
                reply = await self._next_entries(
                    last if backlog else ">", acted
                )
            except _UNREACHABLE:
                backlog = True
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            except rex.ResponseError as exc:
                # The inbox is gone (Redis lost it, or it expired): make it
                # again; anything else is worth a warning, not a dead reader.
                backlog, acted = True, []
                if "NOGROUP" not in str(exc):
                    log.warning("reading the inbox failed: %s", str(exc))
                    await asyncio.sleep(_BACKOFF_MAX)
                with contextlib.suppress(*_UNREACHABLE, rex.ResponseError):
                    await self._make_inbox(self._reader)
                continue
            delay = _BACKOFF_FIRST
            entries = _entries(reply)
            acted = [entry_id for entry_id, _ in entries]
            backlog = backlog and len(entries) == _READ_COUNT
            woken = False
            for entry_id, fields in entries:
                last = entry_id
                woken = self._take(fields) or woken
            self._read_to = last if last != "0-0" else ""
            if woken:
                await self._serve_now()

    async def _next_entries(self, at: str, acted: list[str]) -> Any:
        """
        Acknowledge *acted* and read on from *at* (``>``: new entries),
        in one round trip.
        """
        streams: dict[KeyT, StreamIdT] = {self._inbox: at}
        if not acted:
            return await self._reader.xreadgroup(
                _GROUP, _GROUP, streams, count=_READ_COUNT, block=_BLOCK_MS
            )
        async with self._reader.pipeline(transaction=False) as pipe:
            pipe.xack(self._inbox, _GROUP, *acted)
            pipe.xreadgroup(
                _GROUP, _GROUP, streams, count=_READ_COUNT, block=_BLOCK_MS
            )
            _, reply = await pipe.execute()
        return reply

    async def _make_inbox(self, redis: Redis) -> None:
        """
        Create the inbox stream and its reader's group, if need be.
        """
        try:
            await redis.xgroup_create(
                self._inbox, _GROUP, id="0", mkstream=True
            )
        except rex.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _take(self, fields: dict[str, str]) -> bool:
        """
        Act on one inbox entry; whether it was a wake-up.
        """
        kind = fields.get("k")
        if kind == "w":
            held = fields.get("r")
            if held:
                self._held.append(held)
            return True
        if kind == "g":
            track_id, nonce = fields.get("t"), fields.get("n")
            if track_id is not None and nonce is not None:
                self._granted(track_id, nonce)
            return False
        if kind == "s":
            try:
                state = load_state(fields["s"])
            except (StoreError, KeyError):
                log.warning("an unreadable inbox entry was skipped")
                return False
            self.counts["delivered"] += 1
            self._hand(state)
        return False

    def _hand(self, state: JobState) -> None:
        if self._deliver is None:
            self._undelivered.append(state)
            return
        try:
            self._deliver(state)
        except Exception:
            log.exception("the journal's listener failed")

    # --- keys ---------------------------------------------------------------

    def _base(self) -> tuple[Any, ...]:
        return (self._prefix, self._retention_ms, self._me)

    def _job(self, track_id: str) -> str:
        return f"{self._prefix}job:{track_id}"

    def _hook(self, webhook_id: str | None) -> str:
        return "" if webhook_id is None else f"{self._prefix}hook:{webhook_id}"

    def _shut(self) -> bool:
        # A method, not the attribute: it may change while a call waits.
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            msg = "the journal is closed"
            raise ClientStateError(msg)


def _entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """
    The entries of an XREADGROUP reply, RESP2 (lists) or RESP3 (a
    mapping).
    """
    if not reply:
        return []
    streams = (
        reply.values()
        if isinstance(reply, dict)
        else [entries for _, entries in reply]
    )
    found = []
    for entries in streams:
        for entry in entries:
            entry_id, fields = entry[0], entry[1]
            found.append((entry_id, dict(fields)))
    return found


def _mode(waiter: _Waiter) -> str:
    """
    How a waiting claim is sent: "next" takes the slot a wake-up held for
    this journal (and, if it is gone, keeps the journal first in line).
    """
    return "next" if waiter.held else "try"


def _won(done: asyncio.Future[Any]) -> bool:
    """
    Whether a claim's reply (or a waiter's grant) is a won slot.
    """
    if not done.done() or done.cancelled() or done.exception() is not None:
        return False
    reply = done.result()
    return reply is None or (isinstance(reply, list) and reply[0] == "won")


def _quiet(done: asyncio.Future[Any]) -> None:
    # Best-effort calls: their failure is harmless, but must be retrieved.
    if not done.cancelled():
        done.exception()
