"""
``modelslab-async fetch JOB_ID``: re-attach to a job and save its images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

from modelslab_async.errors import InvalidRequestError, ModelsLabError

from ._common import PROG, Console, Exit, UsageError, fatal, open_client
from ._folder import OutFolder
from ._report import Entry, write_report
from ._saving import save_result


__all__ = ["fetch"]


async def fetch(args: argparse.Namespace, console: Console) -> int:
    """
    Run ``fetch``; return the exit status.
    """
    folder = OutFolder.prepare(args.out)
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        # A job id means nothing to a fresh emulator: a key is needed.
        client = await open_client(args, stack, console)
        try:
            job = await client.fetch(args.job_id, endpoint=args.endpoint)
            result = await job.wait(args.timeout)
        except InvalidRequestError as exc:
            raise UsageError(str(exc)) from None
        except ModelsLabError as exc:
            stop = fatal(exc, client.base_url)
            if stop is not None:
                raise stop from None
            console.problem(f"{PROG}: {exc}")
            return Exit.FAILED
        prompt = str(result.meta.get("prompt") or f"job {result.id}")
        entry = Entry(
            index=0,
            prompt=prompt,
            endpoint=args.endpoint,
            track_id=result.track_id,
            seed=result.meta.get("seed"),
            job_id=result.id,
            seconds=round(time.monotonic() - started, 3),
        )
        await save_result(entry, result, folder.path)
    manifest, elsewhere = write_report(
        folder.path, [entry], endpoint=args.endpoint, emulated=False
    )
    if args.json:
        print(json.dumps(entry.as_json(), ensure_ascii=False), flush=True)
    else:
        for name in entry.files:
            print(folder.path / name, flush=True)
    if elsewhere is not None:
        console.problem(f"{PROG}: {elsewhere}; the manifest is in {manifest}")
    if entry.status != "success":
        console.problem(f"{PROG}: {entry.error}")
        return Exit.FAILED
    return Exit.OK
