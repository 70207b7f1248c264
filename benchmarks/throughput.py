"""
Throughput and overhead: jobs that succeed at once, three ways.

The emulator runs with ``--eta 0``, so the submit answer itself is the
success: a job is exactly one HTTP round trip and everything else is client
overhead. Three clients do the same jobs at concurrency 1, 10 and 100:

- ``modelslab-async``: ``await client.generate(Text2Img(...))`` on a
  ``Client(max_queued=None)``, so admission control does not cap anything.
- ``raw aiohttp``: one ``ClientSession``, POST the same JSON body, read the
  JSON answer, check ``status``. The floor: no client can do less.
- ``modelslab-py``: the official SDK's async path,
  ``Community.async_text_to_image``. Its ``Client`` has no base URL
  option: ``base_url`` is a plain attribute set in ``__init__``, so we
  overwrite it on the instance before building ``Community`` (no code is
  patched).

Each round starts a fresh emulator process, opens every client, and runs
each client's jobs in slices taken in turn (the order rotated per slice),
so a slowdown of the machine falls on every client alike. Figures are
medians over rounds, with min and max; ratios are taken within a round,
side by side.

Then, in slices the same way, at concurrency 50 (issue 13):

- **submit plus reading the one output**: ours ``generate()`` then
  ``result.outputs[0].read()``; raw aiohttp POSTs, then GETs the output
  URL and reads the bytes;
- **the default cap against none**: ours with ``max_queued=5`` (the
  default) and ``max_queued=None``, plain submits and submit plus read. A
  job done in its submit answer holds a queue slot for that round trip
  only, so the cap should cost next to nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import aiohttp
import attrs

from modelslab_async import Client, Text2Img

from . import report
from ._common import KEY, emulator_process, rotated, run_workers, summary
from .report import Target


OURS: Final = "modelslab-async"
RAW: Final = "raw aiohttp"
PEER: Final = "modelslab-py"
#: Submit route below the API root, the same for all three clients.
ROUTE: Final = "v6/images/text2img"

#: One job: ``await one(number)``.
Job = Callable[[int], Awaitable[None]]


@attrs.frozen
class Settings:
    jobs: int
    concurrency: tuple[int, ...]
    rounds: int
    warmup: int
    slices: int
    #: The cap and read scenario: jobs per contender, at this concurrency.
    cap_jobs: int = 1000
    cap_concurrency: int = 50


FULL: Final = Settings(
    jobs=2000, concurrency=(1, 10, 100), rounds=5, warmup=200, slices=4
)
QUICK: Final = Settings(
    jobs=20,
    concurrency=(1, 4),
    rounds=1,
    warmup=4,
    slices=2,
    cap_jobs=8,
    cap_concurrency=4,
)

#: The default queue cap, as ``Client()`` has it.
DEFAULT_CAP: Final = 5
CAPPED: Final = f"{OURS}, max_queued={DEFAULT_CAP}"
UNCAPPED: Final = f"{OURS}, max_queued=None"
READ: Final = " + read"
#: One prompt, seed and size for every read job: the emulator draws the
#: PNG once and serves it from memory, so the read measures the clients,
#: not the emulator's drawing.
READ_PROMPT: Final = "bench read"
READ_SIDE: Final = 512


def peer_problem() -> str | None:
    """
    Why ``modelslab-py`` cannot run here, or ``None`` when it can.
    """
    if importlib.util.find_spec("modelslab_py") is None:
        return "not installed"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import modelslab_py.core.client  # noqa: F401, PLC0415
    except ImportError as exc:
        # 0.2.3 imports requests without declaring it as a dependency.
        return f"installed, but importing it fails: {exc}"
    return None


@contextlib.asynccontextmanager
async def ours(url: str) -> AsyncIterator[Job]:
    """
    One job through modelslab-async.
    """
    async with _ours(url, max_queued=None, read=False) as one:
        yield one


@contextlib.asynccontextmanager
async def _ours(
    url: str, *, max_queued: int | None, read: bool
) -> AsyncIterator[Job]:
    async with Client(KEY, base_url=url, max_queued=max_queued) as client:

        async def one(number: int) -> None:
            request = (
                Text2Img(prompt=f"bench {number}")
                if not read
                else Text2Img(
                    prompt=READ_PROMPT,
                    seed=1,
                    width=READ_SIDE,
                    height=READ_SIDE,
                )
            )
            result = await client.generate(request)
            if not result.outputs:
                msg = f"job {result.id} has no outputs"
                raise RuntimeError(msg)
            if read and not await result.outputs[0].read():
                msg = f"job {result.id}'s output is empty"
                raise RuntimeError(msg)

        yield one


def ours_with(
    *, max_queued: int | None, read: bool
) -> Callable[[str], contextlib.AbstractAsyncContextManager[Job]]:
    """
    modelslab-async with this cap, reading the output or not.
    """

    def factory(url: str) -> contextlib.AbstractAsyncContextManager[Job]:
        return _ours(url, max_queued=max_queued, read=read)

    return factory


@contextlib.asynccontextmanager
async def raw(url: str) -> AsyncIterator[Job]:
    """
    The same HTTP call with nothing around it: the floor.
    """
    endpoint = url + ROUTE
    async with aiohttp.ClientSession() as session:

        async def one(number: int) -> None:
            body = {
                "key": KEY,
                "model_id": "flux",
                "prompt": f"bench {number}",
                "track_id": f"raw-{number}",
            }
            async with session.post(endpoint, json=body) as answer:
                data = await answer.json()
            if data["status"] != "success":
                msg = f"job {data.get('id')} is {data['status']}"
                raise RuntimeError(msg)

        yield one


@contextlib.asynccontextmanager
async def raw_read(url: str) -> AsyncIterator[Job]:
    """
    The floor of submit plus reading the output: POST, then GET its URL.
    """
    endpoint = url + ROUTE
    async with aiohttp.ClientSession() as session:

        async def one(number: int) -> None:
            body = {
                "key": KEY,
                "model_id": "flux",
                "prompt": READ_PROMPT,
                "seed": 1,
                "width": READ_SIDE,
                "height": READ_SIDE,
                "track_id": f"raw-read-{number}",
            }
            async with session.post(endpoint, json=body) as answer:
                data = await answer.json()
            if data["status"] != "success":
                msg = f"job {data.get('id')} is {data['status']}"
                raise RuntimeError(msg)
            async with session.get(data["output"][0]) as image:
                image.raise_for_status()
                if not await image.read():
                    msg = f"job {data['id']}'s output is empty"
                    raise RuntimeError(msg)

        yield one


@contextlib.asynccontextmanager
async def peer(url: str) -> AsyncIterator[Job]:
    """
    The same job through the official SDK's async path.
    """
    with warnings.catch_warnings():
        # modelslab-py uses pydantic v1 idioms: class Config and .dict()
        # warn on every call under pydantic 2. Silenced, not skipped: the
        # cost of warn() itself is part of what the SDK costs.
        warnings.simplefilter("ignore", DeprecationWarning)
        from modelslab_py.core.apis.community import Community  # noqa: PLC0415
        from modelslab_py.core.client import Client as PeerClient  # noqa: PLC0415
        from modelslab_py.schemas.community import Text2Image  # noqa: PLC0415

        client = PeerClient(api_key=KEY)
        client.base_url = url  # No constructor option; see the docstring.
        community = Community(client)
        try:

            async def one(number: int) -> None:
                schema = Text2Image(prompt=f"bench {number}", model_id="flux")
                data = await community.async_text_to_image(schema)
                if data["status"] != "success":
                    # Never with eta 0; this is how its users would wait.
                    data = await community.async_fetch(str(data["id"]))

            yield one
        finally:
            await client.close()


Factory = Callable[[str], contextlib.AbstractAsyncContextManager[Job]]

CLIENTS: Final[dict[str, Factory]] = {OURS: ours, RAW: raw, PEER: peer}
#: The cap and read scenario, all in one round's slices.
CAP_CLIENTS: Final[dict[str, Factory]] = {
    CAPPED: ours_with(max_queued=DEFAULT_CAP, read=False),
    UNCAPPED: ours_with(max_queued=None, read=False),
    RAW: raw,
    CAPPED + READ: ours_with(max_queued=DEFAULT_CAP, read=True),
    UNCAPPED + READ: ours_with(max_queued=None, read=True),
    RAW + READ: raw_read,
}


async def _round(
    settings: Settings,
    concurrency: int,
    order: list[str],
    *,
    clients: dict[str, Factory] = CLIENTS,
    jobs_per_client: int | None = None,
) -> dict[str, dict[str, float]]:
    """
    Every client, its jobs in slices taken in turn, on one emulator.

    Taking turns in slices rather than one whole run each spreads any
    slowdown of the machine over every client alike.
    """
    wall = dict.fromkeys(order, 0.0)
    cpu = dict.fromkeys(order, 0.0)
    total = settings.jobs if jobs_per_client is None else jobs_per_client
    per_slice = max(1, total // settings.slices)
    async with (
        emulator_process("--eta", "0") as emulator,
        contextlib.AsyncExitStack() as stack,
    ):
        jobs = {}
        for name in order:
            jobs[name] = await stack.enter_async_context(
                clients[name](emulator.url)
            )
            # Warm up at full concurrency so every connection is open.
            await run_workers(settings.warmup, concurrency, jobs[name])
        for turn in range(settings.slices):
            for name in rotated(order, turn):
                seconds, used = await run_workers(
                    per_slice, concurrency, jobs[name]
                )
                wall[name] += seconds
                cpu[name] += used
    done = per_slice * settings.slices
    return {
        name: {
            "jobs_per_s": done / wall[name],
            "cpu_us_per_job": cpu[name] / done * 1e6,
        }
        for name in order
    }


def _level(rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    names = list(rounds[0])
    level: dict[str, Any] = {
        name: {
            "jobs_per_s": summary([r[name]["jobs_per_s"] for r in rounds]),
            "cpu_us_per_job": summary(
                [r[name]["cpu_us_per_job"] for r in rounds]
            ),
        }
        for name in names
    }
    for other in (RAW, PEER):
        if other in names:
            level[OURS][f"throughput_vs_{_slug(other)}"] = summary(
                [
                    r[OURS]["jobs_per_s"] / r[other]["jobs_per_s"]
                    for r in rounds
                ]
            )
            level[OURS][f"cpu_vs_{_slug(other)}"] = summary(
                [
                    r[OURS]["cpu_us_per_job"] / r[other]["cpu_us_per_job"]
                    for r in rounds
                ]
            )
    return level


def _slug(name: str) -> str:
    return "raw" if name == RAW else "peer"


async def run(settings: Settings, *, peer: bool = True) -> dict[str, Any]:
    """
    Measure every client at every concurrency; see the module docstring.

    Args:
        peer: Include ``modelslab-py`` if it is installed.
    """
    problem = peer_problem() if peer else "left out"
    names = [OURS, RAW] + ([PEER] if problem is None else [])
    levels = {}
    for concurrency in settings.concurrency:
        rounds = [
            await _round(settings, concurrency, rotated(names, number))
            for number in range(settings.rounds)
        ]
        levels[str(concurrency)] = _level(rounds)
    return {
        "settings": attrs.asdict(settings),
        "clients": names,
        "peer_missing": PEER not in names,
        "peer_problem": problem,
        "levels": levels,
        "cap": await _cap(settings),
        "targets": _targets(levels),
    }


async def _cap(settings: Settings) -> dict[str, Any]:
    """
    Submit plus read, and the default cap against none, at one level.
    """
    names = list(CAP_CLIENTS)
    rounds = [
        await _round(
            settings,
            settings.cap_concurrency,
            rotated(names, number),
            clients=CAP_CLIENTS,
            jobs_per_client=settings.cap_jobs,
        )
        for number in range(settings.rounds)
    ]
    clients: dict[str, Any] = {
        name: {
            "jobs_per_s": summary([r[name]["jobs_per_s"] for r in rounds]),
            "cpu_us_per_job": summary(
                [r[name]["cpu_us_per_job"] for r in rounds]
            ),
        }
        for name in names
    }
    for suffix in ("", READ):
        floor = RAW + suffix
        for name in (CAPPED + suffix, UNCAPPED + suffix):
            clients[name]["throughput_vs_raw"] = summary(
                [
                    r[name]["jobs_per_s"] / r[floor]["jobs_per_s"]
                    for r in rounds
                ]
            )
            clients[name]["cpu_vs_raw"] = summary(
                [
                    r[name]["cpu_us_per_job"] / r[floor]["cpu_us_per_job"]
                    for r in rounds
                ]
            )
        capped = CAPPED + suffix
        clients[capped]["throughput_vs_uncapped"] = summary(
            [
                r[capped]["jobs_per_s"] / r[UNCAPPED + suffix]["jobs_per_s"]
                for r in rounds
            ]
        )
        # With every worker waiting for one of the cap's slots, the slots
        # are never free: each job held one for cap / rate seconds.
        clients[capped]["slot_held_us"] = summary(
            [DEFAULT_CAP / r[capped]["jobs_per_s"] * 1e6 for r in rounds]
        )
    return {
        "jobs": settings.cap_jobs,
        "concurrency": settings.cap_concurrency,
        "cap": DEFAULT_CAP,
        "clients": clients,
    }


def _targets(levels: dict[str, Any]) -> dict[str, Any]:
    worst_raw = min(
        level[OURS]["throughput_vs_raw"]["median"] for level in levels.values()
    )
    result: dict[str, Any] = {
        "throughput_vs_raw_min_over_levels": worst_raw,
        "throughput_vs_raw_met": worst_raw >= 0.9,
    }
    if all("throughput_vs_peer" in level[OURS] for level in levels.values()):
        worst_peer = min(
            level[OURS]["throughput_vs_peer"]["median"]
            for level in levels.values()
        )
        result["throughput_vs_peer_min_over_levels"] = worst_peer
        result["ahead_of_peer_met"] = worst_peer > 1.0
    return result


# --- the page ----------------------------------------------------------------

_OVERHEAD: Final = "[overhead](#client-overhead)"


def targets(data: dict[str, Any]) -> list[Target]:
    """
    Throughput and CPU per job against raw aiohttp and modelslab-py.
    """
    rows: list[Target] = []
    levels = data["levels"]
    for level, figures in levels.items():
        ours = figures[OURS]
        cpu = ours["cpu_vs_raw"]["median"]
        rows.append(
            Target(
                "13",
                f"Throughput vs raw aiohttp, concurrency {level} "
                "(issue 6 set it too)",
                ">= 0.90x",
                report.ratio(ours["throughput_vs_raw"]),
                report.at_least(ours["throughput_vs_raw"]["median"], 0.9, "x"),
                f"client CPU per job {cpu:.2f}x the raw loop's: {_OVERHEAD}",
            )
        )
    for level, figures in levels.items():
        ours = figures[OURS]
        extra = (
            ours["cpu_us_per_job"]["median"]
            - figures[RAW]["cpu_us_per_job"]["median"]
        )
        rows.append(
            Target(
                "13",
                f"Client CPU per job vs raw aiohttp, concurrency {level}",
                "<= 1.20x",
                report.ratio(ours["cpu_vs_raw"]),
                report.at_most(ours["cpu_vs_raw"]["median"], 1.2, "x"),
                f"{extra:,.0f} µs/job more than the raw loop: "
                "[where the time goes](#where-the-time-goes)",
            )
        )
    top = levels.get("100")
    if top is not None:
        cpu = top[OURS]["cpu_vs_raw"]["median"]
        no_regression = "no regression" if cpu <= 1.48 else "a regression"
        rows.append(
            Target(
                "9",
                "Client CPU per job vs raw aiohttp, concurrency 100",
                "<= 1.25x, and never above 1.48x (before issue 9)",
                report.ratio(top[OURS]["cpu_vs_raw"]),
                report.at_most(cpu, 1.25, "x") + f"; {no_regression}",
                _OVERHEAD,
            )
        )
    rows += _cap_targets(data.get("cap"))
    for level, figures in levels.items():
        ours = figures[OURS]
        if "throughput_vs_peer" not in ours:
            rows.append(
                report.not_run(
                    "6",
                    "Throughput vs modelslab-py",
                    "> 1.00x",
                    data.get("peer_problem") or "",
                )
            )
            break
        peer = ours["throughput_vs_peer"]["median"]
        rows.append(
            Target(
                "6",
                f"Throughput vs modelslab-py, concurrency {level}",
                "> 1.00x",
                report.ratio(ours["throughput_vs_peer"]),
                report.verdict(peer > 1.0, f": {1.0 - peer:.2f}x short"),
                _OVERHEAD,
            )
        )
    return rows


_CAP_LINK: Final = "[submit plus read](#submit-plus-read-and-the-default-cap)"


def _cap_targets(cap: dict[str, Any] | None) -> list[Target]:
    if cap is None:
        return [report.not_run("13", "Submit plus read, the cap", "")]
    clients, level = cap["clients"], cap["concurrency"]
    rows = []
    for name in (CAPPED + READ, UNCAPPED + READ):
        figures = clients[name]
        cpu = figures["cpu_vs_raw"]["median"]
        rows.append(
            Target(
                "13",
                f"Submit plus reading the one output, concurrency {level}, "
                f"{name.split(', ')[1].removesuffix(READ)}: throughput vs "
                "raw aiohttp",
                ">= 0.90x",
                report.ratio(figures["throughput_vs_raw"]),
                report.at_least(
                    figures["throughput_vs_raw"]["median"], 0.9, "x"
                ),
                f"client CPU per job {cpu:.2f}x the raw loop's: {_CAP_LINK}",
            )
        )
    for suffix, what in (
        ("", "jobs done at once"),
        (READ, "submit plus read"),
    ):
        figures = clients[CAPPED + suffix]
        held = figures["slot_held_us"]["median"]
        rows.append(
            Target(
                "13",
                f"The default cap ({cap['cap']}) against none, {what}, "
                f"concurrency {level}: throughput",
                ">= 0.95x (a slot held only for its submit's round trip)",
                report.ratio(figures["throughput_vs_uncapped"]),
                report.at_least(
                    figures["throughput_vs_uncapped"]["median"], 0.95, "x"
                ),
                f"each job held a slot {held:,.0f} µs: {_CAP_LINK}",
            )
        )
    return rows


def render(data: dict[str, Any]) -> list[str]:
    """
    The section: jobs/s and CPU per job per client and level.
    """
    settings = data["settings"]
    lines = [
        "## Throughput and overhead",
        "",
        f"{settings['jobs']:,} jobs that succeed at once (emulator",
        "`--eta 0`: the submit answer is the success, so a job is one HTTP",
        "round trip) per client and round, after",
        f"{settings['warmup']} warm-up jobs, {settings['rounds']} rounds, a",
        "fresh emulator process per round. Within a round the clients take",
        f"turns in {settings['slices']} slices of their jobs, in an order",
        "rotated per slice, so a slowdown of the machine falls on all",
        "alike. CPU is `time.process_time()` of the client process per",
        "job. modelslab-async is `await client.generate(Text2Img(...))` on",
        "`Client(max_queued=None)`; raw aiohttp POSTs the same body on one",
        "`ClientSession` and reads the JSON; modelslab-py is",
        "`Community.async_text_to_image`. modelslab-py's `Client` takes no",
        "base URL: it sets `self.base_url` in `__init__`, so the benchmark",
        "overwrites that attribute on the instance before building",
        "`Community` (no code is patched).",
        "",
    ]
    if data["peer_missing"]:
        problem = data.get("peer_problem") or "not installed"
        lines += [f"modelslab-py could not run ({problem}): no rows.", ""]
    for level, figures in data["levels"].items():
        rows = [
            (
                name,
                report.spread(figures[name]["jobs_per_s"]),
                report.spread(figures[name]["cpu_us_per_job"]),
                report.ratio(figures[name].get("throughput_vs_raw")),
                report.ratio(figures[name].get("throughput_vs_peer")),
            )
            for name in data["clients"]
        ]
        lines += [
            f"### Concurrency {level}",
            "",
            *report.table(
                (
                    "Client",
                    "Jobs/s",
                    "Client CPU µs/job",
                    "Throughput vs raw",
                    "Throughput vs modelslab-py",
                ),
                rows,
            ),
        ]
    return lines + _overhead(data) + _cap_section(data.get("cap"))


def _cap_section(cap: dict[str, Any] | None) -> list[str]:
    if cap is None:
        return []
    rows = [
        (
            name,
            report.spread(figures["jobs_per_s"]),
            report.spread(figures["cpu_us_per_job"]),
            report.ratio(figures.get("throughput_vs_raw")),
            report.ratio(figures.get("cpu_vs_raw")),
            report.ratio(figures.get("throughput_vs_uncapped")),
            report.spread(figures.get("slot_held_us")),
        )
        for name, figures in cap["clients"].items()
    ]
    return [
        "### Submit plus read, and the default cap",
        "",
        f"{cap['jobs']:,} jobs done at once per client and round, at",
        f"concurrency {cap['concurrency']}, the six clients taking turns in",
        "slices as above. *+ read*: ours then reads the one output",
        "(`await result.outputs[0].read()`: a download, its bytes checked",
        "to be a whole image); raw aiohttp GETs the output URL and reads",
        "the bytes. `max_queued=5` is the default: a job done in its submit",
        "answer holds its slot for that round trip only, so the cap should",
        "cost little. With every worker waiting for one of its slots, the",
        "slots are never free, so each job held one for 5 / throughput:",
        "the last column. Ratios against raw are to the raw loop doing the",
        "same (with or without the read).",
        "",
        *report.table(
            (
                "Client",
                "Jobs/s",
                "Client CPU µs/job",
                "Throughput vs raw",
                "CPU vs raw",
                "vs max_queued=None",
                "Slot held µs/job",
            ),
            rows,
        ),
    ]


def _overhead(data: dict[str, Any]) -> list[str]:
    rows = []
    for level, figures in data["levels"].items():
        ours = figures[OURS]["cpu_us_per_job"]["median"]
        raw = figures[RAW]["cpu_us_per_job"]["median"]
        rows.append(
            (
                level,
                report.number(ours - raw),
                report.ratio(figures[OURS]["cpu_vs_raw"]),
            )
        )
    return [
        "### Client overhead",
        "",
        "What modelslab-async costs on top of the HTTP call itself: its CPU",
        "per job minus the raw loop's, and the ratio of the two. When the",
        "client process is the bottleneck, throughput follows this ratio;",
        "see [Where the time goes](#where-the-time-goes) for what it is",
        "made of, measured without the network's noise.",
        "",
        *report.table(("Concurrency", "Extra CPU µs/job", "CPU vs raw"), rows),
    ]
