"""
Real PNG images, the same bytes for the same seed, prompt and size.
"""

from __future__ import annotations

import functools
import hashlib
import io
import random

from typing import Any


__all__ = ["render_png", "require_pillow"]

#: What to run when Pillow is missing, in every message that says so.
INSTALL_HINT = 'pip install "modelslab-async[emulator]"'


def require_pillow() -> Any:
    """
    Pillow's ``Image`` module.

    Raises:
        ImportError: Pillow is not installed; the message names the fix.
    """
    try:
        from PIL import Image  # noqa: PLC0415 (optional: the emulator extra)
    except ImportError:
        msg = f"the emulator draws real PNGs with Pillow: {INSTALL_HINT}"
        raise ImportError(msg, name="PIL") from None
    return Image


@functools.lru_cache(maxsize=64)
def render_png(
    seed: int, prompt: str, width: int, height: int, *, noise: bool = False
) -> bytes:
    """
    A *width* x *height* PNG: a diagonal gradient between two colours
    drawn from the seed and prompt, cheap to make and to compress; or, with
    *noise*, random pixels, which compress as badly as a photo (about 3 MB
    at 1024 x 1024, the size of the vendor's real outputs).
    """
    image_module = require_pillow()
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    if noise:
        pixels = random.Random(digest).randbytes(width * height * 3)
        noisy = image_module.frombytes("RGB", (width, height), pixels)
        buffer = io.BytesIO()
        noisy.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()
    start, end = digest[:3], digest[3:6]
    # One gradient row, then every row is it shifted: fast at 1024x1024.
    span = width + height
    ramp = bytearray()
    for x in range(span):
        ramp += bytes(
            a + (b - a) * x // max(span - 1, 1)
            for a, b in zip(start, end, strict=True)
        )
    rows = b"".join(
        bytes(ramp[y * 3 : (y + width) * 3]) for y in range(height)
    )
    image = image_module.frombytes("RGB", (width, height), rows)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
