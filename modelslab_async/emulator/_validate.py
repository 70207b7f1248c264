"""
What a request may say: the documented fields, their types, and the checks
that refuse malformed input with a 4xx before any job exists.

The field sets are written from the vendor's pages and OpenAPI files, not
imported from the client, so that the emulator checks the client rather
than agreeing with it. Types are checked tolerantly: numbers may come as
strings of digits, as the vendor's own examples send them (``"width":
"512"``), and ``null`` means "the server's default" for any optional field.
"""

from __future__ import annotations

import json
import math
import re

from collections.abc import Collection, Mapping
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import attrs

from ._faults import Refusal


__all__ = [
    "BooleanStyle",
    "FIELD_KINDS",
    "FLUX_KLEIN_FIELDS",
    "FieldKind",
    "Submission",
    "V6_FIELDS",
    "check_key",
    "check_submit",
    "job_id",
    "parse_body",
    "request_id",
]

#: How an endpoint spells booleans: JSON ``true``/``false``, or the strings
#: ``"yes"``/``"no"``.
BooleanStyle = Literal["json", "yes-no"]

#: Seed 000 (and its vendor page, the same fields): Flux Klein text2img.
FLUX_KLEIN_FIELDS: Final = frozenset(
    {
        "key",
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "samples",
        "safety_checker",
        "seed",
        "instant_response",
        "base64",
        "webhook",
        "track_id",
    }
)
#: The community OpenAPI's ``TextToImageRequest``: its own properties and
#: those of ``CommonImageGenerationParams`` it extends.
_COMMUNITY_OPENAPI: Final = frozenset(
    {
        "key",
        "model_id",
        "prompt",
        "negative_prompt",
        "enhance_prompt",
        "width",
        "height",
        "samples",
        "num_inference_steps",
        "safety_checker",
        "safety_checker_type",
        "seed",
        "guidance_scale",
        "use_karras_sigmas",
        "algorithm_type",
        "vae",
        "lora_strength",
        "lora_model",
        "clip_skip",
        "base64",
        "temp",
        "webhook",
        "track_id",
        "ip_adapter_id",
        "ip_adapter_scale",
        "ip_adapter_image",
        "scheduler",
        "multi_lingual",
        "upscale",
        "highres_fix",
    }
)
#: The Flux OpenAPI's ``FluxTextToImageRequest``.
_FLUX_OPENAPI: Final = frozenset(
    {
        "key",
        "model_id",
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "samples",
        "num_inference_steps",
        "safety_checker",
        "safety_checker_type",
        "seed",
        "guidance_scale",
        "injected_noise_alpha",
        "sigma_threshold",
        "true_cfg_scale",
        "use_cfg_zero_star",
        "use_zero_init",
        "zero_steps",
        "base64",
        "webhook",
        "track_id",
        "temp",
        "clip_skip",
        "vae",
        "lora_strength",
        "lora_model",
    }
)
#: Seed 001: its table of body attributes and its two example bodies.
_SEED_001: Final = frozenset(
    {
        "key",
        "model_id",
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "samples",
        "num_inference_steps",
        "safety_checker",
        "safety_checker_type",
        "enhance_style",
        "seed",
        "guidance_scale",
        "algorithm_type",
        "multi_lingual",
        "panorama",
        "self_attention",
        "clip_skip",
        "base64",
        "scheduler",
        "webhook",
        "track_id",
        "temp",
        "enhance_prompt",
        "tomesd",
        "vae",
    }
)
#: Community/v6 text2img: every field some vendor source documents.
V6_FIELDS: Final = _COMMUNITY_OPENAPI | _FLUX_OPENAPI | _SEED_001

