"""
Saving a job's images under the names the CLI documents.
"""

from __future__ import annotations

import re

from pathlib import Path

from modelslab_async._jobs import JobResult
from modelslab_async.errors import ModelsLabError

from ._report import Entry


__all__ = ["save_result"]


async def save_result(entry: Entry, result: JobResult, out: Path) -> None:
    """
    Save *result*'s images into *out* as ``0001-<slug>-1.png`` ...; mark
    *entry* ``success``, or ``failed`` with the reason (no error type: the
    job itself succeeded), whatever the reason.
    """
    stem = f"{entry.index + 1:04d}-{_slug(entry.prompt)}"
    try:
        for number, output in enumerate(result.outputs, start=1):
            path = await output.save(out / f"{stem}-{number}")
            entry.files.append(str(path.relative_to(out)))
    except ModelsLabError as exc:
        entry.fail(f"saving: {exc}")
    except Exception as exc:  # noqa: BLE001 (one job's images, not the batch)
        # Whatever the download layer raises for an output it cannot
        # handle, it is this job's failure: the batch goes on, and its
        # manifest is written.
        entry.fail(f"saving: {type(exc).__name__}: {exc}")
    else:
        entry.status = "success"


def _slug(prompt: str) -> str:
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    return "-".join(words)[:40].rstrip("-") or "image"
