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
import sys

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, TypeVar

import attrs
import cattrs

from cattrs.gen import (
    make_dict_structure_fn,
    make_dict_unstructure_fn,
    override,
)

from ._requests import FluxKleinText2Img, S3Settings, Text2Img
from ._responses import JobResponse, JobStatus, SystemDetails
from .errors import ResponseDecodeError


__all__ = [
    "decode_job",
    "decode_message",
    "decode_system_details",
    "error_details",
    "key_body",
    "make_converter",
    "request_body",
    "s3_body",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})
#: Longer texts are unlikely to repeat and not worth a lookup.
_INTERN_UP_TO: Final = 400


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
        return sys.intern(value) if len(value) < _INTERN_UP_TO else value
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
            eta=override(struct_hook=_as_seconds),
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
    _register_requests(c)
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


def decode_job(data: Any) -> JobResponse:
    """
    Read a submit, fetch or webhook body.

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
    return _structured(data, JobResponse, _JOB_KEYS, "job response")


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


def error_details(data: dict[str, Any]) -> tuple[str | None, float | None]:
    """
    Read ``(message, retry_after)`` from an error body, never raising.
    """
    message = data.get("message", data.get("messege"))
    try:
        retry_after = _as_seconds(data.get("retry_after"))
    except ResponseDecodeError:
        retry_after = None
    return _as_text(message), retry_after


# --- sending ---------------------------------------------------------------


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _comma_joined(value: Any) -> Any:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return value


def _register_requests(c: cattrs.Converter) -> None:
    # v6 speaks "yes"/"no"; a copy keeps that rule away from other classes.
    v6 = c.copy()
    v6.register_unstructure_hook(bool, _yes_no)
    c.register_unstructure_hook(
        Text2Img,
        make_dict_unstructure_fn(
            Text2Img,
            v6,
            _cattrs_omit_if_default=True,
            # The server requires model_id even when it is the default.
            model_id=override(omit_if_default=False),
            lora_model=override(unstruct_hook=_comma_joined),
            lora_strength=override(unstruct_hook=_comma_joined),
            extra=override(omit=True),
        ),
    )
    c.register_unstructure_hook(
        FluxKleinText2Img,
        make_dict_unstructure_fn(
            FluxKleinText2Img,
            c,
            _cattrs_omit_if_default=True,
            extra=override(omit=True),
        ),
    )
    c.register_unstructure_hook(
        S3Settings,
        make_dict_unstructure_fn(S3Settings, c, _cattrs_omit_if_default=True),
    )


def request_body(
    request: Text2Img | FluxKleinText2Img,
    *,
    key: str,
    track_id: str | None = None,
    webhook: str | None = None,
) -> dict[str, Any]:
    """
    The JSON body for a text2img request.

    *track_id* and *webhook* fill in only what the request left unset.
    """
    body: dict[str, Any] = {"key": key}
    body.update(_UNSTRUCTURE[type(request)](request))
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
# per-call dispatch.
_UNSTRUCTURE: Final[dict[type, Callable[[Any], dict[str, Any]]]] = {
    cls: _CONVERTER.get_unstructure_hook(cls)
    for cls in (Text2Img, FluxKleinText2Img)
}
_STRUCTURE: Final[dict[type, Callable[[Any, Any], Any]]] = {
    cls: _CONVERTER.get_structure_hook(cls)
    for cls in (JobResponse, SystemDetails)
}