#: What a field's value must look like in strict mode:
#:
#: - ``text``: a string.
#: - ``integer``: an integer, or a string of digits (``"512"``).
#: - ``number``: a number, or a string of one (``"7.5"``).
#: - ``numbers``: a number, or a comma-separated string of them.
#: - ``flag``: a boolean, spelled as the endpoint spells booleans.
#: - ``flag_or_integer``: either (``upscale``: ``"no"``, or a factor).
#: - ``url``: an ``http(s)`` URL.
FieldKind = Literal[
    "text",
    "integer",
    "number",
    "numbers",
    "flag",
    "flag_or_integer",
    "url",
]
#: The kind of each documented field; a field not listed takes any value.
FIELD_KINDS: Final[Mapping[str, FieldKind]] = {
    **dict.fromkeys(
        [
            "key",
            "prompt",
            "model_id",
            "negative_prompt",
            "scheduler",
            "vae",
            "lora_model",
            "enhance_style",
            "algorithm_type",
            "safety_checker_type",
            "ip_adapter_id",
            "track_id",
        ],
        "text",
    ),
    **dict.fromkeys(
        [
            "width",
            "height",
            "samples",
            "num_inference_steps",
            "clip_skip",
            "zero_steps",
            "seed",
        ],
        "integer",
    ),
    **dict.fromkeys(
        [
            "guidance_scale",
            "injected_noise_alpha",
            "sigma_threshold",
            "true_cfg_scale",
            "ip_adapter_scale",
        ],
        "number",
    ),
    "lora_strength": "numbers",
    **dict.fromkeys(
        [
            "safety_checker",
            "enhance_prompt",
            "multi_lingual",
            "panorama",
            "self_attention",
            "base64",
            "tomesd",
            "temp",
            "use_karras_sigmas",
            "highres_fix",
            "use_cfg_zero_star",
            "use_zero_init",
            "instant_response",
        ],
        "flag",
    ),
    "upscale": "flag_or_integer",
    **dict.fromkeys(["webhook", "ip_adapter_image"], "url"),
}

#: Sizes the emulator draws; the documented limits (error-codes page).
_LIMITS: Final = {"width": (1, 1024), "height": (1, 1024), "samples": (1, 4)}
_DEFAULTS: Final = {"width": 512, "height": 512, "samples": 1}
#: Seeds are unsigned 64-bit at most; the vendor's examples are 32-bit.
_SEED_MAX: Final = 2**64 - 1
_INTEGER: Final = re.compile(r"\s*[-+]?[0-9]{1,30}\s*")
_NUMBER: Final = re.compile(
    r"\s*[-+]?([0-9]{1,30}(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]{1,3})?\s*"
)
_JOB_ID: Final = re.compile(r"[0-9]{1,19}")


@attrs.frozen(kw_only=True)
class Submission:
    """
    What the emulator takes from a submit body that passed every check.
    """

    prompt: str
    width: int
    height: int
    samples: int
    seed: int | None
    base64: bool
    webhook: str | None
    track_id: str | None
    outcome: Literal["success", "failed"]


