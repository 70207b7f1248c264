"""
Where the client's CPU goes, and what uvloop and orjson would change.

Profiles (``cProfile`` on the CPU time of the event loop's thread, so
waiting for the server does not count), each against an emulator in its
own process:

- ``submit``: ``client.generate`` on jobs that succeed at once (``--eta
  0``), 10 at a time: the throughput benchmark's path.
- ``submit, network stubbed``: the same with ``Requester._post`` replaced
  at run time by JSON encoding the body and decoding a recorded answer:
  the library's own work, without aiohttp or the network's noise. Also
  timed unprofiled, beside the raw loop's equivalent (build the body,
  encode it, decode the answer): their difference is the client's
  overhead per job, free of network jitter.
- ``fetch``: ``job.refresh()`` on pending jobs: one poll.
- ``decode``: ``decode_image`` on a 1024x1024 PNG's base64 text.
- ``dispatch``: ``WebhookReceiver.dispatch`` on success callbacks.

For each: own time grouped by package (where the CPU goes) and the
functions with the most own time. cProfile slows Python code more than C
code, so the shares lean towards Python; the throughput benchmark has the
unprofiled truth.

Timed anatomy of the save path: thread hop, atomic write, decoding, each
against its floor.

Experiments, when the packages are installed (neither is a dependency):
throughput at concurrency 10 on uvloop's event loop, and with orjson for
JSON both ways (the client's ``json.loads`` swapped at run time, a session
with ``json_serialize`` passed in), each against the default in the same
round, in a worker thread with an event loop of its own.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import cProfile
import importlib.util
import io
import json
import pstats
import tempfile
import time

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import anyio
import attrs

from modelslab_async import Client, Text2Img
from modelslab_async import _http as http_module
from modelslab_async import _json as json_module
from modelslab_async._outputs import _write_atomically, decode_image
from modelslab_async.emulator._images import render_png
from modelslab_async.webhooks import WebhookReceiver

from . import report, throughput, webhooks
from ._common import (
    KEY,
    emulator_process,
    rotated,
    run_workers,
    short_path,
    summary,
)
from .report import Target


_TOP: Final = 12
#: Package of a profiled function, by a piece of its file name.
_PACKAGES: Final = (
    ("/modelslab_async/", "modelslab_async"),
    ("<attrs generated", "attrs"),
    ("/attr/", "attrs"),
    ("<cattrs generated", "cattrs"),
    ("/cattrs/", "cattrs"),
    ("/anyio/", "anyio"),
    ("/aiohttp/", "aiohttp"),
    ("/yarl/", "yarl/multidict"),
    ("/multidict/", "yarl/multidict"),
    ("/asyncio/", "asyncio"),
    ("/json/", "json"),
)


@attrs.frozen
class Settings:
    submits: int
    fetches: int
    decodes: int
    callbacks: int
    experiment_jobs: int
    experiment_rounds: int
    image_size: int


FULL: Final = Settings(
    submits=3000,
    fetches=2000,
    decodes=200,
    callbacks=2000,
    experiment_jobs=2000,
    experiment_rounds=5,
    image_size=1024,
)
QUICK: Final = Settings(
    submits=20,
    fetches=10,
    decodes=2,
    callbacks=10,
    experiment_jobs=20,
    experiment_rounds=1,
    image_size=64,
)


# --- profiles --------------------------------------------------------------


def _package(filename: str) -> str:
    if filename == "~":
        return "builtins (C)"
    for piece, package in _PACKAGES:
        if piece in filename:
            return package
    return "other"


def _where(key: tuple[str, int, str]) -> str:
    """
    ``file:line(function)``, or the name of a built-in.
    """
    filename, line, name = key
    if filename == "~":
        return name
    return f"{short_path(filename)}:{line}({name})"


def _digest(profile: cProfile.Profile, units: int) -> dict[str, Any]:
    """
    Own time by package and the top functions, per unit of work.
    """
    stats = pstats.Stats(profile, stream=io.StringIO())
    table: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in table.values()) or 1e-9
    by_package: collections.Counter[str] = collections.Counter()
    for key, entry in table.items():
        by_package[_package(key[0])] += entry[2]
    top = sorted(table.items(), key=lambda item: item[1][2], reverse=True)
    return {
        "profiled_us_per_unit": total / units * 1e6,
        "by_package": {
            name: seconds / total for name, seconds in by_package.most_common()
        },
        "top": [
            {
                "function": _where(key),
                "share": entry[2] / total,
                "calls_per_unit": entry[1] / units,
            }
            for key, entry in top[:_TOP]
        ],
    }


async def _profiled(work: Callable[[], Awaitable[None]]) -> cProfile.Profile:
    # CPU time of this thread, not wall time: waiting in epoll for the
    # server is not a cost of ours.
    profile = cProfile.Profile(time.thread_time)
    profile.enable()
    try:
        await work()
    finally:
        profile.disable()
    return profile


async def _profile_submit(settings: Settings) -> dict[str, Any]:
    async with (
        emulator_process("--eta", "0") as emulator,
        throughput.ours(emulator.url) as one,
    ):
        await run_workers(100, 10, one)

        async def work() -> None:
            await run_workers(settings.submits, 10, one)

        return _digest(await _profiled(work), settings.submits)


async def _profile_fetch(settings: Settings) -> dict[str, Any]:
    async with (
        emulator_process("--eta", "3600") as emulator,
        Client(KEY, base_url=emulator.url, max_queued=None) as client,
    ):
        jobs = [
            await client.submit(Text2Img(prompt=f"fetch {n}"))
            for n in range(10)
        ]

        async def work() -> None:
            for number in range(settings.fetches):
                await jobs[number % len(jobs)].refresh()

        return _digest(await _profiled(work), settings.fetches)


async def _recorded_answer(url: str) -> bytes:
    body = {"key": KEY, "model_id": "flux", "prompt": "recorded"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + throughput.ROUTE, json=body) as answer,
    ):
        return await answer.read()


@contextlib.contextmanager
def _stubbed_network(answer: bytes) -> Iterator[None]:
    """
    Replace the client's HTTP exchange, and only that, by its JSON work.
    """
    original = http_module.Requester._post

    async def post(
        self: http_module.Requester,
        path: str,  # noqa: ARG001 (the signature it stands in for)
        body: dict[str, Any],
        where: dict[str, Any],
    ) -> dict[str, Any]:
        # Everything the client does around one HTTP exchange: encode the
        # body as it would send it, read the answer as it would read it.
        json_module.dumps(body)
        data = http_module.parse(answer)
        return self._interpret(data, answer, 200, None, where)

    http_module.Requester._post = post  # type: ignore[method-assign]
    try:
        yield
    finally:
        http_module.Requester._post = original  # type: ignore[method-assign]


def _raw_equivalent(answer: bytes, jobs: int) -> float:
    """
    CPU µs per job of the raw loop's work besides the HTTP call.
    """
    started = time.process_time()
    for number in range(jobs):
        body = {
            "key": KEY,
            "model_id": "flux",
            "prompt": f"bench {number}",
            "track_id": f"raw-{number}",
        }
        json.dumps(body)
        if json.loads(answer)["status"] != "success":
            raise RuntimeError
    return (time.process_time() - started) / jobs * 1e6


async def _stubbed(settings: Settings) -> dict[str, Any]:
    async with emulator_process("--eta", "0") as emulator:
        answer = await _recorded_answer(emulator.url)
        async with throughput.ours(emulator.url) as one:
            with _stubbed_network(answer):

                async def work() -> None:
                    for number in range(settings.submits):
                        await one(number)

                await work()  # warm
                started = time.process_time()
                await work()
                ours = time.process_time() - started
                profile = await _profiled(work)
    raw = _raw_equivalent(answer, settings.submits)
    ours_us = ours / settings.submits * 1e6
    return {
        "ours_us_per_job": ours_us,
        "raw_us_per_job": raw,
        "overhead_us_per_job": ours_us - raw,
        "profile": _digest(profile, settings.submits),
    }


def _base64_image(size: int) -> bytes:
    return base64.b64encode(render_png(1, "decode", size, size))


async def _profile_decode(settings: Settings) -> dict[str, Any]:
    text = _base64_image(settings.image_size)

    async def work() -> None:
        for _ in range(settings.decodes):
            decode_image(text)

    return _digest(await _profiled(work), settings.decodes)


async def _profile_dispatch(settings: Settings) -> dict[str, Any]:
    receiver = WebhookReceiver()
    async with (
        emulator_process("--eta", "3600", bench_routes=True) as emulator,
        Client(
            KEY, base_url=emulator.url, max_queued=None, webhooks=receiver
        ) as client,
    ):
        jobs, waiters = await webhooks.pending_jobs(
            client, settings.callbacks, "dispatch"
        )
        bodies = [
            (urlsplit(url).path, json.dumps(payload).encode())
            for url, payload in webhooks.callbacks_for(
                jobs, await emulator.jobs()
            )
        ]

        async def work() -> None:
            for path, body in bodies:
                receiver.dispatch(path, body, "application/json")

        profile = await _profiled(work)
        await asyncio.gather(*waiters)
    return _digest(profile, settings.callbacks)


# --- anatomy of a save -------------------------------------------------------


def _per_call(function: Callable[[], object], repeat: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(repeat):
        function()
    return (time.perf_counter() - started) / repeat * 1e6


async def _anatomy(settings: Settings) -> dict[str, Any]:
    """
    Microseconds per call of each step of ``Output.save`` and its floor.
    """
    text = _base64_image(settings.image_size)
    data = base64.b64decode(text)
    repeat = max(settings.decodes, 2)
    started = time.perf_counter()
    for _ in range(repeat):
        await anyio.to_thread.run_sync(time.monotonic)
    hop = (time.perf_counter() - started) / repeat * 1e6
    with tempfile.TemporaryDirectory(prefix="bench-anatomy-") as temp:
        atomic, plain = Path(temp, "atomic.png"), Path(temp, "plain.png")
        return {
            "image_bytes": len(data),
            "base64_bytes": len(text),
            "decode_image_us": _per_call(lambda: decode_image(text), repeat),
            "b64decode_us": _per_call(lambda: base64.b64decode(text), repeat),
            "atomic_write_us": _per_call(
                lambda: _write_atomically(atomic, data), repeat
            ),
            "write_bytes_us": _per_call(
                lambda: plain.write_bytes(data), repeat
            ),
            "thread_hop_us": hop,
        }


# --- experiments -------------------------------------------------------------


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@contextlib.contextmanager
def json_backend(name: str) -> Iterator[None]:
    """
    Switch the client's JSON backend for a while, as the ``fast`` extra
    does for good when orjson is installed.
    """
    before = json_module.BACKEND
    json_module.use(name)
    try:
        yield
    finally:
        json_module.use(before)


@contextlib.asynccontextmanager
async def _ours_orjson(url: str) -> AsyncIterator[throughput.Job]:
    async with throughput.ours(url) as one:
        with json_backend("orjson"):
            yield one


def _measure_in_thread(
    url: str,
    make: Callable[[str], contextlib.AbstractAsyncContextManager[Any]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None,
    settings: Settings,
) -> dict[str, float]:
    async def measure() -> dict[str, float]:
        async with make(url) as one:
            await run_workers(100, 10, one)
            wall, cpu = await run_workers(settings.experiment_jobs, 10, one)
        return {
            "jobs_per_s": settings.experiment_jobs / wall,
            "cpu_us_per_job": cpu / settings.experiment_jobs * 1e6,
        }

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(measure())


async def _experiments(settings: Settings) -> dict[str, Any]:
    variants: dict[str, tuple[Any, Any]] = {
        "asyncio + json (default)": (throughput.ours, None),
    }
    missing = []
    if _installed("uvloop"):
        import uvloop  # noqa: PLC0415

        variants["uvloop"] = (throughput.ours, uvloop.new_event_loop)
    else:
        missing.append("uvloop")
    if _installed("orjson"):
        variants["orjson"] = (_ours_orjson, None)
    else:
        missing.append("orjson")
    rounds: list[dict[str, dict[str, float]]] = []
    for number in range(settings.experiment_rounds):
        figures = {}
        async with emulator_process("--eta", "0") as emulator:
            for name in rotated(list(variants), number):
                make, factory = variants[name]
                figures[name] = await asyncio.to_thread(
                    _measure_in_thread, emulator.url, make, factory, settings
                )
        rounds.append(figures)
    return {"missing": missing, "variants": _relative(rounds)}


def _relative(rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    base = "asyncio + json (default)"
    return {
        name: {
            "jobs_per_s": summary([r[name]["jobs_per_s"] for r in rounds]),
            "cpu_us_per_job": summary(
                [r[name]["cpu_us_per_job"] for r in rounds]
            ),
            "throughput_vs_default": summary(
                [r[name]["jobs_per_s"] / r[base]["jobs_per_s"] for r in rounds]
            ),
        }
        for name in rounds[0]
    }


async def run(settings: Settings) -> dict[str, Any]:
    """
    Profile each hot path, time the save path, run the experiments.
    """
    stubbed = await _stubbed(settings)
    return {
        "settings": attrs.asdict(settings),
        "stubbed_overhead": {
            k: v for k, v in stubbed.items() if k != "profile"
        },
        "profiles": {
            "submit": await _profile_submit(settings),
            "submit, network stubbed": stubbed["profile"],
            "fetch": await _profile_fetch(settings),
            "decode": await _profile_decode(settings),
            "dispatch": await _profile_dispatch(settings),
        },
        "save_anatomy": await _anatomy(settings),
        "experiments": await _experiments(settings),
    }


# --- the page ----------------------------------------------------------------


def targets(data: dict[str, Any]) -> list[Target]:
    """
    None of its own: it explains the throughput and outputs verdicts.
    """
    del data
    return []


def _profile(name: str, profile: dict[str, Any]) -> list[str]:
    packages = ", ".join(
        f"{package} {share * 100:.0f} %"
        for package, share in profile["by_package"].items()
        if share >= 0.01
    )
    rows = [
        (
            f"`{entry['function']}`",
            f"{entry['share'] * 100:.1f} %",
            report.number(entry["calls_per_unit"], 2),
        )
        for entry in profile["top"]
    ]
    return [
        f"### {name}",
        "",
        f"{report.number(profile['profiled_us_per_unit'], 1)} µs of CPU per",
        f"call under the profiler. Own time by package: {packages}.",
        "",
        *report.table(("Function", "Own time", "Calls per unit"), rows),
    ]


_PROFILE_NAMES: Final = {
    "submit": "submit: `client.generate` of a job done at once",
    "submit, network stubbed": (
        "submit, network stubbed: the library's own work per job"
    ),
    "fetch": "fetch: `job.refresh()` of a pending job",
    "decode": "decode: `decode_image` of a 1024x1024 PNG's base64",
    "dispatch": "dispatch: `WebhookReceiver.dispatch` of a success",
}


def render(data: dict[str, Any]) -> list[str]:
    """
    The section: profiles of each hot path, the save path step by step,
    and the uvloop and orjson experiments.
    """
    lines = [
        "## Where the time goes",
        "",
        "`cProfile` of each hot path on the CPU time of the event loop's",
        "thread (waiting for the server does not count), against an",
        "emulator in its own process. The profiler slows Python code more",
        "than C code, so shares lean towards Python; the unprofiled cost",
        "is in the sections above. Own time is time in the function",
        "itself, not in what it calls.",
        "",
    ]
    stubbed = data["stubbed_overhead"]
    lines += [
        "### Overhead without the network",
        "",
        "The same `client.generate` loop with the HTTP call replaced at run",
        "time by what aiohttp would do with JSON (encode the body, decode a",
        "recorded answer), timed without the profiler: the library's own",
        "CPU per job, free of the network's noise, beside the raw loop's",
        "equivalent (build the body, encode it, decode the answer).",
        "",
        *report.table(
            ("modelslab-async µs/job", "raw equivalent µs/job", "Overhead"),
            [
                (
                    report.number(stubbed["ours_us_per_job"], 1),
                    report.number(stubbed["raw_us_per_job"], 1),
                    f"{report.number(stubbed['overhead_us_per_job'], 1)} µs",
                )
            ],
        ),
    ]
    for name, profile in data["profiles"].items():
        lines += _profile(_PROFILE_NAMES.get(name, name), profile)
    anatomy = data["save_anatomy"]
    lines += [
        "### The save path step by step",
        "",
        f"Per call, on a {anatomy['image_bytes']:,}-byte PNG",
        f"({anatomy['base64_bytes']:,} bytes of base64):",
        "",
        *report.table(
            ("Step", "Ours µs", "Floor µs"),
            [
                (
                    "decode",
                    report.number(anatomy["decode_image_us"]),
                    report.number(anatomy["b64decode_us"]),
                ),
                (
                    "write",
                    report.number(anatomy["atomic_write_us"]),
                    report.number(anatomy["write_bytes_us"]),
                ),
                (
                    "hop to a worker thread and back",
                    report.number(anatomy["thread_hop_us"]),
                    "0",
                ),
            ],
        ),
    ]
    return lines + _experiments_section(data["experiments"])


def _experiments_section(data: dict[str, Any]) -> list[str]:
    rows = [
        (
            name,
            report.spread(figures["jobs_per_s"]),
            report.spread(figures["cpu_us_per_job"]),
            report.ratio(figures["throughput_vs_default"]),
        )
        for name, figures in data["variants"].items()
    ]
    missing = (
        f" Not installed, so not measured: {', '.join(data['missing'])}."
        if data["missing"]
        else ""
    )
    return [
        "## uvloop and orjson",
        "",
        "Neither is a dependency; both come with the `fast` extra. When",
        "installed, the benchmark runs",
        "modelslab-async's throughput at concurrency 10 on uvloop's event",
        "loop, and with orjson as the client's JSON backend (what the",
        "`fast` extra gives: `pip install 'modelslab-async[fast]'`), each",
        "beside the default in the same round, in a worker thread with its",
        "own event loop. Every other figure on this page uses the standard",
        "library's json, as a plain install does." + missing,
        "",
        *report.table(("Variant", "Jobs/s", "CPU µs/job", "vs default"), rows),
    ]
