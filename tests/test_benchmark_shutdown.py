"""
The shutdown and lag benchmarks, standalone: they run and print.

No timing is asserted here, ever: only that ``benchmarks/shutdown.py`` and
``benchmarks/lag.py`` still run standalone, print their tables and write
their JSON. Their figures, run as part of the suite, are checked in
``test_benchmarks.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("name", "printed", "keys"),
    [
        (
            "shutdown",
            ("submits waiting for a queue slot", "generate_many"),
            {"scenarios", "batch"},
        ),
        ("lag", ("inline noise PNGs", "target: p99"), {"rows", "settings"}),
    ],
)
def test_runs_standalone_and_writes_json(tmp_path, name, printed, keys):
    """python -m benchmarks.NAME --quick prints its tables and JSON."""
    out = tmp_path / f"{name}.json"
    command = [sys.executable, "-m", f"benchmarks.{name}", "--quick"]

    child = subprocess.run(
        [*command, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    for text in printed:
        assert text in child.stdout
    assert "nan" not in child.stdout.lower().split()
    assert set(json.loads(out.read_text(encoding="utf-8"))) >= keys
