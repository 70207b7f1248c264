"""
Outputs: reading and saving an image from each form the API delivers.

For each form we make one job on the emulator (its own process, a
1024x1024 PNG) and then, in each round, save its output repeatedly two ways:

- ours: ``await output.save(directory)``: download (for URLs), detect and
  decode base64, write atomically through a temporary file in a worker
  thread;
- floor: the same bytes fetched with a bare ``aiohttp`` GET (for URLs), a
  ``data:`` prefix cut off, ``base64.b64decode``, and ``Path.write_bytes``
  on the event loop.

The two take turns save by save, so a slowdown of the machine falls on
both. The figure is floor time / our time per round (1.0 = as fast as the
floor). A second figure isolates decoding: ``decode_image`` against
``base64.b64decode`` on the same text in memory.
"""

from __future__ import annotations

import base64
import tempfile
import time

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import aiohttp
import attrs

from modelslab_async import Client, Output, Text2Img
from modelslab_async._outputs import decode_image

from . import report
from ._common import KEY, EmulatorProcess, emulator_process, summary
from .report import Target


#: Label: (ask for base64, how the emulator delivers base64).
FORMS: Final = {
    "PNG URL": (False, "url"),
    ".base64 URL": (True, "url"),
    ".base64 URL, data: prefix": (True, "url_data_uri"),
    "inline base64": (True, "inline"),
    "inline data: URI": (True, "inline_data_uri"),
}


@attrs.frozen
class Settings:
    size: int
    saves: int
    rounds: int


FULL: Final = Settings(size=1024, saves=40, rounds=7)
QUICK: Final = Settings(size=64, saves=2, rounds=1)


def _b64decode(raw: bytes) -> bytes:
    if raw.startswith(b"data:"):
        raw = raw.partition(b",")[2]
    return base64.b64decode(raw)


async def _output(
    emulator: EmulatorProcess, client: Client, form: str, size: int
) -> Output:
    wants_base64, delivery = FORMS[form]
    await emulator.configure(base64_delivery=delivery)
    request = Text2Img(
        prompt="outputs", width=size, height=size, seed=1, base64=wants_base64
    )
    result = await client.generate(request)
    return result.outputs[0]


async def _raw_bytes(session: aiohttp.ClientSession, output: Output) -> bytes:
    if output.is_inline:
        return output.url.encode()
    async with session.get(output.url) as answer:
        answer.raise_for_status()
        return await answer.read()


def _floor(
    session: aiohttp.ClientSession, output: Output, path: Path
) -> Callable[[], Awaitable[None]]:
    async def save() -> None:
        raw = await _raw_bytes(session, output)
        data = raw if raw.startswith(b"\x89PNG") else _b64decode(raw)
        path.write_bytes(data)  # noqa: ASYNC240 (the floor blocks, on purpose)

    return save


def _ours(output: Output, directory: Path) -> Callable[[], Awaitable[None]]:
    async def save() -> None:
        await output.save(directory)

    return save


async def _in_turns(
    ours: Callable[[], Awaitable[None]],
    floor: Callable[[], Awaitable[None]],
    times: int,
) -> tuple[float, float]:
    """
    Mean seconds per save of each, the two taking turns save by save.
    """
    spent = [0.0, 0.0]
    for number in range(times):
        # Alternate who goes first: the second may find a warmer cache.
        for side in (0, 1) if number % 2 else (1, 0):
            started = time.perf_counter()
            await (ours, floor)[side]()
            spent[side] += time.perf_counter() - started
    return spent[0] / times, spent[1] / times


def _decode_ratio(raw: bytes, repeat: int) -> float | None:
    """
    ``b64decode`` time / ``decode_image`` time on the same text.
    """
    if raw.startswith(b"\x89PNG"):
        return None  # Nothing to decode in this form.
    started = time.perf_counter()
    for _ in range(repeat):
        _b64decode(raw)
    floor = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(repeat):
        decode_image(raw)
    return floor / (time.perf_counter() - started)


