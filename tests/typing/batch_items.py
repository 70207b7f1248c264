"""
Typing tests: what type checkers must accept, and refuse, about batches.

Checked by ``mypy`` (``nox -s typing``), never run: each function is a
case. A line marked ``# type: ignore[...]`` must be an error; mypy's
``warn_unused_ignores`` (part of ``--strict``) fails the check if it stops
being one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from modelslab_async import (
    BatchFailure,
    BatchItem,
    BatchSuccess,
    JobResult,
)
from modelslab_async.errors import ModelsLabError


def ok_narrows_to_a_result(item: BatchItem) -> str | None:
    """
    ``if item.ok:`` makes ``item.result`` a JobResult.
    """
    if item.ok:
        return item.result.id
    return None


def not_ok_narrows_to_an_error(item: BatchItem) -> ModelsLabError | None:
    """
    ``if not item.ok:`` makes ``item.error`` a ModelsLabError.
    """
    if not item.ok:
        return item.error
    return None


def error_is_none_narrows_too(item: BatchItem) -> str | None:
    """
    ``item.error is None`` narrows the same way.
    """
    if item.error is None:
        return item.result.id
    return None


def isinstance_narrows(item: BatchItem) -> JobResult | None:
    """
    The two classes narrow by isinstance as well.
    """
    if isinstance(item, BatchSuccess):
        return item.result
    assert isinstance(item, BatchFailure)
    return None


def without_narrowing_result_may_be_none(item: BatchItem) -> str | None:
    """
    Unnarrowed, ``item.result`` may be None: reading it is an error.
    """
    return item.result.id  # type: ignore[union-attr]


def unwrap_is_a_result(item: BatchItem) -> JobResult:
    """
    ``unwrap()`` is a JobResult either way (or raises).
    """
    return item.unwrap()


async def in_a_loop(items: AsyncIterator[BatchItem]) -> list[str]:
    """
    The documented loop type-checks as written.
    """
    ids = []
    async for item in items:
        if item.ok:
            ids.append(item.result.id or "")
        else:
            ids.append(type(item.error).__name__)
    return ids
