"""
What a batch leaves beside its images: ``manifest.json`` and the
``index.html`` contact sheet, written whatever happens to the folder.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import tempfile

from pathlib import Path
from typing import Any, Final, Literal

import attrs

from modelslab_async._batch import BatchItem
from modelslab_async.errors import ModelsLabError


__all__ = ["Entry", "Status", "read_previous", "write_report"]

Status = Literal["success", "failed", "interrupted", "pending"]
_STATUSES: Final = ("success", "failed", "interrupted", "pending")


@attrs.define(kw_only=True)
class Entry:
    """
    One prompt's line in the manifest.

    Attributes:
        status: ``success`` (saved), ``failed``, ``interrupted`` (its job
            was sent and may still run: a rerun attaches to it) or
            ``pending`` (never sent).
        previous: Saved by an earlier run, and reused.
    """

    index: int
    prompt: str
    endpoint: str
    track_id: str | None
    seed: int | None = None
    job_id: str | None = None
    status: Status = "pending"
    files: list[str] = attrs.Factory(list)
    seconds: float = 0.0
    error: str | None = None
    error_type: str | None = None
    previous: bool = False

    @classmethod
    def of(cls, item: BatchItem) -> Entry:
        """
        The entry of a batch outcome, before its images are saved.
        """
        request = item.request
        seed = getattr(request, "seed", None)
        entry = cls(
            index=item.index,
            prompt=request.prompt,
            endpoint=request.endpoint,
            track_id=request.track_id,
            seed=seed,
            seconds=round(item.seconds, 3),
        )
        if item.ok:
            entry.job_id = item.result.id
            entry.seed = item.result.meta.get("seed", seed)
        else:
            entry.fail(item.error)
            # A failed job still has an id worth keeping: fetch needs it.
            job = getattr(item.error, "job", None)
            entry.job_id = getattr(item.error, "job_id", None) or getattr(
                job, "id", None
            )
        return entry

    def fail(self, error: ModelsLabError | str) -> None:
        """
        Mark it failed, with the reason.
        """
        self.status = "failed"
        self.error = str(error)
        self.error_type = (
            None if isinstance(error, str) else type(error).__name__
        )

    def as_json(self) -> dict[str, Any]:
        """
        The manifest's entry.
        """
        return {
            "index": self.index,
            "prompt": self.prompt,
            "endpoint": self.endpoint,
            "seed": self.seed,
            "job_id": self.job_id,
            "track_id": self.track_id,
            "status": self.status,
            "files": self.files,
            "seconds": self.seconds,
            "error": self.error,
            "error_type": self.error_type,
            "previous": self.previous,
        }

    @classmethod
    def from_json(cls, data: Any) -> Entry | None:
        """
        An entry read back from a manifest, or ``None`` if it is not one.
        """
        try:
            entry = cls(
                index=int(data["index"]),
                prompt=str(data["prompt"]),
                endpoint=str(data["endpoint"]),
                track_id=data.get("track_id"),
                seed=data.get("seed"),
                job_id=data.get("job_id"),
                status=data["status"],
                files=[str(f) for f in data.get("files", [])],
                seconds=float(data.get("seconds", 0.0)),
                error=data.get("error"),
                error_type=data.get("error_type"),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        return entry if entry.status in _STATUSES else None


def read_previous(out: Path, *, emulated: bool) -> dict[str, Entry]:
    """
    The entries of the manifest an earlier run left, by ``track_id``: only
    those from the same kind of run (emulator or not), since placeholder
    images are no substitute for real ones.
    """
    try:
        manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(manifest, dict) or manifest.get("emulator") != emulated:
        return {}
    found = {}
    for data in manifest.get("jobs", []):
        entry = Entry.from_json(data) if isinstance(data, dict) else None
        if entry is not None and entry.track_id is not None:
            found[entry.track_id] = entry
    return found


def write_report(
    out: Path,
    entries: list[Entry],
    *,
    endpoint: str,
    emulated: bool,
) -> tuple[Path, str | None]:
    """
    Write ``manifest.json`` and ``index.html`` into *out*; if that fails,
    into a new temporary folder, so the manifest is never lost.

    Returns:
        Where the manifest is, and why it is not in *out* (``None`` when
        it is).
    """
    ordered = sorted(entries, key=lambda e: e.index)
    jobs = [e.as_json() for e in ordered]
    counts = {s: sum(e.status == s for e in ordered) for s in _STATUSES}
    summary = {
        "jobs": len(jobs),
        "succeeded": counts["success"],
        "failed": counts["failed"],
        "interrupted": counts["interrupted"],
        "pending": counts["pending"],
        "images": sum(len(e.files) for e in ordered),
    }
    manifest = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "endpoint": endpoint,
        "emulator": emulated,
        "summary": summary,
        "jobs": jobs,
    }
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    sheet = _contact_sheet(jobs, summary)
    try:
        _write(out / "manifest.json", text)
        _write(out / "index.html", sheet)
    except OSError as exc:
        reason = f"cannot write into {out}: {exc.strerror or exc}"
        elsewhere = Path(tempfile.mkdtemp(prefix="modelslab-async-"))
        _write(elsewhere / "manifest.json", text)
        _write(elsewhere / "index.html", sheet)
        return elsewhere / "manifest.json", reason
    return out / "manifest.json", None


def _write(path: Path, text: str) -> None:
    """
    Write through a temporary file renamed into place: a run killed
    mid-write leaves the old file, never half of the new one.
    """
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def _details(job: dict[str, Any]) -> str:
    """
    Seed, job id and time, leaving out what is not known.
    """
    parts = [
        f"{label} {html.escape(str(job[key]))}"
        for label, key in (("seed", "seed"), ("job", "job_id"))
        if job[key] is not None
    ]
    return ", ".join([*parts, f"{job['seconds']}s"])


def _card(job: dict[str, Any]) -> str:
    caption = html.escape(job["prompt"])
    if job["status"] == "success":
        body = "".join(
            f'<a href="{html.escape(f)}"><img src="{html.escape(f)}" '
            f'alt="{caption}" loading="lazy"></a>'
            for f in job["files"]
        )
    elif job["status"] == "failed":
        body = f'<p class="error">{html.escape(str(job["error"]))}</p>'
    else:
        body = f'<p class="note">{job["status"]}: run the command again</p>'
    return (
        f'<figure class="{job["status"]}">{body}'
        f"<figcaption>#{job['index'] + 1} {caption}"
        f"<small>{_details(job)}</small></figcaption></figure>"
    )


def _contact_sheet(jobs: list[dict[str, Any]], summary: dict[str, int]) -> str:
    cards = "\n".join(_card(job) for job in jobs)
    unfinished = summary["interrupted"] + summary["pending"]
    waiting = f", {unfinished} not finished" if unfinished else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>modelslab-async: {summary["images"]} images</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; }}
main {{ display: grid; gap: 1rem;
       grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); }}
figure {{ margin: 0; padding: .5rem; border: 1px solid #ddd; }}
figure.failed {{ border-color: #c33; }}
figure.interrupted, figure.pending {{ border-style: dashed; }}
img {{ width: 100%; height: auto; display: block; margin-bottom: .25rem; }}
small {{ display: block; color: #666; }}
.error {{ color: #c33; }}
.note {{ color: #666; }}
</style></head><body>
<h1>{summary["succeeded"]} of {summary["jobs"]} jobs,
{summary["images"]} images, {summary["failed"]} failed{waiting}</h1>
<main>
{cards}
</main></body></html>
"""
