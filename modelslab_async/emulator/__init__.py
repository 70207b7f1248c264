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

Needs Pillow: ``pip install 'modelslab-async[emulator]'``.
"""

from __future__ import annotations

from ._faults import FAULT_KINDS, FaultKind, Faults
from ._server import ALL_QUIRKS, Emulator, start_emulator
from ._state import EmulatedJob, Record


__all__ = [
    "ALL_QUIRKS",
    "EmulatedJob",
    "Emulator",
    "FAULT_KINDS",
    "FaultKind",
    "Faults",
    "Record",
    "start_emulator",
]
