"""
What a CLI batch leaves beside its images: manifest.json and index.html.
"""

from __future__ import annotations

import datetime as dt
import html
import json

from pathlib import Path
from typing import Any

import attrs

from ._batch import BatchItem


__all__ = ["Entry", "write_report"]


@attrs.define(kw_only=True)
class Entry:
    """
    Strictly private: one request's line in the manifest.
    """

    item: BatchItem
    files: list[Path] = attrs.Factory(list)
    save_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.item.ok and self.save_error is None

    def as_json(self, out: Path) -> dict[str, Any]:
        item, request = self.item, self.item.request
        result, error = item.result, item.error
        seed = getattr(request, "seed", None)
        if result is not None:
            seed = result.meta.get("seed", seed)
        # A failed job still has ids worth keeping: `fetch` needs the id.
        job = getattr(error, "job", None)
        job_id = result.id if result else getattr(error, "job_id", None)
        track_id = (
            result.track_id
            if result
            else getattr(job, "track_id", getattr(error, "track_id", None))
        )
        return {
            "index": item.index,
            "prompt": request.prompt,
            "endpoint": request.endpoint,
            "seed": seed,
            "job_id": job_id,
            "track_id": track_id,
            "status": "success" if self.ok else "failed",
            "files": [str(p.relative_to(out)) for p in self.files],
            "seconds": round(item.seconds, 3),
            "error": self.save_error if error is None else str(error),
            "error_type": None if error is None else type(error).__name__,
        }


def write_report(
    out: Path, entries: list[Entry], *, endpoint: str, emulated: bool
) -> str:
    """
    Write ``manifest.json`` and the ``index.html`` contact sheet; return
    the manifest's text.
    """
    ordered = sorted(entries, key=lambda e: e.item.index)
    jobs = [e.as_json(out) for e in ordered]
    failed = sum(not e.ok for e in ordered)
    summary = {
        "jobs": len(jobs),
        "succeeded": len(jobs) - failed,
        "failed": failed,
        "images": sum(len(j["files"]) for j in jobs),
    }
    manifest = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "endpoint": endpoint,
        "emulator": emulated,
        "summary": summary,
        "jobs": jobs,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    (out / "manifest.json").write_text(text)
    (out / "index.html").write_text(_contact_sheet(jobs, summary))
    return text


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


def _contact_sheet(jobs: list[dict[str, Any]], summary: dict[str, int]) -> str:
    cards = []
    for job in jobs:
        caption = html.escape(job["prompt"])
        if job["status"] == "success":
            images = "".join(
                f'<a href="{html.escape(f)}"><img src="{html.escape(f)}" '
                f'alt="{caption}" loading="lazy"></a>'
                for f in job["files"]
            )
        else:
            images = f'<p class="error">{html.escape(str(job["error"]))}</p>'
        cards.append(
            f'<figure class="{job["status"]}">{images}'
            f"<figcaption>#{job['index'] + 1} {caption}"
            f"<small>{_details(job)}</small></figcaption></figure>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>modelslab-async: {summary["images"]} images</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; }}
main {{ display: grid; gap: 1rem;
       grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); }}
figure {{ margin: 0; padding: .5rem; border: 1px solid #ddd; }}
figure.failed {{ border-color: #c33; }}
img {{ width: 100%; height: auto; display: block; margin-bottom: .25rem; }}
small {{ display: block; color: #666; }}
.error {{ color: #c33; }}
</style></head><body>
<h1>{summary["succeeded"]} of {summary["jobs"]} jobs,
{summary["images"]} images, {summary["failed"]} failed</h1>
<main>
{chr(10).join(cards)}
</main></body></html>
"""
