"""
Results to JSON, and JSON to ``docs/performance.md``.

The page is generated whole from the results, so what it says is always
what was measured; nothing in it is edited by hand.

This module is the page's skeleton (the machine, the targets table, the
"running it" footer) and the helpers every section shares. Each benchmark
module owns the rest: its section (``render(data)``) and its rows of the
targets table (``targets(data)``), from its own results only, so that a
benchmark rerun alone (``--only``) or missing renders the same way. See
:class:`Benchmark` for what a module provides.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol


DASH: Final = "–"  # noqa: RUF001 (an en dash, for ranges)


class Target(NamedTuple):
    """
    One row of the targets table.
    """

    #: The issue that set the target (``"13"``), for grouping.
    issue: str
    figure: str
    target: str
    measured: str
    verdict: str
    #: The figure behind the verdict, and a link to the section.
    explained: str = ""


class Benchmark(Protocol):
    """
    What a benchmark module provides to the suite: ``python -m benchmarks``
    runs ``run(QUICK or FULL)``, stores the result under the module's
    name, and the page shows ``targets(result)`` in its targets table and
    ``render(result)`` as the module's section.
    """

    @property
    def FULL(self) -> object: ...  # noqa: N802 (module constants)

    @property
    def QUICK(self) -> object: ...  # noqa: N802

    def run(self, settings: Any, /) -> Awaitable[dict[str, Any]]: ...

    def targets(self, data: dict[str, Any], /) -> list[Target]: ...

    def render(self, data: dict[str, Any], /) -> list[str]: ...


#: The issues, for the headings of the targets table.
ISSUES: Final = {
    "6": "Issue 6: the benchmark suite and a light client",
    "9": "Issue 9: jobs that outlive the process",
    "10": "Issue 10: never bill twice, never freeze",
    "12": "Issue 12: many processes, one account",
    "13": "Issue 13: performance as users feel it",
}


# --- facts -------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict[str, Any]:
    """
    What the figures depend on besides our code.
    """
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "os": platform.platform(terse=True),
        "aiohttp": _version("aiohttp"),
        "modelslab_async": _version("modelslab-async"),
        "modelslab_py": _version("modelslab-py"),
        "redis_py": _version("redis"),
        "uvloop": _version("uvloop"),
        "orjson": _version("orjson"),
        "load_average_at_start": None if load is None else list(load),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


# --- JSON --------------------------------------------------------------------


def write_json(results: dict[str, Any], path: Path) -> None:
    """
    Write *results* through a temporary file, so a crash leaves the old.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    text = json.dumps(results, indent=2, sort_keys=True, allow_nan=False)
    temporary.write_text(text + "\n", encoding="utf-8")
    temporary.replace(path)


