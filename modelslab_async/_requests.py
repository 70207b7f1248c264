"""
Request models: one frozen class per job endpoint.

Fields use Python types; the converter turns them into each endpoint's wire
spelling. Every documented limit is checked at construction, so a request
object that exists is one the library is willing to send. Each class
carries its :class:`~modelslab_async._routes.Route`: a new endpoint is a
new class here and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs

from ._routes import Endpoint, Route
from ._validation import (
    Checked,
    checked,
    extra_fields,
    field,
    flag,
    freeze,
    integer,
    number,
    one_of,
    optional,
    text,
    url,
)
from ._vocabulary import (
    AlgorithmType,
    EnhanceStyle,
    SafetyCheckerType,
    Scheduler,
)
from .errors import InvalidRequestError


__all__ = [
    "REQUEST_TYPES",
    "FluxKleinText2Img",
    "JobRequest",
    "S3Settings",
    "Text2Img",
]

#: The most denoising steps, by model family. Flux models: the Flux
#: OpenAPI's ``FluxTextToImageRequest`` says 1 to 50. Every other model:
#: the community OpenAPI's ``CommonImageGenerationParams`` and seed 001's
#: table say 1 to 20 ("any value above 20 will be capped at 20").
FLUX_MAX_STEPS: Final = 50
COMMUNITY_MAX_STEPS: Final = 20

#: Every request class by name, for reading requests back from a store.
REQUEST_TYPES: dict[str, type[JobRequest]] = {}


class JobRequest(Checked):
    """
    A job for one endpoint: what :meth:`Client.submit
    <modelslab_async.Client.submit>` sends.

    Each subclass says where it goes in its ``route``.
    """

    __slots__ = ()
    route: ClassVar[Route]
    if TYPE_CHECKING:
        prompt: str
        webhook: str | None
        track_id: str | None
        extra: Mapping[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # attrs replaces a slotted class with a new one: the last wins.
        REQUEST_TYPES[cls.__name__] = cls

    @property
    def endpoint(self) -> Endpoint:
        """
        The endpoint family: ``"v6"`` or ``"flux-klein"``.
        """
        return self.route.family


def _text_list(value: Any) -> Any:
    """
    Accept a list of LoRA ids or strengths; the wire wants one string.
    """
    if isinstance(value, list):
        return tuple(value)
    return value


def _items(value: Any) -> tuple[Any, ...]:
    return value if isinstance(value, tuple) else (value,)


def _lora_models(name: str, value: Any) -> None:
    items = _items(value)
    # The wire joins ids with commas: an id holding one would read as two.
    if not items or not all(
        isinstance(i, str) and i.strip() and "," not in i for i in items
    ):
        raise InvalidRequestError(
            name, value, "must be a model id (no commas) or a list of them"
        )


def _lora_strengths(name: str, value: Any) -> None:
    for item in _items(value):
        if (
            not isinstance(item, int | float)
            or isinstance(item, bool)
            or not 0.1 <= item <= 1
        ):
            raise InvalidRequestError(
                name, value, "each strength must be from 0.1 to 1"
            )


@checked
@attrs.frozen(kw_only=True)
class FluxKleinText2Img(JobRequest):
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

    route: ClassVar[Route] = Route(
        "flux-klein",
        submit="v1/enterprise/flux_klein/text2img",
        fetch="v1/enterprise/flux_klein/fetch/",
        booleans="json",
    )

    prompt: str = field(text(required=True))
    negative_prompt: str | None = optional(text())
    width: int | None = optional(integer(1, 1024))
    height: int | None = optional(integer(1, 1024))
    samples: int | None = optional(integer(1, 4))
    safety_checker: bool | None = optional(flag)
    seed: int | None = optional(integer(0))
    instant_response: bool | None = optional(flag)
    base64: bool | None = optional(flag)
    webhook: str | None = optional(url)
    track_id: str | None = optional(text())
    extra: Mapping[str, Any] = field(
        extra_fields, factory=dict, converter=freeze, hash=False
    )


@checked
@attrs.frozen(kw_only=True)
class Text2Img(JobRequest):
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
        num_inference_steps: Denoising steps: 1 to 50 for Flux models
            (``model_id`` containing ``flux``, per the Flux OpenAPI), 1 to 20
            for every other model (the community OpenAPI and seed 001).
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
        scheduler: One of the community OpenAPI's 18 schedulers, e.g.
            ``UniPCMultistepScheduler``.
        tomesd: Token merging, faster.
        vae: A custom VAE id.
        lora_model: A LoRA id, or a list of them; ids hold no commas.
        lora_strength: A strength from 0.1 to 1, or one per LoRA: as many
            strengths as models when both are given.
        temp: Temporary output links, valid for 24 hours.
        webhook: URL the server POSTs the result to.
        track_id: Your id for the job, echoed in the webhook.
        extra: Undocumented fields, sent unchanged.

    Raises:
        InvalidRequestError: A value is outside its documented limit.
    """

    route: ClassVar[Route] = Route(
        "v6",
        submit="v6/images/text2img",
        fetch="v6/images/fetch/",
        booleans="yes-no",
    )

    prompt: str = field(text(required=True))
    model_id: str = field(text(required=True), default="flux")
    negative_prompt: str | None = optional(text())
    width: int | None = optional(integer(1, 1024))
    height: int | None = optional(integer(1, 1024))
    samples: int | None = optional(integer(1, 4))
    num_inference_steps: int | None = optional(integer(1))
    safety_checker: bool | None = optional(flag)
    safety_checker_type: SafetyCheckerType | None = optional(
        one_of(SafetyCheckerType)
    )
    enhance_prompt: bool | None = optional(flag)
    enhance_style: EnhanceStyle | None = optional(one_of(EnhanceStyle))
    seed: int | None = optional(integer(0))
    guidance_scale: float | None = optional(number(1, 20))
    algorithm_type: AlgorithmType | None = optional(one_of(AlgorithmType))
    multi_lingual: bool | None = optional(flag)
    panorama: bool | None = optional(flag)
    self_attention: bool | None = optional(flag)
    clip_skip: int | None = optional(integer(1, 8))
    base64: bool | None = optional(flag)
    scheduler: Scheduler | None = optional(one_of(Scheduler))
    tomesd: bool | None = optional(flag)
    vae: str | None = optional(text())
    lora_model: str | tuple[str, ...] | None = optional(
        _lora_models, converter=_text_list
    )
    lora_strength: float | tuple[float, ...] | None = optional(
        _lora_strengths, converter=_text_list
    )
    temp: bool | None = optional(flag)
    webhook: str | None = optional(url)
    track_id: str | None = optional(text())
    extra: Mapping[str, Any] = field(
        extra_fields, factory=dict, converter=freeze, hash=False
    )

    def cross_check(self) -> None:
        steps = self.num_inference_steps
        if steps is not None:
            flux = "flux" in self.model_id.lower()
            most = FLUX_MAX_STEPS if flux else COMMUNITY_MAX_STEPS
            if steps > most:
                family = "Flux" if flux else "community"
                raise InvalidRequestError(
                    "num_inference_steps",
                    steps,
                    f"must be from 1 to {most} for {family} models "
                    f"(model_id={self.model_id!r})",
                )
        if self.lora_model is not None and self.lora_strength is not None:
            models = len(_items(self.lora_model))
            strengths = len(_items(self.lora_strength))
            if models != strengths:
                raise InvalidRequestError(
                    "lora_strength",
                    self.lora_strength,
                    f"must give one strength per LoRA model ({models})",
                )


@checked
@attrs.frozen(kw_only=True)
class S3Settings(Checked):
    """
    Where an Enterprise server stores its images
    (``POST /api/v1/enterprise/update_s3``).

    The secret access key is never shown in a repr.
    """

    public_url: str = field(url)
    region_name: str = field(text(required=True))
    endpoint_url: str = field(url)
    aws_access_key_id: str = field(text(required=True))
    aws_secret_access_key: str = field(text(required=True), repr=False)
    image_directory: str = field(text(required=True))
    deploy_type: str | None = optional(text())
