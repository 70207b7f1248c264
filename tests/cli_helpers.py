"""
The ``modelslab-async`` command as a real process, for CLI tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading

from collections.abc import Iterator
from pathlib import Path

import pytest


#: A ``-v`` line: ``#12 job 134700011 queued (mlb-...)``.
JOB_LINE = re.compile(r"^#(\d+) job (\S+) (\w+) \((\S+)\)$")


def cli(*args: str) -> list[str]:
    """
    The command line that runs ``modelslab-async ARGS``.
    """
    return [sys.executable, "-m", "modelslab_async", *args]


def environment(key: str | None = None, **extra: str) -> dict[str, str]:
    """
    Our environment, with *key* (or none) as the API key.
    """
    env = {k: v for k, v in os.environ.items() if k != "MODELSLAB_API_KEY"}
    if key is not None:
        env["MODELSLAB_API_KEY"] = key
    return {**env, **extra}


class Command:
    """
    ``modelslab-async`` running in its own process; its output is read as
    it comes, by threads, so a test can watch its standard error.
    """

    def __init__(self, *args: str, env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen(
            cli(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=_read, args=(stream, lines), daemon=True)
            for stream, lines in (
                (self.process.stdout, self.out),
                (self.process.stderr, self.err),
            )
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def jobs(self, phase: str = "queued") -> dict[str, str]:
        """
        Job id to track_id of the ``-v`` lines so far in *phase*.
        """
        found = {}
        for line in list(self.err):
            match = JOB_LINE.match(line)
            if match and match[3] == phase:
                found[match[2]] = match[4]
        return found

    def wait(self, timeout: float = 60) -> int:
        """
        Its exit status, once it and its readers are done.
        """
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("\n".join(self.err)) from None
        for reader in self._readers:
            reader.join(10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return status

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()


def _read(stream: object, lines: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        # One by one, so a test sees each line as it comes.
        lines.append(line.rstrip("\n"))  # noqa: PERF401


@contextlib.contextmanager
def running(*args: str, env: dict[str, str], cwd: Path) -> Iterator[Command]:
    """
    A :class:`Command`, killed if still running when the block ends.
    """
    command = Command(*args, env=env, cwd=cwd)
    try:
        yield command
    finally:
        command.kill()


def run(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """
    ``modelslab-async ARGS`` to its end.
    """
    return subprocess.run(
        cli(*args),
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """
    *folder* refuses new files for the block: by its mode, or, for root
    (whom modes do not stop), by the immutable attribute.
    """
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    made = chattr is not None and (
        subprocess.run(
            [chattr, "+i", str(folder)], capture_output=True, check=False
        ).returncode
        == 0
    )
    if not made:
        pytest.skip("root, and no immutable attribute on this filesystem")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)
