"""
``python -m benchmarks._server``: the emulator, plus what benchmarks must see.

The package's ``modelslab-async emulator`` command runs the emulator in its
own process but tells nothing about its jobs, and exposes neither
``--seed`` nor ``--base64-delivery``. The polling, webhook and output
benchmarks need per-job ready times, fetch times and webhook send times
from the server's side, so this wraps the same :class:`Emulator` and adds
three routes:

- ``GET /bench/jobs``: each job's ``created``, ``ready_at``, fetch times and
  webhook send time, on ``time.monotonic()`` (the same clock in every
  process on Linux, so the client can compare).
- ``POST /bench/config``: change settings while it runs.
- ``POST /bench/hammer``: POST a list of payloads to their URLs at a given
  concurrency from this process, to load a webhook receiver from outside
  the client's process.
- ``GET /bench/keys``: per API key, the submits refused with a 429 and the
  most jobs it ever had queued, so a benchmark can show that a client kept
  the account's cap (``--queue-limit``).

With ``--nominal-eta`` a submit announces the job's nominal ``eta``
(``announce="nominal"``). The emulator by default announces ``max(real
duration, eta)``, so with ``--eta-error`` a job can end early but never
late; a real estimate can be wrong both ways, and the polling benchmark
needs both.

It keeps every request record (``record_limit=None``): the fetch times come
from them, and a benchmark run is bounded.

Like the package's command it prints its API URL alone on the first line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time

from typing import Any, Final

import aiohttp
import attrs

from aiohttp import web

from modelslab_async.emulator import Emulator


#: Settings /bench/config may change.
_SETTABLE: Final = frozenset({"eta", "eta_error", "base64_delivery"})


@attrs.define(kw_only=True, eq=False)
class BenchEmulator(Emulator):
    """
    An :class:`Emulator` that stamps when it starts each webhook POST.
    """

    webhook_sent: dict[str, float] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # The emulator records a webhook after its answer; the latency we
        # report starts before the request leaves, so stamp it then.
        self.on_webhook_sent = self._stamp

    def _stamp(self, job_id: str) -> None:
        self.webhook_sent.setdefault(job_id, time.monotonic())

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.router.add_get("/bench/jobs", self._bench_jobs)
        app.router.add_post("/bench/config", self._bench_config)
        app.router.add_post("/bench/hammer", self._bench_hammer)
        app.router.add_get("/bench/keys", self._bench_keys)
        return app

    async def _bench_jobs(self, _: web.Request) -> web.Response:
        fetched: dict[str, list[float]] = collections.defaultdict(list)
        for record in self.store.records:
            if record.route == "fetch" and record.job_id is not None:
                fetched[record.job_id].append(record.time)
        jobs = {
            str(job.id): {
                "created": job.created,
                "ready_at": job.ready_at,
                "eta": job.eta,
                "fetch_times": fetched.get(str(job.id), []),
                "webhook": job.webhook,
                "track_id": job.track_id,
                "key": job.key,
                "webhook_sent": self.webhook_sent.get(str(job.id)),
            }
            for job in self.store.jobs.values()
        }
        return web.json_response(jobs)

    async def _bench_keys(self, _: web.Request) -> web.Response:
        refused: collections.Counter[str] = collections.Counter()
        for record in self.store.records:
            if record.route == "submit" and record.status == 429:
                body = record.body if isinstance(record.body, dict) else {}
                refused[str(body.get("key"))] += 1
        keys = set(refused) | set(self.store.max_queued)
        return web.json_response(
            {
                key: {
                    "refused": refused[key],
                    "max_queued": self.store.max_queued[key],
                }
                for key in sorted(keys)
            }
        )

    async def _bench_config(self, request: web.Request) -> web.Response:
        settings = await request.json()
        unknown = settings.keys() - _SETTABLE
        if unknown:
            return web.json_response({"unknown": sorted(unknown)}, status=400)
        self.configure(**settings)
        return web.json_response({"ok": True})

    async def _bench_hammer(self, request: web.Request) -> web.Response:
        order = await request.json()
        targets: list[tuple[str, Any]] = order["targets"]
        gate = asyncio.Semaphore(order["concurrency"])
        statuses: collections.Counter[int] = collections.Counter()
        connector = aiohttp.TCPConnector(limit=order["concurrency"])
        async with aiohttp.ClientSession(connector=connector) as session:

            async def post(url: str, payload: Any) -> None:
                async with gate, session.post(url, json=payload) as answer:
                    await answer.read()
                    statuses[answer.status] += 1

            started = time.perf_counter()
            await asyncio.gather(*(post(u, p) for u, p in targets))
            seconds = time.perf_counter() - started
        return web.json_response(
            {"seconds": seconds, "statuses": dict(statuses)}
        )


async def _serve(args: argparse.Namespace) -> None:
    emulator = BenchEmulator(
        port=args.port,
        eta=args.eta,
        eta_error=args.eta_error,
        eta_bias=args.eta_bias,
        queue_limit=args.queue_limit,
        seed=args.seed,
        base64_delivery=args.base64_delivery,
        announce="nominal" if args.nominal_eta else "max",
        record_limit=None,
    )
    async with emulator:
        print(emulator.url, flush=True)
        await asyncio.Event().wait()  # until terminated


def main() -> None:
    """
    Serve until terminated.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks._server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--eta-error", type=float, default=0.0)
    parser.add_argument("--eta-bias", type=float, default=0.0)
    parser.add_argument("--queue-limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base64-delivery", default="url")
    parser.add_argument("--nominal-eta", action="store_true")
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
