"""
The job endpoints the emulator serves, as data: adding one is a row.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from ._validate import FLUX_KLEIN_FIELDS, V6_FIELDS, BooleanStyle


__all__ = [
    "DEFAULT_ENDPOINTS",
    "FLUX_KLEIN_TEXT2IMG",
    "V6_TEXT2IMG",
    "EmulatedEndpoint",
]


def _names(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


def _below_api(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value or value.startswith("/") or "{" in value:
        msg = f"{attribute.name} is a path below /api/, not {value!r}"
        raise ValueError(msg)


def _prefix(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    _below_api(_, attribute, value)
    if not value.endswith("/"):
        msg = f"{attribute.name} is a prefix ending in '/', not {value!r}"
        raise ValueError(msg)


@attrs.frozen(kw_only=True)
class EmulatedEndpoint:
    """
    One job endpoint: where it is submitted and fetched, what it accepts.

    Args:
        family: The endpoint family, as records and jobs name it (``v6``,
            ``flux-klein``). A fetch route serves the jobs of the families
            submitted to it.
        submit: The submit path below ``/api/``, e.g.
            ``v6/images/text2img``.
        fetch: The fetch prefix below ``/api/``; the job id is appended,
            e.g. ``v6/images/fetch/``. Endpoints may share one.
        fields: The body fields strict mode accepts.
        required: The fields strict mode requires (``key`` and ``prompt``
            are checked in every mode).
        booleans: How booleans are spelled: ``json`` or ``yes-no``.
        fetch_by_body: Also serve the fetch prefix without an id, taking
            ``{"request_id": ...}`` in the body (the v6 form).

    To serve one more, add a row to the defaults::

        img2img = attrs.evolve(
            V6_TEXT2IMG,
            submit="v6/images/img2img",
            fields=V6_TEXT2IMG.fields | {"init_image", "strength"},
        )
        Emulator(endpoints=(*DEFAULT_ENDPOINTS, img2img))
    """

    family: str
    submit: str = attrs.field(validator=_below_api)
    fetch: str = attrs.field(validator=_prefix)
    fields: frozenset[str] = attrs.field(converter=_names)
    required: frozenset[str] = attrs.field(
        converter=_names, default=frozenset({"key", "prompt"})
    )
    booleans: BooleanStyle = attrs.field(
        default="json", validator=attrs.validators.in_(("json", "yes-no"))
    )
    fetch_by_body: bool = False


#: Community/v6 text2img (seed 001 and the community and Flux OpenAPI
#: files), fetched by path or by ``request_id``; ``"yes"``/``"no"``.
V6_TEXT2IMG = EmulatedEndpoint(
    family="v6",
    submit="v6/images/text2img",
    fetch="v6/images/fetch/",
    fields=V6_FIELDS,
    required={"key", "prompt", "model_id"},
    booleans="yes-no",
    fetch_by_body=True,
)
#: Enterprise Flux Klein text2img (seed 000); JSON booleans.
FLUX_KLEIN_TEXT2IMG = EmulatedEndpoint(
    family="flux-klein",
    submit="v1/enterprise/flux_klein/text2img",
    fetch="v1/enterprise/flux_klein/fetch/",
    fields=FLUX_KLEIN_FIELDS,
    required={"key", "prompt"},
    booleans="json",
)
#: The endpoints an :class:`Emulator` serves unless told otherwise.
DEFAULT_ENDPOINTS: tuple[EmulatedEndpoint, ...] = (
    V6_TEXT2IMG,
    FLUX_KLEIN_TEXT2IMG,
)
