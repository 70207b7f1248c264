"""
A client process for durability tests.

``journal_batch.py BASE_URL STORE MODE [N] [WEBHOOK_PORT]``, where STORE
is a path to a SQLite journal or a redis:// URL, WEBHOOK_PORT (if given)
the fixed port of a webhook receiver, and MODE is:

- ``submit``: generate N jobs (track_ids ``job-0`` ...) on a 5-job cap,
  printing one JSON line per outcome;
- ``resume``: wait for every unfinished job of the journal, printing one
  JSON line per job: its track_id and ``finished``, ``failed`` or
  ``uncertain``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from modelslab_async import Client, Text2Img, WebhookReceiver
from modelslab_async.errors import GenerationFailedError, SubmitUncertainError
from modelslab_async.stores import JobStore, SQLiteStore


KEY = "test-key-5d41402abc4b2a76"


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)  # noqa: T201 (the worker's output)


async def main(
    base_url: str, where: str, mode: str, count: int, port: int | None
) -> None:
    store: JobStore = SQLiteStore(where)
    if where.startswith("redis://"):
        # Only the Redis tests have the redis extra.
        from modelslab_async.stores import RedisStore  # noqa: PLC0415

        store = RedisStore(where)
    webhooks = None if port is None else WebhookReceiver(port=port, grace=2)
    async with Client(
        KEY, base_url=base_url, store=store, max_queued=5, webhooks=webhooks
    ) as client:
        if mode == "submit":
            requests = [
                Text2Img(prompt=f"job {n}", track_id=f"job-{n}")
                for n in range(count)
            ]
            async for item in client.generate_many(requests, timeout=60):
                say(track_id=item.request.track_id, ok=item.ok)
            return
        for job in await client.unfinished():
            try:
                await job.wait(8)
            except SubmitUncertainError:
                say(track_id=job.track_id, outcome="uncertain")
            except GenerationFailedError:
                say(track_id=job.track_id, outcome="failed")
            else:
                say(track_id=job.track_id, outcome="finished")


if __name__ == "__main__":
    base_url, where, mode = sys.argv[1:4]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    port = int(sys.argv[5]) if len(sys.argv) > 5 else None
    asyncio.run(main(base_url, where, mode, count, port))
