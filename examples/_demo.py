"""
Shared by the examples: a client on ModelsLab, or on a local emulator.
"""

from __future__ import annotations

import contextlib
import os
import sys

from collections.abc import AsyncIterator
from typing import Any

from modelslab_async import Client


@contextlib.asynccontextmanager
async def demo_client(**options: Any) -> AsyncIterator[Client]:
    """
    A client on ModelsLab when ``MODELSLAB_API_KEY`` is set, otherwise on
    the built-in emulator (needs ``pip install 'modelslab-async[emulator]'``).
    """
    if os.environ.get("MODELSLAB_API_KEY"):
        async with Client(**options) as client:
            yield client
        return
    from modelslab_async.emulator import Emulator  # noqa: PLC0415

    print(
        "No MODELSLAB_API_KEY: using the built-in emulator.", file=sys.stderr
    )
    async with (
        Emulator(eta=1.0, eta_error=0.3) as emulator,
        Client("demo", base_url=emulator.url, **options) as client,
    ):
        yield client
