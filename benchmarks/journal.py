"""
The journal's cost: what a store adds to each job, and whether it stalls
the event loop.

Each job goes through the three journal calls a submit makes: ``claim``
(before the submit is sent), ``record`` of the queued state (before
``submit()`` returns) and ``settle`` (when the job ends), with no network,
so only the store is measured:

- ``latency``: one job at a time: what the journal adds to each submit
  (the claim and the record are awaited in turn).
- ``throughput``: 100 jobs at a time, the way ``asyncio.gather`` submits:
  wall time and CPU per job (SQLite batches what arrives together into one
  transaction).
- ``lag``: a probe sleeps 1 ms again and again through the throughput run
  and records how late it wakes: the stores must never stall the loop.

Stores: memory (the default), SQLite in WAL mode with ``synchronous``
``normal`` (survives the process being killed) and ``full`` (survives a
power cut).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

from pathlib import Path
from typing import Any, Final

import attrs

from modelslab_async import JobPhase, JobState, Text2Img
from modelslab_async.stores import JobStore, MemoryStore, SQLiteStore

from ._common import percentile


_PROBE: Final = 0.001
TARGET_LATENCY_MS: Final = 0.5
TARGET_STALL_MS: Final = 5.0


@attrs.frozen
class Settings:
    latency_jobs: int
    throughput_jobs: int
    concurrency: int
    rounds: int


FULL: Final = Settings(
    latency_jobs=1000, throughput_jobs=5000, concurrency=100, rounds=3
)
QUICK: Final = Settings(
    latency_jobs=20, throughput_jobs=100, concurrency=10, rounds=1
)


def _stores(folder: Path) -> dict[str, JobStore]:
    return {
        "memory": MemoryStore(),
        "sqlite (normal)": SQLiteStore(folder / "normal.sqlite3"),
        "sqlite (full)": SQLiteStore(
            folder / "full.sqlite3", synchronous="full"
        ),
    }


_REQUEST: Final = Text2Img(prompt="a lighthouse at dawn", width=768)


async def _one_job(journal: Any, number: int, tag: str) -> None:
    now = time.time()
    state = JobState(
        track_id=f"{tag}-{number}",
        endpoint="v6",
        phase=JobPhase.SUBMITTING,
        request=_REQUEST,
        created_at=now,
        updated_at=now,
    )
    await journal.claim(state)
    queued = attrs.evolve(
        state, phase=JobPhase.QUEUED, job_id=str(number), eta_at=now + 5
    )
    await journal.record(queued)
    journal.settle(
        attrs.evolve(
            queued,
            phase=JobPhase.SUCCEEDED,
            outputs=(f"https://cdn.example/{number}.png",),
            updated_at=time.time(),
        )
    )


async def _probe(lateness: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(_PROBE)
        lateness.append(time.perf_counter() - started - _PROBE)


async def _measure(
    store: JobStore, settings: Settings, tag: str
) -> dict[str, Any]:
    journal = await store.open(f"bench-{tag}", max_queued=None)
    try:
        started = time.perf_counter()
        for number in range(settings.latency_jobs):
            await _one_job(journal, number, f"{tag}-l")
        latency = (time.perf_counter() - started) / settings.latency_jobs

        lateness: list[float] = []
        stop = asyncio.Event()
        probe = asyncio.create_task(_probe(lateness, stop))
        cpu, wall = time.thread_time(), time.perf_counter()
        numbers = iter(range(settings.throughput_jobs))

        async def worker() -> None:
            for number in numbers:
                await _one_job(journal, number, f"{tag}-t")

        await asyncio.gather(*(worker() for _ in range(settings.concurrency)))
        wall = time.perf_counter() - wall
        cpu = time.thread_time() - cpu
        stop.set()
        await probe
    finally:
        await journal.aclose()
    jobs = settings.throughput_jobs
    return {
        "latency_ms": latency * 1000,
        "wall_us_per_job": wall / jobs * 1e6,
        "loop_cpu_us_per_job": cpu / jobs * 1e6,
        "lag_p99_ms": (percentile(lateness, 0.99) or 0.0) * 1000,
        "lag_max_ms": max(lateness, default=0.0) * 1000,
    }


async def run(settings: Settings) -> dict[str, Any]:
    """
    Measure every store, *settings.rounds* times; medians reported.
    """
    rounds: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-journal-") as folder:
        for number in range(settings.rounds):
            for name, store in _stores(Path(folder)).items():
                tag = f"{name.split()[0]}{len(name)}-{number}"
                rounds.setdefault(name, []).append(
                    await _measure(store, settings, tag)
                )
    stores = {
        name: {
            key: statistics.median(r[key] for r in results)
            for key in results[0]
        }
        for name, results in rounds.items()
    }
    sqlite = stores["sqlite (normal)"]
    return {
        "settings": attrs.asdict(settings),
        "stores": stores,
        "targets": {
            "latency_ms": sqlite["latency_ms"],
            "latency_met": sqlite["latency_ms"] <= TARGET_LATENCY_MS,
            "stall_ms": sqlite["lag_max_ms"],
            "stall_met": sqlite["lag_max_ms"] <= TARGET_STALL_MS,
        },
    }


def targets(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """
    The page's target rows for this benchmark.
    """
    figures = data["targets"]
    latency, stall = figures["latency_ms"], figures["stall_ms"]
    return [
        (
            "SQLite journal, cost per job (claim + record + settle)",
            f"< {TARGET_LATENCY_MS} ms",
            f"{latency:.3f} ms",
            "met" if figures["latency_met"] else "**not met**",
            "[journal](#the-journal)",
        ),
        (
            "SQLite journal, longest event-loop stall",
            f"<= {TARGET_STALL_MS:g} ms",
            f"{stall:.2f} ms",
            "met" if figures["stall_met"] else "**not met**",
            "[journal](#the-journal)",
        ),
    ]


def render(data: dict[str, Any]) -> list[str]:
    """
    The page's section for this benchmark.
    """
    settings = data["settings"]
    rows = [
        "| Store | Added per submit (1 at a time) | Wall µs/job "
        f"({settings['concurrency']} at a time) | Loop CPU µs/job | "
        "Lag p99 ms | Lag max ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, figures in data["stores"].items():
        rows.append(
            f"| {name} | {figures['latency_ms']:.3f} ms | "
            f"{figures['wall_us_per_job']:,.1f} | "
            f"{figures['loop_cpu_us_per_job']:,.1f} | "
            f"{figures['lag_p99_ms']:.2f} | {figures['lag_max_ms']:.2f} |"
        )
    return [
        "## The journal",
        "",
        "What each store adds to a job: the three journal calls of a",
        "submit (claim before sending, record the job id before `submit()`",
        "returns, settle when the job ends), no network. One job at a time",
        "shows the latency a submit gains; "
        f"{settings['concurrency']} at a time shows the",
        "cost per job when submits arrive together (SQLite commits what",
        "arrives together in one transaction), with a probe sleeping 1 ms",
        "throughout to catch any stall of the event loop. SQLite runs on a",
        "worker thread, in WAL mode.",
        "",
        *rows,
        "",
    ]
