"""
Where a client journals its jobs: in memory (the default), in a SQLite file
(jobs that outlive the process), or in Redis (many processes on one
account).

Pass one as ``Client(store=...)``. Every store keeps the same records
(:class:`~modelslab_async.JobState`), never the API key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._memory import MemoryStore
from ._protocol import JobStore, Journal
from ._sqlite import SQLiteStore


if TYPE_CHECKING:
    from ._redis import RedisStore


__all__ = ["JobStore", "Journal", "MemoryStore", "RedisStore", "SQLiteStore"]


def __getattr__(name: str) -> Any:
    # RedisStore needs redis-py, which only the `redis` extra installs.
    if name == "RedisStore":
        from ._redis import RedisStore  # noqa: PLC0415

        return RedisStore
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
