"""
Faults the emulator can inject, per route, by probability or by schedule.
"""

from __future__ import annotations

import random

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, TypeAlias, get_args

import attrs


__all__ = ["FAULT_KINDS", "FaultKind", "Faults", "Route"]

#: What can go wrong with one answer.
#:
#: - ``http_500`` / ``http_503``: a JSON error body, the API refusing.
#: - ``bad_gateway``: a 502 HTML page from a proxy, after the job was made.
#: - ``rate_limit``: 429 with ``retry_after`` in the body.
#: - ``reset_before``: the connection drops before anything is recorded.
#: - ``reset_after``: the job is recorded, then the connection drops.
#: - ``stall``: the job is recorded, then no answer for ``stall_seconds``.
#: - ``malformed``: HTTP 200 with truncated JSON, after the job was made.
#: - ``html``: HTTP 200 with an HTML page, after the job was made.
#: - ``empty``: HTTP 200 with an empty body, after the job was made.
#: - ``slow_body``: the right answer, dribbled out over ``stall_seconds/10``.
FaultKind: TypeAlias = Literal[
    "http_500",
    "http_503",
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


def _frozen_rates(
    value: Mapping[Route, Mapping[FaultKind, float]],
) -> Mapping[Route, Mapping[FaultKind, float]]:
    for route, rates in value.items():
        if route not in ROUTES:
            msg = f"unknown route {route!r}; use one of {ROUTES}"
            raise ValueError(msg)
        for kind, rate in rates.items():
            if kind not in FAULT_KINDS or not 0 <= rate <= 1:
                msg = f"bad fault {kind!r}={rate!r} for {route}"
                raise ValueError(msg)
        if sum(rates.values()) > 1:
            msg = f"fault rates for {route} add up to more than 1"
            raise ValueError(msg)
    return {route: dict(rates) for route, rates in value.items()}


@attrs.define(kw_only=True)
class Faults:
    """
    Which answers go wrong, and how.

    Args:
        rates: Per route, the probability of each fault kind.
        schedule: Per route, the faults of the next answers in order
            (``None`` for a good answer); used before *rates*.
        webhook_drop: Probability a webhook is never sent.
        webhook_duplicate: Probability a webhook is sent twice.
        webhook_delay: Seconds every webhook is held back.
        stall_seconds: How long a ``stall`` keeps the client waiting.
        seed: Seeds the random choices, for repeatable runs.
    """

    rates: Mapping[Route, Mapping[FaultKind, float]] = attrs.field(
        factory=dict, converter=_frozen_rates
    )
    schedule: Mapping[Route, Sequence[FaultKind | None]] = attrs.field(
        factory=dict
    )
    webhook_drop: float = 0.0
    webhook_duplicate: float = 0.0
    webhook_delay: float = 0.0
    stall_seconds: float = 30.0
    seed: int | None = 0
    injected: Counter[tuple[str, str]] = attrs.field(
        init=False, factory=Counter
    )
    _random: random.Random = attrs.field(init=False)
    _queues: dict[str, deque[FaultKind | None]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._queues = {
            route: deque(kinds) for route, kinds in self.schedule.items()
        }

    @classmethod
    def mixed(
        cls,
        rate: float,
        *,
        routes: Iterable[Route] = ("submit", "fetch", "download"),
        kinds: Iterable[FaultKind] = FAULT_KINDS,
        **kwargs: float | None,
    ) -> Faults:
        """
        *rate* of the answers on *routes* go wrong, spread over *kinds*.
        """
        chosen = tuple(kinds)
        share = rate / len(chosen)
        return cls(
            rates={route: dict.fromkeys(chosen, share) for route in routes},
            **kwargs,  # type: ignore[arg-type]
        )

    def pick(self, route: Route) -> FaultKind | None:
        """
        The fault for the next answer on *route*, and count it.
        """
        queue = self._queues.get(route)
        if queue:
            kind = queue.popleft()
        else:
            kind = None
            roll = self._random.random()
            for candidate, rate in self.rates.get(route, {}).items():
                if roll < rate:
                    kind = candidate
                    break
                roll -= rate
        if kind is not None:
            self.injected[route, kind] += 1
        return kind

    def roll(self, probability: float) -> bool:
        """
        ``True`` with *probability*.
        """
        return probability > 0 and self._random.random() < probability
