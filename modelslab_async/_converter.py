"""
The wire: every spelling and quirk of the ModelsLab JSON lives here.

Strict in what we send, tolerant in what we read (DESIGN.md, wire rules).
Sending: v6 booleans are ``"yes"``/``"no"``, Enterprise booleans stay JSON
booleans, unset fields are omitted, the key is added at send time. Reading:
``message`` or ``messege``, ``output`` as list or ``""``, ``id`` as int or
string, ``proxy_links`` as list or object, numbers as strings, unknown keys
kept.
"""

from __future__ import annotations

import json
import math

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar, cast, get_args, get_origin

import attrs
import cattrs

from cattrs.gen import (
    make_dict_structure_fn,
    make_dict_unstructure_fn,
    override,
)

from ._requests import JobRequest, S3Settings
from ._responses import JobResponse, JobStatus, SystemDetails
from .errors import ResponseDecodeError


__all__ = [
    "Answer",
    "decode_job",
    "decode_message",
    "decode_system_details",
    "key_body",
    "make_converter",
    "read_answer",
    "request_body",
    "s3_body",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})
#: Longer texts are unlikely to repeat and not worth a lookup.
_SHARE_UP_TO: Final = 400
#: Distinct texts kept for sharing; the table starts over when full.
_SHARED_MAX: Final = 512
#: One copy of each repeated text (tips, messages), so pending jobs share
#: it. Not ``sys.intern``: some texts are unique (``fetch_result`` URLs,
#: messages naming a job), and the interpreter's intern table grows to its
#: peak and never shrinks (the soak saw a 1.9 MB jump); on Python 3.12
#: interned strings are immortal, so every unique text would stay forever.
_shared: dict[str, str] = {}


# --- reading ---------------------------------------------------------------


def _fail(what: str, value: Any) -> ResponseDecodeError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ResponseDecodeError(f"unexpected {what}: {shown}")


