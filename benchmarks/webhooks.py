"""
The webhook path: how fast a callback becomes a result, and how many a
receiver takes.

Latency: jobs submitted at a steady pace on a ``Client(webhooks=
WebhookReceiver())`` (default grace, so polling would start only 5 s after
the eta); the emulator POSTs each job's webhook at its ready time. We
report the time from the moment the emulator starts the POST (stamped in
its own process by :mod:`benchmarks._server`) to ``await job`` returning in
ours, on ``time.monotonic()``, which is one clock for both processes.

Callbacks per second, three ways, each over jobs that are pending with a
task awaiting each:

- ``http``: the emulator's process POSTs one success webhook per job to the
  receiver's route at a fixed concurrency; wall time and the receiver
  process's CPU per callback (its inverse is what one core sustains).
- ``http duplicate``: the same callbacks again, now for finished jobs,
  which the receiver answers 200 from its memory of retired tokens.
- ``dispatch``: :meth:`WebhookReceiver.dispatch` called directly with the
  same paths and bodies: the receiver's rules without HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time

from typing import Any, Final
from urllib.parse import urlsplit

import attrs

from modelslab_async import Client, JobHandle, Text2Img
from modelslab_async.webhooks import WebhookReceiver

from . import report
from ._common import KEY, EmulatorProcess, emulator_process, percentile
from .report import Target


#: Long enough that no job finishes by itself while we call back.
_NEVER: Final = 3600.0


@attrs.frozen
class Settings:
    eta: float
    latency_jobs: int
    pace: float
    callback_jobs: int
    concurrency: int


FULL: Final = Settings(
    eta=0.3, latency_jobs=300, pace=0.005, callback_jobs=2000, concurrency=32
)
QUICK: Final = Settings(
    eta=0.05, latency_jobs=5, pace=0.005, callback_jobs=10, concurrency=4
)


async def _latencies(
    emulator: EmulatorProcess, client: Client, settings: Settings
) -> dict[str, Any]:
    seen: dict[str, float] = {}

    async def one(number: int) -> None:
        # Paced, so we time webhooks one by one rather than a burst queue.
        await asyncio.sleep(number * settings.pace)
        job = await client.submit(Text2Img(prompt=f"hook {number}"))
        await job
        seen[str(job.id)] = time.monotonic()

    await asyncio.gather(*(one(n) for n in range(settings.latency_jobs)))
    server = await emulator.jobs()
    latencies = [
        (observed - server[job_id]["webhook_sent"]) * 1e3
        for job_id, observed in seen.items()
    ]
    return {
        "jobs": len(latencies),
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies),
        "jobs_that_fetched": sum(
            bool(server[job_id]["fetch_times"]) for job_id in seen
        ),
    }


async def pending_jobs(
    client: Client, count: int, label: str
) -> tuple[list[JobHandle], list[asyncio.Task[Any]]]:
    """
    *count* jobs that never finish by themselves, each with a waiting task.
    """
    gate = asyncio.Semaphore(50)

    async def submit(number: int) -> JobHandle:
        async with gate:
            return await client.submit(Text2Img(prompt=f"{label} {number}"))

    jobs = await asyncio.gather(*(submit(n) for n in range(count)))
    waiters = [asyncio.create_task(job.wait()) for job in jobs]
    return jobs, waiters


def callbacks_for(
    jobs: list[JobHandle], server: dict[str, dict[str, Any]]
) -> list[tuple[str, dict[str, Any]]]:
    """
    Each job's webhook URL and the success payload the emulator would send.
    """
    targets = []
    for job in jobs:
        info = server[str(job.id)]
        payload = {
            "status": "success",
            "id": int(str(job.id)),
            "output": list(job.response.future_links),
            "generationTime": 1.0,
            "track_id": info["track_id"],
            "meta": dict(job.response.meta),
        }
        targets.append((info["webhook"], payload))
    return targets


async def _over_http(
    emulator: EmulatorProcess,
    targets: list[tuple[str, dict[str, Any]]],
    concurrency: int,
) -> dict[str, Any]:
    cpu = time.process_time()
    answer = await emulator.hammer(targets, concurrency)
    cpu = time.process_time() - cpu
    return {
        "callbacks": len(targets),
        "per_s": len(targets) / answer["seconds"],
        "receiver_cpu_us_per_callback": cpu / len(targets) * 1e6,
        "statuses": answer["statuses"],
    }


def _direct(
    receiver: WebhookReceiver, targets: list[tuple[str, dict[str, Any]]]
) -> dict[str, Any]:
    calls = [
        (urlsplit(url).path, json.dumps(payload).encode())
        for url, payload in targets
    ]
    statuses: dict[str, int] = {}
    started = time.perf_counter()
    for path, body in calls:
        status = receiver.dispatch(path, body, "application/json")
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    seconds = time.perf_counter() - started
    return {
        "callbacks": len(calls),
        "per_s": len(calls) / seconds,
        "us_per_callback": seconds / len(calls) * 1e6,
        "statuses": statuses,
    }


async def run(settings: Settings) -> dict[str, Any]:
    """
    Measure latency, then callbacks per second; see the module docstring.
    """
    receiver = WebhookReceiver()
    async with (
        emulator_process(
            "--eta", str(settings.eta), bench_routes=True
        ) as emulator,
        Client(
            KEY, base_url=emulator.url, max_queued=None, webhooks=receiver
        ) as client,
    ):
        latency = await _latencies(emulator, client, settings)
        await emulator.configure(eta=_NEVER)
        jobs, waiters = await pending_jobs(
            client, settings.callback_jobs, "http"
        )
        targets = callbacks_for(jobs, await emulator.jobs())
        http = await _over_http(emulator, targets, settings.concurrency)
        duplicate = await _over_http(emulator, targets, settings.concurrency)
        await asyncio.gather(*waiters)
        jobs, waiters = await pending_jobs(
            client, settings.callback_jobs, "call"
        )
        direct = _direct(receiver, callbacks_for(jobs, await emulator.jobs()))
        await asyncio.gather(*waiters)
    return {
        "settings": attrs.asdict(settings),
        "latency": latency,
        "callbacks": {
            "http": http,
            "http duplicate": duplicate,
            "dispatch": direct,
        },
    }


# --- the page ----------------------------------------------------------------


def targets(data: dict[str, Any]) -> list[Target]:
    """
    None: no issue set a target for this path in one process.
    """
    del data
    return []


def render(data: dict[str, Any]) -> list[str]:
    """
    The section: webhook-to-result latency and callbacks per second.
    """
    settings, latency = data["settings"], data["latency"]
    rows = []
    for name, figures in data["callbacks"].items():
        cpu = figures.get(
            "receiver_cpu_us_per_callback", figures.get("us_per_callback")
        )
        rows.append(
            (
                name,
                report.number(figures["per_s"]),
                report.number(cpu),
                report.number(1e6 / cpu) if cpu else "n/a",
                ", ".join(
                    f"{status}: {count}"
                    for status, count in figures["statuses"].items()
                ),
            )
        )
    return [
        "## Webhook path",
        "",
        f"{latency['jobs']} jobs submitted {settings['pace'] * 1e3:g} ms",
        "apart on `Client(webhooks=WebhookReceiver())`, `eta`",
        f"{settings['eta']:g} s. Latency runs from the moment the emulator",
        "starts its webhook POST (stamped in its process) to `await job`",
        "returning in ours.",
        "",
        *report.table(
            ("p50", "p99", "max", "Jobs that also polled"),
            [
                (
                    f"{report.number(latency['p50_ms'], 2)} ms",
                    f"{report.number(latency['p99_ms'], 2)} ms",
                    f"{report.number(latency['max_ms'], 2)} ms",
                    str(latency["jobs_that_fetched"]),
                )
            ],
        ),
        f"Callbacks per second, over {settings['callback_jobs']:,} pending",
        "jobs each awaited by a task. `http`: the emulator's process POSTs",
        f"each job's success webhook, {settings['concurrency']} at a time;",
        "wall rate, and the receiver process's CPU per callback (its",
        "inverse is what one core sustains). `http duplicate`: the same",
        "again, for jobs now finished. `dispatch`: `receiver.dispatch()`",
        "called directly, no HTTP.",
        "",
        *report.table(
            (
                "Path",
                "Callbacks/s",
                "Receiver CPU µs/callback",
                "Per core, callbacks/s",
                "Answers",
            ),
            rows,
        ),
    ]
