"""
What the emulator says on the wire: the response shapes of the real service
with their legacy quirks, and the webhook payload, each defined once.
"""

from __future__ import annotations

import base64
import math

from collections.abc import Collection
from typing import Any, Final, Literal

import attrs

from ._images import render_png
from ._state import EmulatedJob


__all__ = [
    "ALL_QUIRKS",
    "Announce",
    "Base64Delivery",
    "Wire",
]

#: The legacy habits of the real service, each switchable:
#:
#: - ``messege``: error and processing bodies spell it ``messege``.
#: - ``thin_fetch``: a fetch of a processing job answers
#:   ``{"status": "processing", "output": "", ...}`` with no id or eta.
#: - ``int_ids``: job ids are JSON integers (else strings).
#: - ``proxy_links_object``: success ``proxy_links`` as ``{"0": url}``.
#: - ``tips``: ``tip``/``tip_1`` advertising in processing bodies.
ALL_QUIRKS: Final = frozenset(
    {"messege", "thin_fetch", "int_ids", "proxy_links_object", "tips"}
)

#: How the processing answers estimate a job's time: ``max`` announces the
#: larger of the real remaining time and the nominal ``eta`` (so a client
#: trusting it is never early), ``nominal`` the nominal ``eta`` alone (so
#: estimates are wrong both ways, as real ones are).
Announce = Literal["max", "nominal"]
#: How ``base64`` outputs are delivered; see :class:`Emulator`.
Base64Delivery = Literal["url", "url_data_uri", "inline", "inline_data_uri"]
#: What the images look like; see :class:`Emulator`.
Images = Literal["gradient", "noise"]

TIP: Final = (
    "Get 20x faster image generation using enterprise plan. Click here : "
    "https://modelslab.com/enterprise"
)
TIP_1: Final = (
    "Your image is processing in background, you can get this image using "
    "fetch API: here is link for fetch api : https://docs.modelslab.com/"
    "image-generation/community-models/dreamboothfetchqueimg"
)
#: The documented bodies of the API's own failures (error-codes page).
SERVER_ERROR: Final = "Internal server error. Please try again."
UNAVAILABLE: Final = "Service temporarily unavailable. Please try again later."


def _rounded_up(seconds: float) -> float:
    # To the hundredth, upwards: a client trusting it never polls early.
    # Float noise first: (now + 0.2) - now is 0.2000000000000171.
    return math.ceil(round(seconds * 100, 6)) / 100


