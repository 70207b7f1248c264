"""
The ``modelslab-async`` command: generate, fetch, and run the emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import re
import shutil
import sys
import time

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import anyio

from ._batch import BatchItem, BatchProgress
from ._client import API_KEY_VARIABLE, Client
from ._jobs import JobResult
from ._report import Entry, write_report
from ._requests import FluxKleinText2Img, JobRequest, Text2Img
from .errors import InvalidRequestError, ModelsLabError


__all__ = ["main"]

_EMULATOR_NOTICE = (
    f"No {API_KEY_VARIABLE} set: generating on the built-in emulator "
    "(placeholder images, no credits spent)."
)


class UsageError(Exception):
    """
    Strictly private: bad command-line input, reported without a traceback.
    """


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the command line; return the exit status.
    """
    args = _parser().parse_args(argv)
    try:
        status: int = asyncio.run(args.command(args))
    except UsageError as exc:
        print(f"modelslab-async: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelslab-async",
        description="Generate images with ModelsLab, or emulate it locally.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        help="generate images from prompts",
        description=(
            f"Generate images. Reads the key from {API_KEY_VARIABLE}; "
            "without one, runs on the built-in emulator."
        ),
    )
    generate.add_argument("prompts", nargs="*", metavar="PROMPT")
    generate.add_argument(
        "-f",
        "--file",
        type=Path,
        help="prompts, one per line; or JSON lines with per-job fields",
    )
    _common(generate)
    generate.add_argument("--samples", type=int, help="images per prompt, 1-4")
    generate.add_argument("--width", type=int)
    generate.add_argument("--height", type=int)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--negative-prompt")
    generate.add_argument("--model-id", help="v6 model (default: flux)")
    generate.add_argument(
        "--base64", action="store_true", help="ask for base64 outputs"
    )
    generate.add_argument(
        "--max-queued",
        type=int,
        default=5,
        help="your plan's queued-job cap: 5, 10 or 15 (default 5)",
    )
    generate.add_argument(
        "--concurrency", type=int, help="jobs in flight (default 2x queued)"
    )
    generate.add_argument(
        "--emulator",
        action="store_true",
        help="use the built-in emulator even if a key is set",
    )
    generate.set_defaults(command=_generate)

    fetch = commands.add_parser(
        "fetch", help="re-attach to a job by id and save its images"
    )
    fetch.add_argument("job_id")
    _common(fetch)
    fetch.set_defaults(command=_fetch)

    emulator = commands.add_parser(
        "emulator",
        help="serve a local ModelsLab emulator",
        description=(
            "Serve a ModelsLab emulator until interrupted. The first line "
            "of standard output is its API URL, alone. GET "
            "/_emulator/stats reads its counters; POST /_emulator/settings "
            "changes settings while it runs."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    emulator.add_argument("--host", default="127.0.0.1", help="interface")
    emulator.add_argument(
        "--port", type=int, default=8000, help="port; 0 picks a free one"
    )
    emulator.add_argument(
        "--seed", type=int, default=0, help="seeds durations, images, faults"
    )
    emulator.add_argument(
        "--eta", type=float, default=2.0, help="seconds a job announces"
    )
    emulator.add_argument(
        "--eta-error",
        type=float,
        default=0.0,
        help="jobs take their time times a factor in 1 ± this",
    )
    emulator.add_argument(
        "--eta-bias",
        type=float,
        default=0.0,
        help="jobs take eta * (1 + this): 0.2 is 20%% optimistic",
    )
    emulator.add_argument(
        "--announce",
        choices=("max", "nominal"),
        default="max",
        help="announce max(real, eta), or the nominal eta",
    )
    emulator.add_argument(
        "--queue-limit",
        type=int,
        help="queued jobs per key before a 429; None: no limit",
    )
    emulator.add_argument(
        "--retry-after",
        type=float,
        default=1.0,
        help="seconds a 429 asks the client to wait",
    )
    emulator.add_argument(
        "--cdn-delay",
        type=float,
        default=0.0,
        help="seconds after a job ends before its files exist",
    )
    emulator.add_argument(
        "--strict",
        action="store_true",
        help="refuse fields and types the vendor does not document",
    )
    emulator.add_argument(
        "--no-quirks",
        action="store_true",
        help="modern response shapes, without the legacy quirks",
    )
    emulator.add_argument(
        "--base64-delivery",
        choices=("url", "url_data_uri", "inline", "inline_data_uri"),
        default="url",
        help="how base64 outputs arrive",
    )
    emulator.add_argument(
        "--webhook-drop",
        type=float,
        default=0.0,
        help="probability a webhook is never sent",
    )
    emulator.add_argument(
        "--webhook-duplicate",
        type=float,
        default=0.0,
        help="probability a webhook is sent twice",
    )
    emulator.add_argument(
        "--fault",
        action="append",
        type=_fault,
        default=[],
        metavar="ROUTE:KIND:RATE",
        help=(
            "inject a fault, e.g. submit:http_500_after:0.05; repeatable. "
            "Routes: submit, fetch, download"
        ),
    )
    emulator.add_argument(
        "--record-limit",
        type=int,
        default=10_000,
        help="requests kept for inspection (counts are exact regardless)",
    )
    emulator.add_argument(
        "--job-ttl",
        type=float,
        default=24 * 3600.0,
        help="seconds a job is kept, as the service keeps outputs",
    )
    emulator.set_defaults(command=_serve_emulator)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint", choices=("v6", "flux-klein"), default="v6"
    )
    parser.add_argument("-o", "--out", type=Path, default=Path("out"))
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per job"
    )
    parser.add_argument("--base-url", help="API root (e.g. an emulator's)")
    parser.add_argument(
        "--json", action="store_true", help="print the manifest as JSON"
    )


