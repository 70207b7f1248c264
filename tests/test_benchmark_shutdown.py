"""
The shutdown and lag benchmarks at tiny size: they run and report.

No timing is asserted here, ever: only that ``benchmarks/shutdown.py`` and
``benchmarks/lag.py`` still run against the current code, standalone too,
and report every figure, finite.
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


def _module(name: str):
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT))
        return importlib.import_module(f"benchmarks.{name}")


def _finite(value) -> bool:
    if isinstance(value, dict):
        return all(_finite(inner) for inner in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(inner) for inner in value)
    if isinstance(value, float | int) and not isinstance(value, bool):
        return math.isfinite(value) and value >= 0
    return True


async def test_shutdown_reports_every_scenario():
    """Close, cancel and bare rows, and batch CPU per level, all finite."""
    shutdown = _module("shutdown")

    results = await shutdown.run(shutdown.QUICK)

    json.dumps(results, allow_nan=False)
    assert _finite(results)
    assert set(results["scenarios"]) == {
        f"{name}{suffix}"
        for name in ("close", "cancel", "bare asyncio")
        for suffix in ("", ", gc.freeze()")
    }
    for row in results["scenarios"].values():
        assert row["all_s"] > 0
        assert row["max_lag_ms"] >= (row["p99_lag_ms"] or 0)
    levels = {str(level) for level in shutdown.QUICK.levels}
    for rows in results["batch"].values():
        assert set(rows) == levels
        assert all(row["cpu_us_per_job"] > 0 for row in rows.values())


async def test_lag_reports_every_row():
    """Ours and all-on-the-loop rows, per JSON backend, all finite."""
    lag = _module("lag")

    results = await lag.run(lag.QUICK)

    json.dumps(results, allow_nan=False)
    assert _finite(results)
    assert {name.split(", ")[0] for name in results["rows"]} == {
        "ours",
        "all on the loop",
    }
    for row in results["rows"].values():
        assert row["beats"] >= 1
        assert row["image_bytes_per_job"] > 0


def test_shutdown_runs_standalone_and_writes_json(tmp_path):
    """python -m benchmarks.shutdown --quick prints its tables and JSON."""
    out = tmp_path / "shutdown.json"
    command = [sys.executable, "-m", "benchmarks.shutdown", "--quick"]

    child = subprocess.run(
        [*command, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    assert "submits waiting for a queue slot" in child.stdout
    assert "generate_many" in child.stdout
    assert "nan" not in child.stdout.lower().split()
    assert set(json.loads(out.read_text(encoding="utf-8"))) >= {
        "scenarios",
        "batch",
    }
