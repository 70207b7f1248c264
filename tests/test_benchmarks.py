"""
The benchmarks at tiny sizes: they run and report well-formed results.

No timing is asserted here, ever: only that each benchmark still runs
against the current code and reports every figure the page shows.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import warnings

from pathlib import Path

import pytest


pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def anyio_backend():
    """
    Module-scoped, so the suite runs once for all the tests below.
    """
    return "asyncio"


@pytest.fixture(scope="module")
def bench():
    """
    The benchmarks package, which lives beside tests/, not in the wheel.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT))
        return importlib.import_module("benchmarks.__main__")


@pytest.fixture(scope="module")
async def results(bench):
    """
    Every benchmark once, at its quick sizes.
    """
    return await bench.run_all(list(bench.BENCHMARKS), quick=True)


#: Differences of two timings: finite, but may be negative.
_DIFFERENCES = frozenset({"overhead_us_per_job"})


def _well_formed(value, where="results"):
    """
    Every number finite, and not negative unless it is a difference.
    """
    if isinstance(value, dict):
        for key, inner in value.items():
            _well_formed(inner, f"{where}.{key}")
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            _well_formed(inner, f"{where}[{index}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        assert math.isfinite(value), where
        assert value >= 0 or where.rsplit(".", 1)[-1] in _DIFFERENCES, where


def _summary(figure):
    assert set(figure) == {"median", "min", "max"}
    assert figure["min"] <= figure["median"] <= figure["max"]


async def test_every_benchmark_reports_finite_json(results, bench):
    """Each benchmark returns JSON-ready results with finite figures."""
    assert set(results) == set(bench.BENCHMARKS)
    json.dumps(results, allow_nan=False)
    _well_formed(results)


async def test_throughput_has_every_client_at_every_level(results):
    """Throughput reports jobs/s, CPU/job and ratios per concurrency."""
    data = results["throughput"]
    assert list(data["levels"]) == [str(c) for c in (1, 4)]
    for level in data["levels"].values():
        for name in data["clients"]:
            _summary(level[name]["jobs_per_s"])
            _summary(level[name]["cpu_us_per_job"])
        _summary(level["modelslab-async"]["throughput_vs_raw"])
    assert isinstance(data["targets"]["throughput_vs_raw_met"], bool)


async def test_throughput_drives_modelslab_py_when_installed(bench):
    """modelslab-py, when installed, runs jobs against the emulator."""
    with warnings.catch_warnings():
        # Its pydantic v1 idioms warn at import under pydantic 2.
        warnings.simplefilter("ignore", DeprecationWarning)
        pytest.importorskip("modelslab_py")
    throughput = sys.modules["benchmarks.throughput"]
    tiny = throughput.Settings(
        jobs=4, concurrency=(2,), rounds=1, warmup=1, slices=2
    )

    data = await throughput.run(tiny)

    assert "modelslab-py" in data["clients"]
    _summary(data["levels"]["2"]["modelslab-async"]["throughput_vs_peer"])


async def test_throughput_reports_the_cap_and_read_case(results):
    """Submit plus read and the default cap, each against its floor."""
    cap = results["throughput"]["cap"]
    assert set(cap["clients"]) == {
        f"modelslab-async, max_queued={limit}{read}"
        for limit in (5, None)
        for read in ("", " + read")
    } | {"raw aiohttp", "raw aiohttp + read"}
    for name, figures in cap["clients"].items():
        _summary(figures["jobs_per_s"])
        if name.startswith("modelslab-async"):
            _summary(figures["throughput_vs_raw"])
        if "max_queued=5" in name:
            _summary(figures["throughput_vs_uncapped"])
            _summary(figures["slot_held_us"])


async def test_makespan_reports_every_contender_per_case(results, bench):
    """Every case has every contender's efficiency, fetches and delay."""
    makespan = sys.modules["benchmarks.makespan"]
    data = results["makespan"]
    assert list(data["cases"]) == [case.name for case in makespan.CASES]
    expected = {
        "generate_many, polling",
        "generate_many, webhooks",
        "gather, polling",
        "gather, webhooks",
        "command line (polls)",
        "raw aiohttp, every 0.05 s",
        "modelslab-py (computed)",
    }
    for case in data["cases"].values():
        assert set(case["contenders"]) == expected
        for name, figures in case["contenders"].items():
            assert figures["jobs"] == makespan.QUICK.jobs, name
            assert figures["efficiency"] > 0, name
            assert figures["limit_s"] > 0, name
            assert figures.get("refused", 0) == 0, name
        assert "startup_s" in case["contenders"]["command line (polls)"]


async def test_makespan_measures_every_handoff_of_the_idle_runs(results):
    """Each of our four ways has its hand-offs paired and timed."""
    idle = results["makespan"]["idle"]
    assert set(idle) == {
        "generate_many, polling",
        "generate_many, webhooks",
        "gather, polling",
        "gather, webhooks",
    }
    for way in idle.values():
        assert way["handoffs"] > 0
        for key in ("settle_to_submit_ms", "settle_to_slot_ms"):
            assert way[key]["median"] <= way[key]["max"]


async def test_polling_reports_every_strategy(results):
    """Polling reports fetches and delays for ours, fixed and computed."""
    strategies = results["polling"]["strategies"]
    assert set(strategies) == {
        "modelslab-async",
        "fixed 0.05 s",
        "fixed 60 s (modelslab-py, computed)",
    }
    for figures in strategies.values():
        assert figures["fetches_median"]["median"] >= 1
        _summary(figures["delay_share_median"])


async def test_webhooks_resolve_jobs_and_count_callbacks(results):
    """Every webhook resolves its job and every callback gets a 200."""
    data = results["webhooks"]
    assert data["latency"]["jobs"] == data["settings"]["latency_jobs"]
    for path in ("http", "http duplicate", "dispatch"):
        figures = data["callbacks"][path]
        assert figures["statuses"] == {"200": figures["callbacks"]}
        assert figures["per_s"] > 0


async def test_scale_reports_memory_sites_and_lag(results):
    """Scale reports memory per job, where it goes, and loop lag."""
    data = results["scale"]
    assert data["memory"]["bytes_per_job"] > 0
    assert data["memory"]["sites"]
    for phase in ("lag_submitting", "lag_pending", "lag_closing"):
        assert set(data[phase]) == {
            "samples",
            "p50_ms",
            "p99_ms",
            "max_ms",
            "gc",
        }


async def test_outputs_saves_every_form(results):
    """Every output form is saved and compared with its floor."""
    forms = results["outputs"]["forms"]
    assert len(forms) == 5
    for figures in forms.values():
        assert figures["image_bytes"] > 0
        _summary(figures["vs_floor"])


async def test_hotpaths_profiles_each_path(results):
    """Each hot path has a profile with package shares and top functions."""
    data = results["hotpaths"]
    assert set(data["profiles"]) == {
        "submit",
        "submit, network stubbed",
        "fetch",
        "decode",
        "dispatch",
    }
    assert data["stubbed_overhead"]["ours_us_per_job"] > 0
    for profile in data["profiles"].values():
        assert math.isclose(sum(profile["by_package"].values()), 1.0)
        assert profile["top"]
    assert "asyncio + json (default)" in data["experiments"]["variants"]


async def test_journal_reports_every_store(results):
    """The journal reports latency, cost and paced lag per store."""
    data = results["journal"]
    assert set(data["stores"]) == {
        "memory",
        "sqlite (normal)",
        "sqlite (full)",
    }
    for figures in data["stores"].values():
        assert figures["latency_ms"] > 0
        assert figures["lag_p99_ms"] <= figures["lag_max_ms"]


async def test_shutdown_reports_every_scenario(results, bench):
    """Close, cancel and bare rows, and batch CPU per level."""
    data = results["shutdown"]
    assert set(data["scenarios"]) == {
        f"{name}{suffix}"
        for name in ("close", "cancel", "bare asyncio")
        for suffix in ("", ", gc.freeze()")
    }
    for row in data["scenarios"].values():
        assert row["all_s"] > 0
        assert row["max_lag_ms"] >= (row["p99_lag_ms"] or 0)
    levels = {str(level) for level in data["settings"]["levels"]}
    for rows in data["batch"].values():
        assert set(rows) == levels
        assert all(row["cpu_us_per_job"] > 0 for row in rows.values())


async def test_lag_reports_every_row(results):
    """Ours and all-on-the-loop rows, per JSON backend."""
    rows = results["lag"]["rows"]
    assert {name.split(", ")[0] for name in rows} == {
        "ours",
        "all on the loop",
    }
    for row in rows.values():
        assert row["beats"] >= 1
        assert row["image_bytes_per_job"] > 0


async def test_offloop_reports_sizes_hop_and_readers(results, bench):
    """Decode times per size, the hop and lag per reader."""
    data = results["offloop"]
    offloop = sys.modules["benchmarks.offloop"]
    assert len(data["decode"]) == len(offloop.QUICK.sizes)
    assert set(data["hop"]) == {"round_trip_us", "loop_cpu_us"}
    assert set(data["lag"]) == set(offloop.READERS)
    for row in data["lag"].values():
        assert row["beats"] >= 1
        assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]


