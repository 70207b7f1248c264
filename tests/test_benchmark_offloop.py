"""
The off-loop decoding benchmark at tiny size: it runs and reports.

No timing is asserted here, ever: only that ``benchmarks/offloop.py`` still
runs against the current code, standalone too, and reports every figure.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys

from pathlib import Path

import pytest


pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(name="offloop")
def _offloop():
    """
    The benchmark module, which lives beside tests/, not in the wheel.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT))
        return importlib.import_module("benchmarks.offloop")


def _finite(value) -> bool:
    if isinstance(value, dict):
        return all(_finite(inner) for inner in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(inner) for inner in value)
    if isinstance(value, float | int) and not isinstance(value, bool):
        return math.isfinite(value) and value >= 0
    return True


async def test_reports_every_figure_finite(offloop):
    """Decode times per size, the hop and lag per reader, all finite."""
    results = await offloop.run(offloop.QUICK)

    json.dumps(results, allow_nan=False)
    assert _finite(results)
    assert len(results["decode"]) == len(offloop.QUICK.sizes)
    assert all(row["bytes"] > 0 for row in results["decode"])
    assert set(results["hop"]) == {"round_trip_us", "loop_cpu_us"}
    assert set(results["lag"]) == set(offloop.READERS)
    for row in results["lag"].values():
        assert row["beats"] >= 1
        assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]


def test_runs_standalone_and_prints_its_tables():
    """python -m benchmarks.offloop --quick prints both tables."""
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.offloop", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    assert "Decoding base64" in child.stdout
    assert "Thread hop:" in child.stdout
    assert "thread, in pieces, yielding (ours)" in child.stdout
    assert "nan" not in child.stdout.lower().split()
