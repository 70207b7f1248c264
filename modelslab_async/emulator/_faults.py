"""
Faults the emulator can inject, per route, by probability or by schedule:
choosing them (:class:`Faults`) and answering with them (:func:`render`).
"""

from __future__ import annotations

import asyncio
import json
import random

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias, get_args

import attrs

from aiohttp import web

from ._wire import SERVER_ERROR, UNAVAILABLE, Wire


__all__ = [
    "EARLY",
    "FAULT_KINDS",
    "ROUTES",
    "FaultKind",
    "Faults",
    "Refusal",
    "Route",
    "answered_status",
    "render",
]

#: What can go wrong with one answer. "After" faults happen once the work
#: is done: on a submit the job exists, on a fetch the fetch is counted.
#:
#: - ``http_500`` / ``http_503``: a JSON error body, the API refusing
#:   before any job exists.
#: - ``http_500_after``: the job is made, then HTTP 500 with the
#:   documented JSON body ``{"status": "error", "message": "Internal server
#:   error. Please try again."}`` (``messege`` with that quirk). A client
#:   that believes the body and submits again makes a second job.
#: - ``bad_gateway``: a 502 HTML page from a proxy, after the job was made.
#: - ``rate_limit``: 429 with ``retry_after`` in the body.
#: - ``reset_before``: the connection drops before anything is recorded.
#: - ``reset_after``: the job is made, then the connection is cut.
#: - ``stall``: the job is made, then no answer for ``stall_seconds``.
#: - ``malformed``: HTTP 200 with truncated JSON, after the job was made.
#: - ``html``: HTTP 200 with an HTML page, after the job was made.
#: - ``empty``: HTTP 200 with an empty body, after the job was made.
#: - ``slow_body``: the right answer, dribbled out over ``stall_seconds/10``.
FaultKind: TypeAlias = Literal[
    "http_500",
    "http_503",
    "http_500_after",
    "bad_gateway",
    "rate_limit",
    "reset_before",
    "reset_after",
    "stall",
    "malformed",
    "html",
    "empty",
    "slow_body",
]
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)

#: Where a fault applies.
Route: TypeAlias = Literal["submit", "fetch", "download"]
ROUTES: tuple[Route, ...] = get_args(Route)

#: The faults answered before any work is done, with their HTTP status; 0
#: is a dropped connection.
EARLY: Final[Mapping[FaultKind, int]] = {
    "reset_before": 0,
    "http_500": 500,
    "http_503": 503,
    "rate_limit": 429,
}
#: The HTTP status of the faults answered after the work; 200 otherwise.
_LATE: Final[Mapping[FaultKind, int]] = {
    "http_500_after": 500,
    "bad_gateway": 502,
    "reset_after": 0,
}