def read_json(path: Path) -> dict[str, Any] | None:
    """
    Earlier results, to merge a partial run (``--only``) into.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- formatting, for every section -------------------------------------------


def number(value: float | None, digits: int = 0) -> str:
    """
    *value* with thousands separators; ``n/a`` for nothing.
    """
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def spread(figure: dict[str, Any] | None, digits: int = 0) -> str:
    """
    ``median (min-max)`` of a summary, with an en dash.
    """
    if figure is None or figure.get("median") is None:
        return "n/a"
    median, low, high = (
        number(figure[k], digits) for k in ("median", "min", "max")
    )
    if low == high:
        return median
    return f"{median} ({low}{DASH}{high})"


def ratio(figure: dict[str, Any] | None) -> str:
    """
    ``median (min-max)`` of a summary of ratios, each with an ``x``.
    """
    if figure is None or figure.get("median") is None:
        return "n/a"
    median, low, high = (f"{figure[k]:.2f}x" for k in ("median", "min", "max"))
    if low == high:
        return median
    return f"{median} ({low}{DASH}{high})"


def percent(value: float | None, digits: int = 1) -> str:
    """
    A share as a percentage; ``n/a`` for nothing.
    """
    return "n/a" if value is None else f"{value * 100:.{digits}f} %"


def table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """
    A Markdown table, and the blank line after it.
    """
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def verdict(met: bool | None, gap: str = "") -> str:
    """
    ``**met**``, ``**not met**`` with how far off, or not measured.
    """
    if met is None:
        return "not measured"
    return "**met**" if met else f"**not met**{gap}"


def at_most(value: float | None, limit: float, unit: str = "") -> str:
    """
    The verdict on an upper limit, with how far over.
    """
    if value is None:
        return verdict(None)
    return verdict(value <= limit, f": {value - limit:,.2f}{unit} over")


def at_least(value: float | None, limit: float, unit: str = "") -> str:
    """
    The verdict on a lower limit, with how far short.
    """
    if value is None:
        return verdict(None)
    return verdict(value >= limit, f": {limit - value:,.2f}{unit} short")


def not_run(issue: str, figure: str, target: str, why: str = "") -> Target:
    """
    A target row for a figure no run produced.
    """
    return Target(issue, figure, target, "not run", "", why)


# --- the page ----------------------------------------------------------------


def _header(meta: dict[str, Any]) -> list[str]:
    facts = meta["machine"]
    load = facts.get("load_average_at_start")
    rows = [
        ("Command", f"`{meta['command']}`"),
        ("CPU", facts["cpu"]),
        ("Cores", str(facts["cores"])),
        ("Python", f"{facts['implementation']} {facts['python']}"),
        ("aiohttp", facts["aiohttp"] or "n/a"),
        ("modelslab-py", facts["modelslab_py"] or "not installed"),
        ("redis-py", facts.get("redis_py") or "not installed"),
        ("uvloop / orjson", f"{facts['uvloop']} / {facts['orjson']}"),
        ("OS", facts["os"]),
        ("Date (UTC)", facts["date"]),
        (
            "Load average at start",
            "n/a" if load is None else " / ".join(f"{x:.2f}" for x in load),
        ),
        (
            "Runtime",
            f"{meta['seconds']:.0f} s for "
            + ", ".join(meta.get("ran", ["everything"])),
        ),
    ]
    return [
        "# Performance",
        "",
        "This page is generated by `python -m benchmarks` (which is what",
        "`nox -s bench` runs) and rewritten by every run: do not edit it by",
        "hand. The raw figures are in `benchmarks/results/latest.json`.",
        "",
        "Every comparison was measured side by side in one run. Each figure",
        "is the median over repeated rounds, with the minimum and maximum",
        "in brackets; a ratio is taken within each round and then",
        "summarised. The emulator runs in a process of its own, so server",
        "work never shares the client's event loop. A busy machine widens",
        "the ranges: the load average below says how quiet it was.",
        "",
        "## The machine",
        "",
        *table(("Fact", "Value"), rows),
    ]


def _targets(
    results: dict[str, Any], benchmarks: Mapping[str, Benchmark]
) -> list[str]:
    measured = results.get("benchmarks", {})
    rows: list[Target] = []
    for name, module in benchmarks.items():
        data = measured.get(name)
        if data is not None:
            rows += module.targets(data)
    issues = sorted({row.issue for row in rows}, key=_issue_order)
    lines = [
        "## Targets",
        "",
        "Every target an issue set, with the figure measured in this run",
        "and its verdict; the last column gives the figure that explains",
        "the verdict and links the section with the details. Grouped by",
        "the issue that set the target, newest first.",
        "",
    ]
    for issue in issues:
        lines += [
            f"### {ISSUES.get(issue, f'Issue {issue}')}",
            "",
            *table(
                ("Figure", "Target", "Measured", "Verdict", "Explained by"),
                (row[1:] for row in rows if row.issue == issue),
            ),
        ]
    not_ran = [name for name in benchmarks if name not in measured]
    if not_ran:
        lines += [
            "Not run, so neither in this table nor below: "
            + ", ".join(not_ran)
            + ".",
            "",
        ]
    return lines


def _issue_order(issue: str) -> tuple[int, str]:
    return (-int(issue) if issue.isdigit() else 0, issue)


def render(
    results: dict[str, Any], benchmarks: Mapping[str, Benchmark]
) -> str:
    """
    The Markdown (MyST) page for *results*, with a section for each of
    *benchmarks* (name to module, in page order) that has results.
    """
    lines = [*_header(results["meta"]), *_targets(results, benchmarks)]
    measured = results.get("benchmarks", {})
    for name, module in benchmarks.items():
        data = measured.get(name)
        if data is not None:
            lines += module.render(data)
    lines += [
        "## Running it",
        "",
        "```sh",
        "nox -s bench                   # what produced this page",
        "python -m benchmarks --quick   # tiny sizes, writes nothing here",
        "python -m benchmarks --only makespan",
        "```",
        "",
        "`--only` reruns one benchmark and merges it into the results. The",
        "test suite runs every benchmark at tiny sizes and checks only the",
        "shape of its results, never a timing.",
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_doc(
    results: dict[str, Any], path: Path, benchmarks: Mapping[str, Benchmark]
) -> None:
    """
    Render *results* to *path*.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(results, benchmarks), encoding="utf-8")


def command_line(argv: Sequence[str]) -> str:
    """
    The command as typed, for the page.
    """
    return " ".join(["python -m benchmarks", *argv]).strip()


def write_alone(
    data: dict[str, Any],
    *,
    module: str,
    argv: Sequence[str] | None,
    quick: bool,
    out: Path | None,
    results: Path,
    started: float,
) -> Path:
    """
    Write the results of a benchmark run on its own (``python -m
    benchmarks.NAME``), with how it ran: to *out*, else *results*, else
    (``--quick``, whose figures mean nothing) a temporary file.
    """
    data["meta"] = {
        "command": " ".join(
            [f"python -m benchmarks.{module}", *(argv or sys.argv[1:])]
        ),
        "quick": quick,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": [round(n, 2) for n in os.getloadavg()],
        "seconds": round(time.monotonic() - started, 1),
    }
    path = out or (
        Path(tempfile.gettempdir()) / results.name if quick else results
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def run_alone(
    benchmark: Benchmark,
    *,
    module: str,
    argv: Sequence[str] | None,
    quick: bool,
    out: Path | None,
    results: Path,
    table: Callable[[dict[str, Any]], str],
) -> int:
    """
    ``python -m benchmarks.NAME`` for a benchmark that may be skipped:
    run it, write its results (:func:`write_alone`), print *table* of its
    figures; the exit status.
    """
    started = time.monotonic()
    settings = benchmark.QUICK if quick else benchmark.FULL

    async def measured() -> dict[str, Any]:
        return await benchmark.run(settings)

    data = asyncio.run(measured())
    if "skipped" in data:
        print(data["skipped"], file=sys.stderr)
        return 1
    path = write_alone(
        data,
        module=module,
        argv=argv,
        quick=quick,
        out=out,
        results=results,
        started=started,
    )
    print(table(data["figures"]))
    print(f"results: {path}")
    return 0
