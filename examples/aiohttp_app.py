"""
An aiohttp web app with an image endpoint: ``GET /image?prompt=...``.

One Client for the whole app, opened and closed with it (cleanup_ctx), so
every request shares one session and one queue cap.

A visitor who leaves early stops their request's wait at once: the app
runs with ``handler_cancellation=True`` (aiohttp's default, ``False``,
lets a handler run on after its visitor is gone). Their job keeps its
queue slot until it ends, by design: the cap counts jobs queued on the
server, whoever waits for them. The client watches such a job and frees
its slot the moment it ends.

    python examples/aiohttp_app.py   # then open http://127.0.0.1:8080/image?prompt=a+fox
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Final

from aiohttp import web

from modelslab_async import Client, Text2Img
from modelslab_async.errors import (
    InvalidRequestError,
    JobTimeoutError,
    ModelsLabError,
)


CLIENT = web.AppKey("client", Client)

#: How the app is served: a visitor who hangs up cancels their handler.
RUNNER_OPTIONS: Final[dict[str, Any]] = {"handler_cancellation": True}

_TYPES = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg"}


async def image(request: web.Request) -> web.Response:
    """
    Generate one image for ``?prompt=`` and return its bytes.
    """
    prompt = request.query.get("prompt", "").strip()
    if not prompt:
        raise web.HTTPBadRequest(text="add ?prompt=...")
    try:
        request_ = Text2Img(prompt=prompt, width=512, height=512)
        result = await request.app[CLIENT].generate(request_, timeout=120)
        data = await result.outputs[0].read()
    except InvalidRequestError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from exc
    except JobTimeoutError as exc:
        raise web.HTTPGatewayTimeout(
            text=f"still working: job {exc.job_id}"
        ) from exc
    except ModelsLabError as exc:
        raise web.HTTPBadGateway(text=str(exc)) from exc
    kind = next(
        (t for magic, t in _TYPES.items() if data.startswith(magic)),
        "application/octet-stream",
    )
    return web.Response(body=data, content_type=kind)


def make_app(
    clients: Callable[[], AbstractAsyncContextManager[Client]],
) -> web.Application:
    """
    The app; *clients* opens the Client it serves with.
    """

    async def client_context(app: web.Application) -> AsyncIterator[None]:
        async with clients() as client:
            app[CLIENT] = client
            yield

    app = web.Application()
    app.cleanup_ctx.append(client_context)
    app.router.add_get("/image", image)
    return app


def _run(**options: Any) -> None:
    from _demo import demo_client  # noqa: PLC0415

    web.run_app(
        make_app(lambda: demo_client(**options)),
        host="127.0.0.1",
        port=8080,
        **RUNNER_OPTIONS,
    )


if __name__ == "__main__":
    _run(max_queued=5)
