"""
Response models, built only by the converter.
"""

from __future__ import annotations

import enum

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs


__all__ = ["JobResponse", "JobStatus", "SystemDetails"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class JobStatus(enum.StrEnum):
    """
    Where a job is. ``error`` and ``failed`` both mean it will not finish:
    the API answers ``error``, its webhooks say ``failed``.
    """

    PROCESSING = "processing"
    SUCCESS = "success"
    ERROR = "error"
    FAILED = "failed"

    @property
    def is_finished(self) -> bool:
        """
        Whether the job has left the server's queue for good.
        """
        return self is not JobStatus.PROCESSING


@attrs.frozen(kw_only=True)
class JobResponse:
    """
    One answer about a job: from a submit, a fetch or a webhook.

    The server is read tolerantly: ``messege`` is read as ``message``, an
    ``output`` of ``""`` as no outputs, an integer ``id`` as a string,
    ``proxy_links`` as a list whether it came as one or as an object, and
    numbers that came as strings as numbers. Keys this library does not know
    are kept in :attr:`extra`.

    Attributes:
        status: The job's status.
        id: The job id, always a string.
        eta: Seconds until the job should be done, when the server says.
        output: Output URLs (or inline data) once the job succeeded.
        future_links: Where outputs will appear while processing.
        proxy_links: CDN mirrors of the outputs.
        fetch_result: The fetch URL the server suggests.
        message: The server's message, if any.
        tip: The server's advertising tip, if any.
        generation_time: Seconds the generation took.
        track_id: The ``track_id`` sent with the job, when echoed.
        nsfw_content_detected: Whether the safety checker fired.
        meta: The parameters the server used.
        extra: Every other key of the body.
    """

    status: JobStatus
    id: str | None = None
    eta: float | None = None
    output: tuple[str, ...] = ()
    future_links: tuple[str, ...] = ()
    proxy_links: tuple[str, ...] = ()
    fetch_result: str | None = None
    message: str | None = None
    tip: str | None = None
    generation_time: float | None = None
    track_id: str | None = None
    nsfw_content_detected: bool | None = None
    meta: Mapping[str, Any] = attrs.field(default=_EMPTY, hash=False)
    extra: Mapping[str, Any] = attrs.field(default=_EMPTY, hash=False)


@attrs.frozen(kw_only=True)
class SystemDetails:
    """
    What an Enterprise server says about itself (``system_details``).

    Attributes:
        status: ``"ok"`` when the server is up.
        model_count: Models loaded.
        queue_time: Seconds of work queued; 0 when idle.
        extra: Every other key of the body.
    """

    status: str
    model_count: int | None = None
    queue_time: float | None = None
    extra: Mapping[str, Any] = attrs.field(default=_EMPTY, hash=False)
