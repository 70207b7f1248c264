"""
Request models: one frozen class per text2img endpoint.

Fields use Python types; the converter turns them into each endpoint's wire
spelling. Every documented limit is checked at construction, so a request
object that exists is one the library is willing to send.
"""

from __future__ import annotations

import functools
import operator
import warnings

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal, TypeAlias, TypeVar, get_args

import attrs

from ._enums import AlgorithmType, EnhanceStyle, SafetyCheckerType
from .errors import InvalidRequestError, ModelsLabWarning


__all__ = [
    "Endpoint",
    "FluxKleinText2Img",
    "S3Settings",
    "Text2Img",
    "Text2ImgRequest",
]

#: The two endpoint families: community/v6 ``images`` and the Enterprise
#: Flux Klein server.
Endpoint: TypeAlias = Literal["v6", "flux-klein"]

#: A field's check: ``(field name, value)``; raises InvalidRequestError.
_Check = Callable[[str, Any], None]
_CHECK: Final = "modelslab_async.check"

#: Seed 001: "any value above 20 will be capped at 20".
V6_STEPS_CAP = 20


def _field(check: Callable[..., None], **options: Any) -> Any:
    """
    An attrs field with its check, run by :class:`_Checked`.

    *check* is a :data:`_Check`, or ``_check_extra``, which ``_checked``
    binds to the class's field names.
    """
    return attrs.field(metadata={_CHECK: check}, **options)


def _optional(check: _Check, **options: Any) -> Any:
    """
    A field that may be left out (``None``): checked only when set.
    """
    return _field(check, default=None, **options)


class _Checked:
    """
    Strictly private: runs the fields' checks in one pass.

    attrs validators would run all of them on every construction; a request
    sets a few of its ~30 fields, so only set ones (and those whose unset
    value is not ``None``) are checked.
    """

    __slots__ = ()
    _checks: ClassVar[tuple[tuple[str, _Check], ...]] = ()
    _values: ClassVar[Callable[[Any], tuple[Any, ...]]]
    #: Fields for which None is never valid: required, or a real default.
    _required: ClassVar[tuple[tuple[str, _Check], ...]] = ()

    def __attrs_post_init__(self) -> None:
        cls = type(self)
        for (name, check), value in zip(
            cls._checks, cls._values(self), strict=True
        ):
            if value is not None:
                check(name, value)
        for name, check in cls._required:
            value = getattr(self, name)
            if value is None:
                check(name, value)


_C = TypeVar("_C", bound=type[_Checked])


def _checked(cls: _C) -> _C:
    """
    Collect *cls*'s field checks, once, when the class is made.
    """
    fields: tuple[attrs.Attribute[Any], ...] = attrs.fields(cls)  # type: ignore[arg-type]
    declared = frozenset(field.name for field in fields)
    checks = []
    required = []
    for field in fields:
        check = field.metadata.get(_CHECK)
        if check is _check_extra:
            check = functools.partial(_check_extra, declared)
        if check is not None:
            checks.append((field.name, check))
            if field.default is not None:
                required.append((field.name, check))
    cls._checks = tuple(checks)
    cls._required = tuple(required)
    cls._values = operator.attrgetter(*(name for name, _ in checks))
    return cls


def _integer(low: int | None = None, high: int | None = None) -> _Check:
    limit = (
        f"must be an integer from {low} to {high}"
        if high is not None
        else f"must be an integer of at least {low}"
        if low is not None
        else "must be an integer"
    )

    def check(name: str, value: Any) -> None:
        # bool is an int subclass; True as a width is always a mistake.
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            raise InvalidRequestError(name, value, limit)

    return check


def _number(low: float, high: float) -> _Check:
    limit = f"must be a number from {low:g} to {high:g}"

    def check(name: str, value: Any) -> None:
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not low <= value <= high
        ):
            raise InvalidRequestError(name, value, limit)

    return check


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidRequestError(name, value, "must be True or False")


def _text(*, required: bool = False) -> _Check:
    limit = "must be a non-empty string" if required else "must be a string"

    def check(name: str, value: Any) -> None:
        if not isinstance(value, str) or (required and not value.strip()):
            raise InvalidRequestError(name, value, limit)

    return check


