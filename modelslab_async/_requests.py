"""
Request models: one frozen class per text2img endpoint.

Fields use Python types; the converter turns them into each endpoint's wire
spelling. Every documented limit is checked at construction, so a request
object that exists is one the library is willing to send.
"""

from __future__ import annotations

import warnings

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeAlias, get_args

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

_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]

#: Seed 001: "any value above 20 will be capped at 20".
V6_STEPS_CAP = 20


def _reject(
    attribute: attrs.Attribute[Any], value: object, limit: str
) -> None:
    raise InvalidRequestError(attribute.name, value, limit)


def _integer(low: int | None = None, high: int | None = None) -> _Validator:
    limit = (
        f"must be an integer from {low} to {high}"
        if high is not None
        else f"must be an integer of at least {low}"
        if low is not None
        else "must be an integer"
    )

    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return
        # bool is an int subclass; True as a width is always a mistake.
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            _reject(attribute, value, limit)

    return check


def _number(low: float, high: float) -> _Validator:
    limit = f"must be a number from {low:g} to {high:g}"

    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not low <= value <= high
        ):
            _reject(attribute, value, limit)

    return check


def _flag(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        _reject(attribute, value, "must be True or False")


def _text(*, required: bool = False) -> _Validator:
    limit = "must be a non-empty string" if required else "must be a string"

    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and not required:
            return
        if not isinstance(value, str) or (required and not value.strip()):
            _reject(attribute, value, limit)

    return check


def _one_of(alias: object) -> _Validator:
    choices = get_args(alias)
    shown = ", ".join(map(repr, choices[:6]))
    more = f" and {len(choices) - 6} more" if len(choices) > 6 else ""
    limit = f"must be one of {shown}{more}"

    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and value not in choices:
            _reject(attribute, value, limit)

    return check


def _url(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not (
        isinstance(value, str) and value.startswith(("http://", "https://"))
    ):
        _reject(attribute, value, "must be an http(s) URL")


def _freeze_extra(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


def _checked_extra(
    instance: object, attribute: attrs.Attribute[Any], value: Any
) -> None:
    declared = attrs.fields_dict(type(instance))  # type: ignore[arg-type]
    for name in value:
        if not isinstance(name, str):
            _reject(attribute, name, "keys must be strings")
        if name == "key":
            _reject(
                attribute,
                name,
                "the API key is added at send time; pass it to Client",
            )
        if name in declared:
            _reject(
                attribute,
                name,
                f"{name!r} is a documented field; set it directly",
            )


def _text_list(value: Any) -> Any:
    """
    Accept a list of LoRA ids or strengths; the wire wants one string.
    """
    if isinstance(value, list):
        return tuple(value)
    return value


def _lora_models(
    _: object, attribute: attrs.Attribute[Any], value: Any
) -> None:
    if value is None:
        return
    items = value if isinstance(value, tuple) else (value,)
    if not items or not all(isinstance(i, str) and i for i in items):
        _reject(attribute, value, "must be a model id or a list of them")


def _lora_strengths(
    _: object, attribute: attrs.Attribute[Any], value: Any
) -> None:
    if value is None:
        return
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if (
            not isinstance(item, int | float)
            or isinstance(item, bool)
            or not 0.1 <= item <= 1
        ):
            _reject(attribute, value, "each strength must be from 0.1 to 1")


def _warn_capped_steps(
    _: object, __: attrs.Attribute[Any], value: Any
) -> None:
    if value is not None and value > V6_STEPS_CAP:
        warnings.warn(
            f"num_inference_steps={value} is above the v6 cap; the server "
            f"runs {V6_STEPS_CAP} steps (seed 001). Sent unchanged.",
            ModelsLabWarning,
            stacklevel=4,
        )


@attrs.frozen(kw_only=True)
class FluxKleinText2Img:
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

    prompt: str = attrs.field(validator=_text(required=True))
    negative_prompt: str | None = attrs.field(default=None, validator=_text())
    width: int | None = attrs.field(default=None, validator=_integer(1, 1024))
    height: int | None = attrs.field(default=None, validator=_integer(1, 1024))
    samples: int | None = attrs.field(default=None, validator=_integer(1, 4))
    safety_checker: bool | None = attrs.field(default=None, validator=_flag)
    seed: int | None = attrs.field(default=None, validator=_integer(0))
    instant_response: bool | None = attrs.field(default=None, validator=_flag)
    base64: bool | None = attrs.field(default=None, validator=_flag)
    webhook: str | None = attrs.field(default=None, validator=_url)
    track_id: str | None = attrs.field(
        default=None, validator=_text(required=False)
    )
    extra: Mapping[str, Any] = attrs.field(
        factory=dict,
        converter=_freeze_extra,
        validator=_checked_extra,
        hash=False,
    )


@attrs.frozen(kw_only=True)
class Text2Img:
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

    prompt: str = attrs.field(validator=_text(required=True))
    model_id: str = attrs.field(default="flux", validator=_text(required=True))
    negative_prompt: str | None = attrs.field(default=None, validator=_text())
    width: int | None = attrs.field(default=None, validator=_integer(1, 1024))
    height: int | None = attrs.field(default=None, validator=_integer(1, 1024))
    samples: int | None = attrs.field(default=None, validator=_integer(1, 4))
    num_inference_steps: int | None = attrs.field(
        default=None, validator=[_integer(1), _warn_capped_steps]
    )
    safety_checker: bool | None = attrs.field(default=None, validator=_flag)
    safety_checker_type: SafetyCheckerType | None = attrs.field(
        default=None, validator=_one_of(SafetyCheckerType)
    )
    enhance_prompt: bool | None = attrs.field(default=None, validator=_flag)
    enhance_style: EnhanceStyle | None = attrs.field(
        default=None, validator=_one_of(EnhanceStyle)
    )
    seed: int | None = attrs.field(default=None, validator=_integer(0))
    guidance_scale: float | None = attrs.field(
        default=None, validator=_number(1, 20)
    )
    algorithm_type: AlgorithmType | None = attrs.field(
        default=None, validator=_one_of(AlgorithmType)
    )
    multi_lingual: bool | None = attrs.field(default=None, validator=_flag)
    panorama: bool | None = attrs.field(default=None, validator=_flag)
    self_attention: bool | None = attrs.field(default=None, validator=_flag)
    clip_skip: int | None = attrs.field(default=None, validator=_integer(1, 8))
    base64: bool | None = attrs.field(default=None, validator=_flag)
    scheduler: str | None = attrs.field(default=None, validator=_text())
    tomesd: bool | None = attrs.field(default=None, validator=_flag)
    vae: str | None = attrs.field(default=None, validator=_text())
    lora_model: str | tuple[str, ...] | None = attrs.field(
        default=None, converter=_text_list, validator=_lora_models
    )
    lora_strength: float | tuple[float, ...] | None = attrs.field(
        default=None, converter=_text_list, validator=_lora_strengths
    )
    temp: bool | None = attrs.field(default=None, validator=_flag)
    webhook: str | None = attrs.field(default=None, validator=_url)
    track_id: str | None = attrs.field(default=None, validator=_text())
    extra: Mapping[str, Any] = attrs.field(
        factory=dict,
        converter=_freeze_extra,
        validator=_checked_extra,
        hash=False,
    )


#: Either text2img request.
Text2ImgRequest: TypeAlias = FluxKleinText2Img | Text2Img


@attrs.frozen(kw_only=True)
class S3Settings:
    """
    Where an Enterprise server stores its images
    (``POST /api/v1/enterprise/update_s3``).

    The secret access key is never shown in a repr.
    """

    public_url: str = attrs.field(validator=_url)
    region_name: str = attrs.field(validator=_text(required=True))
    endpoint_url: str = attrs.field(validator=_url)
    aws_access_key_id: str = attrs.field(validator=_text(required=True))
    aws_secret_access_key: str = attrs.field(
        validator=_text(required=True), repr=False
    )
    image_directory: str = attrs.field(validator=_text(required=True))
    deploy_type: str | None = attrs.field(default=None, validator=_text())
