"""
``python -m benchmarks [--quick] [--only NAME] [--out PATH] [--doc PATH]``.

Runs the benchmarks, writes their results as JSON and regenerates
``docs/performance.md`` from them. ``--quick`` runs tiny sizes and writes
to a temporary directory unless told otherwise: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from . import (
    hotpaths,
    journal,
    lag,
    makespan,
    many_processes,
    offloop,
    outputs,
    polling,
    redis_store,
    report,
    scale,
    shutdown,
    throughput,
    webhooks,
)


ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = ROOT / "benchmarks" / "results" / "latest.json"
DOC: Final = ROOT / "docs" / "performance.md"

#: In the order they run and appear on the page. Each module provides what
#: :class:`report.Benchmark` says (FULL, QUICK, run, targets, render), so a
#: new benchmark is one line here.
BENCHMARKS: Final[dict[str, report.Benchmark]] = {
    "makespan": makespan,
    "throughput": throughput,
    "polling": polling,
    "webhooks": webhooks,
    "scale": scale,
    "outputs": outputs,
    "journal": journal,
    "shutdown": shutdown,
    "lag": lag,
    "offloop": offloop,
    "redis_store": redis_store,
    "many_processes": many_processes,
    "hotpaths": hotpaths,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark modelslab-async against its floors and peers.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, to check the code runs; the figures mean nothing",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"results JSON (default: {RESULTS.relative_to(ROOT)}, or a "
        "temporary file with --quick)",
    )
    parser.add_argument(
        "--doc",
        type=Path,
        help=f"page to regenerate (default: {DOC.relative_to(ROOT)}; none "
        "with --quick)",
    )
    return parser


async def run_all(names: Sequence[str], *, quick: bool) -> dict[str, Any]:
    """
    Run the named benchmarks one after another; return their results.
    """
    results = {}
    for name in names:
        module = BENCHMARKS[name]
        print(f"benchmark {name}...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        result = await module.run(module.QUICK if quick else module.FULL)
        result["seconds"] = time.perf_counter() - started
        print(
            f"benchmark {name}: {result['seconds']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        results[name] = result
    return results


def _paths(args: argparse.Namespace) -> tuple[Path, Path | None]:
    if args.out is not None:
        out = args.out
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="bench-")) / "quick.json"
    else:
        out = RESULTS
    doc = args.doc if args.doc is not None or args.quick else DOC
    return out, doc


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run, write the JSON and the page; return the exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    out, doc = _paths(args)
    names = args.only or list(BENCHMARKS)
    machine = report.machine_facts()
    started = time.perf_counter()
    # Every figure is for a plain install; orjson is measured apart.
    with hotpaths.json_backend("json"):
        fresh = asyncio.run(run_all(names, quick=args.quick))
    seconds = time.perf_counter() - started
    previous = report.read_json(out) if args.only else None
    results = {
        "meta": {
            "command": report.command_line(argv),
            "quick": args.quick,
            "machine": machine,
            "ran": names,
            "seconds": seconds,
        },
        "benchmarks": {
            **(previous or {}).get("benchmarks", {}),
            **fresh,
        },
    }
    report.write_json(results, out)
    print(f"results: {out}", file=sys.stderr)
    if doc is not None:
        report.write_doc(results, doc, BENCHMARKS)
        print(f"page: {doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
