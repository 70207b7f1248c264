"""
A job as data: the record a store keeps, and how it is written down.

:class:`JobState` is everything needed to wait for a job again in another
process: no live object, no monotonic clock reading, no key. The storage
converter beside it turns one into JSON and back; it shares nothing with the
wire converter, which speaks ModelsLab's spelling.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import time

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import attrs
import cattrs

from ._requests import REQUEST_TYPES, JobRequest
from ._responses import JobResponse, JobStatus
from ._routes import Endpoint
from .errors import InvalidRequestError, StoreError


__all__ = [
    "JobPhase",
    "JobState",
    "dump_state",
    "hash_token",
    "load_state",
    "response_of",
    "token_matches",
    "with_outcome",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})
#: The layout of a stored record; bumped when it changes incompatibly.
_FORMAT: Final = 1


class JobPhase(enum.StrEnum):
    """
    Where a journaled job is, from this library's side.
    """

    #: Journaled before its submit was sent; after a crash, it may or may
    #: not exist on the server.
    SUBMITTING = "submitting"
    #: The server took it: it has a job id and is queued or running.
    QUEUED = "queued"
    #: It finished with outputs.
    SUCCEEDED = "succeeded"
    #: It finished without outputs.
    FAILED = "failed"
    #: Its submit may have created a job; only its webhook can tell.
    UNCERTAIN = "uncertain"

    @property
    def is_finished(self) -> bool:
        """
        Whether the job has ended for good.
        """
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED)


@attrs.frozen(kw_only=True)
class JobState:
    """
    One job as a store keeps it: frozen, serialisable, enough to resume.

    Attributes:
        track_id: The job's ``track_id``: its idempotency key.
        endpoint: The endpoint family.
        phase: Where the job is.
        request: The request, when this library submitted it.
        job_id: The server's job id, once known.
        eta_at: When the server expects it done, as a wall-clock time
            (``time.time()``).
        outputs: Output links: the final ones, or ``future_links`` while it
            runs.
        message: The server's message about a failure or an uncertain
            submit.
        generation_time: Seconds the server spent, once it says.
        meta: The parameters the server reported using.
        webhook_id: The registration id in the job's callback URL.
        token_hash: SHA-256 (hex) of the callback URL's token; the token
            itself is never stored.
        created_at: When it was journaled (wall clock).
        updated_at: When this record was written (wall clock).
    """

    track_id: str
    endpoint: Endpoint
    phase: JobPhase
    request: JobRequest | None = None
    job_id: str | None = None
    eta_at: float | None = None
    outputs: tuple[str, ...] = ()
    message: str | None = None
    generation_time: float | None = None
    meta: Mapping[str, Any] = attrs.field(default=_EMPTY, hash=False)
    webhook_id: str | None = None
    token_hash: str | None = None
    created_at: float
    updated_at: float


def response_of(state: JobState) -> JobResponse:
    """
    The answer a journaled job stands for, to rebuild its handle.
    """
    phase = state.phase
    status = (
        JobStatus.SUCCESS
        if phase is JobPhase.SUCCEEDED
        else JobStatus.ERROR
        if phase is JobPhase.FAILED
        else JobStatus.PROCESSING
    )
    eta = (
        None if state.eta_at is None else max(0.0, state.eta_at - time.time())
    )
    succeeded = status is JobStatus.SUCCESS
    return JobResponse(
        status=status,
        id=state.job_id,
        eta=eta,
        output=state.outputs if succeeded else (),
        future_links=() if succeeded else state.outputs,
        message=state.message,
        generation_time=state.generation_time,
        track_id=state.track_id,
        meta=state.meta,
    )


def with_outcome(state: JobState, response: JobResponse) -> JobState:
    """
    *state* once a finished *response* (a webhook's) is known.
    """
    succeeded = response.status is JobStatus.SUCCESS
    return attrs.evolve(
        state,
        phase=JobPhase.SUCCEEDED if succeeded else JobPhase.FAILED,
        job_id=response.id or state.job_id,
        eta_at=None,
        outputs=response.output or response.future_links or state.outputs,
        message=response.message,
        generation_time=response.generation_time,
        meta=response.meta,
        updated_at=time.time(),
    )


def hash_token(token: str) -> str:
    """
    The stored form of a callback token.
    """
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, token_hash: str) -> bool:
    """
    Whether *token* (any text a sender put in a URL) hashes to *token_hash*.

    Both sides are hex digests, so the comparison is constant-time and never
    raises, whatever the sender sent.
    """
    candidate = hashlib.sha256(token.encode("utf-8", "surrogatepass"))
    return hmac.compare_digest(candidate.hexdigest(), token_hash)


def _make_converter() -> cattrs.Converter:
    """
    The storage converter: the plain attrs layout of records and requests.

    It reads strictly: a field of the wrong JSON type is an error, never
    coerced (``str(5)``, a string read as a tuple of its characters).
    """
    c = cattrs.Converter()
    c.register_unstructure_hook(MappingProxyType, dict)
    c.register_structure_hook_func(
        lambda cls: cls == Mapping[str, Any], _structure_mapping
    )
    # Class hooks: cattrs tries them before hooks by predicate. The one
    # for str also gets str's subclasses (JobPhase).
    c.register_structure_hook(str, _structure_str)
    c.register_structure_hook(float, _structure_float)
    c.register_structure_hook_func(
        lambda cls: cls == tuple[str, ...], _structure_strs
    )
    return c


def _structure_mapping(data: Any, _: object) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        msg = f"expected an object, not {type(data).__name__}"
        raise TypeError(msg)
    return MappingProxyType(data)


def _structure_str(data: Any, cls: type[str]) -> str:
    if not isinstance(data, str):
        msg = f"expected a string, not {type(data).__name__}"
        raise TypeError(msg)
    return data if cls is str else cls(data)


def _structure_float(data: Any, _: object) -> float:
    if isinstance(data, bool) or not isinstance(data, int | float):
        msg = f"expected a number, not {type(data).__name__}"
        raise TypeError(msg)
    return float(data)


def _structure_strs(data: Any, _: object) -> tuple[str, ...]:
    if not isinstance(data, list | tuple):
        msg = f"expected an array, not {type(data).__name__}"
        raise TypeError(msg)
    return tuple(_structure_str(item, str) for item in data)


def _dump_request(request: JobRequest) -> dict[str, Any]:
    fields = _CONVERTER.unstructure(request)
    return {"type": type(request).__name__, "fields": _compact(fields)}


def _compact(data: dict[str, Any]) -> dict[str, Any]:
    # Unset fields are left out: every record is smaller for it.
    return {k: v for k, v in data.items() if v is not None and v != {}}


def _load_request(data: Any) -> JobRequest | None:
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        msg = "a request without its type"
        raise TypeError(msg)
    fields = data.get("fields")
    if not isinstance(fields, dict):
        msg = "a request without its fields"
        raise TypeError(msg)
    cls = REQUEST_TYPES.get(data["type"])
    if cls is None:
        return None  # a request class of a later version
    # Lists of LoRA ids and strengths come back as lists; the request
    # classes turn them into tuples themselves.
    try:
        return cls(**{k: v for k, v in fields.items() if v is not None})
    except (InvalidRequestError, TypeError, ValueError, AttributeError):
        # Written by a version with other limits: keep the job, whose id
        # matters far more than its request.
        return None


_CONVERTER: Final = _make_converter()


def dump_state(state: JobState) -> str:
    """
    The JSON text a store keeps for *state*: always valid UTF-8.

    Text is kept as it is, but for what UTF-8 cannot encode (a lone
    surrogate, from a ``\\ud800`` escape in an answer, say): a record with
    one is written with ASCII escapes, which read back the same.

    Raises:
        StoreError: *state* holds what JSON cannot write.
    """
    try:
        data = _compact(
            _CONVERTER.unstructure(attrs.evolve(state, request=None))
        )
        if state.request is not None:
            data["request"] = _dump_request(state.request)
        data["format"] = _FORMAT
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        if not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError:
                text = json.dumps(data, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as e:
        msg = f"cannot journal the job {state.track_id!r}: {e}"
        raise StoreError(msg) from None
    return text


def load_state(text: str | bytes) -> JobState:
    """
    Read back what :func:`dump_state` wrote.

    Raises:
        StoreError: The text is not a job record this version can read:
            never another error, whatever the text holds.
    """
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.pop("format", None) != _FORMAT:
            msg = "not a job record of this version"
            raise StoreError(msg)
        request = _load_request(data.pop("request", None))
        state = _CONVERTER.structure(data, JobState)
    except StoreError:
        raise
    # Anything at all: a record is outside data (RecursionError from deep
    # nesting, OverflowError from a huge number, cattrs' groups...).
    except Exception as e:  # noqa: BLE001
        msg = f"unreadable job record: {type(e).__name__}"
        raise StoreError(msg) from None
    return state if request is None else attrs.evolve(state, request=request)
