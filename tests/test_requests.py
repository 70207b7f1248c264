"""
Request models: every documented limit is checked before sending.
"""

from __future__ import annotations

from typing import Any, get_args

import attrs
import pytest

from modelslab_async import FluxKleinText2Img, S3Settings, Text2Img
from modelslab_async._vocabulary import EnhanceStyle
from modelslab_async.errors import InvalidRequestError


pytestmark = pytest.mark.anyio


# (field, bad value, words the limit must contain) per documented limit.
SHARED_LIMITS = [
    ("width", 1025, "1 to 1024"),
    ("width", 0, "1 to 1024"),
    ("width", 512.0, "integer"),
    ("width", True, "integer"),
    ("height", 2048, "1 to 1024"),
    ("samples", 0, "1 to 4"),
    ("samples", 5, "1 to 4"),
    ("seed", -1, "at least 0"),
    ("safety_checker", "yes", "True or False"),
    ("base64", 1, "True or False"),
    ("webhook", "ftp://example.com/hook", "http(s) URL"),
    ("webhook", "http://", "with a host"),
    ("webhook", "http://[::1", "with a host"),
    ("negative_prompt", 7, "string"),
]
V6_LIMITS = [
    ("guidance_scale", 0.5, "1 to 20"),
    ("guidance_scale", 20.5, "1 to 20"),
    ("clip_skip", 0, "1 to 8"),
    ("clip_skip", 9, "1 to 8"),
    ("num_inference_steps", 0, "at least 1"),
    ("safety_checker_type", "smudge", "'blur'"),
    ("enhance_style", "vaporwave-deluxe", "'enhance'"),
    ("algorithm_type", "dpmsolver++", "'none'"),
    ("lora_strength", 1.5, "0.1 to 1"),
    ("lora_strength", [0.5, 0.05], "0.1 to 1"),
    ("lora_model", [""], "model id"),
    ("lora_model", "a,b", "no commas"),
    ("lora_model", ["a", "b,c"], "no commas"),
    ("scheduler", "FancyScheduler", "'DDPMScheduler'"),
    ("model_id", "", "non-empty"),
    ("tomesd", "no", "True or False"),
]


@pytest.mark.parametrize(("field", "value", "limit"), SHARED_LIMITS)
@pytest.mark.parametrize("cls", [Text2Img, FluxKleinText2Img])
def test_shared_limits(cls, field, value, limit):
    """A value outside a limit both endpoints document is refused."""
    with pytest.raises(InvalidRequestError) as caught:
        cls(prompt="a lighthouse", **{field: value})

    error = caught.value
    assert (error.field, error.value) == (field, value)
    assert limit in error.limit
    assert str(error).startswith(f"{field}=")
    assert limit in str(error)


@pytest.mark.parametrize(("field", "value", "limit"), V6_LIMITS)
def test_v6_limits(field, value, limit):
    """A value outside a v6 limit is refused, naming field and limit."""
    with pytest.raises(InvalidRequestError) as caught:
        Text2Img(prompt="a lighthouse", **{field: value})

    assert caught.value.field == field
    assert limit in str(caught.value)


@pytest.mark.parametrize("prompt", ["", "   ", None, 42])
@pytest.mark.parametrize("cls", [Text2Img, FluxKleinText2Img])
def test_prompt_is_required(cls, prompt):
    """The prompt must be a non-empty string."""
    with pytest.raises(InvalidRequestError, match="prompt"):
        cls(prompt=prompt)


def test_limits_at_the_edges_are_accepted():
    """The documented extremes themselves are valid."""
    for width, samples, guidance, clip_skip in (
        (1, 1, 1, 1),
        (1024, 4, 20, 8),
    ):
        Text2Img(
            prompt="p",
            width=width,
            height=width,
            samples=samples,
            guidance_scale=guidance,
            clip_skip=clip_skip,
        )
    FluxKleinText2Img(prompt="p", width=1024, height=1024, samples=4)


def test_every_seed_style_is_accepted():
    """Each enhance_style seed 001 lists builds a request."""
    styles = get_args(EnhanceStyle)

    built = [Text2Img(prompt="p", enhance_style=s) for s in styles]

    assert len(styles) > 180
    assert [r.enhance_style for r in built] == list(styles)


async def test_refused_before_any_request(emulator, client):
    """A request over a limit never reaches the server."""
    with pytest.raises(InvalidRequestError):
        await client.generate(Text2Img(prompt="p", width=4096))

    assert emulator.records == []


@pytest.mark.parametrize(
    ("model_id", "most"),
    [
        ("flux", 50),
        ("flux-dev-uncensored", 50),
        ("sdxl", 20),
        ("juggernaut", 20),
    ],
)
def test_steps_follow_the_model_family(model_id, most):
    """Flux models take up to 50 steps, community models up to 20."""
    request = Text2Img(prompt="p", model_id=model_id, num_inference_steps=most)
    with pytest.raises(InvalidRequestError) as caught:
        Text2Img(prompt="p", model_id=model_id, num_inference_steps=most + 1)

    assert request.num_inference_steps == most
    assert caught.value.field == "num_inference_steps"
    assert caught.value.value == most + 1
    assert f"from 1 to {most}" in caught.value.limit
    assert model_id in caught.value.limit


def test_each_lora_model_needs_its_strength():
    """LoRA models and strengths of different counts are refused."""
    Text2Img(prompt="p", lora_model=["a", "b"], lora_strength=[0.5, 0.7])
    Text2Img(prompt="p", lora_model="a", lora_strength=0.5)
    with pytest.raises(InvalidRequestError) as caught:
        Text2Img(prompt="p", lora_model=["a", "b"], lora_strength=0.5)

    assert caught.value.field == "lora_strength"
    assert "one strength per LoRA model (2)" in caught.value.limit


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"key": "sneaky"}, "extra"),
        ({"width": 512}, "extra"),
        ({1: "x"}, "extra"),
    ],
)
def test_extra_cannot_shadow(extra: dict[Any, Any], field):
    """extra may not carry the key, a documented field or a non-string."""
    with pytest.raises(InvalidRequestError) as caught:
        Text2Img(prompt="p", extra=extra)

    assert caught.value.field == field


def test_requests_are_frozen_and_hashable():
    """Requests are immutable values: equal fields, equal requests."""
    request = Text2Img(prompt="p", lora_model=["a", "b"], extra={"upscale": 2})

    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        request.prompt = "q"  # type: ignore[misc]
    with pytest.raises(TypeError):
        request.extra["upscale"] = 3  # type: ignore[index]
    assert request == Text2Img(
        prompt="p", lora_model=("a", "b"), extra={"upscale": 2}
    )
    assert hash(request) == hash(Text2Img(prompt="p", lora_model=("a", "b")))


def test_positional_arguments_are_refused():
    """Keyword-only: width and height can never be swapped by position."""
    with pytest.raises(TypeError):
        Text2Img("p", "flux")  # type: ignore[misc]


def test_s3_secret_is_not_in_repr():
    """The S3 secret access key never shows in a repr."""
    settings = S3Settings(
        public_url="https://cdn.example.com/generations/",
        region_name="us-east-1",
        endpoint_url="https://s3.example.com",
        aws_access_key_id="AKIAEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI-secret",
        image_directory="generations",
    )

    assert "wJalrXUtnFEMI-secret" not in repr(settings)
    assert "AKIAEXAMPLE" in repr(settings)
