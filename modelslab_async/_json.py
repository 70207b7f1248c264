"""
JSON in and out: orjson when the ``fast`` extra installed it, else json.

Measured in docs/performance.md: orjson gives about 8% more jobs per
second. Both read the same valid JSON the same way; orjson refuses what is
not JSON (``NaN``, ``Infinity``), which then reads as an unreadable answer.
"""

from __future__ import annotations

import contextlib
import json

from collections.abc import Callable
from typing import Any


__all__ = ["BACKEND", "dumps", "loads", "use"]


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _json_loads(data: bytes) -> Any:
    # JSON is UTF-8 (RFC 8259): decoding first skips json's sniffing.
    return json.loads(data.decode())


#: The backend in use: "orjson" or "json".
BACKEND = "json"
dumps: Callable[[Any], bytes] = _json_dumps
loads: Callable[[bytes], Any] = _json_loads


def use(backend: str) -> None:
    """
    Strictly private: pick a backend (tests and benchmarks compare them).
    """
    global BACKEND, dumps, loads
    if backend == "orjson":
        import orjson  # noqa: PLC0415

        BACKEND, dumps, loads = "orjson", orjson.dumps, orjson.loads
    else:
        BACKEND, dumps, loads = "json", _json_dumps, _json_loads


with contextlib.suppress(ImportError):
    use("orjson")