async def test_redis_store_measures_or_says_why(results):
    """With a redis-server every figure; without one, the reason."""
    data = results["redis_store"]
    if "skipped" in data:
        assert data["skipped"]
        return
    figures = data["figures"]
    assert figures["cap"]["max_holders"] <= figures["cap"]["cap"]
    assert figures["handoff_ms"]["n"] > 0
    assert figures["inbox_ms"]["lost"] == 0


def _page(results, bench):
    report = sys.modules["benchmarks.report"]
    meta = {
        "command": "python -m benchmarks --quick",
        "machine": report.machine_facts(),
        "ran": list(results),
        "seconds": 1.0,
    }
    return report.render(
        {"meta": meta, "benchmarks": results}, bench.BENCHMARKS
    )


async def test_page_renders_every_section(results, bench):
    """The page has the machine facts, the targets and every section."""
    page = _page(results, bench)

    for heading in (
        "# Performance",
        "## The machine",
        "## Targets",
        "### Issue 13: performance as users feel it",
        "## Batch time against the cap",
        "### Idle cap in one process",
        "### Submit plus read, and the default cap",
        "### Issue 10: never bill twice, never freeze",
        "### Issue 9: jobs that outlive the process",
        "### Issue 6: the benchmark suite and a light client",
        "## Throughput and overhead",
        "## Polling efficiency",
        "## Webhook path",
        "## Scale",
        "## Outputs",
        "## The journal",
        "## Closing and cancelling under load",
        "## Loop lag with big inline outputs",
        "## Decoding off the loop",
        "## The Redis store across processes",
        "## Where the time goes",
        "## uvloop and orjson",
    ):
        assert f"\n{heading}\n" in f"\n{page}"
    assert "nan" not in page.lower().split()


async def test_every_target_row_has_a_verdict(results, bench):
    """Each module's target rows are whole: figure, target, verdict."""
    for name, module in bench.BENCHMARKS.items():
        for row in module.targets(results[name]):
            assert row.issue.isdigit(), (name, row)
            assert row.figure, (name, row)
            assert row.target or row.measured == "not run", (name, row)
            assert row.verdict or row.measured == "not run", (name, row)


def test_cli_merges_a_partial_run_into_its_results(bench, tmp_path):
    """--only runs one benchmark and keeps the others' earlier results."""
    out, doc = tmp_path / "results.json", tmp_path / "performance.md"
    common = ["--quick", "--out", str(out), "--doc", str(doc)]

    assert bench.main([*common, "--only", "outputs"]) == 0
    assert bench.main([*common, "--only", "polling"]) == 0

    data = json.loads(out.read_text(encoding="utf-8"))
    assert set(data["benchmarks"]) == {"outputs", "polling"}
    assert data["meta"]["command"].startswith("python -m benchmarks --quick")
    page = doc.read_text(encoding="utf-8")
    assert "## Outputs" in page
    assert "Not run, so neither in this table nor below: makespan" in page