# --- generate ---------------------------------------------------------------


def _requests(args: argparse.Namespace) -> list[JobRequest]:
    cls: type[JobRequest] = (
        Text2Img if args.endpoint == "v6" else FluxKleinText2Img
    )
    defaults = {
        name: value
        for name, value in (
            ("samples", args.samples),
            ("width", args.width),
            ("height", args.height),
            ("seed", args.seed),
            ("negative_prompt", args.negative_prompt),
            ("base64", args.base64 or None),
            ("model_id", args.model_id),
        )
        if value is not None
    }
    lines: list[tuple[str, dict[str, Any]]] = [
        ("argument", {"prompt": p}) for p in args.prompts
    ]
    if args.file is not None:
        lines += _prompt_file(args.file)
    if not lines:
        msg = "give at least one PROMPT or --file"
        raise UsageError(msg)
    requests = []
    for where, fields in lines:
        try:
            requests.append(cls(**{**defaults, **fields}))
        except InvalidRequestError as exc:
            msg = f"{where}: {exc}"
            raise UsageError(msg) from None
        except TypeError as exc:
            unknown = str(exc).rsplit(" ", 1)[-1]
            msg = f"{where}: {cls.__name__} has no field {unknown}"
            raise UsageError(msg) from None
    return requests


def _prompt_file(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror}"
        raise UsageError(msg) from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path}:{number}"
        if not stripped.startswith("{"):
            lines.append((where, {"prompt": stripped}))
            continue
        try:
            fields = json.loads(stripped)
        except json.JSONDecodeError as exc:
            msg = f"{where}: not valid JSON ({exc.msg})"
            raise UsageError(msg) from None
        if not isinstance(fields, dict) or "prompt" not in fields:
            msg = f'{where}: a JSON line needs a "prompt"'
            raise UsageError(msg)
        lines.append((where, fields))
    return lines


def _slug(prompt: str) -> str:
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    return "-".join(words)[:40].rstrip("-") or "image"


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


async def _open_client(
    args: argparse.Namespace,
    stack: contextlib.AsyncExitStack,
    *,
    may_emulate: bool,
    **options: Any,
) -> tuple[Client, bool]:
    key = os.environ.get(API_KEY_VARIABLE)
    emulated = may_emulate and (
        args.emulator or (not key and args.base_url is None)
    )
    base_url = args.base_url
    if emulated:
        from .emulator import Emulator  # noqa: PLC0415

        emulator = await stack.enter_async_context(
            Emulator(eta=1.0, eta_error=0.3)
        )
        base_url, key = emulator.url, "emulator"
        print(_EMULATOR_NOTICE, file=sys.stderr)
    elif not key:
        msg = f"set {API_KEY_VARIABLE} to your API key"
        raise UsageError(msg)
    settings: dict[str, Any] = {"job_timeout": args.timeout, **options}
    if base_url is not None:
        settings["base_url"] = base_url
    try:
        client = Client(key, **settings)
    except InvalidRequestError as exc:
        raise UsageError(str(exc)) from None
    return await stack.enter_async_context(client), emulated


async def _generate(args: argparse.Namespace) -> int:
    requests = _requests(args)
    out: Path = args.out
    started = time.monotonic()
    entries: list[Entry] = []
    async with contextlib.AsyncExitStack() as stack:
        client, emulated = await _open_client(
            args, stack, may_emulate=True, max_queued=args.max_queued
        )
        bar = _Progress(
            len(requests),
            enabled=not args.json and sys.stderr.isatty(),
            stream=sys.stderr,
        )
        stack.callback(bar.close)
        await anyio.Path(out).mkdir(parents=True, exist_ok=True)
        async with anyio.create_task_group() as saving:
            async for item in client.generate_many(
                requests,
                concurrency=args.concurrency,
                on_progress=bar.update,
            ):
                entry = Entry(item=item)
                entries.append(entry)
                if item.result is not None:
                    saving.start_soon(_save, entry, item.result, out)
    return _finish(args, entries, started, emulated=emulated)


async def _save(entry: Entry, result: JobResult, out: Path) -> None:
    stem = f"{entry.item.index + 1:04d}-{_slug(entry.item.request.prompt)}"
    try:
        for number, output in enumerate(result.outputs, start=1):
            entry.files.append(await output.save(out / f"{stem}-{number}"))
    except ModelsLabError as exc:
        entry.save_error = str(exc)


