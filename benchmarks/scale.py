"""
Scale: 10,000 jobs pending at once.

The emulator (its own process) gives every job an hour's ``eta``, so every
job we submit stays pending, each awaited by a task of its own, the way
``asyncio.gather(*(client.generate(r) for r in requests))`` holds them.

- Memory per pending job: ``tracemalloc`` from just before the first submit
  to when every waiter is asleep, divided by the jobs. It counts everything
  the library keeps (handle, response, timers, cancel scopes) plus the
  waiting task and its coroutine, but not the request objects, which the
  caller built beforehand. Connections are opened by a warm-up first.
- Event-loop lag: a probe sleeps 5 ms again and again and records how late
  it wakes, while the jobs are submitted and then while they all wait.
  Measured in a second pass without ``tracemalloc``, which slows
  allocation.
- Close: how long ``aclose()`` takes to wake every waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import tracemalloc

from collections.abc import AsyncIterator
from typing import Any, Final

import attrs

from modelslab_async import Client, JobHandle, Text2Img
from modelslab_async.errors import ClientStateError

from . import report
from ._common import KEY, emulator_process, percentile, short_path
from .report import Target


_ETA: Final = "3600"
_PROBE_INTERVAL: Final = 0.005
_CONCURRENCY: Final = 100
#: Allocation sites listed in the results.
_SITES: Final = 10


@attrs.frozen
class Settings:
    jobs: int
    idle: float


FULL: Final = Settings(jobs=10_000, idle=2.0)
QUICK: Final = Settings(jobs=50, idle=0.05)


class _GCPauses:
    """
    Times every garbage collection, to tell its pauses from our code's.
    """

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return  # Young collections are short; full ones scale with RAM.
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._started)

    def take(self) -> dict[str, Any]:
        pauses, self.pauses = self.pauses, []
        return {
            "full_collections": len(pauses),
            "longest_ms": max(pauses, default=0.0) * 1e3,
            "total_ms": sum(pauses) * 1e3,
        }


class _LagProbe:
    """
    Records how late a repeated short sleep wakes.
    """

    def __init__(self) -> None:
        self.lags: list[float] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + _PROBE_INTERVAL
            await asyncio.sleep(_PROBE_INTERVAL)
            self.lags.append(max(0.0, loop.time() - due))

    def take(self) -> dict[str, Any]:
        lags, self.lags = [lag * 1e3 for lag in self.lags], []
        return {
            "samples": len(lags),
            "p50_ms": percentile(lags, 0.5),
            "p99_ms": percentile(lags, 0.99),
            "max_ms": max(lags, default=None),
        }


@contextlib.asynccontextmanager
async def _running(probe: _LagProbe, pauses: _GCPauses) -> AsyncIterator[None]:
    task = asyncio.create_task(probe.run())
    gc.callbacks.append(pauses)
    try:
        yield
    finally:
        gc.callbacks.remove(pauses)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _submit_all(
    client: Client, requests: list[Text2Img]
) -> list[asyncio.Task[Any]]:
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def submit(request: Text2Img) -> JobHandle:
        async with gate:
            return await client.submit(request)

    jobs = await asyncio.gather(*(submit(r) for r in requests))
    waiters = [asyncio.create_task(job.wait()) for job in jobs]
    await asyncio.sleep(0.05)  # every waiter reaches its sleep
    return waiters


async def _close(client: Client, waiters: list[asyncio.Task[Any]]) -> float:
    started = time.perf_counter()
    await client.aclose()
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    seconds = time.perf_counter() - started
    wrong = [o for o in outcomes if not isinstance(o, ClientStateError)]
    if wrong:
        msg = f"{len(wrong)} waiters did not end with ClientStateError"
        raise RuntimeError(msg)
    return seconds


def _requests(count: int, label: str) -> list[Text2Img]:
    return [Text2Img(prompt=f"{label} {n}") for n in range(count)]


async def _warm(client: Client) -> list[asyncio.Task[Any]]:
    # Opens the connection pool before counting, so sockets are not
    # charged to jobs. These jobs stay pending too, uncounted.
    return await _submit_all(client, _requests(_CONCURRENCY, "warm"))


async def _memory(url: str, settings: Settings) -> dict[str, Any]:
    requests = _requests(settings.jobs, "memory")
    client = Client(KEY, base_url=url, max_queued=None)
    warm = await _warm(client)
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.take_snapshot()
        before = tracemalloc.get_traced_memory()[0]
        waiters = await _submit_all(client, requests)
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
        end = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    await _close(client, warm + waiters)
    per_job = (after - before) / settings.jobs
    return {
        "bytes_per_job": per_job,
        "kib_per_job": per_job / 1024,
        "peak_mib": (peak - before) / 2**20,
        "sites": _sites(end.compare_to(start, "lineno"), settings.jobs),
    }


def _sites(
    differences: list[tracemalloc.StatisticDiff], jobs: int
) -> list[dict[str, Any]]:
    """
    Where the memory per job was allocated, largest first.
    """
    return [
        {
            "where": _short(difference.traceback[0]),
            "bytes_per_job": difference.size_diff / jobs,
            "objects_per_job": difference.count_diff / jobs,
        }
        for difference in differences[:_SITES]
    ]


def _short(frame: tracemalloc.Frame) -> str:
    return f"{short_path(frame.filename)}:{frame.lineno}"


async def _lag(url: str, settings: Settings) -> dict[str, Any]:
    requests = _requests(settings.jobs, "lag")
    probe, pauses = _LagProbe(), _GCPauses()
    client = Client(KEY, base_url=url, max_queued=None)
    warm = await _warm(client)
    async with _running(probe, pauses):
        started = time.perf_counter()
        waiters = await _submit_all(client, requests)
        submit_seconds = time.perf_counter() - started
        submitting = probe.take() | {"gc": pauses.take()}
        await asyncio.sleep(settings.idle)
        pending = probe.take() | {"gc": pauses.take()}
        close_seconds = await _close(client, warm + waiters)
        closing = probe.take() | {"gc": pauses.take()}
    return {
        "submit_jobs_per_s": settings.jobs / submit_seconds,
        "close_s": close_seconds,
        "lag_submitting": submitting,
        "lag_pending": pending,
        "lag_closing": closing,
    }


async def run(settings: Settings) -> dict[str, Any]:
    """
    Measure memory, then lag, each with a fresh emulator.
    """
    async with emulator_process("--eta", _ETA) as emulator:
        memory = await _memory(emulator.url, settings)
    async with emulator_process("--eta", _ETA) as emulator:
        lag = await _lag(emulator.url, settings)
    return {
        "settings": attrs.asdict(settings),
        "memory": memory,
        **lag,
        "targets": {
            "kib_per_job": memory["kib_per_job"],
            "memory_met": memory["kib_per_job"] <= 5.0,
        },
    }


# --- the page ----------------------------------------------------------------


def targets(data: dict[str, Any]) -> list[Target]:
    """
    Memory per pending job, against issue 6's target.
    """
    memory = data["memory"]
    kib, jobs = memory["kib_per_job"], data["settings"]["jobs"]
    top = memory["sites"][0] if memory["sites"] else None
    note = (
        ""
        if top is None
        else f"largest site `{top['where']}` "
        f"{top['bytes_per_job']:,.0f} bytes/job: "
    )
    return [
        Target(
            "6",
            f"Memory per pending job ({jobs:,} pending)",
            "<= 5 KiB",
            f"{kib:.2f} KiB",
            report.at_most(kib, 5.0, " KiB"),
            note + "[allocation sites](#scale)",
        )
    ]


def _lag_row(name: str, lag: dict[str, Any]) -> tuple[str, ...]:
    collections = lag["gc"]
    longest = report.number(collections["longest_ms"])
    total = report.number(collections["total_ms"])
    return (
        name,
        str(lag["samples"]),
        report.number(lag["p50_ms"], 2),
        report.number(lag["p99_ms"], 2),
        report.number(lag["max_ms"], 2),
        f"{collections['full_collections']} ({longest} / {total})",
    )


def render(data: dict[str, Any]) -> list[str]:
    """
    The section: memory per pending job, where it goes, and loop lag.
    """
    memory, jobs = data["memory"], data["settings"]["jobs"]
    sites = [
        (
            f"`{site['where']}`",
            report.number(site["bytes_per_job"]),
            report.number(site["objects_per_job"], 1),
        )
        for site in memory["sites"]
    ]
    return [
        "## Scale",
        "",
        f"{jobs:,} jobs pending at once, each awaited by its own task",
        "(emulator `--eta 3600`, its own process). Memory is `tracemalloc`",
        "from just before the first submit to when every waiter sleeps,",
        "per job: the library's objects plus the waiting task, not the",
        "request objects the caller built. Lag is how late a 5 ms sleep",
        "wakes, measured in a second pass without `tracemalloc`, with",
        "every full (generation 2) garbage collection timed beside it:",
        "each pending job adds objects the collector must traverse.",
        "",
        *report.table(
            ("Memory per pending job", "Peak during submits"),
            [
                (
                    f"{memory['kib_per_job']:.2f} KiB",
                    f"{memory['peak_mib']:.1f} MiB",
                )
            ],
        ),
        "Where that memory is allocated (first frame), per job:",
        "",
        *report.table(("Site", "Bytes/job", "Objects/job"), sites),
        *report.table(
            (
                "Event-loop lag",
                "Samples",
                "p50 ms",
                "p99 ms",
                "max ms",
                "Full GCs (longest / total ms)",
            ),
            [
                _lag_row(
                    f"while submitting ({data['submit_jobs_per_s']:,.0f} "
                    "jobs/s)",
                    data["lag_submitting"],
                ),
                _lag_row("while all are pending", data["lag_pending"]),
                _lag_row(
                    f"while closing ({data['close_s']:.2f} s to wake all)",
                    data["lag_closing"],
                ),
            ],
        ),
    ]