@attrs.frozen(kw_only=True)
class Wire:
    """
    The shapes of the answers, for the emulator's settings of the moment.

    Args:
        quirks: The legacy habits to show; see :data:`ALL_QUIRKS`.
        base64_delivery: How ``base64`` outputs are delivered.
        origin: ``http://host:port``, the root of the emulator's CDN.
        announce: How processing answers estimate the time left.
        images: Gradients (small files) or noise (photo-sized files).
    """

    quirks: Collection[str]
    base64_delivery: Base64Delivery
    origin: str
    announce: Announce = "max"
    images: Images = "gradient"

    def message(self, text: str) -> dict[str, str]:
        """
        ``{"message": text}``, or ``messege`` with that quirk.
        """
        return {"messege" if "messege" in self.quirks else "message": text}

    def error(self, message: str, **extra: Any) -> dict[str, Any]:
        """
        The documented error body, ``{"status": "error", "message": ...}``.
        """
        return {"status": "error", **self.message(message), **extra}

    def job_id(self, job: EmulatedJob) -> int | str:
        """
        The job's id as the service spells it: an int, or a string.
        """
        return job.id if "int_ids" in self.quirks else str(job.id)

    def links(self, job: EmulatedJob) -> list[str]:
        """
        The job's outputs: CDN URLs, or inline base64 text.
        """
        if job.base64 and self.base64_delivery.startswith("inline"):
            return [
                self.base64_text(job, index).decode()
                for index in range(job.samples)
            ]
        return [
            f"{self.origin}/cdn/generations/{name}" for name in job.files()
        ]

    def meta(self, job: EmulatedJob) -> dict[str, Any]:
        """
        The echo of the job's settings: flags as strings, id as a string.
        """
        return {
            "prompt": job.prompt,
            "model_id": job.body.get("model_id", "flux_klein"),
            "width": job.width,
            "height": job.height,
            "n_samples": job.samples,
            "seed": job.seed,
            "base64": "yes" if job.base64 else "no",
            "track_id": job.track_id,
            "webhook": job.webhook,
            "id": str(job.id),
            "file_prefix": job.prefix,
        }

    def processing(
        self, job: EmulatedJob, now: float, fetch_url: str
    ) -> dict[str, Any]:
        """
        The submit answer of a queued job, the legacy v6 shape.
        """
        links = self.links(job)
        answer: dict[str, Any] = {"status": "processing"}
        if "tips" in self.quirks:
            answer |= {"tip": TIP, "tip_1": TIP_1}
        eta = (
            job.eta
            if self.announce == "nominal"
            else _rounded_up(max(job.ready_at - now, job.eta))
        )
        answer |= {
            "eta": eta,
            **self.message("Try to fetch request after seconds estimated"),
            "webhook_status": "",
            "fetch_result": f"{fetch_url}{job.id}",
            "id": self.job_id(job),
            "output": [],
            "meta": self.meta(job),
            "future_links": links,
            "proxy_links": links,
        }
        return answer

    def fetch_processing(self, job: EmulatedJob, now: float) -> dict[str, Any]:
        """
        A fetch's answer while the job runs: thin with the quirk.
        """
        if "thin_fetch" in self.quirks:
            answer = {
                "status": "processing",
                **self.message("try again later."),
                "output": "",
            }
            if "tips" in self.quirks:
                answer["tip"] = TIP
            return answer
        end = (
            job.created + job.eta
            if self.announce == "nominal"
            else job.ready_at
        )
        return {
            "status": "processing",
            "id": self.job_id(job),
            "eta": _rounded_up(max(0.0, end - now)),
            **self.message("Your request is being processed"),
            "future_links": self.links(job),
        }

    def _succeeded(self, job: EmulatedJob) -> dict[str, Any]:
        # What every success says, in answers and webhooks alike.
        return {
            "status": "success",
            "generationTime": round(job.ready_at - job.created, 3),
            "id": self.job_id(job),
            "output": self.links(job),
            "meta": self.meta(job),
        }

    def _failed(self, job: EmulatedJob) -> dict[str, Any]:
        # What every failure says, in answers and webhooks alike.
        reason = (
            "Queue cleared"
            if job.cancelled
            else "Processing failed: the emulator was told to fail this job"
        )
        return {"status": "error", "message": reason, "id": self.job_id(job)}

    def success(self, job: EmulatedJob) -> dict[str, Any]:
        """
        The answer of a job that succeeded.
        """
        answer = self._succeeded(job)
        links = answer["output"]
        answer["proxy_links"] = (
            {str(i): link for i, link in enumerate(links)}
            if "proxy_links_object" in self.quirks
            else links
        )
        answer["nsfw_content_detected"] = False
        return answer

    def failure(self, job: EmulatedJob) -> dict[str, Any]:
        """
        The answer of a job that failed: an error body with its id.
        """
        answer = self._failed(job)
        return {
            "status": "error",
            **self.message(answer.pop("message")),
            "id": answer["id"],
        }

    def outcome(self, job: EmulatedJob, now: float) -> dict[str, Any]:
        """
        A fetch's answer: processing, success or failure.
        """
        status = job.status(now)
        if status == "processing":
            return self.fetch_processing(job, now)
        return self.success(job) if status == "success" else self.failure(job)

    def webhook(self, job: EmulatedJob, now: float) -> dict[str, Any]:
        """
        The webhook payload (webhooks page): the success with the job's
        ``track_id``, or ``status: "failed"`` with a ``message``.
        """
        if job.status(now) == "success":
            return {**self._succeeded(job), "track_id": job.track_id}
        failed = self._failed(job)
        return {**failed, "status": "failed", "track_id": job.track_id}

    def base64_text(self, job: EmulatedJob, index: int) -> bytes:
        """
        Output *index* as base64 text, with a ``data:`` prefix if asked.
        """
        encoded = base64.b64encode(self.png(job, index))
        if self.base64_delivery.endswith("data_uri"):
            return b"data:image/png;base64," + encoded
        return encoded

    def png(self, job: EmulatedJob, index: int) -> bytes:
        """
        Output *index* as PNG bytes.
        """
        return render_png(
            job.seed + index,
            job.prompt,
            job.width,
            job.height,
            noise=self.images == "noise",
        )