class Refusal(Exception):  # noqa: N818 (an answer, not a failure of ours)
    """
    An answer given before any job exists: an error body, or (with
    *fault*) an injected fault.
    """

    def __init__(
        self,
        status: int,
        message: str = "",
        *,
        fault: FaultKind | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.fault = fault
        self.extra = extra


def answered_status(kind: FaultKind) -> int:
    """
    The HTTP status a fault of *kind* answers with; 0 for a cut
    connection.
    """
    if kind in EARLY:
        return EARLY[kind]
    return _LATE.get(kind, 200)


def _frozen_rates(value: Any) -> Mapping[Route, Mapping[FaultKind, float]]:
    if not isinstance(value, Mapping) or not all(
        isinstance(rates, Mapping) for rates in value.values()
    ):
        msg = f"fault rates are {{route: {{kind: rate}}}}, not {value!r}"
        raise TypeError(msg)
    for route, rates in value.items():
        if route not in ROUTES:
            msg = f"unknown route {route!r}; use one of {ROUTES}"
            raise ValueError(msg)
        for kind, rate in rates.items():
            if (
                kind not in FAULT_KINDS
                or isinstance(rate, bool)
                or not isinstance(rate, int | float)
                or not 0 <= rate <= 1
            ):
                msg = f"bad fault {kind!r}={rate!r} for {route}"
                raise ValueError(msg)
        if sum(rates.values()) > 1:
            msg = f"fault rates for {route} add up to more than 1"
            raise ValueError(msg)
    return {route: dict(rates) for route, rates in value.items()}


def _probability(
    _: object, attribute: attrs.Attribute[Any], value: Any
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{attribute.name} is a number, not {value!r}"
        raise TypeError(msg)
    if not 0 <= value <= 1:
        msg = f"{attribute.name} is a probability, 0 to 1, not {value!r}"
        raise ValueError(msg)


def _seconds(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{attribute.name} is a number of seconds, not {value!r}"
        raise TypeError(msg)
    if not 0 <= value < float("inf"):
        msg = f"{attribute.name} must be 0 or more, not {value!r}"
        raise ValueError(msg)


def _queues(
    schedule: Mapping[Route, Sequence[FaultKind | None]],
) -> dict[str, deque[FaultKind | None]]:
    for route, kinds in schedule.items():
        unknown = [k for k in kinds if k is not None and k not in FAULT_KINDS]
        if route not in ROUTES or unknown:
            msg = f"bad schedule for {route!r}: {list(kinds)!r}"
            raise ValueError(msg)
    return {route: deque(kinds) for route, kinds in schedule.items()}


@attrs.define(kw_only=True)
class Faults:
    """
    Which answers go wrong, and how.

    Every setting but *seed* may be changed while the emulator runs;
    assigning *schedule* starts it over.

    Args:
        rates: Per route, the probability of each fault kind.
        schedule: Per route, the faults of the next answers in order
            (``None`` for a good answer); used before *rates*.
        webhook_drop: Probability a webhook is never sent.
        webhook_duplicate: Probability a webhook is sent twice.
        webhook_delay: Seconds every webhook is held back.
        stall_seconds: How long a ``stall`` keeps the client waiting.
        seed: Seeds the random choices, for repeatable runs.

    Attributes:
        injected: How many faults were applied, per ``(route, kind)``;
            webhooks count as ``("webhook", "drop")`` and
            ``("webhook", "duplicate")``.
    """

    rates: Mapping[Route, Mapping[FaultKind, float]] = attrs.field(
        factory=dict, converter=_frozen_rates
    )

    def _reschedule(
        self,
        _: attrs.Attribute[Any],
        schedule: Mapping[Route, Sequence[FaultKind | None]],
    ) -> Mapping[Route, Sequence[FaultKind | None]]:
        # attrs' on_setattr hook for *schedule*: a new one starts over.
        self._queues = _queues(schedule)
        return schedule

    schedule: Mapping[Route, Sequence[FaultKind | None]] = attrs.field(
        factory=dict, on_setattr=_reschedule
    )
    webhook_drop: float = attrs.field(default=0.0, validator=_probability)
    webhook_duplicate: float = attrs.field(default=0.0, validator=_probability)
    webhook_delay: float = attrs.field(default=0.0, validator=_seconds)
    stall_seconds: float = attrs.field(default=30.0, validator=_seconds)
    seed: int | None = 0
    injected: Counter[tuple[str, str]] = attrs.field(
        init=False, factory=Counter
    )
    _random: random.Random = attrs.field(init=False)
    _queues: dict[str, deque[FaultKind | None]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._queues = _queues(self.schedule)

    @classmethod
    def mixed(
        cls,
        rate: float,
        *,
        routes: Iterable[Route] = ROUTES,
        kinds: Iterable[FaultKind] = FAULT_KINDS,
        **kwargs: float | None,
    ) -> Faults:
        """
        *rate* of the answers on *routes* go wrong, spread over *kinds*
        (by default every kind, ``http_500_after`` included: a client must
        treat any 500 on a submit as a job that may exist).
        """
        chosen = tuple(kinds)
        share = rate / len(chosen)
        return cls(
            rates={route: dict.fromkeys(chosen, share) for route in routes},
            **kwargs,  # type: ignore[arg-type]
        )

    def choose(self, route: Route) -> FaultKind | None:
        """
        The fault for the next answer on *route*, not yet counted.
        """
        queue = self._queues.get(route)
        if queue:
            return queue.popleft()
        roll = self._random.random()
        for candidate, rate in self.rates.get(route, {}).items():
            if roll < rate:
                return candidate
            roll -= rate
        return None

    def pick(self, route: Route) -> FaultKind | None:
        """
        The fault for the next answer on *route*, and count it.
        """
        kind = self.choose(route)
        if kind is not None:
            self.count(route, kind)
        return kind

    def count(self, route: str, kind: str) -> None:
        """
        Count a fault of *kind* applied on *route*.
        """
        self.injected[route, kind] += 1

    def roll(self, probability: float) -> bool:
        """
        ``True`` with *probability*.
        """
        return probability > 0 and self._random.random() < probability


async def render(  # noqa: PLR0911 (one answer per fault kind)
    request: web.Request,
    kind: FaultKind,
    answer: dict[str, Any] | bytes,
    *,
    wire: Wire,
    stall_seconds: float,
    retry_after: float,
) -> web.StreamResponse:
    """
    Answer *answer* to *request* the way fault *kind* says.
    """
    status = answered_status(kind)
    if kind in ("reset_before", "reset_after"):
        assert request.transport is not None  # noqa: S101 (aiohttp sets it)
        request.transport.close()
        return web.Response()
    errors = {
        "http_500": SERVER_ERROR,
        "http_500_after": SERVER_ERROR,
        "http_503": UNAVAILABLE,
        "rate_limit": "Rate limit exceeded. Maximum queued requests reached.",
    }
    if kind in errors:
        extra = {"retry_after": retry_after} if kind == "rate_limit" else {}
        return web.json_response(
            wire.error(errors[kind], **extra), status=status
        )
    pages = {
        "bad_gateway": "<html><body><h1>502 Bad Gateway</h1></body></html>",
        "html": "<!DOCTYPE html><html><body>Error</body></html>",
    }
    if kind in pages:
        return web.Response(
            status=status, text=pages[kind], content_type="text/html"
        )
    if kind == "empty":
        return web.Response(body=b"", content_type="application/json")
    if kind == "stall":
        await asyncio.sleep(stall_seconds)
    raw = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
    content_type = (
        "application/json"
        if isinstance(answer, dict)
        else "application/octet-stream"
    )
    if kind == "malformed":
        return web.Response(
            body=raw[: max(1, len(raw) // 2)], content_type=content_type
        )
    if kind == "slow_body":
        response = web.StreamResponse()
        response.content_length = len(raw)
        response.content_type = content_type
        await response.prepare(request)
        step = max(1, len(raw) // 4)
        for start in range(0, len(raw), step):
            await response.write(raw[start : start + step])
            await asyncio.sleep(stall_seconds / 40)
        await response.write_eof()
        return response
    if isinstance(answer, dict):
        return web.json_response(answer)
    return web.Response(body=answer)
