"""
The command line's grammar: every option with its help and default.

Values are checked here, so a bad one is named by its flag
(``argument --concurrency: must be 1 or more, not 0``), never by a Python
parameter.
"""

from __future__ import annotations

import argparse
import textwrap

from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelslab_async._client import API_KEY_VARIABLE


__all__ = ["parser"]


class _Formatter(argparse.HelpFormatter):
    """
    Shows ``(default: ...)`` for options that have one worth showing, and
    keeps a description's paragraphs apart.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(
            textwrap.fill(
                " ".join(paragraph.split()),
                width,
                initial_indent=indent,
                subsequent_indent=indent,
            )
            for paragraph in text.split("\n\n")
        )

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "%(default)" in text
            or action.default is None
            or action.default is False
            or action.default in (argparse.SUPPRESS, [])
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


def _whole(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            msg = f"{text!r} is not a whole number"
            raise argparse.ArgumentTypeError(msg) from None
        if value < low:
            msg = f"must be {low} or more, not {value}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"{text!r} is not a number of seconds"
        raise argparse.ArgumentTypeError(msg) from None
    if not value > 0:
        msg = f"must be more than 0 seconds, not {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _number(low: float, high: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            msg = f"{text!r} is not a number"
            raise argparse.ArgumentTypeError(msg) from None
        if value < low or (high is not None and value > high):
            span = f"from {low:g} to {high:g}" if high else f"{low:g} or more"
            msg = f"must be {span}, not {text}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def parser(
    *,
    version: str,
    generate: Callable[..., Any],
    fetch: Callable[..., Any],
    emulator: Callable[..., Any],
    fault: Callable[[str], Any],
) -> argparse.ArgumentParser:
    """
    The parser; each command's function is its ``command`` default.
    """
    root = argparse.ArgumentParser(
        prog="modelslab-async",
        description="Generate images with ModelsLab, or emulate it locally.",
        formatter_class=_Formatter,
    )
    root.add_argument(
        "--version", action="version", version=f"%(prog)s {version}"
    )
    commands = root.add_subparsers(required=True, metavar="COMMAND")
    _generate(commands, generate)
    _fetch(commands, fetch)
    _emulator(commands, emulator, fault)
    return root


def _generate(commands: Any, command: Callable[..., Any]) -> None:
    generate = commands.add_parser(
        "generate",
        help="generate images from prompts (resumable)",
        formatter_class=_Formatter,
        description=(
            f"Generate images. Reads the key from {API_KEY_VARIABLE}; "
            "without one, runs on the built-in emulator.\n\n"
            "The batch is journaled in OUT: run the same command again "
            "after Ctrl-C, a crash or a kill, and it saves what was "
            "finished, waits for the jobs already sent, and sends only "
            "the rest. No prompt is ever paid for twice."
        ),
    )
    generate.add_argument(
        "prompts",
        nargs="*",
        metavar="PROMPT",
        help="prompts, one job each (before those of --file)",
    )
    generate.add_argument(
        "-f",
        "--file",
        type=Path,
        help="a UTF-8 prompts file: one prompt per line, or JSON lines "
        "with per-job fields; blank lines and # comments are skipped",
    )
    _common(generate)
    generate.add_argument(
        "--samples",
        type=_whole(1),
        metavar="N",
        help="images per prompt, 1-4 (default: the server's)",
    )
    for side in ("--width", "--height"):
        generate.add_argument(
            side,
            type=_whole(1),
            metavar="N",
            help="pixels, 1-1024 (default: the server's)",
        )
    generate.add_argument(
        "--seed", type=int, help="seed for every prompt (default: random)"
    )
    generate.add_argument(
        "--negative-prompt",
        metavar="TEXT",
        help="what the images should not show (default: nothing)",
    )
    generate.add_argument(
        "--model-id",
        metavar="ID",
        help="the model, on v6 only (default: flux)",
    )
    generate.add_argument(
        "--base64",
        action="store_true",
        help="ask for base64 outputs; the saved images are the same",
    )
    generate.add_argument(
        "--max-queued",
        type=_whole(1),
        default=5,
        metavar="N",
        help="your plan's queued-job cap: 5, 10 or 15",
    )
    generate.add_argument(
        "--concurrency",
        type=_whole(1),
        metavar="N",
        help="jobs in flight at once (default: twice --max-queued)",
    )
    generate.add_argument(
        "--emulator",
        action="store_true",
        help="use the built-in emulator even if a key is set",
    )
    generate.add_argument(
        "--fresh",
        action="store_true",
        help="start over: forget the batch journaled in OUT and generate "
        "every prompt again (new jobs, paid again)",
    )
    generate.set_defaults(command=command)


def _fetch(commands: Any, command: Callable[..., Any]) -> None:
    fetch = commands.add_parser(
        "fetch",
        help="re-attach to a job by id and save its images",
        formatter_class=_Formatter,
        description=(
            "Wait for a job by id and save its images, manifest.json and "
            f"index.html into OUT. Needs {API_KEY_VARIABLE}."
        ),
    )
    fetch.add_argument("job_id", metavar="JOB_ID", help="the job's id")
    _common(fetch)
    fetch.set_defaults(command=command)


def _common(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--endpoint",
        choices=("v6", "flux-klein"),
        default="v6",
        help="v6 sends Text2Img, flux-klein sends FluxKleinText2Img",
    )
    command.add_argument(
        "-o",
        "--out",
        type=Path,
        default=Path("out"),
        metavar="OUT",
        help="folder for images, manifest.json, index.html and the "
        "batch's journal; created if missing",
    )
    command.add_argument(
        "--timeout",
        type=_seconds,
        default=600.0,
        metavar="SECONDS",
        help="seconds per job, from its submit",
    )
    command.add_argument(
        "--base-url",
        metavar="URL",
        help="the API root, e.g. an emulator's (default: ModelsLab's)",
    )
    command.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line per job as it ends (its manifest "
        "entry), instead of the image paths",
    )
    loudness = command.add_mutually_exclusive_group()
    loudness.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="say more: each job sent, retries (-vv: every request)",
    )
    loudness.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar, notice or summary: only problems",
    )


def _emulator(
    commands: Any, command: Callable[..., Any], fault: Callable[[str], Any]
) -> None:
    emulator = commands.add_parser(
        "emulator",
        help="serve a local ModelsLab emulator",
        # Every default shown, None and False included: they are settings.
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Serve a ModelsLab emulator until interrupted. The first line "
            "of standard output is its API URL, alone. GET "
            "/_emulator/stats reads its counters; POST /_emulator/settings "
            "changes settings while it runs."
        ),
    )
    emulator.add_argument("--host", default="127.0.0.1", help="interface")
    emulator.add_argument(
        "--port",
        type=_whole(0),
        default=8000,
        help="port; 0 picks a free one",
    )
    emulator.add_argument(
        "--seed", type=int, default=0, help="seeds durations, images, faults"
    )
    emulator.add_argument(
        "--eta",
        type=_number(0),
        default=2.0,
        help="seconds a job announces",
    )
    emulator.add_argument(
        "--eta-error",
        type=_number(0, 1),
        default=0.0,
        help="jobs take their time times a factor in 1 ± this",
    )
    emulator.add_argument(
        "--eta-bias",
        type=_number(-1),
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
        type=_whole(1),
        help="queued jobs per key before a 429; None: no limit",
    )
    emulator.add_argument(
        "--retry-after",
        type=_number(0),
        default=1.0,
        help="seconds a 429 asks the client to wait",
    )
    emulator.add_argument(
        "--cdn-delay",
        type=_number(0),
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
        type=_number(0, 1),
        default=0.0,
        help="probability a webhook is never sent",
    )
    emulator.add_argument(
        "--webhook-duplicate",
        type=_number(0, 1),
        default=0.0,
        help="probability a webhook is sent twice",
    )
    emulator.add_argument(
        "--fault",
        action="append",
        type=fault,
        default=[],
        metavar="ROUTE:KIND:RATE",
        help=(
            "inject a fault, e.g. submit:http_500_after:0.05; repeatable. "
            "Routes: submit, fetch, download"
        ),
    )
    emulator.add_argument(
        "--record-limit",
        type=_whole(0),
        default=10_000,
        help="requests kept for inspection (counts are exact regardless)",
    )
    emulator.add_argument(
        "--job-ttl",
        type=_number(0),
        default=24 * 3600.0,
        help="seconds a job is kept, as the service keeps outputs",
    )
    emulator.set_defaults(command=command)
