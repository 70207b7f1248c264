"""
What every command shares: exit statuses, errors that end a command with
one line, the console, and opening a client (checked before paying).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import sys

from collections.abc import Iterator
from typing import Any, Final, TextIO

from modelslab_async._client import API_KEY_VARIABLE, Client
from modelslab_async._retry import RetryPolicy
from modelslab_async.errors import (
    AuthenticationError,
    InsufficientCreditsError,
    InvalidRequestError,
    ModelsLabError,
    PermissionDeniedError,
    TransportError,
)
from modelslab_async.stores import JobStore


__all__ = [
    "CommandError",
    "Console",
    "Exit",
    "UsageError",
    "fatal",
    "open_client",
]

PROG: Final = "modelslab-async"

_EMULATOR_NOTICE: Final = (
    f"No {API_KEY_VARIABLE} set: generating on the built-in emulator "
    "(placeholder images, no credits spent)."
)
#: The preflight: a few quick tries, so a dead API ends the run in
#: seconds, not after the batch's patient retries.
_PREFLIGHT_RETRY: Final = RetryPolicy(
    attempts=3, timeout=5.0, wait_initial=0.2, wait_jitter=0.2
)
#: The job id the preflight fetches: none has it, so the answer costs
#: nothing and says whether the key is good.
_NO_SUCH_JOB: Final = "0"


class Exit(enum.IntEnum):
    """
    Exit statuses, as documented in docs/cli.md.
    """

    OK = 0
    FAILED = 1
    USAGE = 2
    MISSING_EXTRA = 3
    KEY_REFUSED = 4
    NO_CREDITS = 5
    PLAN_REFUSED = 6
    UNREACHABLE = 7
    INTERRUPTED = 130
    TERMINATED = 143


class CommandError(Exception):
    """
    Ends a command with one line on standard error and a status.
    """

    def __init__(self, message: str, status: Exit) -> None:
        super().__init__(message)
        self.status = status


class UsageError(CommandError):
    """
    Bad command-line input: nothing was sent.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, Exit.USAGE)


def fatal(error: BaseException, base_url: str) -> CommandError | None:
    """
    The end of the batch an error means, if no other job can do better:
    a refused key, no credits, a plan that refuses, an API out of reach.
    """
    # The server's words, and its HTTP status when it sent one; where the
    # call went is noise here.
    said = getattr(error, "message", None) or str(error)
    status = getattr(error, "http_status", None)
    if status is not None:
        said = f"HTTP {status}: {said}"
    if isinstance(error, AuthenticationError):
        return CommandError(
            f"the API key was refused ({said}); check {API_KEY_VARIABLE}",
            Exit.KEY_REFUSED,
        )
    if isinstance(error, InsufficientCreditsError):
        return CommandError(
            f"the account is out of credits ({said}); top up, then run "
            "the same command again",
            Exit.NO_CREDITS,
        )
    if isinstance(error, PermissionDeniedError):
        return CommandError(
            f"your plan does not allow this ({said})", Exit.PLAN_REFUSED
        )
    if isinstance(error, TransportError):
        return CommandError(
            f"cannot reach the API at {base_url}: {said}", Exit.UNREACHABLE
        )
    return None


class Console:
    """
    Standard error, as loud as ``-q``/``-v`` say; standard output is the
    commands' own.
    """

    def __init__(self, verbosity: int, stream: TextIO | None = None) -> None:
        self.verbosity = verbosity
        self.stream = sys.stderr if stream is None else stream

    @contextlib.contextmanager
    def logging(self) -> Iterator[None]:
        """
        The library's log lines on standard error, as loud as asked, for
        the block; as they were after it (main() may run in a process
        that logs its own way, a test's).
        """
        level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}
        logger = logging.getLogger("modelslab_async")
        before = logger.level, logger.propagate
        handler = logging.StreamHandler(self.stream)
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
        logger.setLevel(level.get(self.verbosity, logging.DEBUG))
        logger.addHandler(handler)
        logger.propagate = False
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(before[0])
            logger.propagate = before[1]

    def info(self, message: str) -> None:
        """
        A line for people watching; ``-q`` silences it.
        """
        if self.verbosity >= 0:
            print(message, file=self.stream, flush=True)

    def detail(self, message: str) -> None:
        """
        A line for ``-v``.
        """
        if self.verbosity >= 1:
            print(message, file=self.stream, flush=True)

    def problem(self, message: str) -> None:
        """
        A line that is never silenced.
        """
        print(message, file=self.stream, flush=True)


def emulator_wanted(args: Any) -> bool:
    """
    Whether ``generate`` runs on the built-in emulator.
    """
    key = os.environ.get(API_KEY_VARIABLE)
    return bool(args.emulator or (not key and args.base_url is None))


def new_emulator() -> Any:
    """
    The built-in emulator, made (not started) at once: a missing Pillow
    ends the command here, before anything else.
    """
    from modelslab_async.emulator import Emulator  # noqa: PLC0415

    try:
        return Emulator(eta=1.0, eta_error=0.3)
    except ImportError as exc:
        raise CommandError(str(exc), Exit.MISSING_EXTRA) from None


async def open_client(
    args: Any,
    stack: contextlib.AsyncExitStack,
    console: Console,
    *,
    emulator: Any = None,
    store: JobStore | None = None,
    **options: Any,
) -> Client:
    """
    A client for *args*, open in *stack*: on *emulator* (started here)
    when given, else on ModelsLab or ``--base-url``, checked first with a
    fetch that costs nothing.

    Raises:
        CommandError: No key, a refused key, or an API out of reach.
    """
    key = os.environ.get(API_KEY_VARIABLE)
    base_url = args.base_url
    if emulator is not None:
        await stack.enter_async_context(emulator)
        base_url, key = emulator.url, "emulator"
        console.info(_EMULATOR_NOTICE)
    elif not key:
        msg = f"set {API_KEY_VARIABLE} to your API key"
        raise UsageError(msg)
    settings: dict[str, Any] = {"job_timeout": args.timeout, **options}
    if base_url is not None:
        settings["base_url"] = base_url
    try:
        client = Client(key, store=store, **settings)
    except InvalidRequestError as exc:
        raise UsageError(str(exc)) from None
    if emulator is None:
        await _preflight(key, client.base_url, args.endpoint)
    return await stack.enter_async_context(client)


async def _preflight(key: str, base_url: str, endpoint: Any) -> None:
    """
    Fail before paying: a fetch of a job nobody has says whether the API
    answers and takes the key, and costs nothing.
    """
    async with Client(
        key,
        base_url=base_url,
        retry=_PREFLIGHT_RETRY,
        timeout=10.0,
        max_queued=None,
    ) as probe:
        try:
            await probe.fetch(_NO_SUCH_JOB, endpoint=endpoint)
        except ModelsLabError as exc:
            stop = fatal(exc, base_url)
            if stop is not None:
                raise stop from None
            # Any other answer (no such job, above all) is an answer.
