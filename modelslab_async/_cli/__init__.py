"""
The ``modelslab-async`` command: generate, fetch, and run the emulator.

``main`` parses the command line and turns every expected failure into one
line on standard error and its exit status (docs/cli.md has the table).
"""

from __future__ import annotations

import asyncio
import sys

from collections.abc import Sequence

from ._args import parser
from ._common import PROG, CommandError, Console, Exit
from ._emulator import fault, serve_emulator
from ._fetch import fetch
from ._generate import generate


__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the command line; return the exit status.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser(
        version=_version(),
        generate=generate,
        fetch=fetch,
        emulator=serve_emulator,
        fault=fault,
    ).parse_args(arguments)
    quiet = getattr(args, "quiet", False)
    console = Console(-1 if quiet else getattr(args, "verbose", 0))
    try:
        with console.logging():
            if args.command is generate:
                status: int = asyncio.run(generate(args, console, arguments))
            else:
                status = asyncio.run(args.command(args, console))
    except CommandError as exc:
        console.problem(f"{PROG}: {exc}")
        return exc.status
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    return status


def _version() -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version("modelslab-async")
