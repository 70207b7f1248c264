"""
One replica of an application on a shared account: a client process for
the many-processes tests and benchmark.

``replica.py --base-url URL --redis URL [options]`` opens
``Client(max_queued=..., store=RedisStore(...))`` with its own event loop,
prints ``{"ready": ...}`` once the client is open, then (mode ``batch``)
runs its jobs with ``generate_many`` or one at a time, optionally waits
for every job it adopted (``--drain``), and prints one last JSON line
with every outcome and the journal's timestamps; or (mode ``serve``)
serves webhooks for the account until its standard input closes.

Every timestamp is ``time.monotonic()``: the same clock in every process
on Linux, so a test or a benchmark can compare them across processes.
The journal is wrapped (the store protocol is public) to stamp when each
slot was taken and given back and when each job was handed over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time

from collections.abc import Callable
from typing import Any

from modelslab_async import (
    Client,
    JobHandle,
    JobPhase,
    JobState,
    Text2Img,
    WebhookReceiver,
)
from modelslab_async.errors import ModelsLabError
from modelslab_async.stores import JobStore, Journal, MemoryStore, RedisStore


KEY = "test-key-5d41402abc4b2a76"


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)  # noqa: T201 (the worker's output)


class Stamps:
    """
    What the journal saw, when: claims, settles and jobs handed over.
    """

    def __init__(self) -> None:
        #: track_id, when the claim began, when it returned, whether won.
        self.claims: list[tuple[str, float, float, bool]] = []
        #: track_id, phase, when the slot was given back.
        self.settles: list[tuple[str, str, float]] = []
        #: track_id, phase, when: unfinished jobs handed to this process.
        self.adopted: list[tuple[str, str, float]] = []
        #: track_id, when: outcomes recorded by another process.
        self.heard: list[tuple[str, float]] = []


class StampedStore:
    """
    A store whose journals stamp what they do.
    """

    def __init__(self, store: JobStore, stamps: Stamps) -> None:
        self.store = store
        self.stamps = stamps
        self.journal: Journal | None = None

    async def open(self, account: str, *, max_queued: int | None) -> Journal:
        journal = await self.store.open(account, max_queued=max_queued)
        self.journal = journal
        return StampedJournal(journal, self.stamps)

    def usage(self) -> dict[str, Any]:
        """
        Round trips on the command connection, and what the journal
        counted (wake-ups, heartbeats, inbox deliveries).
        """
        return {
            "round_trips": getattr(self.journal, "round_trips", None),
            "counts": dict(getattr(self.journal, "counts", {})),
        }


class StampedJournal:
    """
    A journal that notes the time of each claim, settle and hand-over.
    """

    def __init__(self, journal: Journal, stamps: Stamps) -> None:
        self.journal = journal
        self.stamps = stamps

    @property
    def held(self) -> int:
        return self.journal.held

    async def claim(self, state: JobState) -> JobState | None:
        began = time.monotonic()
        known = await self.journal.claim(state)
        self.stamps.claims.append(
            (state.track_id, began, time.monotonic(), known is None)
        )
        return known

    async def record(self, state: JobState) -> JobState:
        return await self.journal.record(state)

    def settle(self, state: JobState) -> None:
        self.stamps.settles.append(
            (state.track_id, state.phase.value, time.monotonic())
        )
        self.journal.settle(state)

    async def abandon(self, track_id: str) -> None:
        await self.journal.abandon(track_id)

    async def get(self, track_id: str) -> JobState | None:
        return await self.journal.get(track_id)

    async def find(self, webhook_id: str) -> JobState | None:
        return await self.journal.find(webhook_id)

    async def adopt(self) -> list[JobState]:
        adopted = await self.journal.adopt()
        now = time.monotonic()
        self.stamps.adopted += [
            (state.track_id, state.phase.value, now) for state in adopted
        ]
        return adopted

    def listen(self, deliver: Callable[[JobState], object]) -> None:
        def stamped(state: JobState) -> object:
            now = time.monotonic()
            if state.phase.is_finished:
                self.stamps.heard.append((state.track_id, now))
            else:
                self.stamps.adopted.append(
                    (state.track_id, state.phase.value, now)
                )
            return deliver(state)

        self.journal.listen(stamped)

    async def aclose(self) -> None:
        await self.journal.aclose()


def _receiver(args: argparse.Namespace) -> WebhookReceiver | None:
    if args.serve_webhooks is not None:
        return WebhookReceiver(port=args.serve_webhooks, grace=args.grace)
    if args.webhook_url is not None:
        return WebhookReceiver(
            public_url=args.webhook_url, serve=False, grace=args.grace
        )
    return None


def _requests(args: argparse.Namespace) -> list[Text2Img]:
    numbers = list(range(args.first, args.first + args.count))
    if args.shuffle is not None:
        random.Random(args.shuffle).shuffle(numbers)  # noqa: S311 (an order)
    return [
        Text2Img(prompt=f"job {n}", track_id=f"{args.prefix}{n}")
        for n in numbers
    ]


def _outcome(track_id: str | None, **fields: Any) -> dict[str, Any]:
    return {"track_id": track_id, "done": time.monotonic(), **fields}


async def _batch(client: Client, args: argparse.Namespace) -> list[Any]:
    requests = _requests(args)
    outcomes: list[dict[str, Any]] = []
    if args.sequential:
        for request in requests:
            try:
                result = await client.generate(request, timeout=args.timeout)
            except ModelsLabError as exc:
                outcomes.append(
                    _outcome(request.track_id, ok=False, error=repr(exc))
                )
            else:
                outcomes.append(
                    _outcome(request.track_id, ok=True, id=result.id)
                )
        return outcomes
    return [
        _outcome(
            item.request.track_id,
            ok=item.ok,
            id=None if item.result is None else item.result.id,
            error=None if item.error is None else repr(item.error),
        )
        async for item in client.generate_many(
            requests, timeout=args.timeout, concurrency=args.concurrency
        )
    ]


async def _drain(client: Client, args: argparse.Namespace) -> list[Any]:
    """
    Finish every job this process watches, adopted ones included, until
    standard input closes: a dead replica's jobs are handed over when its
    lease lapses, and the test knows when they are all finished.
    """
    drained: list[dict[str, Any]] = []
    waiting: set[JobHandle] = set()

    async def finish(job: JobHandle) -> None:
        # An uncertain job has no id: only its webhook can settle it, and
        # none comes if its submit never reached the server.
        uncertain = job.phase is JobPhase.UNCERTAIN
        try:
            await job.wait(args.uncertain_wait if uncertain else args.timeout)
        except ModelsLabError as exc:
            drained.append(_outcome(job.track_id, ok=False, error=repr(exc)))
        else:
            drained.append(_outcome(job.track_id, ok=True, id=job.id))

    stop = asyncio.ensure_future(_until_stdin_closes())
    async with asyncio.TaskGroup() as group:
        while not stop.done():
            for job in await client.unfinished():
                if job not in waiting:
                    waiting.add(job)
                    group.create_task(finish(job))
            await asyncio.wait([stop], timeout=0.05)
    return drained


async def _until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


async def _line() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)


async def main(args: argparse.Namespace) -> None:
    stamps = Stamps()
    inner: JobStore = (
        MemoryStore()
        if args.redis == "memory"
        else RedisStore(args.redis, lease=args.lease)
    )
    store = StampedStore(inner, stamps)
    receiver = _receiver(args)
    async with contextlib.AsyncExitStack() as stack:
        if receiver is not None and args.serve_webhooks is not None:
            # Listening from the start, as a replica behind a load
            # balancer must: callbacks of other replicas' jobs may come
            # before this one submits anything.
            await stack.enter_async_context(receiver)
        client = await stack.enter_async_context(
            Client(
                KEY,
                base_url=args.base_url,
                store=store,
                max_queued=args.max_queued,
                webhooks=receiver,
                job_timeout=args.timeout,
            )
        )
        # Opened (journal, receiver bound) before the test goes on.
        await client.unfinished()
        say(ready=time.monotonic(), wall=time.time(), name=args.name)
        outcomes: list[Any] = []
        drained: list[Any] = []
        if args.mode == "serve":
            await _until_stdin_closes()
        else:
            if args.wait_go:
                await _line()
            outcomes = await _batch(client, args)
            if args.drain:
                drained = await _drain(client, args)
        left = [job.track_id for job in await client.unfinished()]
    say(
        name=args.name,
        outcomes=outcomes,
        drained=drained,
        unfinished=left,
        claims=stamps.claims,
        settles=stamps.settles,
        adopted=stamps.adopted,
        heard=stamps.heard,
        redis=store.usage(),
        closed=time.monotonic(),
    )


def parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(prog="replica.py")
    options.add_argument("--base-url", required=True)
    options.add_argument(
        "--redis",
        required=True,
        help="a redis:// URL, or 'memory' for a MemoryStore",
    )
    options.add_argument("--name", default="replica")
    options.add_argument("--mode", choices=["batch", "serve"], default="batch")
    options.add_argument("--count", type=int, default=0)
    options.add_argument("--first", type=int, default=0)
    options.add_argument("--prefix", default="job-")
    options.add_argument("--shuffle", type=int, help="seed of the order")
    options.add_argument("--max-queued", type=int, default=5)
    options.add_argument("--lease", type=float, default=10.0)
    options.add_argument("--concurrency", type=int)
    options.add_argument(
        "--sequential", action="store_true", help="one job at a time"
    )
    options.add_argument(
        "--wait-go",
        action="store_true",
        help="start the batch on a line from standard input",
    )
    options.add_argument("--timeout", type=float, default=60.0)
    options.add_argument(
        "--drain",
        action="store_true",
        help="then finish adopted jobs until standard input closes",
    )
    hooks = options.add_mutually_exclusive_group()
    hooks.add_argument("--serve-webhooks", type=int, metavar="PORT")
    hooks.add_argument(
        "--webhook-url", help="callbacks go there; this replica serves none"
    )
    options.add_argument("--grace", type=float, default=5.0)
    options.add_argument(
        "--uncertain-wait",
        type=float,
        default=5.0,
        help="seconds a drained uncertain job waits for its webhook",
    )
    options.add_argument(
        "--deadline", type=float, default=120.0, help="seconds, whatever"
    )
    return options


def run() -> None:
    args = parser().parse_args()

    async def bounded() -> None:
        async with asyncio.timeout(args.deadline):
            await main(args)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(bounded())


if __name__ == "__main__":
    run()
