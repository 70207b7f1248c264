"""
Generate a batch with plain asyncio.gather and save every image.

No semaphore, no retry loop: the client keeps the account's queue cap
(max_queued) and waits out 429s by itself.

    python examples/batch_gather.py "a lighthouse" "a red fox" ...
"""

from __future__ import annotations

import asyncio
import sys

from pathlib import Path

from _demo import demo_client

from modelslab_async import Client, Text2Img


async def generate_all(
    client: Client, prompts: list[str], out: Path
) -> list[Path]:
    """
    Generate one image per prompt, all at once, and save them in *out*.
    """
    results = await asyncio.gather(
        *(
            client.generate(Text2Img(prompt=p, width=512, height=512))
            for p in prompts
        )
    )
    saved = await asyncio.gather(*(r.save_all(out) for r in results))
    return [path for paths in saved for path in paths]


async def main() -> None:
    prompts = sys.argv[1:] or [f"a lighthouse, study {n}" for n in range(12)]
    async with demo_client(max_queued=5) as client:
        for path in await generate_all(client, prompts, Path("out")):
            print(path)


if __name__ == "__main__":
    asyncio.run(main())
