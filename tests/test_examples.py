"""
The examples in examples/, run against the emulator.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import os
import re
import subprocess
import sys

from pathlib import Path

import aiohttp
import anyio
import pytest

from aiohttp import web

from conftest import FAST_RETRY, KEY, held


EXAMPLES = Path(__file__).parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import aiohttp_app  # noqa: E402
import batch_gather  # noqa: E402
import chat_bot  # noqa: E402

from modelslab_async import Client  # noqa: E402
from modelslab_async.webhooks import WebhookReceiver  # noqa: E402


PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.anyio
async def test_batch_gather_under_a_queue_cap(emulator, tmp_path):
    """The gather example saves every image on a 5-job account."""
    emulator.queue_limit = 5
    prompts = [f"p{i}" for i in range(12)]
    async with Client(KEY, base_url=emulator.url, retry=FAST_RETRY) as client:
        paths = await batch_gather.generate_all(client, prompts, tmp_path)

    assert len(paths) == 12
    assert all(p.read_bytes().startswith(PNG) for p in paths)
    assert emulator.max_queued(KEY) <= 5
    assert all(r.status == 200 for r in emulator.requests("submit"))


@pytest.mark.anyio
async def test_aiohttp_app_serves_images(emulator):
    """The web app answers images, and 400/502 for bad or failed prompts."""
    app = aiohttp_app.make_app(
        lambda: Client(KEY, base_url=emulator.url, retry=FAST_RETRY)
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def get(query: str) -> tuple[int, bytes, str]:
        async with http.get(f"{base}/image{query}") as response:
            return (
                response.status,
                await response.read(),
                response.content_type,
            )

    try:
        async with aiohttp.ClientSession() as http:
            images = await asyncio.gather(
                *(get(f"?prompt=fox+{i}") for i in range(5))
            )
            missing = await get("")
            failed = await get("?prompt=a+[fail]+job")
    finally:
        await runner.cleanup()

    assert all(
        s == 200 and b.startswith(PNG) and t == "image/png"
        for s, b, t in images
    )
    assert missing[0] == 400
    assert failed[0] == 502
    assert b"Processing failed" in failed[1]


@pytest.mark.anyio
async def test_aiohttp_app_visitors_who_leave_stop_waiting(emulator):
    """Visitors who hang up stop their waits; their jobs keep their slots."""
    emulator.eta = 1.0
    app = aiohttp_app.make_app(
        lambda: Client(KEY, base_url=emulator.url, max_queued=5)
    )
    runner = web.AppRunner(app, **aiohttp_app.RUNNER_OPTIONS)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def leave_early(prompt: str) -> None:
        timeout = aiohttp.ClientTimeout(total=0.3)
        with contextlib.suppress(TimeoutError):
            async with http.get(
                f"{base}/image?prompt={prompt}", timeout=timeout
            ):
                pass

    try:
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(leave_early(f"fox+{i}") for i in range(5)))
            client = app[aiohttp_app.CLIENT]
            with anyio.fail_after(10):
                while True:
                    jobs = await client.unfinished()
                    if len(jobs) == 5 and not any(
                        job.has_waiters for job in jobs
                    ):
                        break
                    await anyio.sleep(0.01)
            held_while_running = held(client)
            running = [not job.status.is_finished for job in jobs]
            # The slots come back as the jobs end: the next visitor is served.
            async with http.get(f"{base}/image?prompt=owl") as response:
                status, data = response.status, await response.read()
    finally:
        await runner.cleanup()

    assert held_while_running == 5
    assert all(running)
    assert status == 200
    assert data.startswith(PNG)
    assert emulator.max_queued(KEY) <= 5


@pytest.mark.anyio
async def test_chat_bot_answers_by_webhook(emulator):
    """The bot replies with images, finished by webhooks without polling."""
    replies: list[tuple[str, list[bytes]]] = []

    async def reply(text: str, images: list[bytes]) -> None:
        replies.append((text, images))

    async with (
        WebhookReceiver() as receiver,
        Client(KEY, base_url=emulator.url, webhooks=receiver) as client,
    ):
        bot = chat_bot.ImagineBot(client)
        await asyncio.gather(
            bot.on_message("/imagine a lighthouse", reply),
            bot.on_message("hello there", reply),
            bot.on_message("/imagine   ", reply),
            bot.on_message("/imagine a [refuse] thing", reply),
        )

    texts = sorted(text for text, _ in replies)
    assert len(replies) == 3
    assert texts[0] == "Here is 'a lighthouse':"
    assert texts[1].startswith("Sorry, that failed: prompt refused")
    assert texts[2] == chat_bot.USAGE
    images = next(i for t, i in replies if t.startswith("Here"))
    assert len(images) == 2
    assert all(i.startswith(PNG) for i in images)
    assert emulator.requests("fetch") == []


@pytest.mark.parametrize("script", ["batch_gather.py", "chat_bot.py"])
def test_scripts_run_without_a_key(script, tmp_path):
    """Each example script runs end to end on the built-in emulator."""
    env = {k: v for k, v in os.environ.items() if k != "MODELSLAB_API_KEY"}

    process = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
        check=False,
    )

    assert process.returncode == 0, process.stderr.decode()
    assert "built-in emulator" in process.stderr.decode()
    assert process.stdout.strip()


def test_the_fastapi_page_is_sound():
    """The FastAPI code compiles and uses only names this package has."""
    page = (EXAMPLES.parent / "docs" / "web-apps.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.DOTALL)
    assert blocks

    for block in blocks:
        tree = ast.parse(block)  # a SyntaxError fails the test
        compile(tree, "web-apps.md", "exec")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (
                node.module or ""
            ).startswith("modelslab_async"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), alias.name
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "receiver"
            ):
                assert hasattr(WebhookReceiver, node.attr), node.attr
