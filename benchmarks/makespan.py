"""
Batch time against the queue cap: how close a batch comes to the fastest
any client could finish it, and how long a freed slot sits idle.

An account may queue ``cap`` jobs (5 on pay-as-you-go), so no client can
finish N jobs faster than the **cap-bound limit**: the jobs' summed real
durations divided by the cap, and never less than the longest job. Every
moment between a job being ready and its slot being used again is lost.
So per contender, with the real durations taken from the emulator's own
per-job times::

    efficiency = max(sum(durations) / cap, max(durations)) / wall time

Cases (a fresh emulator in its own process for each, ``--queue-limit`` at
the cap, the nominal eta announced): durations uniform in ``eta`` ± 30 %
(an honest but noisy eta); always 20 % over the eta (``--eta-bias 0.2``)
with the same noise; and always 20 % over, no noise.

Contenders, all at once on one emulator, each on an API key (an account)
of its own, their starts staggered over one eta so their jobs do not end in
step, ``jobs`` jobs each:

- ``generate_many`` and ``asyncio.gather`` of ``generate()`` on
  ``Client(max_queued=cap)``, polling only and with a
  :class:`~modelslab_async.WebhookReceiver`;
- the command line, ``modelslab-async generate -f PROMPTS --max-queued
  CAP --json`` in its own process (it polls): wall time from starting the
  process to its exit, and seen when its JSON line for the job arrives
  (after the image is saved);
- raw aiohttp, ``cap`` workers that submit, then sleep and fetch every
  0.5 s (Replicate's default) or 0.1 s (fal's) until the job is done;
- modelslab-py's async client, **computed, not run**: it fetches at once,
  then every 60 s (``BaseAPI.async_fetch``), so every job of a few seconds
  costs a minute of its slot and a real run would take about 40 minutes.
  Its figures apply that schedule (and a semaphore of ``cap``, which it
  does not have) to the real durations of the jobs measured here.

Per contender: efficiency, fetches per job (counted by the emulator), the
delay from ready to seen as a share of the job's duration, 429s answered,
and the idle time per hand-off: from a job's ready time to the arrival of
the submit that took its slot (both on the emulator's clock).

**Idle cap in one process**: then, with nothing else in the process, each
of our four ways runs a short batch with its ``Client`` instrumented from
outside: a :class:`~modelslab_async.stores.JobStore` that wraps the default
one and stamps when a job is settled (the client saw it end: its slot is
freed) and when a waiting claim gets a slot, and an aiohttp session with a
``TraceConfig`` (``Client(session=...)``) that stamps when each submit's
body has been written. Per hand-off: from the settle to the next submit
leaving. No package code is patched.

Every stamp is ``time.monotonic()``, one clock for every process on Linux.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
import attrs

from modelslab_async import Client, JobState, Text2Img
from modelslab_async.stores import JobStore, Journal, MemoryStore
from modelslab_async.webhooks import WebhookReceiver

from . import report
from ._common import ROOT, EmulatorProcess, emulator_process, percentile
from .report import Target


_SUBMIT: Final = "v6/images/text2img"
_FETCH: Final = "v6/images/fetch/"
PEER_INTERVAL: Final = 60.0
#: Issue 13's targets.
WEBHOOK_EFFICIENCY: Final = 0.97
POLLING_EFFICIENCY: Final = 0.93
FETCHES: Final = 1.3
DELAY: Final = 0.04
IDLE_MS: Final = 1.0

MANY_POLL: Final = "generate_many, polling"
MANY_HOOKS: Final = "generate_many, webhooks"
GATHER_POLL: Final = "gather, polling"
GATHER_HOOKS: Final = "gather, webhooks"
CLI: Final = "command line (polls)"
PEER: Final = "modelslab-py (computed)"
#: Ours, by how it waits.
POLLING: Final = (MANY_POLL, GATHER_POLL, CLI)
WEBHOOKS: Final = (MANY_HOOKS, GATHER_HOOKS)


def raw_label(interval: float) -> str:
    return f"raw aiohttp, every {interval:g} s"


@attrs.frozen
class Case:
    name: str
    eta_error: float
    eta_bias: float


@attrs.frozen
class Settings:
    jobs: int
    cap: int
    eta: float
    cases: tuple[Case, ...]
    intervals: tuple[float, ...]
    #: The idle-cap runs: jobs per way, their eta and noise.
    idle_jobs: int
    idle_eta: float
    seed: int = 13


CASES: Final = (
    Case("eta ±30 %", 0.3, 0.0),
    Case("20 % optimistic, ±30 %", 0.3, 0.2),
    Case("20 % optimistic, no noise", 0.0, 0.2),
)
#: An eta of 2 s, as the polling benchmark: a case takes about 90 s at
#: cap 5, and loopback latency (a millisecond or two) stays under 0.1 %
#: of a job.
FULL: Final = Settings(
    jobs=200,
    cap=5,
    eta=2.0,
    cases=CASES,
    intervals=(0.5, 0.1),
    idle_jobs=200,
    idle_eta=0.25,
)
QUICK: Final = Settings(
    jobs=6,
    cap=2,
    eta=0.1,
    cases=CASES,
    intervals=(0.05,),
    idle_jobs=6,
    idle_eta=0.05,
)


# --- what a contender reports -------------------------------------------


@attrs.define
class Batch:
    """
    One contender's batch, as the contender saw it.
    """

    key: str
    started: float = 0.0
    ended: float = 0.0
    #: Job id to when the contender saw it done.
    seen: dict[str, float] = attrs.field(factory=dict)
    #: The command line's whole run, process start to exit.
    process: tuple[float, float] | None = None


Contender = Callable[[EmulatorProcess, str, Settings], Awaitable[Batch]]


def _request(key: str, number: int) -> Text2Img:
    return Text2Img(prompt=f"makespan {key} {number}")


def _ours(*, many: bool, webhooks: bool) -> Contender:
    async def run(
        emulator: EmulatorProcess, key: str, settings: Settings
    ) -> Batch:
        batch = Batch(key)
        receiver = WebhookReceiver() if webhooks else None
        async with Client(
            key,
            base_url=emulator.url,
            max_queued=settings.cap,
            webhooks=receiver,
        ) as client:
            requests = [_request(key, n) for n in range(settings.jobs)]
            batch.started = time.monotonic()
            if many:
                async for item in client.generate_many(requests):
                    if not item.ok:
                        raise item.error
                    batch.seen[str(item.result.id)] = time.monotonic()
            else:

                async def one(request: Text2Img) -> None:
                    result = await client.generate(request)
                    batch.seen[str(result.id)] = time.monotonic()

                await asyncio.gather(*map(one, requests))
            batch.ended = time.monotonic()
        return batch

    return run


def _raw(interval: float) -> Contender:
    async def run(
        emulator: EmulatorProcess, key: str, settings: Settings
    ) -> Batch:
        batch = Batch(key)
        numbers = iter(range(settings.jobs))
        async with aiohttp.ClientSession() as session:

            async def post(path: str, body: dict[str, Any]) -> Any:
                async with session.post(emulator.url + path, json=body) as r:
                    return await r.json()

            async def worker() -> None:
                # One worker per queue slot: the cap kept the plain way.
                for number in numbers:
                    body = {
                        "key": key,
                        "model_id": "flux",
                        "prompt": f"makespan {key} {number}",
                    }
                    answer = await post(_SUBMIT, body)
                    job_id = str(answer["id"])
                    while answer["status"] == "processing":
                        await asyncio.sleep(interval)
                        answer = await post(_FETCH + job_id, {"key": key})
                    if answer["status"] != "success":
                        msg = f"raw job {job_id}: {answer}"
                        raise RuntimeError(msg)
                    batch.seen[job_id] = time.monotonic()

            batch.started = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(settings.cap)))
            batch.ended = time.monotonic()
        return batch

    return run


async def _cli(
    emulator: EmulatorProcess, key: str, settings: Settings
) -> Batch:
    batch = Batch(key)
    with tempfile.TemporaryDirectory(prefix="bench-makespan-") as temp:
        folder = Path(temp)
        prompts = folder / "prompts.txt"
        prompts.write_text(
            "".join(f"makespan {key} {n}\n" for n in range(settings.jobs)),
            encoding="utf-8",
        )
        # stderr to a file: never a pipe that fills up.
        with (folder / "stderr.txt").open("wb") as errors:
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "modelslab_async",
                "generate",
                "-f",
                str(prompts),
                "--out",
                str(folder / "out"),
                "--max-queued",
                str(settings.cap),
                "--base-url",
                emulator.url,
                "--json",
                "-q",
                cwd=ROOT,
                env={**os.environ, "MODELSLAB_API_KEY": key},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=errors,
            )
            assert process.stdout is not None  # noqa: S101 (PIPE asked)
            async for line in process.stdout:
                entry = json.loads(line)
                if entry["status"] != "success":
                    msg = f"the command line's job failed: {entry}"
                    raise RuntimeError(msg)
                batch.seen[str(entry["job_id"])] = time.monotonic()
            await process.wait()
            ended = time.monotonic()
        if process.returncode != 0:
            tail = (folder / "stderr.txt").read_text(errors="replace")
            msg = f"the command line exited {process.returncode}: {tail}"
            raise RuntimeError(msg)
    batch.started, batch.ended = started, ended
    batch.process = (started, ended)
    return batch


def _contenders(settings: Settings) -> dict[str, Contender]:
    return {
        MANY_POLL: _ours(many=True, webhooks=False),
        MANY_HOOKS: _ours(many=True, webhooks=True),
        GATHER_POLL: _ours(many=False, webhooks=False),
        GATHER_HOOKS: _ours(many=False, webhooks=True),
        CLI: _cli,
        **{raw_label(i): _raw(i) for i in settings.intervals},
    }


# --- figures --------------------------------------------------------------


def _limit(durations: Sequence[float], cap: int) -> float:
    return max(sum(durations) / cap, *durations)


def _handoff_idle(jobs: Sequence[dict[str, Any]], cap: int) -> list[float]:
    """
    Per hand-off, seconds from a job's ready time to the arrival of the
    submit that took a slot after it.

    The (cap + k)-th submit can only arrive after k jobs have ended (the
    cap), so pairing the k-th earliest end with it never goes negative,
    and the sum is exactly the slot time lost between jobs.
    """
    ends = sorted(job["ready_at"] for job in jobs)
    starts = sorted(job["created"] for job in jobs)[cap:]
    return [
        max(0.0, start - end) for start, end in zip(starts, ends, strict=False)
    ]


def _figures(
    batch: Batch, jobs: Sequence[dict[str, Any]], settings: Settings
) -> dict[str, Any]:
    durations = [job["ready_at"] - job["created"] for job in jobs]
    shares, delays = [], []
    for job, duration in zip(jobs, durations, strict=True):
        delay = max(0.0, batch.seen[job["id"]] - job["ready_at"])
        delays.append(delay)
        shares.append(delay / duration)
    fetches = [len(job["fetch_times"]) for job in jobs]
    limit = _limit(durations, settings.cap)
    wall = batch.ended - batch.started
    idle = _handoff_idle(jobs, settings.cap)
    once = [
        share
        for share, count in zip(shares, fetches, strict=True)
        if count == 1
    ]
    figures: dict[str, Any] = {
        "jobs": len(jobs),
        "limit_s": limit,
        "wall_s": wall,
        "efficiency": limit / wall,
        # Jobs the first fetch found done, and how late those were seen:
        # the two halves of what a polling schedule trades.
        "done_at_first_fetch": len(once) / len(jobs),
        "delay_share_median_first_fetch": (
            statistics.median(once) if once else None
        ),
        "fetches_mean": statistics.fmean(fetches),
        "fetches_median": statistics.median(fetches),
        "fetches_max": max(fetches),
        "delay_share_median": statistics.median(shares),
        "delay_share_p90": percentile(shares, 0.9),
        "delay_s_median": statistics.median(delays),
        "idle_ms_median": _ms(statistics.median(idle) if idle else None),
        "idle_ms_mean": _ms(statistics.fmean(idle) if idle else None),
        "idle_share": sum(idle) / (settings.cap * wall),
    }
    if batch.process is not None:
        # From the first submit's arrival: the run without the start-up
        # (interpreter, imports, the free check of the key).
        first = min(job["created"] for job in jobs)
        figures["startup_s"] = first - batch.process[0]
        figures["efficiency_from_first_submit"] = limit / (
            batch.process[1] - first
        )
    return figures


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _peer(
    jobs: Sequence[dict[str, Any]], settings: Settings
) -> dict[str, Any]:
    """
    modelslab-py's schedule applied to real durations: a fetch at once,
    then one every 60 s; ``cap`` jobs at a time, each slot taken again as
    soon as its job is seen done.
    """
    durations = [job["ready_at"] - job["created"] for job in jobs]
    held = [
        math.ceil(duration / PEER_INTERVAL) * PEER_INTERVAL
        for duration in durations
    ]
    slots = [0.0] * settings.cap
    for hold in held:
        slot = min(range(settings.cap), key=slots.__getitem__)
        slots[slot] += hold
    wall = max(slots)
    late = [
        hold - duration for hold, duration in zip(held, durations, strict=True)
    ]
    shares = [
        delay / duration
        for delay, duration in zip(late, durations, strict=True)
    ]
    fetches = [1 + round(hold / PEER_INTERVAL) for hold in held]
    limit = _limit(durations, settings.cap)
    return {
        "jobs": len(jobs),
        "limit_s": limit,
        "wall_s": wall,
        "efficiency": limit / wall,
        "fetches_mean": statistics.fmean(fetches),
        "fetches_median": statistics.median(fetches),
        "fetches_max": max(fetches),
        "delay_share_median": statistics.median(shares),
        "delay_share_p90": percentile(shares, 0.9),
        "delay_s_median": statistics.median(late),
        # A slot is taken again the moment its job is seen done.
        "idle_ms_median": _ms(statistics.median(late)),
        "idle_ms_mean": _ms(statistics.fmean(late)),
        "idle_share": sum(late) / (settings.cap * wall),
    }


async def _case(settings: Settings, case: Case) -> dict[str, Any]:
    """
    Every contender at once on one emulator, each its own account.
    """
    contenders = _contenders(settings)
    keys = {name: f"makespan-{index}" for index, name in enumerate(contenders)}
    async with emulator_process(
        "--eta",
        str(settings.eta),
        "--eta-error",
        str(case.eta_error),
        "--eta-bias",
        str(case.eta_bias),
        "--queue-limit",
        str(settings.cap),
        "--seed",
        str(settings.seed),
        "--nominal-eta",
        bench_routes=True,
    ) as emulator:

        async def staggered(index: int, name: str) -> Batch:
            # Started over one eta, so the contenders' jobs do not all end
            # in the same instant (they would with no noise).
            await asyncio.sleep(settings.eta * index / len(contenders))
            return await contenders[name](emulator, keys[name], settings)

        batches = await asyncio.gather(
            *(staggered(i, name) for i, name in enumerate(contenders))
        )
        server = await emulator.jobs()
        accounts = await emulator.keys()
    by_key: dict[str, list[dict[str, Any]]] = {}
    for job_id, job in server.items():
        by_key.setdefault(job["key"], []).append({"id": job_id, **job})
    results: dict[str, Any] = {}
    for name, batch in zip(contenders, batches, strict=True):
        jobs = by_key[batch.key]
        if len(jobs) != settings.jobs or set(batch.seen) != {
            job["id"] for job in jobs
        }:
            msg = f"{name}: {len(jobs)} jobs made, {len(batch.seen)} seen"
            raise RuntimeError(msg)
        account = accounts.get(batch.key, {})
        results[name] = {
            **_figures(batch, jobs, settings),
            "refused": account.get("refused", 0),
            "max_queued": account.get("max_queued", 0),
        }
    # Durations of one run's jobs: the raw 0.1 s poller's, whose own
    # schedule cannot sway them.
    durations_from = by_key[keys[raw_label(settings.intervals[-1])]]
    results[PEER] = _peer(durations_from, settings)
    return {
        "eta_error": case.eta_error,
        "eta_bias": case.eta_bias,
        "contenders": results,
    }


# --- idle cap in one process ------------------------------------------------


@attrs.define
class _Stamps:
    """
    What the wrapped store and the traced session saw.
    """

    settled: list[tuple[float, str]] = attrs.field(factory=list)
    claimed: list[tuple[float, str]] = attrs.field(factory=list)
    #: track_id to when its submit's body had been written.
    left: dict[str, float] = attrs.field(factory=dict)
    #: job id to when a fetch answer for it came back, the last one kept.
    fetched: dict[str, float] = attrs.field(factory=dict)


@attrs.define
class _StampedJournal:
    """
    A journal that passes every call through, stamping two of them.
    """

    inner: Journal
    stamps: _Stamps

    @property
    def held(self) -> int:
        return self.inner.held

    async def claim(self, state: JobState) -> JobState | None:
        known = await self.inner.claim(state)
        if known is None:
            self.stamps.claimed.append((time.monotonic(), state.track_id))
        return known

    async def record(self, state: JobState) -> JobState:
        return await self.inner.record(state)

    def settle(self, state: JobState) -> None:
        self.stamps.settled.append((time.monotonic(), state.track_id))
        self.inner.settle(state)

    async def abandon(self, track_id: str) -> None:
        await self.inner.abandon(track_id)

    async def get(self, track_id: str) -> JobState | None:
        return await self.inner.get(track_id)

    async def find(self, webhook_id: str) -> JobState | None:
        return await self.inner.find(webhook_id)

    async def adopt(self) -> list[JobState]:
        return await self.inner.adopt()

    def listen(self, deliver: Callable[[JobState], object]) -> None:
        self.inner.listen(deliver)

    async def aclose(self) -> None:
        await self.inner.aclose()


@attrs.define
class _StampedStore:
    """
    The default store, its journal wrapped: a public seam, no patching.
    """

    stamps: _Stamps
    inner: JobStore = attrs.field(factory=MemoryStore)

    async def open(self, account: str, *, max_queued: int | None) -> Journal:
        journal = await self.inner.open(account, max_queued=max_queued)
        return _StampedJournal(journal, self.stamps)


_TRACK_ID: Final = re.compile(rb'"track_id":\s*"([^"]+)"')


@contextlib.asynccontextmanager
async def _traced(stamps: _Stamps) -> AsyncIterator[aiohttp.ClientSession]:
    """
    A session that stamps each submit's body written and fetch answered.
    """

    async def written(
        _: aiohttp.ClientSession,
        __: Any,
        params: aiohttp.TraceRequestChunkSentParams,
    ) -> None:
        if params.url.path.endswith(_SUBMIT):
            found = _TRACK_ID.search(params.chunk)
            if found is not None:
                stamps.left[found.group(1).decode()] = time.monotonic()

    async def answered(
        _: aiohttp.ClientSession,
        __: Any,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        if _FETCH in params.url.path:
            stamps.fetched[params.url.path.rsplit("/", 1)[1]] = (
                time.monotonic()
            )

    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(written)
    trace.on_request_end.append(answered)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        yield session


async def _idle_way(
    emulator: EmulatorProcess,
    settings: Settings,
    *,
    many: bool,
    webhooks: bool,
    key: str,
) -> dict[str, Any]:
    stamps = _Stamps()
    async with (
        _traced(stamps) as session,
        Client(
            key,
            base_url=emulator.url,
            max_queued=settings.cap,
            webhooks=WebhookReceiver() if webhooks else None,
            store=_StampedStore(stamps),
            session=session,
        ) as client,
    ):
        requests = [_request(key, n) for n in range(settings.idle_jobs)]
        if many:
            async for item in client.generate_many(requests):
                if not item.ok:
                    raise item.error
        else:
            await asyncio.gather(*map(client.generate, requests))
    server = {
        job["track_id"]: {"id": job_id, **job}
        for job_id, job in (await emulator.jobs()).items()
        if job["key"] == key
    }
    return _handoffs(stamps, server, webhooks=webhooks)


def _handoffs(
    stamps: _Stamps, server: dict[str, dict[str, Any]], *, webhooks: bool
) -> dict[str, Any]:
    """
    Pair each settle with the claim it woke (the next one to get a slot
    after it, first come first served) and that claim's submit.
    """
    timeline = sorted(
        [(at, 0, track) for at, track in stamps.settled]
        + [(at, 1, track) for at, track in stamps.claimed]
    )
    waiting: collections.deque[float] = collections.deque()
    wake, leave, transit = [], [], []
    for at, kind, track in timeline:
        if kind == 0:
            waiting.append(at)
            continue
        if not waiting:
            continue  # A slot that was free: no hand-off.
        settled_at = waiting.popleft()
        wake.append(at - settled_at)
        left = stamps.left.get(track)
        if left is not None:
            leave.append(left - settled_at)
            if track in server:
                transit.append(server[track]["created"] - left)
    return {
        "handoffs": len(leave),
        "settle_to_submit_ms": _spread_ms(leave),
        "settle_to_slot_ms": _spread_ms(wake),
        "submit_to_server_ms": _spread_ms(transit),
        "seen_to_settle_ms": _spread_ms(
            _seen_to_settle(stamps, server, webhooks=webhooks)
        ),
    }


def _seen_to_settle(
    stamps: _Stamps, server: dict[str, dict[str, Any]], *, webhooks: bool
) -> list[float]:
    """
    Polling: from the fetch answer's arrival to the settle (reading and
    decoding it); webhooks: from the emulator starting the POST.
    """
    settled = {track: at for at, track in stamps.settled}
    spans = []
    for track, job in server.items():
        if track not in settled:
            continue
        answered = (
            job.get("webhook_sent")
            if webhooks
            else stamps.fetched.get(job["id"])
        )
        if answered is not None:
            spans.append(settled[track] - answered)
    return spans


def _spread_ms(values: Sequence[float]) -> dict[str, float | None]:
    ms = [value * 1e3 for value in values]
    return {
        "median": percentile(ms, 0.5),
        "p90": percentile(ms, 0.9),
        "max": max(ms, default=None),
    }


_WAYS: Final = {
    MANY_POLL: {"many": True, "webhooks": False},
    MANY_HOOKS: {"many": True, "webhooks": True},
    GATHER_POLL: {"many": False, "webhooks": False},
    GATHER_HOOKS: {"many": False, "webhooks": True},
}


async def _idle(settings: Settings) -> dict[str, Any]:
    ways: dict[str, Any] = {}
    async with emulator_process(
        "--eta",
        str(settings.idle_eta),
        "--eta-error",
        "0.3",
        "--queue-limit",
        str(settings.cap),
        "--seed",
        str(settings.seed),
        "--nominal-eta",
        bench_routes=True,
    ) as emulator:
        for index, (name, way) in enumerate(_WAYS.items()):
            ways[name] = await _idle_way(
                emulator, settings, key=f"idle-{index}", **way
            )
    return ways


async def run(settings: Settings) -> dict[str, Any]:
    """
    Every case, then the idle-cap runs; see the module docstring.
    """
    cases = {case.name: await _case(settings, case) for case in settings.cases}
    idle = await _idle(settings)
    return {
        "settings": attrs.asdict(settings),
        "cases": cases,
        "idle": idle,
    }


# --- the page ----------------------------------------------------------------

_LINK: Final = "[batch time](#batch-time-against-the-cap)"
_IDLE_LINK: Final = "[idle cap](#idle-cap-in-one-process)"
_JOBS_LINK: Final = "[Polling that learns](jobs.md#polling-that-learns)"


def _worst(
    contenders: dict[str, Any], names: Sequence[str], key: str, *, low: bool
) -> tuple[float | None, str]:
    """
    The worst of *names*' figures and every one of them, for a row.
    """
    values = {
        name: contenders[name][key] for name in names if name in contenders
    }
    if not values:
        return None, ""
    worst = (min if low else max)(values.values())
    return worst, ", ".join(
        f"{_short(name)} {_format(key, value)}"
        for name, value in values.items()
    )


def _short(name: str) -> str:
    return name.split(",", maxsplit=1)[0].replace(" (polls)", "")


def _format(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if key.startswith("delay_share"):
        return report.percent(value)
    return f"{value:.2f}"


def _idle_note(figures: dict[str, Any]) -> str:
    rest = 1 - figures["efficiency"] - (figures["idle_share"] or 0)
    return (
        f"slots idle between jobs {report.percent(figures['idle_share'])} "
        f"({report.number(figures['idle_ms_median'], 1)} ms per hand-off), "
        f"at the batch's start and end {report.percent(max(0.0, rest))}"
    )


def _case_targets(name: str, case: dict[str, Any]) -> list[Target]:
    contenders = case["contenders"]
    hooks, hooks_all = _worst(contenders, WEBHOOKS, "efficiency", low=True)
    poll, poll_all = _worst(contenders, POLLING, "efficiency", low=True)
    fetches, fetches_all = _worst(
        contenders, POLLING, "fetches_mean", low=False
    )
    delay, delay_all = _worst(
        contenders, POLLING, "delay_share_median", low=False
    )
    many_hooks = contenders[MANY_HOOKS]
    many = contenders[MANY_POLL]
    first = (
        f"generate_many: {report.percent(many['done_at_first_fetch'], 0)} "
        "of jobs done at their first fetch, seen "
        f"{report.percent(many['delay_share_median_first_fetch'])} late "
        "(median)"
    )
    infeasible = (
        f"; on ±30 % no schedule meets both ({_JOBS_LINK})"
        if case["eta_error"] > 0
        else ""
    )
    return [
        Target(
            "13",
            f"Batch efficiency with webhooks, {name}",
            f">= {WEBHOOK_EFFICIENCY:.2f}",
            hooks_all,
            report.at_least(hooks, WEBHOOK_EFFICIENCY),
            f"generate_many: {_idle_note(many_hooks)}: {_LINK}",
        ),
        Target(
            "13",
            f"Batch efficiency, polling only, {name}",
            f">= {POLLING_EFFICIENCY:.2f}",
            poll_all,
            report.at_least(poll, POLLING_EFFICIENCY),
            f"generate_many: {_idle_note(many)}: {_LINK}",
        ),
        Target(
            "13",
            f"Fetches per job (mean), polling, {name}",
            f"<= {FETCHES:g}",
            fetches_all,
            report.at_most(fetches, FETCHES),
            f"{first}{infeasible}: {_LINK}",
        ),
        Target(
            "13",
            "Ready-to-observed delay (median share of duration), "
            f"polling, {name}",
            f"<= {DELAY * 100:.0f} %",
            delay_all,
            report.verdict(
                None if delay is None else delay <= DELAY,
                f": {((delay or 0) - DELAY) * 100:.1f} points over",
            ),
            f"{first}{infeasible}: {_LINK}",
        ),
    ]


def targets(data: dict[str, Any]) -> list[Target]:
    """
    Issue 13's batch figures per case, and the idle cap.
    """
    rows: list[Target] = []
    for name, case in data["cases"].items():
        rows += _case_targets(name, case)
    idle = data["idle"]
    medians = {
        name: way["settle_to_submit_ms"]["median"]
        for name, way in idle.items()
    }
    present = [value for value in medians.values() if value is not None]
    worst = max(present) if present else None
    rows.append(
        Target(
            "13",
            "Idle cap in one process: a job seen ended to the next submit "
            "leaving (median)",
            f"< {IDLE_MS:g} ms",
            ", ".join(
                f"{name} {report.number(value, 3)} ms"
                for name, value in medians.items()
            ),
            report.verdict(
                None if worst is None else worst < IDLE_MS,
                f": {(worst or 0) - IDLE_MS:.3f} ms over",
            ),
            _idle_target_note(idle),
        )
    )
    return rows


def _idle_target_note(idle: dict[str, Any]) -> str:
    def median(way: dict[str, Any], key: str) -> float:
        return float(way[key]["median"] or 0.0)

    name, way = max(
        idle.items(), key=lambda item: median(item[1], "settle_to_submit_ms")
    )
    slot = median(way, "settle_to_slot_ms")
    rest = median(way, "settle_to_submit_ms") - slot
    return (
        f"slowest, {name}: the slot granted {slot:.3f} ms after the settle, "
        f"the submit written about {rest:.3f} ms later: {_IDLE_LINK}"
    )


def _contender_row(name: str, figures: dict[str, Any]) -> tuple[str, ...]:
    wall = f"{figures['wall_s']:,.1f} ({figures['limit_s']:,.1f})"
    return (
        name,
        f"{figures['efficiency']:.3f}",
        wall,
        f"{figures['fetches_mean']:.2f} ({figures['fetches_median']:g})",
        report.percent(figures["delay_share_median"]),
        report.percent(figures["delay_share_p90"]),
        report.number(figures["idle_ms_median"], 1),
        report.percent(figures["idle_share"]),
        str(figures.get("refused", "–")),  # noqa: RUF001 (a dash)
    )


def render(data: dict[str, Any]) -> list[str]:
    """
    The section: every case's table, then the idle cap.
    """
    settings = data["settings"]
    cap, jobs, eta = settings["cap"], settings["jobs"], settings["eta"]
    intervals = " and ".join(f"{i:g} s" for i in settings["intervals"])
    lines = [
        "## Batch time against the cap",
        "",
        f"{jobs} jobs per contender on an account that may queue {cap}",
        f"(emulator `--queue-limit {cap}`, `Client(max_queued={cap})`), each",
        f"announcing `eta` {eta:g} s (the nominal eta: real estimates are",
        "wrong both ways). No client can finish faster than the",
        "**cap-bound limit**, max(sum of the jobs' real durations / cap,",
        "longest job), taken from the emulator's own per-job times;",
        "**efficiency** is that limit over the measured wall time. Every",
        "contender runs at the same time on one emulator process, each on",
        "an account (API key) of its own, their starts staggered over one",
        "eta. Ours: `generate_many` and `asyncio.gather` of `generate()`,",
        "polling only and with a `WebhookReceiver`, and the command line",
        f"(`modelslab-async generate -f PROMPTS --max-queued {cap} --json`",
        "in its own process; it polls; wall time from starting the process",
        "to its exit, a job seen when its JSON line arrives, after its",
        f"image is saved). Raw aiohttp: {cap} workers that submit, then",
        f"sleep and fetch every {intervals} (Replicate's and fal's",
        "defaults) until done. modelslab-py is **computed, not run**: its",
        "async client fetches at once and then every 60 s, so each job of",
        "a few seconds holds its slot a minute and a run would take about",
        "40 minutes; its row applies that schedule, with a semaphore of",
        f"{cap} it does not itself have, to the real durations of the jobs",
        "of the 0.1 s poller.",
        "",
        "Columns: fetches per job are counted by the emulator (mean, and",
        "median in brackets); the delay runs from a job's ready time to",
        "when the contender saw it done, as a share of the job's duration;",
        "idle per hand-off runs from a job's ready time to the arrival of",
        "the submit that took its slot (the emulator's clock), and the",
        "idle share is all of it over cap x wall time; 429s are the",
        "submits the emulator refused for the cap.",
        "",
    ]
    for name, case in data["cases"].items():
        rows = [
            _contender_row(contender, figures)
            for contender, figures in case["contenders"].items()
        ]
        lines += [
            f"### {name}",
            "",
            *report.table(
                (
                    "Contender",
                    "Efficiency",
                    "Wall s (limit s)",
                    "Fetches/job",
                    "Delay (median)",
                    "Delay (p90)",
                    "Idle per hand-off ms",
                    "Idle share",
                    "429s",
                ),
                rows,
            ),
        ]
        cli = case["contenders"].get(CLI)
        if cli is not None and "startup_s" in cli:
            lines += [
                f"The command line took {cli['startup_s']:.2f} s from",
                "starting to its first submit (interpreter, imports, the",
                "free check of the key); from its first submit to its exit",
                "its efficiency is",
                f"{cli['efficiency_from_first_submit']:.3f}.",
                "",
            ]
    lines += [
        "Polling cannot free a slot before it fetches the job, and with",
        "durations spread ±30 % around the eta no schedule both fetches a",
        "job about once and sees it within a few percent of its duration:",
        f"see {_JOBS_LINK} for the trade-off in figures. A server that is",
        "always late by the same share is learned (the no-noise case).",
        "Webhooks free the slot when the job ends, whatever the spread.",
        "",
    ]
    return lines + _idle_section(data)


def _idle_section(data: dict[str, Any]) -> list[str]:
    settings = data["settings"]
    rows = []
    for name, way in data["idle"].items():
        cells = [
            way[key]
            for key in (
                "settle_to_submit_ms",
                "settle_to_slot_ms",
                "submit_to_server_ms",
                "seen_to_settle_ms",
            )
        ]
        rows.append(
            (
                name,
                str(way["handoffs"]),
                *(
                    f"{report.number(cell['median'], 3)} / "
                    f"{report.number(cell['p90'], 3)} / "
                    f"{report.number(cell['max'], 2)}"
                    for cell in cells
                ),
            )
        )
    return [
        "### Idle cap in one process",
        "",
        "How long a freed slot waits for the client. Each of our four ways",
        f"runs {settings['idle_jobs']} jobs (`eta` {settings['idle_eta']:g} s",
        f"± 30 %, cap {settings['cap']}) alone in the process, with its",
        "`Client` instrumented from outside through public seams: a store",
        "that wraps the default one and stamps each `settle` (the client saw",
        "the job end and frees its slot there) and each claim that gets a",
        "slot, and an aiohttp session (`Client(session=...)`) whose",
        "`TraceConfig` stamps each submit's body written. Each settle is",
        "paired with the next claim to get a slot (first come, first",
        "served) and that claim's submit. No package code is patched.",
        "",
        "Median / p90 / max, ms:",
        "",
        *report.table(
            (
                "Way",
                "Hand-offs",
                "Seen ended → next submit leaves",
                "Seen ended → slot granted",
                "Submit leaves → emulator has it",
                "Answer in → seen ended",
            ),
            rows,
        ),
        "The last column is, polling, from the fetch answer's arrival to",
        "the settle (reading and decoding it); with webhooks, from the",
        "emulator starting its POST (its process) to the settle (ours).",
        "Polling, the settle runs in the task that fetched, and the woken",
        "claim runs when that task next waits; with webhooks it runs inside",
        "the receiver's request handler, and the woken claim runs after",
        "that handler has answered and after whatever the loop had queued",
        "before it.",
        "",
    ]
