"""
Polling that learns how far off the server's eta is.
"""

from __future__ import annotations

import pytest

from conftest import KEY
from modelslab_async import Client, Text2Img
from modelslab_async._learning import HIGHEST, LEAST, WINDOW, EtaLearner


pytestmark = pytest.mark.anyio


def observe(learner: EtaLearner, ratio: float, endpoint: str = "v6") -> None:
    learner.observe(
        endpoint, eta=10.0, took=10.0 * ratio, running_until=0, done_by=99
    )


def test_an_eta_is_believed_until_enough_jobs_have_finished():
    """Below LEAST finished jobs, the eta is used as announced."""
    learner = EtaLearner()
    for _ in range(LEAST - 1):
        observe(learner, 1.2)
    assert learner.scale("v6") == 1.0
    observe(learner, 1.2)
    assert learner.scale("v6") == pytest.approx(1.2)
    assert learner.scale("flux-klein") == 1.0  # per endpoint


def test_the_median_of_recent_jobs_is_learned():
    """The scale is the median ratio of the last WINDOW jobs."""
    learner = EtaLearner()
    for _ in range(WINDOW):
        observe(learner, 0.8)
    for ratio in [1.3] * (WINDOW // 2 + 1):
        observe(learner, ratio)

    assert learner.scale("v6") == pytest.approx(1.3)


def test_wild_ratios_are_bounded():
    """A ratio far off is clamped, so odd jobs cannot derail polling."""
    learner = EtaLearner()
    for _ in range(LEAST):
        observe(learner, 40.0)
    assert learner.scale("v6") == HIGHEST


def test_a_span_that_says_little_is_not_learned():
    """Without generationTime, only a short running-to-done span counts."""
    learner = EtaLearner()
    for _ in range(LEAST):
        # Seen running at 0 s, done at 10 s: anywhere in the eta's span.
        learner.observe("v6", eta=10, took=None, running_until=0, done_by=10)
    assert learner.scale("v6") == 1.0
    for _ in range(LEAST):
        learner.observe("v6", eta=10, took=None, running_until=11, done_by=13)
    assert learner.scale("v6") == pytest.approx(1.2)


async def test_a_steadily_optimistic_server_is_fetched_once(emulator):
    """With etas 20% short every time, later jobs are fetched once each."""
    emulator.eta = 0.15
    emulator.eta_bias = 0.2
    emulator.announce = "nominal"
    emulator.quirks = frozenset()
    async with Client(KEY, base_url=emulator.url, max_queued=None) as client:
        early = [
            await client.generate(Text2Img(prompt="p")) for _ in range(LEAST)
        ]
        later = [await client.generate(Text2Img(prompt="q")) for _ in range(6)]

    assert all(emulator.fetches(r.id) >= 2 for r in early)
    assert [emulator.fetches(r.id) for r in later] == [1] * 6
