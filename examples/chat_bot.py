"""
An async chat-bot command: ``/imagine <prompt>`` answers with images.

A bot serves many people at once and must never hang on one of them. With
a WebhookReceiver, each command finishes the moment ModelsLab calls back;
if a callback is lost, polling takes over after the job's eta plus a grace
period. Errors become replies, never crashes.

    python examples/chat_bot.py
"""

from __future__ import annotations

import asyncio

from collections.abc import Awaitable, Callable

import attrs

from _demo import demo_client

from modelslab_async import Client, Text2Img
from modelslab_async.errors import InvalidRequestError, ModelsLabError
from modelslab_async.webhooks import WebhookReceiver


Reply = Callable[[str, list[bytes]], Awaitable[None]]

USAGE = "usage: /imagine <what to draw>"


@attrs.define
class ImagineBot:
    """
    Turns ``/imagine`` messages into images; ignores everything else.
    """

    client: Client
    timeout: float = 120.0

    async def on_message(self, text: str, reply: Reply) -> None:
        """
        Handle one chat message, replying with text and images.
        """
        command, _, prompt = text.strip().partition(" ")
        if command != "/imagine":
            return
        if not prompt.strip():
            await reply(USAGE, [])
            return
        try:
            result = await self.client.generate(
                Text2Img(prompt=prompt.strip(), samples=2),
                timeout=self.timeout,
            )
            images = [await output.read() for output in result.outputs]
        except InvalidRequestError as exc:
            await reply(f"I can't draw that: {exc}", [])
        except ModelsLabError as exc:
            await reply(f"Sorry, that failed: {exc}", [])
        else:
            await reply(f"Here is {prompt.strip()!r}:", images)


async def main() -> None:
    async def reply(text: str, images: list[bytes]) -> None:
        sizes = ", ".join(f"{len(i)} bytes" for i in images)
        print(text, f"[{sizes}]" if images else "")

    async with (
        WebhookReceiver() as receiver,
        demo_client(webhooks=receiver) as client,
    ):
        bot = ImagineBot(client)
        messages = [
            "/imagine a lighthouse at dawn",
            "good morning",
            "/imagine a red fox in the snow",
            "/imagine",
        ]
        await asyncio.gather(*(bot.on_message(m, reply) for m in messages))


if __name__ == "__main__":
    asyncio.run(main())