async def _form(
    settings: Settings,
    output: Output,
    session: aiohttp.ClientSession,
    directory: Path,
) -> dict[str, Any]:
    ours, floor = (
        _ours(output, directory),
        _floor(session, output, directory / "floor.png"),
    )
    await ours()  # Warm: connections, the thread pool, the page cache.
    await floor()
    ratios, ours_ms, floor_ms = [], [], []
    for _ in range(settings.rounds):
        mine, bare = await _in_turns(ours, floor, settings.saves)
        ratios.append(bare / mine)
        ours_ms.append(mine * 1e3)
        floor_ms.append(bare * 1e3)
    raw = await _raw_bytes(session, output)
    decode = [
        ratio
        for _ in range(settings.rounds)
        if (ratio := _decode_ratio(raw, settings.saves)) is not None
    ]
    return {
        "bytes": len(raw),
        "image_bytes": len(await output.read()),
        "ours_ms": summary(ours_ms),
        "floor_ms": summary(floor_ms),
        "vs_floor": summary(ratios),
        "decode_vs_b64decode": summary(decode) if decode else None,
    }


async def run(settings: Settings) -> dict[str, Any]:
    """
    Time every output form; see the module docstring.
    """
    forms = {}
    with tempfile.TemporaryDirectory(prefix="bench-outputs-") as temp:
        directory = Path(temp)
        async with (
            emulator_process("--eta", "0", bench_routes=True) as emulator,
            Client(KEY, base_url=emulator.url, max_queued=None) as client,
            aiohttp.ClientSession() as session,
        ):
            for form in FORMS:
                output = await _output(emulator, client, form, settings.size)
                forms[form] = await _form(settings, output, session, directory)
    worst = min(figures["vs_floor"]["median"] for figures in forms.values())
    return {
        "settings": attrs.asdict(settings),
        "forms": forms,
        "targets": {"vs_floor_min_over_forms": worst, "met": worst >= 0.8},
    }


# --- the page ----------------------------------------------------------------


def targets(data: dict[str, Any]) -> list[Target]:
    """
    Each form's save against its floor, against issue 6's target.
    """
    rows = []
    for form, figures in data["forms"].items():
        decode = figures["decode_vs_b64decode"]
        note = (
            "download, atomic write and the thread hop"
            if decode is None
            else "decode_image at "
            + report.ratio(decode)
            + " b64decode's pace"
        )
        rows.append(
            Target(
                "6",
                f"Save from {form} vs floor",
                ">= 0.80x",
                report.ratio(figures["vs_floor"]),
                report.at_least(figures["vs_floor"]["median"], 0.8, "x"),
                f"{note}: [save path](#the-save-path-step-by-step)",
            )
        )
    return rows


def render(data: dict[str, Any]) -> list[str]:
    """
    The section: each form's save time against its floor.
    """
    settings = data["settings"]
    rows = [
        (
            form,
            report.number(figures["bytes"]),
            report.spread(figures["ours_ms"], 2),
            report.spread(figures["floor_ms"], 2),
            report.ratio(figures["vs_floor"]),
            report.ratio(figures["decode_vs_b64decode"]),
        )
        for form, figures in data["forms"].items()
    ]
    return [
        "## Outputs",
        "",
        f"One {settings['size']}x{settings['size']} PNG from the emulator",
        "in each form, saved",
        f"{settings['saves']} times per round, {settings['rounds']} rounds.",
        "Ours is `await output.save(directory)`: download if a URL, decode",
        "if base64, atomic write (temporary file, rename) in a worker",
        "thread. The floor fetches the same bytes with a bare aiohttp GET,",
        "cuts a `data:` prefix, calls `base64.b64decode` and",
        "`Path.write_bytes` on the event loop, the two taking turns save",
        "by save. Ratio = floor time / our",
        "time. The last column isolates decoding: `decode_image` against",
        "`base64.b64decode` on the same text in memory.",
        "",
        *report.table(
            (
                "Form",
                "Bytes delivered",
                "Ours ms",
                "Floor ms",
                "vs floor",
                "Decode vs b64decode",
            ),
            rows,
        ),
    ]
