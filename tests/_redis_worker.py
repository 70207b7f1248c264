"""
``python tests/_redis_worker.py MODE JSON``: one OS process with its own
event loop, on a RedisStore, for the multi-process tests.

It prints one JSON line when it is ready (``{"ready": ...}``) where a mode
waits to be killed, and one JSON line with its results at the end.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

from typing import Any

import redis.asyncio

from modelslab_async._state import JobPhase, JobState
from modelslab_async.stores import RedisStore


ACCOUNT = "acct-test"


def state(track_id: str, phase: JobPhase, **fields: Any) -> JobState:
    """
    A job record as a client would journal it.
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


def say(data: dict[str, Any]) -> None:
    """
    One JSON line to the test.
    """
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def claims(args: dict[str, Any]) -> None:
    """
    Claim every track_id (in a shuffled order): who won each?
    """
    store = RedisStore(args["url"])
    journal = await store.open(ACCOUNT, max_queued=args.get("cap"))
    name = args["name"]
    ids = list(args["track_ids"])
    random.shuffle(ids)

    async def one(track_id: str) -> tuple[str, str]:
        known = await journal.claim(
            state(track_id, JobPhase.SUBMITTING, message=name)
        )
        if known is None:
            journal.settle(state(track_id, JobPhase.SUCCEEDED, message=name))
            return track_id, name
        return track_id, str(known.message)

    try:
        winners = dict(await asyncio.gather(*(one(t) for t in ids)))
    finally:
        await journal.aclose()
    say({"winners": winners})


async def hammer(args: dict[str, Any]) -> None:
    """
    Claim and settle jobs; count the account's holders at every grant.
    """
    store = RedisStore(args["url"], lease=args.get("lease", 10.0))
    journal = await store.open(ACCOUNT, max_queued=args["cap"])
    counter = redis.asyncio.Redis.from_url(args["url"])
    seen = 0
    name = args["name"]
    queue = list(range(args["jobs"]))

    async def worker() -> None:
        nonlocal seen
        while queue:
            track_id = f"{name}-{queue.pop()}"
            await journal.claim(state(track_id, JobPhase.SUBMITTING))
            holders = await counter.incr("test:holders")
            seen = max(seen, holders)
            await asyncio.sleep(random.uniform(0.0, args["hold"]))  # noqa: S311
            # Counted out before the slot is given back, never after.
            await counter.decr("test:holders")
            journal.settle(state(track_id, JobPhase.SUCCEEDED))

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(args["concurrency"])))
        elapsed = time.perf_counter() - started
    finally:
        await journal.aclose()
        await counter.aclose()
    say({"max_holders": seen, "jobs": args["jobs"], "seconds": elapsed})


async def hold(args: dict[str, Any]) -> None:
    """
    Claim jobs, journal them queued, then wait to be killed.
    """
    store = RedisStore(args["url"], lease=args["lease"])
    journal = await store.open(ACCOUNT, max_queued=args.get("cap"))
    for track_id in args["track_ids"]:
        await journal.claim(state(track_id, JobPhase.SUBMITTING))
        await journal.record(
            state(track_id, JobPhase.QUEUED, job_id=f"job-{track_id}")
        )
    say({"ready": time.time(), "held": journal.held})
    try:
        await asyncio.sleep(args.get("linger", 3600))
    finally:
        await journal.aclose()
    say({"closed": True})


async def wait_for_slot(args: dict[str, Any]) -> None:
    """
    Claim a slot (the account is full): report when and how it was woken
    (with ``hang``, then wait to be killed).
    """
    store = RedisStore(args["url"], lease=args.get("lease", 10.0))
    journal = await store.open(ACCOUNT, max_queued=args["cap"])
    adopted: list[str] = []
    journal.listen(lambda job: adopted.append(job.track_id))
    try:
        claim = asyncio.ensure_future(
            journal.claim(state(args["track_id"], JobPhase.SUBMITTING))
        )
        await asyncio.sleep(0.2)
        say({"ready": time.time(), "waiting": not claim.done()})
        try:
            await asyncio.wait_for(claim, args["within"])
            granted = time.time()
        except TimeoutError:
            granted = None
        counts = dict(journal.counts)
        if args.get("hang"):
            # Granted, and killed before sending anything: the test's cue.
            say({"granted": granted, "counts": counts})
            await asyncio.Event().wait()
    finally:
        await journal.aclose()
    say({"granted": granted, "counts": counts, "adopted": adopted})


MODES = {
    "claims": claims,
    "hammer": hammer,
    "hold": hold,
    "wait_for_slot": wait_for_slot,
}


def main() -> None:
    """
    Run one mode with its JSON arguments.
    """
    mode, args = sys.argv[1], json.loads(sys.argv[2])
    asyncio.run(MODES[mode](args))


if __name__ == "__main__":
    main()
