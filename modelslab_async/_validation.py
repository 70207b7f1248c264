"""
Checking values against documented limits, naming the field, the value and
the limit: for requests, client settings and retry policies alike.

Strictly private: the checks are package-internal; their errors are the
public :class:`~modelslab_async.errors.InvalidRequestError`.
"""

from __future__ import annotations

import functools
import math
import operator

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final, TypeVar, get_args
from urllib.parse import urlsplit

import attrs

from .errors import InvalidRequestError


__all__ = [
    "Check",
    "Checked",
    "checked",
    "extra_fields",
    "field",
    "flag",
    "freeze",
    "integer",
    "number",
    "one_of",
    "optional",
    "positive",
    "text",
    "url",
]

#: A field's check: ``(field name, value)``; raises InvalidRequestError.
Check = Callable[[str, Any], None]
_CHECK: Final = "modelslab_async.check"


def field(check: Callable[..., None], **options: Any) -> Any:
    """
    An attrs field with its check, run by :class:`Checked`.

    *check* is a :data:`Check`, or :func:`extra_fields`, which
    :func:`checked` binds to the class's field names.
    """
    return attrs.field(metadata={_CHECK: check}, **options)


def optional(check: Check, **options: Any) -> Any:
    """
    A field that may be left out (``None``): checked only when set.
    """
    return field(check, default=None, **options)


class Checked:
    """
    Runs the fields' checks in one pass, after construction.

    attrs validators would run all of them on every construction; a request
    sets a few of its ~30 fields, so only set ones (and those whose unset
    value is not ``None``) are checked. Classes opt in with
    :func:`checked`; ``cross_check`` then sees the whole object.
    """

    __slots__ = ()
    _checks: ClassVar[tuple[tuple[str, Check], ...]] = ()
    _values: ClassVar[Callable[[Any], tuple[Any, ...]]]
    #: Fields for which None is never valid: required, or a real default.
    _required: ClassVar[tuple[tuple[str, Check], ...]] = ()

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
        self.cross_check()

    def cross_check(self) -> None:
        """
        Checks that involve several fields; none by default.
        """


_C = TypeVar("_C", bound=type[Checked])


def checked(cls: _C) -> _C:
    """
    Collect *cls*'s field checks, once, when the class is made.
    """
    fields: tuple[attrs.Attribute[Any], ...] = attrs.fields(cls)  # type: ignore[arg-type]
    declared = frozenset(f.name for f in fields)
    checks = []
    required = []
    for attribute in fields:
        check = attribute.metadata.get(_CHECK)
        if check is extra_fields:
            check = functools.partial(extra_fields, declared)
        if check is not None:
            checks.append((attribute.name, check))
            if attribute.default is not None:
                required.append((attribute.name, check))
    cls._checks = tuple(checks)
    cls._required = tuple(required)
    cls._values = operator.attrgetter(*(name for name, _ in checks))
    return cls


def _is_number(value: Any) -> bool:
    # bool is an int subclass; True as a width is always a mistake.
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(low: int | None = None, high: int | None = None) -> Check:
    """
    An integer, within ``[low, high]`` where given.
    """
    limit = (
        f"must be an integer from {low} to {high}"
        if high is not None
        else f"must be an integer of at least {low}"
        if low is not None
        else "must be an integer"
    )

    def check(name: str, value: Any) -> None:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            raise InvalidRequestError(name, value, limit)

    return check


def number(low: float, high: float) -> Check:
    """
    A finite number within ``[low, high]``.
    """
    limit = f"must be a number from {low:g} to {high:g}"

    def check(name: str, value: Any) -> None:
        if not _is_number(value) or not low <= value <= high:
            raise InvalidRequestError(name, value, limit)

    return check


def positive(*, infinite: bool = False) -> Check:
    """
    A number above 0; finite unless *infinite* allows ``math.inf``.
    """
    limit = (
        "must be a number above 0, or math.inf"
        if infinite
        else "must be a finite number above 0"
    )

    def check(name: str, value: Any) -> None:
        if not _is_number(value) or not value > 0:
            raise InvalidRequestError(name, value, limit)
        if not math.isfinite(value) and not (infinite and value == math.inf):
            raise InvalidRequestError(name, value, limit)

    return check


def flag(name: str, value: Any) -> None:
    """
    ``True`` or ``False``, nothing truthy.
    """
    if not isinstance(value, bool):
        raise InvalidRequestError(name, value, "must be True or False")


def text(*, required: bool = False) -> Check:
    """
    A string; non-blank when *required*.
    """
    limit = "must be a non-empty string" if required else "must be a string"

    def check(name: str, value: Any) -> None:
        if not isinstance(value, str) or (required and not value.strip()):
            raise InvalidRequestError(name, value, limit)

    return check


def one_of(alias: object) -> Check:
    """
    One of the values of a ``Literal`` alias.
    """
    choices = get_args(alias)
    shown = ", ".join(map(repr, choices[:6]))
    more = f" and {len(choices) - 6} more" if len(choices) > 6 else ""
    limit = f"must be one of {shown}{more}"

    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise InvalidRequestError(name, value, limit)

    return check


def url(name: str, value: Any) -> None:
    """
    An absolute http(s) URL with a host.
    """
    limit = "must be an http(s) URL with a host"
    if not isinstance(value, str):
        raise InvalidRequestError(name, value, limit)
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        raise InvalidRequestError(name, value, limit) from None
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidRequestError(name, value, limit)


def freeze(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """
    A read-only copy of a mapping, for frozen classes.
    """
    return MappingProxyType(dict(value))


def extra_fields(declared: frozenset[str], name: str, value: Any) -> None:
    """
    Undocumented fields: string keys, never the key, never a real field.

    :func:`checked` binds *declared* to the class's field names.
    """
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