def _finish(
    args: argparse.Namespace,
    entries: list[Entry],
    started: float,
    *,
    emulated: bool,
) -> int:
    """
    Write the report, print the images (or the manifest), exit status.
    """
    out: Path = args.out
    manifest = write_report(
        out, entries, endpoint=args.endpoint, emulated=emulated
    )
    seconds = time.monotonic() - started
    failed = [e for e in entries if not e.ok]
    images = [p for e in sorted(entries, key=_index) for p in e.files]
    if args.json:
        print(manifest, end="")
    else:
        for path in images:
            print(path)
    print(
        f"{len(images)} images from {len(entries) - len(failed)} of "
        f"{len(entries)} jobs in {out}/ in {seconds:.1f}s; "
        f"contact sheet: {out / 'index.html'}",
        file=sys.stderr,
    )
    for entry in failed:
        reason = entry.save_error or entry.item.error
        print(
            f"failed #{entry.item.index + 1} {entry.item.request.prompt!r}: "
            f"{reason}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _index(entry: Entry) -> int:
    return entry.item.index


# --- fetch ------------------------------------------------------------------


async def _fetch(args: argparse.Namespace) -> int:
    async with contextlib.AsyncExitStack() as stack:
        # A job id means nothing to a fresh emulator: a key is needed.
        client, _ = await _open_client(args, stack, may_emulate=False)
        started = time.monotonic()
        try:
            job = await client.fetch(args.job_id, endpoint=args.endpoint)
            result = await job.wait(args.timeout)
        except InvalidRequestError as exc:
            raise UsageError(str(exc)) from None
        except ModelsLabError as exc:
            print(f"modelslab-async: {exc}", file=sys.stderr)
            return 1
        request: JobRequest = (
            Text2Img if args.endpoint == "v6" else FluxKleinText2Img
        )(prompt=str(result.meta.get("prompt") or f"job {result.id}"))
        entry = Entry(
            item=BatchItem(
                index=0,
                request=request,
                result=result,
                seconds=time.monotonic() - started,
            )
        )
        await anyio.Path(args.out).mkdir(parents=True, exist_ok=True)
        await _save(entry, result, args.out)
        entries = [entry]
    return _finish(args, entries, started, emulated=False)


# --- emulator ---------------------------------------------------------------


def _fault(text: str) -> tuple[str, str, float]:
    """
    ``ROUTE:KIND:RATE`` of ``--fault``, checked.
    """
    from .emulator import FAULT_KINDS  # noqa: PLC0415

    route, _, rest = text.partition(":")
    kind, _, rate = rest.partition(":")
    try:
        probability = float(rate)
    except ValueError:
        probability = -1.0
    if (
        route not in ("submit", "fetch", "download")
        or kind not in FAULT_KINDS
        or not 0 <= probability <= 1
    ):
        msg = (
            f"{text!r} is not ROUTE:KIND:RATE (route submit, fetch or "
            f"download; kind one of {', '.join(FAULT_KINDS)}; rate 0 to 1)"
        )
        raise argparse.ArgumentTypeError(msg)
    return route, kind, probability


async def _serve_emulator(args: argparse.Namespace) -> int:
    from .emulator import ALL_QUIRKS, Emulator, Faults  # noqa: PLC0415

    # Keys checked by _fault; Faults checks them again.
    rates: dict[Any, dict[Any, float]] = {}
    for route, kind, rate in args.fault:
        rates.setdefault(route, {})[kind] = rate
    try:
        emulator = Emulator(
            host=args.host,
            port=args.port,
            seed=args.seed,
            eta=args.eta,
            eta_error=args.eta_error,
            eta_bias=args.eta_bias,
            announce=args.announce,
            queue_limit=args.queue_limit,
            retry_after=args.retry_after,
            cdn_delay=args.cdn_delay,
            strict=args.strict,
            quirks=frozenset() if args.no_quirks else ALL_QUIRKS,
            base64_delivery=args.base64_delivery,
            record_limit=args.record_limit,
            job_ttl=args.job_ttl,
            faults=Faults(
                rates=rates,
                webhook_drop=args.webhook_drop,
                webhook_duplicate=args.webhook_duplicate,
                seed=args.seed,
            ),
        )
    except (TypeError, ValueError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    try:
        await emulator.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            msg = f"port {args.port} is in use; choose another with --port"
            raise UsageError(msg) from None
        raise UsageError(
            f"cannot serve on {args.host}:{args.port}: {exc}"
        ) from None
    try:
        # The URL comes first and alone, for scripts that start us.
        print(emulator.url, flush=True)
        print(
            f"emulating ModelsLab at {emulator.url}; try:\n"
            f"  {API_KEY_VARIABLE}=any modelslab-async generate "
            f'--base-url {emulator.url} "a lighthouse"',
            file=sys.stderr,
            flush=True,
        )
        await asyncio.Event().wait()  # until interrupted
    finally:
        await emulator.aclose()
    return 0
