"""
A local ModelsLab for tests, demos and benchmarks.

It serves both text2img endpoint families on loopback the way the real
service answers: queued jobs with ``eta``, the processing and fetch shapes
with their legacy quirks, real PNG outputs, ``base64`` mode through
``.base64`` files, per-key queue caps answering 429, webhooks back to the
caller, and injected faults. Use it in your own tests::

    from modelslab_async import Client, Text2Img
    from modelslab_async.emulator import Emulator

    async with Emulator(eta=0.1) as emulator:
        async with Client("any-key", base_url=emulator.url) as client:
            result = await client.generate(Text2Img(prompt="a lighthouse"))

Needs Pillow: ``pip install "modelslab-async[emulator]"``.
"""

from __future__ import annotations

from ._app import Emulator, start_emulator
from ._endpoints import (
    DEFAULT_ENDPOINTS,
    FLUX_KLEIN_TEXT2IMG,
    V6_TEXT2IMG,
    EmulatedEndpoint,
)
from ._faults import FAULT_KINDS, FaultKind, Faults
from ._state import EmulatedJob, Record
from ._wire import ALL_QUIRKS


__all__ = [
    "ALL_QUIRKS",
    "DEFAULT_ENDPOINTS",
    "EmulatedEndpoint",
    "EmulatedJob",
    "Emulator",
    "FAULT_KINDS",
    "FLUX_KLEIN_TEXT2IMG",
    "FaultKind",
    "Faults",
    "Record",
    "V6_TEXT2IMG",
    "start_emulator",
]
