"""
Serving an aiohttp application on a port: the emulator, the receiver.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError


__all__ = ["QuietLog", "serve"]


async def serve(
    app: web.Application, host: str, port: int, **options: Any
) -> tuple[web.AppRunner, str]:
    """
    Start *app* on *host*:*port* (0 picks a free port).

    Returns:
        The runner, to ``cleanup()``, and the ``http://host:port`` origin
        actually bound.
    """
    runner = web.AppRunner(app, access_log=None, **options)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound, bound_port = runner.addresses[0][:2]
    shown = f"[{bound}]" if ":" in bound else bound
    return runner, f"http://{shown}:{bound_port}"


#: What a client can do to a server that is no fault of the server: hang
#: up, or send something that is not HTTP.
_CLIENT_TROUBLE: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncio.CancelledError,
    HttpProcessingError,
    web.RequestPayloadError,
)


class QuietLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """
    A logger for aiohttp's request handler that reports what clients do
    (hang up mid-request, send garbage) as one debug line, not a
    traceback; a fault of the server itself keeps its traceback.

    Pass ``logger=QuietLog(logging.getLogger(name))`` to :func:`serve`.
    """

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        """
        Log *msg*, as a one-line debug message if it is the client's doing.
        """
        error = _exception(kwargs.get("exc_info"))
        if error is not None and _by_client(error):
            kwargs.pop("exc_info")
            text = str(msg) % args if args else str(msg)
            detail = " ".join(str(error).split())[:200]
            super().log(
                logging.DEBUG,
                "%s: %s%s",
                text,
                type(error).__name__,
                f": {detail}" if detail else "",
                **kwargs,
            )
            return
        super().log(level, msg, *args, **kwargs)


def _exception(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        return exc_info[1] if isinstance(exc_info[1], BaseException) else None
    if exc_info is True:
        return sys.exc_info()[1]
    return None


def _by_client(error: BaseException) -> bool:
    # The cause counts too: aiohttp wraps a bad gzip body in its own error.
    seen: BaseException | None = error
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, _CLIENT_TROUBLE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
