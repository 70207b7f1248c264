"""
The off-loop decoding benchmark, standalone: it runs and prints.

No timing is asserted here, ever: only that ``python -m
benchmarks.offloop`` still runs against the current code and prints its
tables. Its figures, run as part of the suite, are checked in
``test_benchmarks.py``.
"""

from __future__ import annotations

import subprocess
import sys

from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


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
