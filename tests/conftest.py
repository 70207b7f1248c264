"""
Shared fixtures: a strict emulator, a client on it, leak checks.
"""

from __future__ import annotations

import asyncio
import json
import os
import re

from pathlib import Path
from typing import Any

import pytest

from hypothesis import HealthCheck, settings

from modelslab_async import Client, RetryPolicy
from modelslab_async.emulator import Emulator
from modelslab_async.stores import MemoryStore, SQLiteStore


pytest_plugins = ["_redis_server"]
DATA = Path(__file__).parent / "data"
KEY = "test-key-5d41402abc4b2a76"

#: Retries that take milliseconds, so fault tests stay fast.
FAST_RETRY = RetryPolicy(
    attempts=6,
    timeout=10.0,
    wait_initial=0.005,
    wait_max=0.05,
    wait_jitter=0.005,
    retry_after_max=0.1,
)

settings.register_profile(
    "default",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "soak",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def anyio_backend() -> str:
    """
    aiohttp is asyncio-only, so every async test runs on asyncio.
    """
    return "asyncio"


@pytest.fixture(name="emulator")
async def _emulator():
    """
    A strict emulator with short jobs: it refuses undocumented fields.
    """
    async with Emulator(eta=0.05, strict=True, retry_after=0.05) as emulator:
        yield emulator


@pytest.fixture(name="client")
async def _client(emulator):
    """
    A client on the emulator with fast retries.
    """
    async with Client(KEY, base_url=emulator.url, retry=FAST_RETRY) as client:
        yield client


def _ours(task: asyncio.Task[Any]) -> bool:
    # anyio's pytest runner keeps a task of its own alive, and the test's
    # emulator serves each open keep-alive connection with one.
    name = task.get_coro().__qualname__
    return "TestRunner" not in name and "RequestHandler" not in name


def other_tasks() -> set[asyncio.Task[Any]]:
    """
    Tasks still running besides the current one and the test runner's.
    """
    current = asyncio.current_task()
    return {
        task
        for task in asyncio.all_tasks()
        if task is not current and not task.done() and _ours(task)
    }


async def settled_tasks() -> set[asyncio.Task[Any]]:
    """
    The other tasks left after a moment for closed connections to end.
    """
    for _ in range(50):
        if not other_tasks():
            break
        await asyncio.sleep(0.01)
    return other_tasks()


def held(client: Client) -> int:
    """
    Queue slots a client's jobs hold right now.
    """
    tracker = client._tracker
    return 0 if tracker is None else tracker.journal.held


def session_of(client: Client) -> Any:
    """
    The aiohttp session a client talks through (opened if need be).
    """
    return client._engine.requester.session


def seed_bodies(name: str) -> list[dict[str, Any]]:
    """
    The JSON request bodies a seed page shows, in order.
    """
    text = (DATA / name).read_text(encoding="utf-8")
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.DOTALL)
    # Code samples embed the body too, e.g. JSON.stringify({...}).
    blocks += re.findall(r"JSON\.stringify\((\{.*?\})\);", text, re.DOTALL)
    bodies = []
    for block in blocks:
        try:
            body = json.loads(block)
        except ValueError:
            continue
        if isinstance(body, dict) and "key" in body:
            bodies.append(body)
    return bodies


def documented_responses() -> list[dict[str, Any]]:
    """
    Every response example of the researched reference and vendor docs.
    """
    return json.loads(
        (DATA / "documented_responses.json").read_text(encoding="utf-8")
    )


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    """
    Each store that keeps jobs for one process: memory and SQLite.
    """
    if request.param == "memory":
        return MemoryStore()
    return SQLiteStore(tmp_path / "jobs.sqlite3")
