"""
An asyncio client for ModelsLab's text-to-image job APIs.
"""

from __future__ import annotations

from . import errors, stores
from ._batch import (
    BatchFailure,
    BatchItem,
    BatchProgress,
    BatchSuccess,
    batch_track_id,
)
from ._client import Client
from ._jobs import JobHandle, JobResult
from ._outputs import Output
from ._requests import FluxKleinText2Img, JobRequest, S3Settings, Text2Img
from ._responses import JobResponse, JobStatus, SystemDetails
from ._retry import RetryPolicy
from ._routes import Endpoint
from ._state import JobPhase, JobState
from .webhooks import WebhookReceiver


__all__ = [
    "BatchFailure",
    "BatchItem",
    "BatchProgress",
    "BatchSuccess",
    "Client",
    "Endpoint",
    "FluxKleinText2Img",
    "JobHandle",
    "JobPhase",
    "JobRequest",
    "JobResponse",
    "JobResult",
    "JobState",
    "JobStatus",
    "Output",
    "RetryPolicy",
    "S3Settings",
    "SystemDetails",
    "Text2Img",
    "WebhookReceiver",
    "batch_track_id",
    "errors",
    "stores",
]


def __getattr__(name: str) -> str:
    if name != "__version__":
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)

    from importlib.metadata import version  # noqa: PLC0415

    return version("modelslab-async")