def parse_body(raw: bytes) -> dict[str, Any]:
    """
    The JSON object in *raw*.

    Raises:
        Refusal: 400, the body is not a JSON object (``NaN`` and
            ``Infinity`` are not JSON either).
    """
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        # Bad UTF-8 is a ValueError too; deep nesting a RecursionError.
        raise Refusal(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Refusal(400, "request body must be a JSON object")
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def check_key(body: Mapping[str, Any], keys: Collection[str] | None) -> str:
    """
    The API key of *body*.

    Raises:
        Refusal: 401, no key, or one not in *keys*.
    """
    key = body.get("key")
    if not isinstance(key, str) or not key:
        raise Refusal(401, "API key required")
    if keys is not None and key not in keys:
        raise Refusal(401, "Invalid API key")
    return key


def job_id(text: str) -> int | None:
    """
    The job id spelled by *text*, or ``None`` if it spells none.
    """
    # ASCII digits only: "²" and "١٢" are digits to str.isdigit().
    return int(text) if _JOB_ID.fullmatch(text) else None


def request_id(body: Mapping[str, Any]) -> str:
    """
    The ``request_id`` of a fetch by body, as text.

    Raises:
        Refusal: 400, missing or not a string or integer.
    """
    value = body.get("request_id")
    if value is None or value == "":
        raise Refusal(400, "request_id is required")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise Refusal(400, "request_id must be a string")
    return str(value)


def check_submit(
    body: Mapping[str, Any],
    *,
    fields: Collection[str],
    required: Collection[str],
    booleans: BooleanStyle,
    strict: bool,
) -> Submission:
    """
    Check a submit *body*; what the emulator needs of it.

    Always checked: the prompt, the sizes it draws, the seed, the webhook
    URL and the ``track_id``. In *strict* mode also: no field outside
    *fields*, every field of *required* present, and each documented
    field's type, booleans spelled the endpoint's way.

    Raises:
        Refusal: 400, with the documented kind of message.
    """
    if strict:
        _check_strictly(body, fields, required, booleans)
    prompt = body.get("prompt")
    if prompt is None or prompt == "":
        raise Refusal(400, "prompt is required")
    if not isinstance(prompt, str):
        raise Refusal(400, "prompt must be a string")
    if not prompt.strip():
        raise Refusal(400, "prompt is required")
    if "[refuse]" in prompt:
        raise Refusal(400, "prompt refused by the content policy")
    sizes = {
        name: _bounded(body, name, *limits) for name, limits in _LIMITS.items()
    }
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(seed)
        if seed is None or not 0 <= seed <= _SEED_MAX:
            raise Refusal(400, "seed must be a non-negative integer")
    webhook, track_id = _reply_to(body)
    return Submission(
        prompt=prompt,
        seed=seed,
        base64=body.get("base64") in (True, "yes", "true", 1),
        webhook=webhook,
        track_id=track_id,
        outcome="failed" if "[fail]" in prompt else "success",
        **sizes,
    )


def _reply_to(body: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """
    The webhook URL and the ``track_id`` of *body*, checked.
    """
    webhook = body.get("webhook")
    if webhook == "":
        webhook = None
    if webhook is not None and not _is_url(webhook):
        raise Refusal(400, "webhook must be an http or https URL")
    track_id = body.get("track_id")
    if isinstance(track_id, bool) or not isinstance(
        track_id, str | int | None
    ):
        raise Refusal(400, "track_id must be a string")
    return webhook, None if track_id is None else str(track_id)


def _check_strictly(
    body: Mapping[str, Any],
    fields: Collection[str],
    required: Collection[str],
    booleans: BooleanStyle,
) -> None:
    unknown = sorted(name for name in body if name not in fields)
    if unknown:
        raise Refusal(400, f"unknown fields: {', '.join(unknown)}")
    # The prompt first: the documented message for the commonest mistake.
    for name in sorted(required, key=lambda name: name != "prompt"):
        if body.get(name) is None or body.get(name) == "":
            raise Refusal(400, f"{name} is required")
    for name in sorted(body):
        value = body[name]
        kind = FIELD_KINDS.get(name)
        if value is None or kind is None:
            continue
        complaint = _complaint(kind, value, booleans)
        if complaint is not None:
            raise Refusal(400, f"{name} must be {complaint}")


def _complaint(
    kind: FieldKind, value: Any, booleans: BooleanStyle
) -> str | None:
    """
    What *value* should have been, or ``None`` if it is of its *kind*.
    """
    if booleans == "yes-no":
        flag, spelling = value in ("yes", "no"), '"yes" or "no"'
    else:
        flag, spelling = isinstance(value, bool), "true or false"
    checks: dict[FieldKind, tuple[bool, str]] = {
        "text": (isinstance(value, str), "a string"),
        "integer": (_integer(value) is not None, "an integer"),
        "number": (_is_number(value), "a number"),
        "numbers": (
            isinstance(value, str) or _is_number(value),
            "a number or comma-separated numbers",
        ),
        "flag": (flag, spelling),
        "flag_or_integer": (
            flag or _integer(value) is not None,
            f"{spelling} or an integer",
        ),
        "url": (_is_url(value), "an http or https URL"),
    }
    ok, wanted = checks[kind]
    return None if ok else wanted


def _bounded(body: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return _DEFAULTS[name]
    number = _integer(value)
    if number is None:
        raise Refusal(400, f"{name} must be an integer")
    # Compared as ints: a 400-digit width never becomes a float.
    if not low <= number <= high:
        raise Refusal(400, f"{name} must be between {low} and {high}")
    return number


def _integer(value: Any) -> int | None:
    """
    *value* as an int, if it is one: ``512``, ``512.0`` or ``"512"``.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    return None


def _is_number(value: Any) -> bool:
    """
    Whether *value* is a finite number, or the text of one.
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True  # never float(): a 400-digit int overflows it
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return math.isfinite(float(value))
    return False


def _is_url(value: Any) -> bool:
    """
    Whether *value* is an ``http(s)`` URL that a client could call.
    """
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises for a port out of range)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)
