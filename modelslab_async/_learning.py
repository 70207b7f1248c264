"""
Polling that learns: how the server's ``eta`` relates to the truth.

The server's ``eta`` is an estimate, and its bias is stable for an account
and an endpoint: one that is always 20% optimistic makes a client that
believes it fetch every job too early. So each client keeps, per endpoint
family, the ratio of each finished job's real duration to the ``eta`` it
was announced with, over a window of recent jobs, and schedules a new job's
first fetch at ``eta`` times the median ratio instead of the bare ``eta``.

The bounds, so that a few odd jobs cannot derail it:

- until :data:`LEAST` jobs of an endpoint have finished, the ratio is 1
  (the ``eta`` as announced);
- the window holds the last :data:`WINDOW` jobs, so a changed bias is
  learned within that many jobs;
- a ratio is clamped to [:data:`LOWEST`, :data:`HIGHEST`], and so is the
  median.

A duration is the server's ``generationTime`` when it says one, else the
time from the submit to when a webhook or fetch saw the job end, if a
fetch saw it still running close enough before that the span says
something (within :data:`INFORMATIVE` of the ``eta``). Median, not a
higher quantile: noise around an unbiased ``eta`` (±30%, say) is not
something a first fetch can beat; the backoff after it serves that, and
docs/jobs.md shows the trade-off in figures.

Deterministic: the same observations give the same schedule.
"""

from __future__ import annotations

import collections
import statistics

from typing import Final


__all__ = ["EtaLearner"]

#: Jobs of an endpoint to finish before their ratio is believed.
LEAST: Final = 8
#: Recent jobs the median is taken over.
WINDOW: Final = 128
#: The ratios believed, at most and at least.
LOWEST: Final = 0.5
HIGHEST: Final = 2.0
#: A span between "still running" and "done" longer than this share of
#: the eta says too little about when the job really ended.
INFORMATIVE: Final = 0.25


class EtaLearner:
    """
    Strictly private: one client's ratio of real durations to etas, per
    endpoint family.
    """

    __slots__ = ("_ratios", "_scales")

    def __init__(self) -> None:
        self._ratios: dict[str, collections.deque[float]] = {}
        # The median per endpoint, computed when first needed after a
        # change: jobs are submitted more often than they finish.
        self._scales: dict[str, float] = {}

    def scale(self, endpoint: str) -> float:
        """
        What to multiply an announced eta by for the first fetch.
        """
        scale = self._scales.get(endpoint)
        if scale is None:
            ratios = self._ratios.get(endpoint, ())
            scale = 1.0
            if len(ratios) >= LEAST:
                scale = _clamp(statistics.median(ratios))
            self._scales[endpoint] = scale
        return scale

    def observe(
        self,
        endpoint: str,
        *,
        eta: float | None,
        took: float | None,
        running_until: float,
        done_by: float,
    ) -> None:
        """
        Take in a finished job: it was announced with *eta*; the server
        says it *took* so long (``generationTime``), or it was seen running
        *running_until* and done *done_by* seconds after its submit.
        """
        if eta is None or eta <= 0:
            return
        if took is not None and took > 0:
            duration = took
        elif done_by - running_until <= INFORMATIVE * eta:
            duration = (running_until + done_by) / 2
        else:
            return
        ratios = self._ratios.get(endpoint)
        if ratios is None:
            ratios = self._ratios[endpoint] = collections.deque(maxlen=WINDOW)
        ratios.append(_clamp(duration / eta))
        self._scales.pop(endpoint, None)


def _clamp(ratio: float) -> float:
    return min(HIGHEST, max(LOWEST, ratio))
