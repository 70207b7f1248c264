"""
The emulator's settings that may change while it runs, and their checks:
a bad value raises at once, whether assigned, configured or posted.
"""

from __future__ import annotations

import math

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final

import attrs

from ._endpoints import EmulatedEndpoint
from ._faults import Faults
from ._wire import ALL_QUIRKS


__all__ = [
    "FAULT_SETTABLE",
    "SETTABLE",
    "check_endpoints",
    "check_keys",
    "check_quirks",
    "fault_settings",
    "integer",
    "number",
]

#: Settings ``configure()`` and ``POST /_emulator/settings`` may change.
SETTABLE: Final = frozenset(
    {
        "eta",
        "eta_error",
        "eta_bias",
        "announce",
        "queue_limit",
        "retry_after",
        "keys",
        "quirks",
        "strict",
        "base64_delivery",
        "images",
        "cdn_delay",
        "record_limit",
        "job_ttl",
    }
)
#: The settings of :class:`Faults` that may change while running.
FAULT_SETTABLE: Final = frozenset(
    {
        "rates",
        "schedule",
        "webhook_drop",
        "webhook_duplicate",
        "webhook_delay",
        "stall_seconds",
    }
)


def number(
    low: float, high: float = float("inf"), *, optional: bool = False
) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    """
    A validator: a number from *low* to *high*; ``None`` if *optional*.
    """

    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            msg = f"{attribute.name} is a number, not {value!r}"
            raise TypeError(msg)
        if not (math.isfinite(value) and low <= value <= high):
            msg = f"{attribute.name} must be from {low} to {high}: {value!r}"
            raise ValueError(msg)

    return check


def integer(
    low: int, *, optional: bool = False
) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    """
    A validator: an int of at least *low*; ``None`` if *optional*.
    """
    check_number = number(low, optional=optional)

    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and not isinstance(value, int):
            msg = f"{attribute.name} is an integer, not {value!r}"
            raise TypeError(msg)
        check_number(_, attribute, value)

    return check


def check_quirks(_: object, __: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, str) or not isinstance(value, Collection):
        msg = f"quirks are a collection of names, not {value!r}"
        raise TypeError(msg)
    unknown = set(value) - ALL_QUIRKS
    if unknown:
        msg = f"unknown quirks {sorted(unknown)}; use {sorted(ALL_QUIRKS)}"
        raise ValueError(msg)


def check_keys(_: object, __: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (
        isinstance(value, str)
        or not isinstance(value, Collection)
        or not all(isinstance(key, str) for key in value)
    ):
        msg = f"keys are a collection of strings or None, not {value!r}"
        raise TypeError(msg)


def check_endpoints(
    _: object, __: attrs.Attribute[Any], value: Sequence[EmulatedEndpoint]
) -> None:
    if not all(isinstance(endpoint, EmulatedEndpoint) for endpoint in value):
        msg = "endpoints are EmulatedEndpoint rows"
        raise TypeError(msg)
    paths = [endpoint.submit for endpoint in value]
    # A fetch prefix without its id is the v6 fetch by body.
    taken = set(paths) & {endpoint.fetch.rstrip("/") for endpoint in value}
    if len(set(paths)) != len(paths) or taken or not value:
        msg = f"endpoints need distinct submit paths, not {paths}"
        raise ValueError(msg)


def fault_settings(settings: Any) -> dict[str, Any]:
    """
    Checked :class:`Faults` settings from JSON.
    """
    if not isinstance(settings, Mapping):
        msg = f"faults are a mapping of settings, not {settings!r}"
        raise TypeError(msg)
    unknown = settings.keys() - FAULT_SETTABLE
    if unknown:
        msg = f"unknown fault settings {sorted(unknown)}"
        raise ValueError(msg)
    # A throwaway Faults runs the same converters and validators.
    trial = Faults(**settings)
    return {name: getattr(trial, name) for name in settings}
