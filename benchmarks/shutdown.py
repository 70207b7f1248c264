"""
``python -m benchmarks.shutdown [--quick]``: closing and cancelling under
load, and the batch runner's cost per job as concurrency grows.

- **Close**: ``waiters`` submits wait for a queue slot (``max_queued=5``,
  the five slots held by jobs with an hour's ``eta`` on an emulator in its
  own process); ``aclose()`` is timed, and so is the moment the last waiter
  has its ``ClientStateError``.
- **Cancel**: the same waiters cancelled in random order, ``cancel_batch``
  per loop turn (as an application's own timeouts would fire), timed to the
  last ``CancelledError``.
- **Bare asyncio**: the same count of plain tasks, each awaiting a future
  five coroutines deep, failed the same way: what Python itself costs, to
  tell its share (garbage collection above all) from ours.
- **Batch**: ``generate_many`` through the whole client against the
  emulator (jobs that finish in their submit answer), and the batch runner
  alone with a stub ``submit``: CPU time per job at each concurrency.

A heartbeat task sleeps 1 ms again and again and records how late it wakes:
its worst lateness is the longest the event loop was blocked. Collections
of the garbage collector are timed apart (``gc.callbacks``): a full
collection walks every live object, ~14 per waiting submit, and its pause
is the interpreter's, whoever made the objects. Each scenario runs twice,
with the collector as it is and after ``gc.freeze()`` (what a service that
holds tens of thousands of tasks does to keep full collections short).

Writes ``benchmarks/results/shutdown.json``; ``--quick`` runs tiny sizes to
check that it runs (its figures mean nothing) and writes nothing unless
``--out`` says where.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import statistics
import sys
import time

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from modelslab_async import Client, JobRequest, Text2Img
from modelslab_async._batch import generate_many
from modelslab_async.errors import ClientStateError

from . import report
from ._common import KEY, ROOT, emulator_process, percentile
from .report import Target


RESULTS: Final = ROOT / "benchmarks" / "results" / "shutdown.json"
#: How often the heartbeat means to wake.
HEARTBEAT: Final = 0.001
#: Slots of the account in the close and cancel scenarios.
_CAP: Final = 5
#: How deep a bare waiter's coroutines go: as deep as a submit's.
_DEPTH: Final = 5
#: The acceptance figures of issue 10.
TARGETS: Final = {
    "close_all_s": 1.0,
    "max_lag_ms": 50.0,
    "cpu_ratio": 1.5,
}


@attrs.frozen
class Settings:
    #: Submits waiting for a slot.
    waiters: int
    #: Cancels per loop turn in the cancel scenario.
    cancel_batch: int
    #: Concurrency levels of the batch scenario; the first is the base.
    levels: tuple[int, ...]
    #: Jobs per batch run.
    jobs: int
    #: Batch runs per level; the median is reported.
    rounds: int


FULL: Final = Settings(
    waiters=50_000, cancel_batch=500, levels=(32, 8000), jobs=16_000, rounds=3
)
QUICK: Final = Settings(
    waiters=200, cancel_batch=50, levels=(4, 16), jobs=32, rounds=1
)


class _Heartbeat:
    """
    A task that sleeps HEARTBEAT again and again, recording how late; and
    every garbage collection's pause.
    """

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.pauses: list[tuple[int, float]] = []
        self._gc_started = 0.0

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            pause = time.perf_counter() - self._gc_started
            self.pauses.append((info["generation"], pause))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + HEARTBEAT
            await asyncio.sleep(HEARTBEAT)
            self.lags.append(max(0.0, loop.time() - due))

    @contextlib.asynccontextmanager
    async def beating(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self._run())
        await asyncio.sleep(0.05)  # Settled: the first beats are not ours.
        self.lags.clear()
        gc.callbacks.append(self._gc)
        try:
            yield
        finally:
            gc.callbacks.remove(self._gc)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def figures(self) -> dict[str, Any]:
        lags = [lag * 1e3 for lag in self.lags]
        full = [pause * 1e3 for generation, pause in self.pauses if generation]
        return {
            "beats": len(lags),
            "p50_lag_ms": percentile(lags, 0.5),
            "p99_lag_ms": percentile(lags, 0.99),
            "max_lag_ms": max(lags, default=0.0),
            "gc_runs": len(self.pauses),
            "gc_older_runs": len(full),
            "gc_longest_ms": max(
                (pause * 1e3 for _, pause in self.pauses), default=0.0
            ),
            "gc_older_total_ms": sum(full),
        }


class _Finish:
    """
    When the last of many tasks ended, without gathering them (a gather of
    50,000 tasks blocks the loop on its own).
    """

    def __init__(self, tasks: Sequence[asyncio.Future[Any]]) -> None:
        self.left = len(tasks)
        self.at = 0.0
        self.done = asyncio.Event()
        for task in tasks:
            task.add_done_callback(self._one)

    def _one(self, _: asyncio.Future[Any]) -> None:
        self.left -= 1
        if not self.left:
            self.at = time.perf_counter()
            self.done.set()


def _outcomes(tasks: Sequence[asyncio.Future[Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in tasks:
        if task.cancelled():
            name = "CancelledError"
        else:
            error = task.exception()
            name = "result" if error is None else type(error).__name__
        counts[name] = counts.get(name, 0) + 1
    return counts


@contextlib.contextmanager
def _frozen(freeze: bool) -> Any:
    """
    With *freeze*, move every object alive now out of the collector's
    sight for the block.
    """
    gc.collect()
    if freeze:
        gc.freeze()
    try:
        yield
    finally:
        if freeze:
            gc.unfreeze()


async def _waiting_submits(
    url: str, count: int
) -> tuple[Client, list[asyncio.Task[Any]]]:
    """
    A client whose queue slots are all held, and *count* submits waiting.
    """
    client = Client(KEY, base_url=url, max_queued=_CAP)
    for number in range(_CAP):
        await client.submit(Text2Img(prompt=f"holder {number}"))
    tasks = [
        asyncio.create_task(client.submit(Text2Img(prompt=f"waiter {n}")))
        for n in range(count)
    ]
    # Every task takes its first step, up to its wait for a slot.
    for _ in range(3):
        await asyncio.sleep(0)
    return client, tasks


async def _close(url: str, count: int, *, freeze: bool) -> dict[str, Any]:
    client, tasks = await _waiting_submits(url, count)
    finish = _Finish(tasks)
    heartbeat = _Heartbeat()
    with _frozen(freeze):
        async with heartbeat.beating():
            started = time.perf_counter()
            await client.aclose()
            closed = time.perf_counter() - started
            await finish.done.wait()
    outcomes = _outcomes(tasks)
    if outcomes != {"ClientStateError": count}:
        msg = f"waiters ended otherwise: {outcomes}"
        raise RuntimeError(msg)
    return {
        "aclose_s": closed,
        "all_s": finish.at - started,
        "us_per_waiter": (finish.at - started) / count * 1e6,
        **heartbeat.figures(),
    }


async def _cancel(
    url: str, count: int, batch: int, *, freeze: bool
) -> dict[str, Any]:
    client, tasks = await _waiting_submits(url, count)
    finish = _Finish(tasks)
    order = list(tasks)
    random.Random(count).shuffle(order)
    heartbeat = _Heartbeat()
    with _frozen(freeze):
        async with heartbeat.beating():
            started = time.perf_counter()
            for start in range(0, count, batch):
                for task in order[start : start + batch]:
                    task.cancel()
                await asyncio.sleep(0)
            await finish.done.wait()
    await client.aclose()
    outcomes = _outcomes(tasks)
    if outcomes != {"CancelledError": count}:
        msg = f"waiters ended otherwise: {outcomes}"
        raise RuntimeError(msg)
    return {
        "all_s": finish.at - started,
        "us_per_waiter": (finish.at - started) / count * 1e6,
        **heartbeat.figures(),
    }


async def _bare(count: int, *, freeze: bool) -> dict[str, Any]:
    """
    Plain tasks, each awaiting a future _DEPTH coroutines deep, failed
    256 per loop turn: Python's own cost of what closing does.
    """
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(count)]

    async def deep(future: asyncio.Future[None], depth: int) -> None:
        if depth:
            await deep(future, depth - 1)
        else:
            await future

    tasks = [asyncio.create_task(deep(f, _DEPTH - 1)) for f in futures]
    for _ in range(3):
        await asyncio.sleep(0)
    finish = _Finish(tasks)
    heartbeat = _Heartbeat()
    with _frozen(freeze):
        async with heartbeat.beating():
            started = time.perf_counter()
            for start in range(0, count, 256):
                for future in futures[start : start + 256]:
                    future.set_exception(ClientStateError("closed"))
                await asyncio.sleep(0)
            await finish.done.wait()
    outcomes = _outcomes(tasks)
    if outcomes != {"ClientStateError": count}:
        msg = f"bare waiters ended otherwise: {outcomes}"
        raise RuntimeError(msg)
    return {
        "all_s": finish.at - started,
        "us_per_waiter": (finish.at - started) / count * 1e6,
        **heartbeat.figures(),
    }


async def _batch_client(url: str, jobs: int, concurrency: int) -> float:
    """
    CPU seconds per job of one generate_many run through the client.
    """
    requests = [Text2Img(prompt=f"batch {n}") for n in range(jobs)]
    async with Client(KEY, base_url=url, max_queued=None) as client:
        warm = [Text2Img(prompt="warm")] * min(jobs, 100)
        async for _ in client.generate_many(warm, concurrency=len(warm)):
            pass
        gc.collect()
        cpu = time.process_time()
        failed = 0
        batch = client.generate_many(requests, concurrency=concurrency)
        async for item in batch:
            failed += not item.ok
        spent = time.process_time() - cpu
    if failed:
        msg = f"{failed} batch jobs failed"
        raise RuntimeError(msg)
    return spent / jobs


@attrs.frozen
class _Done:
    """
    A stub job handle: its wait returns at once.
    """

    async def wait(self, _: float | None) -> None:
        await asyncio.sleep(0)


async def _stub_submit(_: JobRequest) -> Any:
    await asyncio.sleep(0)
    return _Done()


async def _batch_alone(jobs: int, concurrency: int) -> float:
    """
    CPU seconds per job of the batch runner with a stub submit.
    """
    requests = [Text2Img(prompt=f"batch {n}") for n in range(jobs)]
    gc.collect()
    cpu = time.process_time()
    async for _ in generate_many(
        _stub_submit,
        requests,
        timeout=None,
        ordered=False,
        concurrency=concurrency,
        on_progress=None,
    ):
        pass
    return (time.process_time() - cpu) / jobs


async def _levels(
    settings: Settings, measure: Callable[[int], Awaitable[float]]
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for level in settings.levels:
        runs = [await measure(level) for _ in range(settings.rounds)]
        figures[str(level)] = {
            "cpu_us_per_job": statistics.median(runs) * 1e6,
            "runs_us": [run * 1e6 for run in runs],
        }
    base = figures[str(settings.levels[0])]["cpu_us_per_job"]
    for row in figures.values():
        row["vs_base"] = row["cpu_us_per_job"] / base
    return figures


async def run(settings: Settings) -> dict[str, Any]:
    """
    Every scenario, each against a fresh emulator process where it needs
    one.
    """
    scenarios: dict[str, dict[str, Any]] = {}
    for freeze in (False, True):
        suffix = ", gc.freeze()" if freeze else ""
        async with emulator_process("--eta", "3600") as emulator:
            scenarios["close" + suffix] = await _close(
                emulator.url, settings.waiters, freeze=freeze
            )
        async with emulator_process("--eta", "3600") as emulator:
            scenarios["cancel" + suffix] = await _cancel(
                emulator.url,
                settings.waiters,
                settings.cancel_batch,
                freeze=freeze,
            )
        scenarios["bare asyncio" + suffix] = await _bare(
            settings.waiters, freeze=freeze
        )
    async with emulator_process(
        "--eta", "0", "--record-limit", "0"
    ) as emulator:
        through_client = await _levels(
            settings,
            lambda level: _batch_client(emulator.url, settings.jobs, level),
        )
    alone = await _levels(
        settings, lambda level: _batch_alone(settings.jobs, level)
    )
    return {
        "settings": attrs.asdict(settings),
        "scenarios": scenarios,
        "batch": {"through the client": through_client, "runner alone": alone},
        "targets": TARGETS,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def text(results: dict[str, Any]) -> str:
    """
    The results as plain-text tables, for the terminal.
    """
    settings = results["settings"]
    lines = [
        (
            f"{settings['waiters']:,} submits waiting for a queue slot "
            f"(cancel: {settings['cancel_batch']} per loop turn)"
        ),
        "",
        (
            f"{'scenario':<26}{'aclose s':>9}{'all s':>8}{'us/each':>8}"
            f"{'p99 ms':>8}{'max ms':>8}{'gc max':>8}{'gc old':>7}"
        ),
    ]
    for name, row in results["scenarios"].items():
        aclose = row.get("aclose_s")
        lines.append(
            f"{name:<26}{'-' if aclose is None else f'{aclose:.3f}':>9}"
            f"{row['all_s']:>8.3f}{row['us_per_waiter']:>8.1f}"
            f"{_ms(row['p99_lag_ms']):>8}{_ms(row['max_lag_ms']):>8}"
            f"{_ms(row['gc_longest_ms']):>8}{row['gc_older_runs']:>7}"
        )
    lines += [
        "",
        "max ms: the longest the loop was blocked (1 ms heartbeat);",
        "gc max: the longest garbage collection; gc old: collections of",
        "the older generations, which walk every live object.",
        "",
        (
            f"generate_many, {settings['jobs']:,} jobs: CPU us per job "
            f"(median of {settings['rounds']})"
        ),
        "",
        f"{'concurrency':>12}"
        + "".join(f"{name:>22}" for name in results["batch"]),
    ]
    for level in map(str, settings["levels"]):
        cells = "".join(
            f"{rows[level]['cpu_us_per_job']:>13.1f}"
            f" ({rows[level]['vs_base']:.2f}x)"
            for rows in results["batch"].values()
        )
        lines.append(f"{level:>12}{cells}")
    return "\n".join(lines)


_LINK: Final = "[closing under load](#closing-and-cancelling-under-load)"


def _scenario_targets(
    label: str, row: dict[str, Any], frozen: dict[str, Any]
) -> list[Target]:
    seconds, lag = row["all_s"], row["max_lag_ms"]
    return [
        Target(
            "10",
            f"{label}: every waiter ended",
            f"<= {TARGETS['close_all_s']:g} s",
            f"{seconds:.3f} s",
            report.at_most(seconds, TARGETS["close_all_s"], " s"),
            f"{row['us_per_waiter']:.1f} µs per waiter; with gc.freeze() "
            f"{frozen['all_s']:.3f} s: {_LINK}",
        ),
        Target(
            "10",
            f"{label}: longest event-loop block",
            f"<= {TARGETS['max_lag_ms']:g} ms",
            f"{lag:.1f} ms",
            report.at_most(lag, TARGETS["max_lag_ms"], " ms"),
            f"longest garbage collection {row['gc_longest_ms']:.1f} ms "
            f"({row['gc_older_runs']} of the older generations); with "
            f"gc.freeze() {frozen['max_lag_ms']:.1f} ms: {_LINK}",
        ),
    ]


def targets(data: dict[str, Any]) -> list[Target]:
    """
    Issue 10's figures: closing and cancelling 50,000 waiting submits, and
    the batch runner's CPU per job as concurrency grows.
    """
    waiters = f"{data['settings']['waiters']:,}"
    scenarios = data["scenarios"]
    rows = []
    for name, label in (
        ("close", f"aclose() with {waiters} submits waiting"),
        ("cancel", f"Cancelling {waiters} waiting submits, random order"),
    ):
        rows += _scenario_targets(
            label, scenarios[name], scenarios[f"{name}, gc.freeze()"]
        )
    levels = [str(level) for level in data["settings"]["levels"]]
    client = data["batch"]["through the client"]
    alone = data["batch"]["runner alone"]
    top = levels[-1]
    rows.append(
        Target(
            "10",
            f"generate_many CPU per job, concurrency {top} vs {levels[0]}",
            f"<= {TARGETS['cpu_ratio']:g}x",
            f"{client[top]['vs_base']:.2f}x",
            report.at_most(client[top]["vs_base"], TARGETS["cpu_ratio"], "x"),
            f"{client[levels[0]]['cpu_us_per_job']:.0f} to "
            f"{client[top]['cpu_us_per_job']:.0f} µs/job; the runner alone "
            f"{alone[top]['vs_base']:.2f}x: {_LINK}",
        )
    )
    return rows


def _cell(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"  # noqa: RUF001


def render(data: dict[str, Any]) -> list[str]:
    """
    The page's section: every scenario, and batch CPU per level.
    """
    settings = data["settings"]
    scenarios = [
        (
            name,
            _cell(row.get("aclose_s"), 3),
            _cell(row["all_s"], 3),
            _cell(row["us_per_waiter"]),
            _cell(row["p99_lag_ms"]),
            _cell(row["max_lag_ms"]),
            _cell(row["gc_longest_ms"]),
            str(row["gc_older_runs"]),
        )
        for name, row in data["scenarios"].items()
    ]
    batch = [
        (
            f"{level:,}",
            *(
                f"{rows[str(level)]['cpu_us_per_job']:,.1f} "
                f"({rows[str(level)]['vs_base']:.2f}x)"
                for rows in data["batch"].values()
            ),
        )
        for level in settings["levels"]
    ]
    return [
        "## Closing and cancelling under load",
        "",
        f"{settings['waiters']:,} submits wait for a queue slot",
        "(`max_queued=5`, the five slots held by jobs with an hour's `eta`",
        "on an emulator in its own process). *close*: `aclose()` is timed,",
        "and so is the moment the last waiter has its `ClientStateError`.",
        "*cancel*: the same waiters cancelled in random order,",
        f"{settings['cancel_batch']} per loop turn, as an application's own",
        "timeouts would fire, timed to the last `CancelledError`. *bare",
        "asyncio*: as many plain tasks, each awaiting a future five",
        "coroutines deep, failed the same way: what Python itself costs. A",
        "heartbeat sleeps 1 ms again and again; its worst lateness is the",
        "longest the loop was blocked. Garbage collections are timed apart",
        "(`gc.callbacks`): a full collection walks every live object, and",
        "its pause is the interpreter's, whoever made the objects. Each",
        "scenario runs again after `gc.freeze()`, what a service holding",
        "tens of thousands of tasks does to keep full collections short.",
        "",
        *report.table(
            (
                "Scenario",
                "aclose() s",
                "All ended s",
                "µs per waiter",
                "Lag p99 ms",
                "Lag max ms",
                "Longest GC ms",
                "Older-generation GCs",
            ),
            scenarios,
        ),
        f"`generate_many`, {settings['jobs']:,} jobs: CPU µs per job",
        f"(median of {settings['rounds']} runs) and its ratio to the lowest",
        "concurrency, through the whole client against the emulator (jobs",
        "done in their submit answer) and for the batch runner alone with a",
        "stub `submit`.",
        "",
        *report.table(("Concurrency", *data["batch"]), batch),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run, print the tables, write the JSON; return the exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.shutdown",
        description="Closing and cancelling under load; batch CPU per job.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, to check the code runs; the figures mean nothing",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"results JSON (default: {RESULTS.relative_to(ROOT)}; "
        "none with --quick)",
    )
    args = parser.parse_args(argv)
    results = asyncio.run(run(QUICK if args.quick else FULL))
    print(text(results))
    out = args.out if args.out is not None or args.quick else RESULTS
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(results, indent=2, allow_nan=False) + "\n",
            encoding="utf-8",
        )
        print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
