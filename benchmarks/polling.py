"""
Polling efficiency: fetches per job, and how late a finished job is seen.

The emulator announces an ``eta`` with every job, but each job really takes
``eta`` times a random factor in ``1 ± 0.3`` (``--eta-error 0.3``), and a
fetch of a processing job says nothing more (the real API's thin fetch
answer). ``--nominal-eta`` makes the announcement the nominal ``eta``: as
shipped, the emulator announces ``max(real duration, eta)``, so no job
would ever run late.

For every job we know from the server's side when it was created and when
it became ready, and every fetch it got; the client notes when it saw the
job done. So per job:

- fetches: fetch requests the server received for it;
- delay: from ready to observed, as a share of the job's real duration.

Strategies, each on its own batch of jobs submitted at once:

- ``modelslab-async``: ``client.generate``, our eta-then-backoff schedule.
- ``fixed 0.1 s`` / ``fixed 0.5 s``: raw aiohttp, sleep then fetch, the
  fixed intervals of fal and Replicate's clients.
- ``fixed 60 s (modelslab-py)``: computed, not run: the SDK fetches at once,
  then every 60 s (``BaseAPI.async_fetch``), so a job of duration *d* costs
  ``1 + ceil(d / 60)`` fetches and is seen ``ceil(d / 60) * 60 - d`` late.
  We apply that to the real durations of the jobs measured here.

The emulator runs in its own process (:mod:`benchmarks._server`, which
reports the per-job times over HTTP); both processes stamp times with
``time.monotonic()``, one clock on Linux.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time

from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp
import attrs

from modelslab_async import Client, Text2Img

from . import report
from ._common import KEY, EmulatorProcess, emulator_process, summary, within
from .report import Target


OURS: Final = "modelslab-async"
PEER_INTERVAL: Final = 60.0
_SUBMIT: Final = "v6/images/text2img"
_FETCH: Final = "v6/images/fetch/"

#: Runs a batch; returns ``{job id: time.monotonic() when seen done}``.
Strategy = Callable[[EmulatorProcess, int, int], Awaitable[dict[str, float]]]


@attrs.frozen
class Settings:
    eta: float
    eta_error: float
    jobs: int
    rounds: int
    intervals: tuple[float, ...]


#: An eta of 2 s keeps the suite short while the few milliseconds of
#: loopback and event-loop latency stay under 1 % of a job.
FULL: Final = Settings(
    eta=2.0, eta_error=0.3, jobs=200, rounds=5, intervals=(0.1, 0.5)
)
QUICK: Final = Settings(
    eta=0.1, eta_error=0.3, jobs=4, rounds=1, intervals=(0.05,)
)


def fixed_label(interval: float) -> str:
    return f"fixed {interval:g} s"


PEER_LABEL: Final = f"{fixed_label(PEER_INTERVAL)} (modelslab-py, computed)"


async def _ours(
    emulator: EmulatorProcess, jobs: int, round_number: int
) -> dict[str, float]:
    seen: dict[str, float] = {}
    async with Client(KEY, base_url=emulator.url, max_queued=None) as client:

        async def one(number: int) -> None:
            prompt = f"poll {round_number} {number}"
            result = await client.generate(Text2Img(prompt=prompt))
            seen[str(result.id)] = time.monotonic()

        await asyncio.gather(*(one(n) for n in range(jobs)))
    return seen


def _fixed(interval: float) -> Strategy:
    async def run(
        emulator: EmulatorProcess, jobs: int, round_number: int
    ) -> dict[str, float]:
        seen: dict[str, float] = {}
        async with aiohttp.ClientSession() as session:

            async def post(path: str, body: dict[str, Any]) -> Any:
                async with session.post(emulator.url + path, json=body) as r:
                    return await r.json()

            async def one(number: int) -> None:
                prompt = f"poll {interval} {round_number} {number}"
                body = {"key": KEY, "model_id": "flux", "prompt": prompt}
                job_id = str((await post(_SUBMIT, body))["id"])
                while True:
                    await asyncio.sleep(interval)
                    answer = await post(_FETCH + job_id, {"key": KEY})
                    if answer["status"] != "processing":
                        seen[job_id] = time.monotonic()
                        return

            await asyncio.gather(*(one(n) for n in range(jobs)))
        return seen

    return run


def _measured(
    seen: dict[str, float], server: dict[str, dict[str, Any]]
) -> list[dict[str, float]]:
    """
    Per job: fetches, duration, and delay from ready to seen.
    """
    jobs = []
    for job_id, observed in seen.items():
        job = server[job_id]
        duration = job["ready_at"] - job["created"]
        delay = max(0.0, observed - job["ready_at"])
        jobs.append(
            {
                "fetches": len(job["fetch_times"]),
                "duration": duration,
                "delay": delay,
                "eta": job["eta"],
            }
        )
    return jobs


def _peer_model(measured: list[dict[str, float]]) -> list[dict[str, float]]:
    """
    modelslab-py's schedule applied to real durations: fetch at 0, then
    every 60 s.
    """
    jobs = []
    for job in measured:
        waits = math.ceil(job["duration"] / PEER_INTERVAL)
        jobs.append(
            {
                "fetches": 1 + waits,
                "duration": job["duration"],
                "delay": waits * PEER_INTERVAL - job["duration"],
                "eta": job["eta"],
            }
        )
    return jobs


def _round_figures(jobs: list[dict[str, float]]) -> dict[str, float | None]:
    fetches = [j["fetches"] for j in jobs]
    shares = [j["delay"] / j["duration"] for j in jobs]
    # Jobs done by their announced eta against those that ran late: the
    # two halves a schedule must serve, the first by its first fetch.
    early = [
        share
        for share, job in zip(shares, jobs, strict=True)
        if job["duration"] <= job["eta"]
    ]
    late = [
        share
        for share, job in zip(shares, jobs, strict=True)
        if job["duration"] > job["eta"]
    ]
    return {
        "fetches_median": statistics.median(fetches),
        "fetches_mean": statistics.fmean(fetches),
        "fetches_max": max(fetches),
        "delay_share_median": statistics.median(shares),
        "delay_share_p90": sorted(shares)[int(0.9 * (len(shares) - 1))],
        "delay_s_median": statistics.median(j["delay"] for j in jobs),
        "early_jobs_share": len(early) / len(jobs),
        "delay_share_median_early": _median_or_none(early),
        "delay_share_median_late": _median_or_none(late),
    }


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


async def run(settings: Settings) -> dict[str, Any]:
    """
    Run every strategy for every round; see the module docstring.
    """
    strategies: dict[str, Strategy] = {OURS: _ours}
    strategies |= {fixed_label(i): _fixed(i) for i in settings.intervals}
    per_round: dict[str, list[dict[str, float | None]]] = {
        name: [] for name in [*strategies, PEER_LABEL]
    }
    async with emulator_process(
        "--eta",
        str(settings.eta),
        "--eta-error",
        str(settings.eta_error),
        "--nominal-eta",
        bench_routes=True,
    ) as emulator:
        for number in range(settings.rounds):
            measured = []
            for name, strategy in strategies.items():
                seen = await strategy(emulator, settings.jobs, number)
                jobs = _measured(seen, await emulator.jobs())
                measured += jobs
                per_round[name].append(_round_figures(jobs))
            per_round[PEER_LABEL].append(_round_figures(_peer_model(measured)))
    strategies_out = {
        name: {key: summary([r[key] for r in rounds]) for key in rounds[0]}
        for name, rounds in per_round.items()
    }
    ours = strategies_out[OURS]
    return {
        "settings": attrs.asdict(settings),
        "strategies": strategies_out,
        "targets": {
            "fetches_median": ours["fetches_median"]["median"],
            "fetches_met": within(ours["fetches_median"]["median"], 2),
            "delay_share_median": ours["delay_share_median"]["median"],
            "delay_met": within(ours["delay_share_median"]["median"], 0.10),
        },
    }


# --- the page ----------------------------------------------------------------

_LINK: Final = "[polling](#polling-efficiency)"


def targets(data: dict[str, Any]) -> list[Target]:
    """
    Fetches per job and delay of our schedule, against issue 6's targets.
    """
    ours = data["strategies"][OURS]
    fetches = data["targets"]["fetches_median"]
    delay = data["targets"]["delay_share_median"]
    early = ours["delay_share_median_early"]["median"]
    late = ours["delay_share_median_late"]["median"]
    return [
        Target(
            "6",
            "Fetches per job (median), eta off by up to ±30 %, no cap",
            "<= 2",
            report.spread(ours["fetches_median"], 1),
            report.at_most(fetches, 2),
            f"mean {ours['fetches_mean']['median']:.2f}: {_LINK}",
        ),
        Target(
            "6",
            "Ready-to-observed delay, share of job duration (median)",
            "<= 10 %",
            report.percent(delay),
            report.verdict(
                delay is not None and delay <= 0.10,
                f": {((delay or 0) - 0.10) * 100:.1f} points over",
            ),
            f"jobs done by their eta {report.percent(early)}, "
            f"late ones {report.percent(late)}: {_LINK}",
        ),
    ]


def render(data: dict[str, Any]) -> list[str]:
    """
    The section: every strategy's fetches and delays.
    """
    settings = data["settings"]
    rows = [
        (
            name,
            report.spread(figures["fetches_median"], 1),
            report.spread(figures["fetches_mean"], 2),
            report.percent(figures["delay_share_median"]["median"]),
            report.percent(figures["delay_share_p90"]["median"]),
            report.spread(figures["delay_s_median"], 3),
            report.percent(figures["delay_share_median_early"]["median"]),
            report.percent(figures["delay_share_median_late"]["median"]),
        )
        for name, figures in data["strategies"].items()
    ]
    early = data["strategies"][OURS]["early_jobs_share"]["median"]
    return [
        "## Polling efficiency",
        "",
        f"{settings['jobs']} jobs at once per strategy and round,",
        f"{settings['rounds']} rounds, no queue cap. Each job announces",
        f"`eta` {settings['eta']:g} s and really takes that times a random",
        f"factor in 1 ± {settings['eta_error']:g} (emulator `--eta-error`),",
        "and a fetch of a processing job gives no new estimate, as the real",
        "API's thin fetch answer. The submit answer announces the nominal",
        "eta (`--nominal-eta`): the emulator as shipped announces the",
        "larger of the real duration and the eta, so no job would ever run",
        "late. Fetches are counted by the emulator; the delay runs from the",
        "job's ready time (the emulator's) to when the client saw it done",
        "(the client's), both on `time.monotonic()`, one clock for both",
        "processes on Linux. The emulator runs in its own process (`python",
        "-m benchmarks._server`, the package's emulator plus a route that",
        "reports these per-job times over HTTP). The batch under a queue",
        "cap, with the learning schedule and webhooks, is in",
        "[Batch time against the cap](#batch-time-against-the-cap).",
        "",
        "Fixed intervals poll with raw aiohttp: sleep, then fetch. The",
        "60 s row is **computed, not run**: modelslab-py's `async_fetch`",
        "fetches at once and then every 60 s, so a job of duration *d*",
        "costs 1 + ⌈*d*/60⌉ fetches and is seen ⌈*d*/60⌉·60 - *d* late;",
        "that is applied to the real durations of the jobs measured here.",
        "",
        *report.table(
            (
                "Strategy",
                "Fetches/job (median)",
                "Fetches/job (mean)",
                "Delay, share of duration (median)",
                "Delay share (p90)",
                "Delay s (median)",
                "Delay share, jobs done by their eta",
                "Delay share, jobs that ran late",
            ),
            rows,
        ),
        "The last two columns split the jobs in two: those done by their",
        f"announced eta ({report.percent(early)} of them), which any",
        "schedule that first polls at the eta sees only then, and those",
        "that ran late, which only the backoff after the eta serves.",
        "",
    ]
