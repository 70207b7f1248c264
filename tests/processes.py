"""
Real OS processes for tests: the emulator, and client workers.

Each process is bounded in time and killed at the end of its block, so a
test that fails never leaves one behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import urllib.request

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs


WORKERS = Path(__file__).parent / "workers"


def free_port() -> int:
    """
    A TCP port free on 127.0.0.1 right now.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@attrs.frozen
class EmulatorProcess:
    """
    An emulator in a process of its own.
    """

    process: subprocess.Popen[str]
    url: str

    @property
    def origin(self) -> str:
        return self.url.removesuffix("/api/")

    def get(self, path: str) -> Any:
        """
        A JSON answer of the emulator's inspection API.
        """
        with urllib.request.urlopen(self.origin + path, timeout=5) as answer:  # noqa: S310 (loopback)
            return json.load(answer)

    def post(self, path: str, body: Any) -> Any:
        """
        POST JSON to the emulator's inspection API.
        """
        request = urllib.request.Request(  # noqa: S310 (loopback)
            self.origin + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310
            return json.load(answer)

    def stats(self) -> dict[str, Any]:
        return self.get("/_emulator/stats")

    def tracks(self) -> dict[str, int]:
        return self.get("/_emulator/tracks")["tracks"]


@contextlib.contextmanager
def emulator_process(*options: str) -> Iterator[EmulatorProcess]:
    """
    ``modelslab-async emulator --port 0 OPTIONS`` in its own process.
    """
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelslab_async",
            "emulator",
            "--port",
            "0",
            *options,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://"), url
        yield EmulatorProcess(process, url)
    finally:
        process.kill()
        process.communicate(timeout=10)


def worker(
    name: str,
    *args: str,
    env: dict[str, str] | None = None,
    stdin: int = subprocess.DEVNULL,
    prefix: Sequence[str] = (),
) -> subprocess.Popen[str]:
    """
    Start ``tests/workers/NAME.py ARGS`` with its own event loop.

    Its standard input is empty unless *stdin* is ``subprocess.PIPE``
    (then the test can speak to it); *prefix* runs it under another
    program (``faketime -f +30s``, say).
    """
    return subprocess.Popen(
        [*prefix, sys.executable, str(WORKERS / f"{name}.py"), *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": str(Path(__file__).parent),
            **(env or {}),
        },
    )


def finish(process: subprocess.Popen[str], timeout: float = 60) -> list[Any]:
    """
    Wait for a worker; return the JSON lines it printed.

    Raises:
        AssertionError: It failed or outlived *timeout* (it is killed).
    """
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"worker timed out; stderr:\n{err}") from None
    assert process.returncode == 0, err
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@contextlib.contextmanager
def killed_at_exit(
    processes: Sequence[subprocess.Popen[str]],
) -> Iterator[None]:
    """
    Kill every process still running when the block ends.
    """
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()