def _as_id(value: Any, _: Any = None) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _fail("id", value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return value
    raise _fail("id", value)


def _as_seconds(value: Any, _: Any = None) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _fail("number", value)
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        raise _fail("number", value) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise _fail("number", value)
    return seconds


def _as_eta(value: Any, _: Any = None) -> float | None:
    # An estimate we cannot read is no estimate: the job id beside it is
    # what matters, and losing it would invite a second, paid submit.
    try:
        return _as_seconds(value)
    except ResponseDecodeError:
        return None


def _as_links(value: Any, _: Any = None) -> tuple[str, ...]:
    if isinstance(value, dict):
        # proxy_links sometimes comes as {"0": url, "1": url}.
        try:
            ordered = sorted(value.items(), key=lambda kv: int(kv[0]))
        except (TypeError, ValueError):
            raise _fail("link object", value) from None
        value = [link for _, link in ordered]
    if isinstance(value, list):
        for item in value:  # a loop: faster than all() on a few links
            if not isinstance(item, str):
                raise _fail("link list", value)
        return tuple(value)
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    raise _fail("link list", value)


def _as_text(value: Any, _: Any = None) -> str | None:
    if isinstance(value, str):
        # Messages and tips repeat in every answer: keep one copy of each.
        if len(value) >= _SHARE_UP_TO:
            return value
        kept = _shared.get(value)
        if kept is None:
            if len(_shared) >= _SHARED_MAX:
                _shared.clear()  # bounded, whatever the server sends
            kept = _shared[value] = value
        return kept
    if value is None:
        return value
    if isinstance(value, int | float | bool):
        return str(value)
    # Validation messages sometimes arrive as {"field": ["why"]}.
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _as_flag(value: Any, _: Any = None) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if value in ("yes", "true", 1):
        return True
    if value in ("no", "false", 0):
        return False
    raise _fail("flag", value)


def _as_mapping(value: Any, _: Any = None) -> Mapping[str, Any]:
    # PHP serialises an empty object as [].
    if value is None or value == []:
        return _EMPTY
    if isinstance(value, dict):
        # Fresh from json.loads and never shared: no copy needed.
        return MappingProxyType(value)
    raise _fail("object", value)


_STATUSES: Final = {status.value: status for status in JobStatus}


def _as_status(value: Any, _: Any = None) -> JobStatus:
    status = _STATUSES.get(value) if isinstance(value, str) else None
    if status is None:
        raise _fail("status", value)
    return status


def _as_count(value: Any, _: Any = None) -> int | None:
    seconds = _as_seconds(value)
    return None if seconds is None else int(seconds)


_JOB_KEYS: Final = frozenset(
    {
        "status",
        "id",
        "eta",
        "output",
        "future_links",
        "proxy_links",
        "fetch_result",
        "message",
        "messege",
        "tip",
        "generationTime",
        "track_id",
        "nsfw_content_detected",
        "meta",
    }
)
_DETAILS_KEYS: Final = frozenset({"status", "model_count", "queue_time"})


def make_converter() -> cattrs.Converter:
    """
    Build the converter for requests and responses.

    Strictly private; the client and the receiver share one instance.
    """
    c = cattrs.Converter()
    c.register_structure_hook(
        JobResponse,
        make_dict_structure_fn(
            JobResponse,
            c,
            status=override(struct_hook=_as_status),
            id=override(struct_hook=_as_id),
            eta=override(struct_hook=_as_eta),
            output=override(struct_hook=_as_links),
            future_links=override(struct_hook=_as_links),
            proxy_links=override(struct_hook=_as_links),
            fetch_result=override(struct_hook=_as_text),
            message=override(struct_hook=_as_text),
            tip=override(struct_hook=_as_text),
            generation_time=override(
                rename="generationTime", struct_hook=_as_seconds
            ),
            track_id=override(struct_hook=_as_id),
            nsfw_content_detected=override(struct_hook=_as_flag),
            meta=override(struct_hook=_as_mapping),
            extra=override(omit=True),
        ),
    )
    c.register_structure_hook(
        SystemDetails,
        make_dict_structure_fn(
            SystemDetails,
            c,
            status=override(struct_hook=lambda v, _: str(v)),
            model_count=override(struct_hook=_as_count),
            queue_time=override(struct_hook=_as_seconds),
            extra=override(omit=True),
        ),
    )
    c.register_unstructure_hook(
        S3Settings,
        make_dict_unstructure_fn(S3Settings, c, _cattrs_omit_if_default=True),
    )
    return c


_T = TypeVar("_T")


def _structured(
    data: Any, cls: type[_T], known: frozenset[str], what: str
) -> _T:
    if not isinstance(data, dict):
        raise _fail(what, data)
    try:
        value: _T = _STRUCTURE[cls](data, cls)
    except ResponseDecodeError:
        raise
    except cattrs.BaseValidationError as exc:
        # Our hooks raise ResponseDecodeError; cattrs wraps it in a group.
        inner = _first_leaf(exc)
        if isinstance(inner, ResponseDecodeError):
            raise inner from None
        problems = "; ".join(cattrs.transform_error(exc))
        raise ResponseDecodeError(f"unexpected {what}: {problems}") from None
    except (TypeError, ValueError) as exc:
        raise ResponseDecodeError(f"unexpected {what}: {exc}") from None
    if not data.keys() <= known:
        unknown = data.keys() - known
        extra = {k: _as_text(v) if isinstance(v, str) else v
                 for k, v in data.items() if k in unknown}  # fmt: skip
        value = attrs.evolve(value, extra=MappingProxyType(extra))  # type: ignore[misc]
    return value


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def decode_job(data: Any, job_id: str | None = None) -> JobResponse:
    """
    Read a submit, fetch or webhook body.

    A body without an id takes *job_id* (the id a fetch asked for), or the
    id at the end of its ``fetch_result`` URL.

    Raises:
        ResponseDecodeError: The body is not a job response.
    """
    if isinstance(data, dict):
        if "message" not in data and "messege" in data:
            data = {**data, "message": data["messege"]}
        links = data.get("future_links")
        if links and data.get("proxy_links") == links:
            # Processing answers repeat their links: one copy per string
            # keeps a pending job small. (Not sys.intern: URLs are unique
            # and would churn the interpreter's intern table.)
            data = {**data, "proxy_links": links}
    response = _structured(data, JobResponse, _JOB_KEYS, "job response")
    if response.id is not None:
        return response
    if job_id is None and response.fetch_result:
        job_id = response.fetch_result.rstrip("/").rsplit("/", 1)[-1] or None
    return response if job_id is None else attrs.evolve(response, id=job_id)


def decode_system_details(data: Any) -> SystemDetails:
    """
    Read a ``system_details`` body.
    """
    return _structured(data, SystemDetails, _DETAILS_KEYS, "system details")


def decode_message(data: Any) -> str:
    """
    Read a management call's ``{"status": "success", "message": ...}``.
    """
    job = decode_job(data)
    return job.message or ""


#: Body statuses that mean the call worked, whatever the HTTP code says.
#: A tuple, not a set: a status may be any JSON value, even unhashable.
_GOOD_STATUSES: Final = ("success", "processing", "ok")
_BAD_STATUSES: Final = ("error", "failed")

#: What an error message says is wrong, when the HTTP status does not.
Reason = Literal["auth", "credits", "plan"]


@attrs.frozen
class Answer:
    """
    What a body's ``status`` and message say, whatever the HTTP code.

    Attributes:
        ok: The body says the call worked (``success``, ``processing``,
            ``ok``); ``False`` for ``error``/``failed``. ``None`` when the
            body carries no status at all.
        message: The server's message (``message`` or ``messege``).
        retry_after: Seconds the server asks us to wait, if it says.
        reason: What the message says is wrong, when it says (ModelsLab
            answers some errors with HTTP 200).
    """

    ok: bool | None
    message: str | None
    retry_after: float | None
    reason: Reason | None


_REASONS: Final[tuple[tuple[tuple[str, ...], Reason], ...]] = (
    (("api key", "apikey", "unauthori"), "auth"),
    (("credit",), "credits"),
    (("premium", "subscription", "not available on your plan"), "plan"),
)


def read_answer(data: dict[str, Any]) -> Answer:
    """
    Read what a decoded JSON body says about the call; never raises.
    """
    status = data.get("status")
    ok = (
        True
        if status in _GOOD_STATUSES
        else False
        if status in _BAD_STATUSES
        else None
    )
    message = _as_text(data.get("message", data.get("messege")))
    try:
        retry_after = _as_seconds(data.get("retry_after"))
    except ResponseDecodeError:
        retry_after = None
    reason = None
    if ok is not True and message:
        lowered = message.lower()
        for needles, meaning in _REASONS:
            if any(needle in lowered for needle in needles):
                reason = meaning
                break
    return Answer(ok, message, retry_after, reason)


# --- sending ---------------------------------------------------------------


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _comma_joined(value: Any) -> Any:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return value


def _encoder(cls: type[JobRequest]) -> Callable[[Any], dict[str, Any]]:
    """
    Build the wire encoder of a request class, from its route and fields.

    Unset (``None``) fields are left out, so the server applies its own
    defaults; fields with a real default (``model_id``) are always sent,
    since the server requires them. Booleans are spelled as the route says,
    and a tuple (several LoRA ids) travels as one comma-joined string.
    """
    converter = _CONVERTER
    if cls.route.booleans == "yes-no":
        # A copy keeps the spelling away from every other class.
        converter = _CONVERTER.copy()
        converter.register_unstructure_hook(bool, _yes_no)
    overrides: dict[str, Any] = {"extra": override(omit=True)}
    resolved: Any = attrs.resolve_types(cast("Any", cls))
    for attribute in attrs.fields(resolved):
        if attribute.name == "extra":
            continue
        joined = any(
            kind is tuple or get_origin(kind) is tuple
            for kind in get_args(attribute.type) or (attribute.type,)
        )
        overrides[attribute.name] = override(
            omit_if_default=attribute.default is None,
            unstruct_hook=_comma_joined if joined else None,
        )
    return make_dict_unstructure_fn(cls, converter, **overrides)


def request_body(
    request: JobRequest,
    *,
    key: str,
    track_id: str | None = None,
    webhook: str | None = None,
) -> dict[str, Any]:
    """
    The JSON body for a job request.

    *track_id* and *webhook* fill in only what the request left unset.
    """
    cls = type(request)
    encode = _UNSTRUCTURE.get(cls)
    if encode is None:
        encode = _UNSTRUCTURE[cls] = _encoder(cls)
    body: dict[str, Any] = {"key": key}
    body.update(encode(request))
    body.update(request.extra)
    if track_id is not None:
        body.setdefault("track_id", track_id)
    if webhook is not None:
        body.setdefault("webhook", webhook)
    return body


def s3_body(settings: S3Settings, *, key: str) -> dict[str, Any]:
    """
    The JSON body for ``update_s3``.
    """
    return {"key": key, **_CONVERTER.unstructure(settings)}


def key_body(key: str) -> dict[str, Any]:
    """
    The JSON body of calls that take only the key (fetch, management).
    """
    return {"key": key}


_CONVERTER: Final[cattrs.Converter] = make_converter()
# Every request is encoded and every answer decoded: skip the converter's
# per-call dispatch. Encoders are built on first use, one per class.
_UNSTRUCTURE: Final[dict[type, Callable[[Any], dict[str, Any]]]] = {}
_STRUCTURE: Final[dict[type, Callable[[Any, Any], Any]]] = {
    cls: _CONVERTER.get_structure_hook(cls)
    for cls in (JobResponse, SystemDetails)
}
