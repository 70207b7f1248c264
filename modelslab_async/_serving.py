"""
Serving an aiohttp application on a port: the emulator, the receiver.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


__all__ = ["serve"]


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