def _one_of(alias: object) -> _Check:
    choices = get_args(alias)
    shown = ", ".join(map(repr, choices[:6]))
    more = f" and {len(choices) - 6} more" if len(choices) > 6 else ""
    limit = f"must be one of {shown}{more}"

    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise InvalidRequestError(name, value, limit)

    return check


def _url(name: str, value: Any) -> None:
    if not (
        isinstance(value, str) and value.startswith(("http://", "https://"))
    ):
        raise InvalidRequestError(name, value, "must be an http(s) URL")


def _freeze_extra(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


def _check_extra(declared: frozenset[str], name: str, value: Any) -> None:
    for key in value:
        if not isinstance(key, str):
            raise InvalidRequestError(name, key, "keys must be strings")
        if key == "key":
            raise InvalidRequestError(
                name,
                key,
                "the API key is added at send time; pass it to Client",
            )
        if key in declared:
            raise InvalidRequestError(
                name, key, f"{key!r} is a documented field; set it directly"
            )


def _text_list(value: Any) -> Any:
    """
    Accept a list of LoRA ids or strengths; the wire wants one string.
    """
    if isinstance(value, list):
        return tuple(value)
    return value


def _lora_models(name: str, value: Any) -> None:
    items = value if isinstance(value, tuple) else (value,)
    if not items or not all(isinstance(i, str) and i for i in items):
        raise InvalidRequestError(
            name, value, "must be a model id or a list of them"
        )


def _lora_strengths(name: str, value: Any) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if (
            not isinstance(item, int | float)
            or isinstance(item, bool)
            or not 0.1 <= item <= 1
        ):
            raise InvalidRequestError(
                name, value, "each strength must be from 0.1 to 1"
            )


def _steps(name: str, value: Any) -> None:
    _integer(1)(name, value)
    if value > V6_STEPS_CAP:
        warnings.warn(
            f"num_inference_steps={value} is above the v6 cap; the server "
            f"runs {V6_STEPS_CAP} steps (seed 001). Sent unchanged.",
            ModelsLabWarning,
            stacklevel=4,
        )


@_checked
@attrs.frozen(kw_only=True)
class FluxKleinText2Img(_Checked):
    """
    A text2img job for an Enterprise Flux Klein server.

    ``POST /api/v1/enterprise/flux_klein/text2img``; booleans travel as JSON
    booleans. Fields left as ``None`` are not sent, so the server applies its
    own defaults.

    Args:
        prompt: What the image should show. Required.
        negative_prompt: What it should not show.
        width: Pixels, at most 1024.
        height: Pixels, at most 1024.
        samples: Number of images, 1 to 4.
        safety_checker: Replace NSFW images with a blank image.
        seed: Reproduce a result; ``None`` for a random seed.
        instant_response: Ask the server to queue and answer at once.
        base64: Deliver outputs as base64 text; :meth:`Output.read
            <modelslab_async.Output.read>` decodes it either way.
        webhook: URL the server POSTs the result to. Set by the client when
            it has a webhook receiver.
        track_id: Your id for the job, echoed in the webhook. Generated when
            not given.
        extra: Undocumented fields, sent unchanged.

    Raises:
        InvalidRequestError: A value is outside its documented limit.
    """

    endpoint: ClassVar[Endpoint] = "flux-klein"

    prompt: str = _field(_text(required=True))
    negative_prompt: str | None = _optional(_text())
    width: int | None = _optional(_integer(1, 1024))
    height: int | None = _optional(_integer(1, 1024))
    samples: int | None = _optional(_integer(1, 4))
    safety_checker: bool | None = _optional(_flag)
    seed: int | None = _optional(_integer(0))
    instant_response: bool | None = _optional(_flag)
    base64: bool | None = _optional(_flag)
    webhook: str | None = _optional(_url)
    track_id: str | None = _optional(_text(required=False))
    extra: Mapping[str, Any] = _field(
        _check_extra, factory=dict, converter=_freeze_extra, hash=False
    )


@_checked
@attrs.frozen(kw_only=True)
class Text2Img(_Checked):
    """
    A text2img job for the community/v6 endpoint, Flux by default.

    ``POST /api/v6/images/text2img``; booleans travel as ``"yes"``/``"no"``.
    Fields left as ``None`` are not sent, so the server applies its own
    defaults.

    Args:
        prompt: What the image should show. Required.
        model_id: The model; ``"flux"`` unless you choose another.
        negative_prompt: What it should not show (``flux`` ignores it).
        width: Pixels, at most 1024.
        height: Pixels, at most 1024.
        samples: Number of images, 1 to 4.
        num_inference_steps: Denoising steps, at least 1. The server caps it
            at 20; above that the value is sent unchanged with a
            :class:`~modelslab_async.errors.ModelsLabWarning`.
        safety_checker: Replace NSFW images.
        safety_checker_type: How: ``blur``, ``sensitive_content_text``,
            ``pixelate`` or ``black``.
        enhance_prompt: Let the server improve the prompt.
        enhance_style: One of the styles seed 001 lists.
        seed: Reproduce a result; ``None`` for a random seed.
        guidance_scale: Classifier-free guidance, 1 to 20.
        algorithm_type: ``none`` or ``dpmsolver+++``.
        multi_lingual: The prompt is not in English.
        panorama: Generate a panorama.
        self_attention: Higher quality, slower.
        clip_skip: CLIP layers to skip, 1 to 8.
        base64: Deliver outputs as base64 text; :meth:`Output.read
            <modelslab_async.Output.read>` decodes it either way.
        scheduler: A scheduler name, e.g. ``UniPCMultistepScheduler``.
        tomesd: Token merging, faster.
        vae: A custom VAE id.
        lora_model: A LoRA id, or a list of them.
        lora_strength: A strength from 0.1 to 1, or one per LoRA.
        temp: Temporary output links, valid for 24 hours.
        webhook: URL the server POSTs the result to.
        track_id: Your id for the job, echoed in the webhook.
        extra: Undocumented fields, sent unchanged.

    Raises:
        InvalidRequestError: A value is outside its documented limit.
    """

    endpoint: ClassVar[Endpoint] = "v6"

    prompt: str = _field(_text(required=True))
    model_id: str = _field(_text(required=True), default="flux")
    negative_prompt: str | None = _optional(_text())
    width: int | None = _optional(_integer(1, 1024))
    height: int | None = _optional(_integer(1, 1024))
    samples: int | None = _optional(_integer(1, 4))
    num_inference_steps: int | None = _optional(_steps)
    safety_checker: bool | None = _optional(_flag)
    safety_checker_type: SafetyCheckerType | None = _optional(
        _one_of(SafetyCheckerType)
    )
    enhance_prompt: bool | None = _optional(_flag)
    enhance_style: EnhanceStyle | None = _optional(_one_of(EnhanceStyle))
    seed: int | None = _optional(_integer(0))
    guidance_scale: float | None = _optional(_number(1, 20))
    algorithm_type: AlgorithmType | None = _optional(_one_of(AlgorithmType))
    multi_lingual: bool | None = _optional(_flag)
    panorama: bool | None = _optional(_flag)
    self_attention: bool | None = _optional(_flag)
    clip_skip: int | None = _optional(_integer(1, 8))
    base64: bool | None = _optional(_flag)
    scheduler: str | None = _optional(_text())
    tomesd: bool | None = _optional(_flag)
    vae: str | None = _optional(_text())
    lora_model: str | tuple[str, ...] | None = _optional(
        _lora_models, converter=_text_list
    )
    lora_strength: float | tuple[float, ...] | None = _optional(
        _lora_strengths, converter=_text_list
    )
    temp: bool | None = _optional(_flag)
    webhook: str | None = _optional(_url)
    track_id: str | None = _optional(_text())
    extra: Mapping[str, Any] = _field(
        _check_extra, factory=dict, converter=_freeze_extra, hash=False
    )


#: Either text2img request.
Text2ImgRequest: TypeAlias = FluxKleinText2Img | Text2Img


@_checked
@attrs.frozen(kw_only=True)
class S3Settings(_Checked):
    """
    Where an Enterprise server stores its images
    (``POST /api/v1/enterprise/update_s3``).

    The secret access key is never shown in a repr.
    """

    public_url: str = _field(_url)
    region_name: str = _field(_text(required=True))
    endpoint_url: str = _field(_url)
    aws_access_key_id: str = _field(_text(required=True))
    aws_secret_access_key: str = _field(_text(required=True), repr=False)
    image_directory: str = _field(_text(required=True))
    deploy_type: str | None = _optional(_text())
