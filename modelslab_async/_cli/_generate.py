"""
``modelslab-async generate``: a batch that survives interruption.

Each prompt gets a ``track_id`` derived from the batch (see
:func:`~modelslab_async.batch_track_id`), and the jobs are journaled in
``OUT/.modelslab-async/``. Running the same command again reuses what the
manifest says was saved, attaches to the journaled jobs, and sends only
the rest. The first SIGINT or SIGTERM stops sending and winds down with a
manifest and a summary; the second exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import anyio

from modelslab_async._batch import (
    BatchItem,
    BatchProgress,
    generate_many,
    with_batch_track_ids,
)
from modelslab_async._client import API_KEY_VARIABLE, Client
from modelslab_async._jobs import JobHandle, JobResult
from modelslab_async._requests import JobRequest
from modelslab_async.stores import JobStore, MemoryStore, SQLiteStore

from ._common import (
    PROG,
    CommandError,
    Console,
    Exit,
    UsageError,
    emulator_wanted,
    fatal,
    new_emulator,
    open_client,
)
from ._folder import OutFolder
from ._gate import Gate, GatedStore, NotSentError
from ._prompts import read_requests
from ._report import Entry, read_previous, write_report
from ._resend import HandBack, send
from ._saving import save_result


__all__ = ["generate"]

#: Job ids listed in an interruption summary, at most.
_LISTED: Final = 20


async def generate(
    args: argparse.Namespace, console: Console, argv: Sequence[str]
) -> int:
    """
    Run ``generate``; return the exit status.

    Raises:
        CommandError: It stopped before sending anything, or a
            batch-fatal answer stopped it before any job was made.
    """
    requests = read_requests(args)
    folder = OutFolder.prepare(args.out)
    with folder.locked():
        emulator = new_emulator() if emulator_wanted(args) else None
        if args.fresh:
            _start_over(folder, console)
        else:
            _refuse_the_other_kind(folder, args, emulated=emulator is not None)
        batch_id = folder.batch_id(fresh=args.fresh)
        batch = _Batch(
            args,
            console,
            folder,
            with_batch_track_ids(batch_id, requests),
            emulated=emulator is not None,
            resume=_resume_command(argv),
        )
        if not args.fresh:
            batch.reuse(read_previous(folder.path, emulated=batch.emulated))
        return await batch.run(emulator)


def _refuse_the_other_kind(
    folder: OutFolder, args: argparse.Namespace, *, emulated: bool
) -> None:
    """
    Stop before a run on the built-in emulator overwrites a real batch's
    images with placeholders under the same names, or a real run mixes
    into an emulator's batch.

    Raises:
        UsageError: The folder holds a batch of the other kind.
    """
    made_on = folder.made_on()
    if made_on is None or (made_on == "emulator") == emulated:
        return
    where = f"--out {folder.path}"
    if emulated:
        resume = (
            "drop --emulator" if args.emulator else f"set {API_KEY_VARIABLE}"
        )
        msg = (
            f"{where} holds a batch made on the API, whose images the "
            f"built-in emulator would overwrite with placeholders: {resume} "
            "to resume it, choose another --out, or start over with --fresh "
            "(which moves it aside)"
        )
    else:
        msg = (
            f"{where} holds a batch made on the built-in emulator: choose "
            "another --out, or start over with --fresh (which moves it "
            "aside)"
        )
    raise UsageError(msg)


def _start_over(folder: OutFolder, console: Console) -> None:
    """
    ``--fresh``: move the earlier batch aside, and say where.
    """
    moved = folder.set_aside()
    if moved is not None:
        aside, what = moved
        console.info(
            f"--fresh: moved the earlier batch to {aside}/ ({what}); "
            f"--out {aside} resumes it"
        )


def _resume_command(argv: Sequence[str]) -> str:
    """
    The command that resumes this run: the same, without ``--fresh``.
    """
    import shlex  # noqa: PLC0415 (only for this line)

    if Path(sys.argv[0]).name == "__main__.py":
        prog = [Path(sys.executable).name, "-m", "modelslab_async"]
    else:
        prog = [PROG]
    return shlex.join([*prog, *(a for a in argv if a != "--fresh")])


class _Stop:
    """
    Why a batch stops early: a signal, or a batch-fatal answer.
    """

    def __init__(self, status: Exit, message: str) -> None:
        self.status = status
        self.message = message


class _Batch:
    """
    One run of a batch: its entries, its jobs, and how it stops.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        console: Console,
        folder: OutFolder,
        requests: list[JobRequest],
        *,
        emulated: bool,
        resume: str,
    ) -> None:
        self.args = args
        self.console = console
        self.folder = folder
        self.out: Path = folder.path
        self.requests = requests
        self.emulated = emulated
        self.resume = resume
        self.entries: dict[int, Entry] = {}
        self.index_of = {r.track_id: i for i, r in enumerate(requests)}
        self.handles: dict[str, JobHandle] = {}
        self.emitted: set[int] = set()
        self.inflight = 0
        self.stop: _Stop | None = None
        self.fatal_type: str | None = None
        self.started = time.monotonic()
        self.gate = Gate()
        self.store = GatedStore(self._store(), self.gate)
        self._stopping: asyncio.Event | None = None

    # --- before sending --------------------------------------------------

    def reuse(self, previous: dict[str, Entry]) -> None:
        """
        Keep the prompts an earlier run saved, when their files are all
        still there.
        """
        for index, request in enumerate(self.requests):
            entry = previous.get(request.track_id or "")
            if (
                entry is not None
                and entry.status == "success"
                and entry.files
                and all((self.out / f).is_file() for f in entry.files)
            ):
                entry.index = index
                entry.previous = True
                self.entries[index] = entry

    async def run(self, emulator: Any) -> int:
        """
        Send what is left, wind down however it ends, and report.
        """
        for index in sorted(self.entries):
            self._emit(self.entries[index])
        todo = [i for i in range(len(self.requests)) if i not in self.entries]
        if not todo:
            self.console.info(
                f"All {len(self.requests)} prompts are already saved in "
                f"{self.out}/; nothing to send (--fresh starts over)."
            )
            return self._finish()
        self._stopping = asyncio.Event()
        signals = _Signals(self._request_stop, self.console, self.out)
        signals.install()
        try:
            async with contextlib.AsyncExitStack() as stack:
                client = await open_client(
                    self.args,
                    stack,
                    self.console,
                    emulator=emulator,
                    store=self.store,
                    max_queued=self.args.max_queued,
                    retry=HandBack(),
                )
                if self.stop is None:
                    await self._drive(client, todo)
        except CommandError:
            raise  # stopped before sending: no report to write
        except BaseException:
            # A bug, or Ctrl-C where no handler could be installed: the
            # manifest still keeps the job ids sent, then the error goes on.
            self._record_quietly()
            raise
        finally:
            signals.uninstall()
        return self._finish()

    def _store(self) -> JobStore:
        # The built-in emulator dies with us, and its jobs with it: there
        # is nothing to attach to next time.
        if self.emulated:
            return MemoryStore()
        return SQLiteStore(self.folder.journal)

    def _request_stop(self, stop: _Stop) -> None:
        if self.stop is None:
            self.stop = stop
            self.gate.close()
            if self._stopping is not None:
                self._stopping.set()

    # --- sending ---------------------------------------------------------

    async def _drive(self, client: Client, todo: list[int]) -> None:
        """
        Run the batch until it ends or is stopped; then let the submits on
        the wire finish, and stop waiting.
        """
        assert self._stopping is not None  # noqa: S101 (set by run)
        bar = _Progress(
            len(todo),
            enabled=not self.args.json
            and self.console.verbosity >= 0
            and sys.stderr.isatty(),
            stream=sys.stderr,
        )
        max_queued: int = self.args.max_queued
        items = generate_many(
            self._submitter(client),
            [self.requests[i] for i in todo],
            timeout=self.args.timeout,
            ordered=False,
            concurrency=self.args.concurrency or 2 * max_queued,
            on_progress=bar.update,
        )
        consumer = asyncio.create_task(self._consume(items, todo, client))
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait(
                {consumer, stopping}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()
        if consumer.done():
            bar.close()
            consumer.result()  # a bug, if any, is raised here
            return
        # Let the claims the gate withdraws unwind first: only submits
        # really on the wire are worth a word.
        await asyncio.sleep(0)
        if self.gate.sending:
            bar.close()
            self.console.problem(
                f"{PROG}: stopping: waiting for {len(self.gate.sending)} "
                "submit(s) on the wire, to keep their job ids (again to "
                "exit now)"
            )
        while self.inflight:  # noqa: ASYNC110 (a count, bounded by HTTP timeouts)
            await asyncio.sleep(0.02)
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        bar.close()

    def _submitter(self, client: Client) -> Callable[[JobRequest], Any]:
        async def submit(request: JobRequest) -> JobHandle:
            track_id = request.track_id or ""

            async def once() -> JobHandle:
                self.inflight += 1
                try:
                    return await client.submit(request)
                finally:
                    self.inflight -= 1
                    self.gate.sending.discard(track_id)

            # Retries between tries, not in flight: the gate ends them.
            job = await send(
                once,
                policy=client.retry,
                gate=self.gate,
                what=request.route.submit,
            )
            if job.phase.is_finished:
                self.store.settle(job.state)
            self.handles[track_id] = job
            self.console.detail(
                f"#{self.index_of[track_id] + 1} job {job.id} "
                f"{job.phase.value} ({track_id})"
            )
            return job

        return submit

    async def _consume(
        self, items: Any, todo: list[int], client: Client
    ) -> None:
        """
        Each outcome to its entry; results saved as they come.
        """
        async with anyio.create_task_group() as saving:
            async for item in items:
                index = todo[item.index]
                entry = Entry.of(item)
                entry.index = index
                self.entries[index] = entry
                if item.ok:
                    saving.start_soon(self._save, entry, item.result)
                else:
                    self._failed(entry, item, client.base_url)

    def _failed(self, entry: Entry, item: BatchItem, base_url: str) -> None:
        error = item.error
        if error is None or isinstance(error, NotSentError):
            entry.status = "pending"  # never sent: the next run sends it
            return
        stop = fatal(error, base_url)
        if stop is not None:
            if self.stop is None:
                self.fatal_type = type(error).__name__
            self._request_stop(_Stop(stop.status, str(stop)))
        self._emit(entry)

    async def _save(self, entry: Entry, result: JobResult) -> None:
        await save_result(entry, result, self.out)
        self._emit(entry)

    # --- after -----------------------------------------------------------

    def _finish(self) -> int:
        """
        Mark what did not finish, write the report, say how it went.
        """
        entries, manifest, elsewhere = self._record()
        for entry in entries:
            self._emit(entry)
        if not self.args.json:
            for entry in entries:
                for name in entry.files:
                    print(self.out / name, flush=True)
        if elsewhere is not None:
            self.console.problem(
                f"{PROG}: {elsewhere}; the manifest is in {manifest}"
            )
        return self._summary(entries)

    def _record_quietly(self) -> None:
        """
        :meth:`_record`, on the way out of an error: say where the
        manifest is, and let a failure here not hide that error.
        """
        try:
            _, manifest, _ = self._record()
        except Exception as exc:  # noqa: BLE001 (the first error matters more)
            self.console.problem(f"{PROG}: cannot write the manifest: {exc}")
        else:
            self.console.problem(
                f"{PROG}: the batch stopped on an error; the manifest is in "
                f"{manifest}"
            )

    def _record(self) -> tuple[list[Entry], Path, str | None]:
        """
        Mark what did not finish and write the manifest and contact sheet.

        Returns:
            The entries, where the manifest is, and why it is not in
            ``--out`` (``None`` when it is).
        """
        for index, request in enumerate(self.requests):
            entry = self.entries.get(index)
            if entry is None:
                entry = Entry(
                    index=index,
                    prompt=request.prompt,
                    endpoint=request.endpoint,
                    track_id=request.track_id,
                    seed=getattr(request, "seed", None),
                )
                self.entries[index] = entry
            job = self.handles.get(request.track_id or "")
            if entry.status == "pending" and job is not None:
                # Sent, and maybe running still: the next run attaches.
                entry.status = "interrupted"
                entry.job_id = job.id
        entries = [self.entries[i] for i in range(len(self.requests))]
        manifest, elsewhere = write_report(
            self.out,
            entries,
            endpoint=self.args.endpoint,
            emulated=self.emulated,
        )
        return entries, manifest, elsewhere

    def _summary(self, entries: list[Entry]) -> int:
        saved = [e for e in entries if e.status == "success"]
        failed = [e for e in entries if e.status == "failed"]
        images = sum(len(e.files) for e in saved)
        earlier = sum(e.previous for e in saved)
        reused = f" ({earlier} saved by an earlier run)" if earlier else ""
        self.console.info(
            f"{images} images from {len(saved)} of {len(entries)} jobs in "
            f"{self.out}/ in {time.monotonic() - self.started:.1f}s"
            f"{reused}; contact sheet: {self.out / 'index.html'}"
        )
        for entry in failed:
            if entry.error_type is None or entry.error_type != self.fatal_type:
                self.console.problem(
                    f"failed #{entry.index + 1} {entry.prompt!r}: "
                    f"{entry.error}"
                )
        if self.stop is None:
            return Exit.FAILED if failed else Exit.OK
        self.console.problem(f"{PROG}: {self.stop.message}")
        running = [e for e in entries if e.status == "interrupted"]
        pending = sum(e.status == "pending" for e in entries)
        if running:
            self.console.problem(
                f"{len(running)} job(s) sent and not saved, kept in the "
                f'journal and marked "interrupted" in {self.out}/'
                "manifest.json:"
            )
            for entry in running[:_LISTED]:
                self.console.problem(
                    f"  #{entry.index + 1} job {entry.job_id}"
                )
            if len(running) > _LISTED:
                self.console.problem(f"  ... {len(running) - _LISTED} more")
        if pending:
            self.console.problem(f"{pending} prompt(s) not sent.")
        if running or pending:
            self.console.problem(
                "To resume, run the same command again; nothing is paid "
                f"for twice:\n  {self.resume}"
            )
        return self.stop.status

    def _emit(self, entry: Entry) -> None:
        """
        With ``--json``: the entry as one line, once, as it ends.
        """
        if not self.args.json or entry.index in self.emitted:
            return
        self.emitted.add(entry.index)
        print(json.dumps(entry.as_json(), ensure_ascii=False), flush=True)


class _Signals:
    """
    The first SIGINT or SIGTERM stops the batch; the second exits at
    once (the journal keeps every job sent).
    """

    _SIGNALS: Final = (
        (signal.SIGINT, "interrupted by SIGINT", Exit.INTERRUPTED),
        (signal.SIGTERM, "terminated by SIGTERM", Exit.TERMINATED),
    )

    def __init__(
        self,
        stop: Callable[[_Stop], None],
        console: Console,
        out: Path,
    ) -> None:
        self._stop = stop
        self._console = console
        self._out = out
        self._received = 0
        self._installed: list[signal.Signals] = []

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for number, message, status in self._SIGNALS:
            try:
                loop.add_signal_handler(number, self._receive, message, status)
            except (NotImplementedError, RuntimeError):
                # Windows, or not the main thread: Ctrl-C then ends the
                # run as KeyboardInterrupt, and the journal still resumes.
                continue
            self._installed.append(number)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for number in self._installed:
            loop.remove_signal_handler(number)
        self._installed.clear()

    def _receive(self, message: str, status: Exit) -> None:
        self._received += 1
        if self._received > 1:
            self._console.problem(
                f"{PROG}: {message} again: exiting now. The journal in "
                f"{self._out}/ keeps every job sent: run the same command "
                "again to resume."
            )
            os._exit(status)
        self._stop(_Stop(status, message))


class _Progress:
    """
    A tqdm bar on a terminal; silence anywhere else.
    """

    def __init__(self, total: int, *, enabled: bool, stream: TextIO) -> None:
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm  # noqa: PLC0415
            except ImportError:
                pass
            else:
                # A fresh pty reports 0x0, and tqdm hides bars below the
                # last row: take the size with shutil's 80x24 fallback.
                size = shutil.get_terminal_size()
                self._bar = tqdm(
                    total=total,
                    unit="job",
                    file=stream,
                    ncols=size.columns,
                    nrows=size.lines,
                )

    def update(self, progress: BatchProgress) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix(
            queued=progress.queued, failed=progress.failed, refresh=False
        )
        self._bar.update(progress.finished - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
