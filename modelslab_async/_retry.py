"""
How long to wait before trying a request again.
"""

from __future__ import annotations

import random

import attrs

from .errors import InvalidRequestError


__all__ = ["RetryPolicy"]


def _not_negative(
    _: object, attribute: attrs.Attribute[float], value: float
) -> None:
    if value < 0:
        raise InvalidRequestError(attribute.name, value, "must be >= 0")


def _one_or_more(
    _: object, attribute: attrs.Attribute[int], value: int
) -> None:
    if value < 1:
        raise InvalidRequestError(attribute.name, value, "must be >= 1")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """
    Retries with capped exponential backoff and jitter.

    The parameter names and the backoff formula are stamina's, so
    ``wait_initial * wait_exp_base ** (attempt - 1) + jitter``, capped at
    *wait_max*. A ``retry_after`` from the server (JSON body or
    ``Retry-After`` header) replaces the computed wait, capped at
    *retry_after_max*.

    Fetches, downloads and ``system_details`` are retried on transport
    errors, timeouts, 5xx, 429 and unreadable bodies. Submits and the other
    management calls are retried only when the server provably did not take
    them; see :doc:`/errors-and-retries`. A 429 ("queue full, come back
    later") does not count as a failed attempt: it is waited out for as
    long as *timeout* and the caller's deadline allow.

    Args:
        attempts: Failed tries allowed, the first included; 1 disables
            retries.
        timeout: Seconds after the first try when no new try starts.
            ``None`` for no limit besides *attempts* and your deadline.
        wait_initial: The first backoff, in seconds.
        wait_max: The longest computed backoff.
        wait_jitter: Up to this many random seconds added to each backoff.
        wait_exp_base: The backoff's growth factor.
        retry_after_max: The longest wait a server's ``retry_after`` can ask.
    """

    attempts: int = attrs.field(default=10, validator=_one_or_more)
    # Longer than stamina's 45 s: a queue shared with another process may
    # stay full for a few of its documented 30 s retry_after periods.
    timeout: float | None = 120.0
    wait_initial: float = attrs.field(default=0.1, validator=_not_negative)
    wait_max: float = attrs.field(default=5.0, validator=_not_negative)
    wait_jitter: float = attrs.field(default=1.0, validator=_not_negative)
    wait_exp_base: float = attrs.field(default=2.0, validator=_not_negative)
    retry_after_max: float = attrs.field(default=60.0, validator=_not_negative)

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """
        A policy that never retries: for tests that want the first error.
        """
        return cls(attempts=1, timeout=0.0)

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """
        Seconds to wait after failed try number *attempt* (from 1).
        """
        if retry_after is not None:
            return min(retry_after, self.retry_after_max)
        computed = self.wait_initial * self.wait_exp_base ** (attempt - 1)
        return min(
            self.wait_max,
            computed + random.uniform(0, self.wait_jitter),  # noqa: S311
        )
