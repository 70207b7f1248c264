"""
Off the loop: when decoding inline base64 in a worker thread pays.

``python -m benchmarks.offloop [--quick]`` measures, and prints as tables:

- decode time against size: ``decode_image`` on base64 of a PNG of random
  noise (photos compress about as badly), timed on the loop and as a round
  trip through ``anyio.to_thread.run_sync``;
- the thread hop itself: the round trip of a call that does nothing, and
  the CPU it costs the event loop's thread, which is what offloading must
  save to pay;
- event-loop lag while jobs are read: a heartbeat task sleeps 1 ms again
  and again and records how late it wakes, while each job's inline outputs
  (4 base64 PNGs of about 3 MB) are read one after another:

  - on the loop, as ``Output.read()`` did before;
  - in a worker thread, one ``binascii`` call per output;
  - in a worker thread, in ``B64_CHUNK`` pieces;
  - ``Output.read()`` now: the same, releasing the GIL between pieces;
  - on the loop in ``B64_CHUNK`` pieces, yielding to other tasks between
    them (for comparison: no thread at all).

Its figures chose ``OFF_LOOP_BYTES`` and ``B64_CHUNK`` in
``modelslab_async._outputs``; it runs standalone too.
``--quick`` runs tiny sizes, to check that it runs; its figures mean
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import io
import math
import random
import statistics
import sys
import time

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

import anyio
import attrs

from PIL import Image

from modelslab_async import Output
from modelslab_async._outputs import (
    B64_CHUNK,
    OFF_LOOP_BYTES,
    decode_image,
)

from . import report
from ._common import percentile
from .report import Target


@attrs.frozen
class Settings:
    #: Lengths of base64 text to time decoding at.
    sizes: tuple[int, ...]
    #: Decodes per size and way; the median is reported.
    repeat: int
    #: Thread round trips to time.
    hops: int
    #: Pixels a side of each job's PNGs: 1024 gives about 3 MB.
    side: int
    jobs: int
    samples: int


FULL: Final = Settings(
    sizes=tuple(4**power * 1024 for power in range(1, 8)),
    repeat=41,
    hops=2001,
    side=1024,
    jobs=6,
    samples=4,
)
QUICK: Final = Settings(
    sizes=(256, 4096), repeat=3, hops=5, side=16, jobs=1, samples=2
)

#: How often the heartbeat means to wake.
HEARTBEAT: Final = 0.001

Reader = Callable[[Output], Awaitable[bytes]]


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """
    A PNG of random RGB noise: it compresses about as badly as a photo.
    """
    pixels = random.Random(seed).randbytes(width * height * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buffer, "PNG")
    return buffer.getvalue()


def base64_of_about(length: int, seed: int = 0) -> bytes:
    """
    Base64 of a noise PNG, about *length* characters long.
    """
    # Base64 is 4/3 of the PNG, and noise costs 3 bytes a pixel.
    side = max(1, math.isqrt(length // 4))
    return base64.b64encode(noise_png(side, side, seed))


def _median_us(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1e6


async def _decode_times(raw: bytes, repeat: int) -> dict[str, float]:
    on_loop, in_thread = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        decode_image(raw)
        on_loop.append(time.perf_counter() - started)
        started = time.perf_counter()
        await anyio.to_thread.run_sync(decode_image, raw)
        in_thread.append(time.perf_counter() - started)
    return {
        "bytes": len(raw),
        "on_loop_us": _median_us(on_loop),
        "thread_round_trip_us": _median_us(in_thread),
    }


def _nothing() -> None:
    pass


async def _hop(hops: int) -> dict[str, float]:
    """
    The round trip of an empty call in a thread, and its CPU on the loop.
    """
    await anyio.to_thread.run_sync(_nothing)  # Start a worker thread.
    trips = []
    cpu = time.thread_time()
    for _ in range(hops):
        started = time.perf_counter()
        await anyio.to_thread.run_sync(_nothing)
        trips.append(time.perf_counter() - started)
    loop_cpu = (time.thread_time() - cpu) / hops
    return {
        "round_trip_us": _median_us(trips),
        "loop_cpu_us": loop_cpu * 1e6,
    }


class _Heartbeat:
    """
    A task that sleeps HEARTBEAT again and again, recording how late.
    """

    def __init__(self) -> None:
        self.lags: list[float] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + HEARTBEAT
            await asyncio.sleep(HEARTBEAT)
            self.lags.append(max(0.0, loop.time() - due))

    @contextlib.asynccontextmanager
    async def beating(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self.run())
        await asyncio.sleep(HEARTBEAT)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _on_loop(output: Output) -> bytes:
    return decode_image(output.url.encode("ascii", "replace"))


def _one_call(text: str) -> bytes:
    return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)


async def _thread_one_call(output: Output) -> bytes:
    return await anyio.to_thread.run_sync(_one_call, output.url)


def _pieces(text: str) -> bytes:
    raw = text.encode("ascii")
    view = memoryview(raw)
    return b"".join(
        binascii.a2b_base64(view[start : start + B64_CHUNK], strict_mode=True)
        for start in range(0, len(raw), B64_CHUNK)
    )


async def _thread_pieces(output: Output) -> bytes:
    return await anyio.to_thread.run_sync(_pieces, output.url)


async def _ours(output: Output) -> bytes:
    return await output.read()


async def _on_loop_yielding(output: Output) -> bytes:
    text = output.url.encode("ascii")
    pieces = []
    for start in range(0, len(text), B64_CHUNK):
        chunk = text[start : start + B64_CHUNK]
        pieces.append(binascii.a2b_base64(chunk, strict_mode=True))
        await asyncio.sleep(0)
    return b"".join(pieces)


READERS: Final[dict[str, Reader]] = {
    "on the loop (before)": _on_loop,
    "thread, one call": _thread_one_call,
    "thread, in pieces": _thread_pieces,
    "thread, in pieces, yielding (ours)": _ours,
    "loop, in pieces, yielding": _on_loop_yielding,
}


async def _lag(
    read: Reader, jobs: Sequence[Sequence[Output]], expected: Sequence[bytes]
) -> dict[str, Any]:
    heartbeat = _Heartbeat()
    per_job = []
    async with heartbeat.beating():
        for outputs in jobs:
            started = time.perf_counter()
            images = [await read(output) for output in outputs]
            per_job.append(time.perf_counter() - started)
            if images != list(expected):
                raise AssertionError("a reader decoded something else")
            await asyncio.sleep(0.02)  # Beats between jobs, as in a service.
    lags = [lag * 1e3 for lag in heartbeat.lags]
    return {
        "job_ms": statistics.median(per_job) * 1e3,
        "beats": len(lags),
        "p50_ms": percentile(lags, 0.5),
        "p99_ms": percentile(lags, 0.99),
        "max_ms": max(lags, default=None),
    }


async def run(settings: Settings) -> dict[str, Any]:
    """
    Measure decode time against size, the hop, and loop lag per reader.
    """
    sizes = [
        await _decode_times(base64_of_about(size), settings.repeat)
        for size in settings.sizes
    ]
    hop = await _hop(settings.hops)
    images = [
        noise_png(settings.side, settings.side, seed)
        for seed in range(settings.samples)
    ]
    texts = [base64.b64encode(image).decode() for image in images]
    jobs = [
        [Output(text, index, str(job)) for index, text in enumerate(texts)]
        for job in range(settings.jobs)
    ]
    lag = {
        name: await _lag(read, jobs, images) for name, read in READERS.items()
    }
    return {
        "settings": attrs.asdict(settings),
        "off_loop_bytes": OFF_LOOP_BYTES,
        "b64_chunk": B64_CHUNK,
        "switch_interval_ms": sys.getswitchinterval() * 1e3,
        "image_bytes": len(images[0]),
        "base64_bytes": len(texts[0]),
        "decode": sizes,
        "hop": hop,
        "lag": lag,
    }


def _kib(length: int) -> str:
    return f"{length / 1024:,.0f} KiB" if length >= 1024 else f"{length} B"


def text(results: dict[str, Any]) -> str:
    """
    The results as plain-text tables, for the terminal.
    """
    hop = results["hop"]
    lines = [
        "Decoding base64 of a noise PNG (median microseconds)",
        "",
        f"{'base64':>10}  {'on loop':>9}  {'via thread':>10}  {'pays?':>5}",
    ]
    for row in results["decode"]:
        pays = row["on_loop_us"] > hop["loop_cpu_us"]
        lines.append(
            f"{_kib(row['bytes']):>10}  {row['on_loop_us']:>9.0f}"
            f"  {row['thread_round_trip_us']:>10.0f}"
            f"  {'yes' if pays else 'no':>5}"
        )
    settings = results["settings"]
    lines += [
        "",
        (
            f"Thread hop: round trip {hop['round_trip_us']:.0f} us, "
            f"loop CPU {hop['loop_cpu_us']:.0f} us "
            "('pays' = decoding on the loop costs it more than that)"
        ),
        (
            f"OFF_LOOP_BYTES = {_kib(results['off_loop_bytes'])}, "
            f"B64_CHUNK = {_kib(results['b64_chunk'])}, "
            f"GIL switch interval {results['switch_interval_ms']:.0f} ms"
        ),
        "",
        (
            f"Loop lag, {settings['jobs']} jobs of {settings['samples']} "
            f"inline PNGs ({_kib(results['image_bytes'])}, base64 "
            f"{_kib(results['base64_bytes'])}), read one after another; "
            f"{HEARTBEAT * 1e3:.0f} ms beat, lateness in ms"
        ),
        "",
        (
            f"{'reader':<36}{'ms/job':>8}{'beats':>7}{'p50':>7}{'p99':>7}"
            f"{'max':>7}"
        ),
    ]
    for name, row in results["lag"].items():
        figures = (row["p50_ms"], row["p99_ms"], row["max_ms"])
        lines.append(
            f"{name:<36}{row['job_ms']:>8.1f}{row['beats']:>7}"
            + "".join(f"{figure or 0:>7.1f}" for figure in figures)
        )
    return "\n".join(lines)


def targets(data: dict[str, Any]) -> list[Target]:
    """
    None: these figures chose thresholds; issue 10's lag target is
    measured through the whole client by :mod:`benchmarks.lag`.
    """
    del data
    return []


def render(data: dict[str, Any]) -> list[str]:
    """
    The page's section: when decoding in a worker thread pays.
    """
    hop = data["hop"]
    sizes = [
        (
            _kib(row["bytes"]),
            report.number(row["on_loop_us"]),
            report.number(row["thread_round_trip_us"]),
            "yes" if row["on_loop_us"] > hop["loop_cpu_us"] else "no",
        )
        for row in data["decode"]
    ]
    lag = [
        (
            name,
            report.number(row["job_ms"], 1),
            str(row["beats"]),
            report.number(row["p50_ms"], 1),
            report.number(row["p99_ms"], 1),
            report.number(row["max_ms"], 1),
        )
        for name, row in data["lag"].items()
    ]
    settings = data["settings"]
    return [
        "## Decoding off the loop",
        "",
        "Why inline base64 over",
        f"{_kib(data['off_loop_bytes'])} is decoded in a worker thread, in",
        f"{_kib(data['b64_chunk'])} pieces. `decode_image` on base64 of a",
        "noise PNG (photos compress about as badly), median µs on the",
        "loop and as a round trip through `anyio.to_thread.run_sync`;",
        "offloading pays when decoding on the loop costs the loop more",
        "than the hop does (a call that does nothing: round trip",
        f"{hop['round_trip_us']:.0f} µs, {hop['loop_cpu_us']:.0f} µs of the",
        "loop's CPU).",
        "",
        *report.table(
            ("Base64", "On the loop µs", "Via a thread µs", "Pays"), sizes
        ),
        f"Loop lag while {settings['jobs']} jobs' outputs are read one",
        f"after another ({settings['samples']} inline PNGs of",
        f"{_kib(data['image_bytes'])} each, base64",
        f"{_kib(data['base64_bytes'])}), by each way of reading them; a 1 ms",
        "heartbeat, lateness in ms. The GIL switch interval is",
        f"{data['switch_interval_ms']:.0f} ms: a thread that never lets go",
        "of the GIL delays the loop by that much at a time.",
        "",
        *report.table(("Reader", "ms/job", "Beats", "p50", "p99", "max"), lag),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run and print the tables; return the exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.offloop",
        description="When decoding inline outputs in a thread pays.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, to check the code runs; the figures mean nothing",
    )
    args = parser.parse_args(argv)
    results = asyncio.run(run(QUICK if args.quick else FULL))
    print(text(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
