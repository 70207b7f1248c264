"""
Results to JSON, and JSON to ``docs/performance.md``.

The page is generated whole from the results, so what it says is always
what was measured; nothing in it is edited by hand.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from . import polling, throughput


_DASH: Final = "–"  # noqa: RUF001 (an en dash, for ranges)


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


# --- formatting --------------------------------------------------------------


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _spread(figure: dict[str, Any] | None, digits: int = 0) -> str:
    """
    ``median (min-max)`` of a summary, with an en dash.
    """
    if figure is None or figure.get("median") is None:
        return "n/a"
    median, low, high = (
        _number(figure[k], digits) for k in ("median", "min", "max")
    )
    if low == high:
        return median
    return f"{median} ({low}{_DASH}{high})"


def _ratio(figure: dict[str, Any] | None) -> str:
    """
    ``median (min-max)`` of a summary of ratios, each with an ``x``.
    """
    if figure is None or figure.get("median") is None:
        return "n/a"
    median, low, high = (f"{figure[k]:.2f}x" for k in ("median", "min", "max"))
    if low == high:
        return median
    return f"{median} ({low}{_DASH}{high})"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _met(met: bool | None, gap: str = "") -> str:
    if met is None:
        return "not measured"
    return "**met**" if met else f"**not met**{gap}"


# --- sections ----------------------------------------------------------------


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
        *_table(("Fact", "Value"), rows),
    ]


_OVERHEAD: Final = "[own work](#overhead-without-the-network)"
_POLLING: Final = "[polling](#polling-efficiency)"
_SITES: Final = "[allocation sites](#scale)"
_SAVE_PATH: Final = "[save path](#the-save-path-step-by-step)"


def _targets(results: dict[str, Any]) -> list[str]:
    benchmarks = results.get("benchmarks", {})
    rows = [
        *_throughput_targets(benchmarks),
        *_polling_targets(benchmarks),
        *_scale_targets(benchmarks),
        *_outputs_targets(benchmarks),
    ]
    return [
        "## Targets",
        "",
        "Each verdict with the figure that explains it; the linked",
        "section has the profile behind it.",
        "",
        *_table(
            ("Figure", "Target", "Measured", "Verdict", "Explained by"),
            rows,
        ),
    ]


def _not_run(figure: str, target: str) -> Sequence[str]:
    return (figure, target, "not run", "", "")


def _overhead_note(benchmarks: dict[str, Any], level: str) -> str:
    throughput_data = benchmarks["throughput"]["levels"][level]
    cpu = throughput_data[throughput.OURS]["cpu_vs_raw"]["median"]
    note = f"client CPU per job {cpu:.2f}x the raw loop's"
    stubbed = benchmarks.get("hotpaths", {}).get("stubbed_overhead")
    if stubbed is not None:
        note += (
            f"; own work {stubbed['overhead_us_per_job']:.0f} µs/job "
            f"against {stubbed['raw_us_per_job']:.0f}"
        )
    return f"{note}: {_OVERHEAD}"


def _throughput_targets(benchmarks: dict[str, Any]) -> list[Sequence[str]]:
    data = benchmarks.get("throughput")
    if data is None:
        return [_not_run("Throughput vs raw aiohttp", ">= 0.90x")]
    rows: list[Sequence[str]] = []
    for level, figures in data["levels"].items():
        ours = figures[throughput.OURS]
        ratio = ours["throughput_vs_raw"]["median"]
        rows.append(
            (
                f"Throughput vs raw aiohttp, concurrency {level}",
                ">= 0.90x",
                _ratio(ours["throughput_vs_raw"]),
                _met(ratio >= 0.9, f": {0.9 - ratio:.2f}x short"),
                _overhead_note(benchmarks, level),
            )
        )
    for level, figures in data["levels"].items():
        ours = figures[throughput.OURS]
        if "throughput_vs_peer" not in ours:
            rows.append(_not_run("Ahead of modelslab-py", "> 1.00x"))
            break
        ratio = ours["throughput_vs_peer"]["median"]
        rows.append(
            (
                f"Throughput vs modelslab-py, concurrency {level}",
                "> 1.00x",
                _ratio(ours["throughput_vs_peer"]),
                _met(ratio > 1.0, f": {1.0 - ratio:.2f}x short"),
                _overhead_note(benchmarks, level),
            )
        )
    return rows


def _polling_targets(benchmarks: dict[str, Any]) -> list[Sequence[str]]:
    data = benchmarks.get("polling")
    if data is None:
        return [_not_run("Polling", "<= 2 fetches, <= 10 % delay")]
    ours = data["strategies"][polling.OURS]
    fetches = data["targets"]["fetches_median"]
    delay = data["targets"]["delay_share_median"]
    early = ours["delay_share_median_early"]["median"]
    late = ours["delay_share_median_late"]["median"]
    return [
        (
            "Fetches per job (median), eta off by up to ±30 %",
            "<= 2",
            _spread(ours["fetches_median"], 1),
            _met(fetches <= 2, f": {fetches - 2:.1f} over"),
            f"mean {ours['fetches_mean']['median']:.2f}: {_POLLING}",
        ),
        (
            "Ready-to-observed delay, share of job duration (median)",
            "<= 10 %",
            _percent(delay),
            _met(delay <= 0.10, f": {(delay - 0.10) * 100:.1f} points over"),
            _delay_note(early, late),
        ),
    ]


def _delay_note(early: float | None, late: float | None) -> str:
    return (
        f"jobs done by their eta {_percent(early)}, "
        f"late ones {_percent(late)}: {_POLLING}"
    )


def _scale_targets(benchmarks: dict[str, Any]) -> list[Sequence[str]]:
    data = benchmarks.get("scale")
    if data is None:
        return [_not_run("Memory per pending job", "<= 5 KiB")]
    memory = data["memory"]
    kib, jobs = memory["kib_per_job"], data["settings"]["jobs"]
    top = memory["sites"][0] if memory["sites"] else None
    note = (
        ""
        if top is None
        else f"largest site `{top['where']}` "
        f"{top['bytes_per_job']:,.0f} bytes/job: "
    )
    return [
        (
            f"Memory per pending job ({jobs:,} pending)",
            "<= 5 KiB",
            f"{kib:.2f} KiB",
            _met(kib <= 5.0, f": {kib - 5.0:.2f} KiB over"),
            note + _SITES,
        )
    ]


def _save_note(benchmarks: dict[str, Any], *, decodes: bool) -> str:
    anatomy = benchmarks.get("hotpaths", {}).get("save_anatomy")
    if anatomy is None:
        return _SAVE_PATH
    extra_write = anatomy["atomic_write_us"] - anatomy["write_bytes_us"]
    parts = [
        f"thread hop {anatomy['thread_hop_us']:.0f} µs",
        f"atomic write {extra_write:+.0f} µs",
    ]
    if decodes:
        extra = anatomy["decode_image_us"] - anatomy["b64decode_us"]
        parts.append(f"decode {extra:+.0f} µs")
    return f"{', '.join(parts)}: {_SAVE_PATH}"


def _outputs_targets(benchmarks: dict[str, Any]) -> list[Sequence[str]]:
    data = benchmarks.get("outputs")
    if data is None:
        return [_not_run("Outputs vs b64decode + write", ">= 0.80x")]
    rows: list[Sequence[str]] = []
    for form, figures in data["forms"].items():
        ratio = figures["vs_floor"]["median"]
        rows.append(
            (
                f"Save from {form} vs floor",
                ">= 0.80x",
                _ratio(figures["vs_floor"]),
                _met(ratio >= 0.8, f": {0.8 - ratio:.2f}x short"),
                _save_note(
                    benchmarks,
                    decodes=figures["decode_vs_b64decode"] is not None,
                ),
            )
        )
    return rows


def _throughput(data: dict[str, Any]) -> list[Any]:
    settings = data["settings"]
    lines = [
        "## Throughput and overhead",
        "",
        f"{settings['jobs']:,} jobs that succeed at once (emulator",
        "`--eta 0`: the submit answer is the success, so a job is one HTTP",
        "round trip) per client and round, after",
        f"{settings['warmup']} warm-up jobs, {settings['rounds']} rounds, a",
        "fresh emulator process per round. Within a round the clients take",
        f"turns in {settings['slices']} slices of their jobs, in an order",
        "rotated per slice, so a slowdown of the machine falls on all",
        "alike. CPU is `time.process_time()` of the client process per",
        "job. modelslab-async is `await client.generate(Text2Img(...))` on",
        "`Client(max_queued=None)`; raw aiohttp POSTs the same body on one",
        "`ClientSession` and reads the JSON; modelslab-py is",
        "`Community.async_text_to_image`. modelslab-py's `Client` takes no",
        "base URL: it sets `self.base_url` in `__init__`, so the benchmark",
        "overwrites that attribute on the instance before building",
        "`Community` (no code is patched).",
        "",
    ]
    if data["peer_missing"]:
        problem = data.get("peer_problem") or "not installed"
        lines += [f"modelslab-py could not run ({problem}): no rows.", ""]
    for level, figures in data["levels"].items():
        rows = []
        for name in data["clients"]:
            own = figures[name]
            rows.append(
                (
                    name,
                    _spread(own["jobs_per_s"]),
                    _spread(own["cpu_us_per_job"]),
                    _ratio(own.get("throughput_vs_raw")),
                    _ratio(own.get("throughput_vs_peer")),
                )
            )
        lines += [
            f"### Concurrency {level}",
            "",
            *_table(
                (
                    "Client",
                    "Jobs/s",
                    "Client CPU µs/job",
                    "Throughput vs raw",
                    "Throughput vs modelslab-py",
                ),
                rows,
            ),
        ]
    lines += _overhead(data)
    return lines


def _overhead(data: dict[str, Any]) -> list[str]:
    rows = []
    for level, figures in data["levels"].items():
        ours = figures[throughput.OURS]["cpu_us_per_job"]["median"]
        raw = figures[throughput.RAW]["cpu_us_per_job"]["median"]
        rows.append(
            (
                level,
                _number(ours - raw),
                _ratio(figures[throughput.OURS]["cpu_vs_raw"]),
            )
        )
    return [
        "### Client overhead",
        "",
        "What modelslab-async costs on top of the HTTP call itself: its CPU",
        "per job minus the raw loop's, and the ratio of the two. When the",
        "client process is the bottleneck, throughput follows this ratio;",
        "see [Where the time goes](#where-the-time-goes) for what it is",
        "made of, measured without the network's noise.",
        "",
        *_table(("Concurrency", "Extra CPU µs/job", "CPU vs raw"), rows),
    ]


def _polling(data: dict[str, Any]) -> list[str]:
    settings = data["settings"]
    rows = [
        (
            name,
            _spread(figures["fetches_median"], 1),
            _spread(figures["fetches_mean"], 2),
            _percent(figures["delay_share_median"]["median"]),
            _percent(figures["delay_share_p90"]["median"]),
            _spread(figures["delay_s_median"], 3),
            _percent(figures["delay_share_median_early"]["median"]),
            _percent(figures["delay_share_median_late"]["median"]),
        )
        for name, figures in data["strategies"].items()
    ]
    early = data["strategies"][polling.OURS]["early_jobs_share"]["median"]
    return [
        "## Polling efficiency",
        "",
        f"{settings['jobs']} jobs at once per strategy and round,",
        f"{settings['rounds']} rounds. Each job announces `eta`",
        f"{settings['eta']:g} s and really takes that times a random factor",
        f"in 1 ± {settings['eta_error']:g} (emulator `--eta-error`), and a",
        "fetch of a processing job gives no new estimate, as the real API's",
        "thin fetch answer. The submit answer announces the nominal eta",
        "(`--nominal-eta`): the emulator as shipped announces the larger of",
        "the real duration and the eta, so no job would ever run late.",
        "Fetches are counted by the emulator; the delay",
        "runs from the job's ready time (the emulator's) to when the client",
        "saw it done (the client's), both on `time.monotonic()`, one clock",
        "for both processes on Linux. The emulator runs in its own process",
        "(`python -m benchmarks._server`, the package's emulator plus a",
        "route that reports these per-job times over HTTP).",
        "",
        "Fixed intervals poll with raw aiohttp: sleep, then fetch. The",
        "60 s row is **computed, not run**: modelslab-py's `async_fetch`",
        "fetches at once and then every 60 s, so a job of duration *d*",
        "costs 1 + ⌈*d*/60⌉ fetches and is seen ⌈*d*/60⌉·60 - *d* late;",
        "that is applied to the real durations of the jobs measured here.",
        "",
        *_table(
            (
                "Strategy",
                "Fetches/job (median)",
                "Fetches/job (mean)",
                "Delay, share of duration (median)",
                "Delay share (p90)",
                "Delay s (median)",
                "Delay share, jobs done by their eta",
                "Delay share, jobs that ran late",
            ),
            rows,
        ),
        "The last two columns split the jobs in two: those done by their",
        f"announced eta ({_percent(early)} of them), which any schedule",
        "that first polls at the eta sees only then, and those that ran",
        "late, which only the backoff after the eta serves.",
        "",
    ]


def _webhooks(data: dict[str, Any]) -> list[str]:
    settings, latency = data["settings"], data["latency"]
    rows = []
    for name, figures in data["callbacks"].items():
        cpu = figures.get(
            "receiver_cpu_us_per_callback", figures.get("us_per_callback")
        )
        rows.append(
            (
                name,
                _number(figures["per_s"]),
                _number(cpu),
                _number(1e6 / cpu) if cpu else "n/a",
                ", ".join(
                    f"{status}: {count}"
                    for status, count in figures["statuses"].items()
                ),
            )
        )
    return [
        "## Webhook path",
        "",
        f"{latency['jobs']} jobs submitted {settings['pace'] * 1e3:g} ms",
        "apart on `Client(webhooks=WebhookReceiver())`, `eta`",
        f"{settings['eta']:g} s. Latency runs from the moment the emulator",
        "starts its webhook POST (stamped in its process) to `await job`",
        "returning in ours.",
        "",
        *_table(
            ("p50", "p99", "max", "Jobs that also polled"),
            [
                (
                    f"{_number(latency['p50_ms'], 2)} ms",
                    f"{_number(latency['p99_ms'], 2)} ms",
                    f"{_number(latency['max_ms'], 2)} ms",
                    str(latency["jobs_that_fetched"]),
                )
            ],
        ),
        f"Callbacks per second, over {settings['callback_jobs']:,} pending",
        "jobs each awaited by a task. `http`: the emulator's process POSTs",
        f"each job's success webhook, {settings['concurrency']} at a time;",
        "wall rate, and the receiver process's CPU per callback (its",
        "inverse is what one core sustains). `http duplicate`: the same",
        "again, for jobs now finished. `dispatch`: `receiver.dispatch()`",
        "called directly, no HTTP.",
        "",
        *_table(
            (
                "Path",
                "Callbacks/s",
                "Receiver CPU µs/callback",
                "Per core, callbacks/s",
                "Answers",
            ),
            rows,
        ),
    ]


def _lag_row(name: str, lag: dict[str, Any]) -> Sequence[str]:
    collections = lag["gc"]
    return (
        name,
        str(lag["samples"]),
        _number(lag["p50_ms"], 2),
        _number(lag["p99_ms"], 2),
        _number(lag["max_ms"], 2),
        _collections(collections),
    )


def _collections(collections: dict[str, Any]) -> str:
    longest = _number(collections["longest_ms"])
    total = _number(collections["total_ms"])
    return f"{collections['full_collections']} ({longest} / {total})"


def _scale(data: dict[str, Any]) -> list[str]:
    memory, jobs = data["memory"], data["settings"]["jobs"]
    sites = [
        (
            f"`{site['where']}`",
            _number(site["bytes_per_job"]),
            _number(site["objects_per_job"], 1),
        )
        for site in memory["sites"]
    ]
    return [
        "## Scale",
        "",
        f"{jobs:,} jobs pending at once, each awaited by its own task",
        "(emulator `--eta 3600`, its own process). Memory is `tracemalloc`",
        "from just before the first submit to when every waiter sleeps,",
        "per job: the library's objects plus the waiting task, not the",
        "request objects the caller built. Lag is how late a 5 ms sleep",
        "wakes, measured in a second pass without `tracemalloc`, with",
        "every full (generation 2) garbage collection timed beside it:",
        "each pending job adds objects the collector must traverse.",
        "",
        *_table(
            ("Memory per pending job", "Peak during submits"),
            [
                (
                    f"{memory['kib_per_job']:.2f} KiB",
                    f"{memory['peak_mib']:.1f} MiB",
                )
            ],
        ),
        "Where that memory is allocated (first frame), per job:",
        "",
        *_table(("Site", "Bytes/job", "Objects/job"), sites),
        *_table(
            (
                "Event-loop lag",
                "Samples",
                "p50 ms",
                "p99 ms",
                "max ms",
                "Full GCs (longest / total ms)",
            ),
            [
                _lag_row(
                    f"while submitting ({data['submit_jobs_per_s']:,.0f} "
                    "jobs/s)",
                    data["lag_submitting"],
                ),
                _lag_row("while all are pending", data["lag_pending"]),
                _lag_row(
                    f"while closing ({data['close_s']:.2f} s to wake all)",
                    data["lag_closing"],
                ),
            ],
        ),
    ]


def _outputs(data: dict[str, Any]) -> list[str]:
    settings = data["settings"]
    rows = [
        (
            form,
            _number(figures["bytes"]),
            _spread(figures["ours_ms"], 2),
            _spread(figures["floor_ms"], 2),
            _ratio(figures["vs_floor"]),
            _ratio(figures["decode_vs_b64decode"]),
        )
        for form, figures in data["forms"].items()
    ]
    return [
        "## Outputs",
        "",
        f"One {settings['size']}x{settings['size']} PNG from the emulator",
        "in each form, saved",
        f"{settings['saves']} times per round, {settings['rounds']} rounds.",
        "Ours is `await output.save(directory)`: download if a URL, decode",
        "if base64, atomic write (temporary file, rename) in a worker",
        "thread. The floor fetches the same bytes with a bare aiohttp GET,",
        "cuts a `data:` prefix, calls `base64.b64decode` and",
        "`Path.write_bytes` on the event loop, the two taking turns save",
        "by save. Ratio = floor time / our",
        "time. The last column isolates decoding: `decode_image` against",
        "`base64.b64decode` on the same text in memory.",
        "",
        *_table(
            (
                "Form",
                "Bytes delivered",
                "Ours ms",
                "Floor ms",
                "vs floor",
                "Decode vs b64decode",
            ),
            rows,
        ),
    ]


def _profile(name: str, profile: dict[str, Any]) -> list[str]:
    packages = ", ".join(
        f"{package} {share * 100:.0f} %"
        for package, share in profile["by_package"].items()
        if share >= 0.01
    )
    rows = [
        (
            f"`{entry['function']}`",
            f"{entry['share'] * 100:.1f} %",
            _number(entry["calls_per_unit"], 2),
        )
        for entry in profile["top"]
    ]
    return [
        f"### {name}",
        "",
        f"{_number(profile['profiled_us_per_unit'], 1)} µs of CPU per call",
        f"under the profiler. Own time by package: {packages}.",
        "",
        *_table(("Function", "Own time", "Calls per unit"), rows),
    ]


_PROFILE_NAMES: Final = {
    "submit": "submit: `client.generate` of a job done at once",
    "submit, network stubbed": (
        "submit, network stubbed: the library's own work per job"
    ),
    "fetch": "fetch: `job.refresh()` of a pending job",
    "decode": "decode: `decode_image` of a 1024x1024 PNG's base64",
    "dispatch": "dispatch: `WebhookReceiver.dispatch` of a success",
}


def _hotpaths(data: dict[str, Any]) -> list[str]:
    lines = [
        "## Where the time goes",
        "",
        "`cProfile` of each hot path on the CPU time of the event loop's",
        "thread (waiting for the server does not count), against an",
        "emulator in its own process. The profiler slows Python code more",
        "than C code, so shares lean towards Python; the unprofiled cost",
        "is in the sections above. Own time is time in the function",
        "itself, not in what it calls.",
        "",
    ]
    stubbed = data["stubbed_overhead"]
    lines += [
        "### Overhead without the network",
        "",
        "The same `client.generate` loop with the HTTP call replaced at run",
        "time by what aiohttp would do with JSON (encode the body, decode a",
        "recorded answer), timed without the profiler: the library's own",
        "CPU per job, free of the network's noise, beside the raw loop's",
        "equivalent (build the body, encode it, decode the answer).",
        "",
        *_table(
            ("modelslab-async µs/job", "raw equivalent µs/job", "Overhead"),
            [
                (
                    _number(stubbed["ours_us_per_job"], 1),
                    _number(stubbed["raw_us_per_job"], 1),
                    f"{_number(stubbed['overhead_us_per_job'], 1)} µs",
                )
            ],
        ),
    ]
    for name, profile in data["profiles"].items():
        lines += _profile(_PROFILE_NAMES.get(name, name), profile)
    anatomy = data["save_anatomy"]
    lines += [
        "### The save path step by step",
        "",
        f"Per call, on a {anatomy['image_bytes']:,}-byte PNG",
        f"({anatomy['base64_bytes']:,} bytes of base64):",
        "",
        *_table(
            ("Step", "Ours µs", "Floor µs"),
            [
                (
                    "decode",
                    _number(anatomy["decode_image_us"]),
                    _number(anatomy["b64decode_us"]),
                ),
                (
                    "write",
                    _number(anatomy["atomic_write_us"]),
                    _number(anatomy["write_bytes_us"]),
                ),
                (
                    "hop to a worker thread and back",
                    _number(anatomy["thread_hop_us"]),
                    "0",
                ),
            ],
        ),
    ]
    return lines + _experiments(data["experiments"])


def _experiments(data: dict[str, Any]) -> list[str]:
    rows = [
        (
            name,
            _spread(figures["jobs_per_s"]),
            _spread(figures["cpu_us_per_job"]),
            _ratio(figures["throughput_vs_default"]),
        )
        for name, figures in data["variants"].items()
    ]
    missing = (
        f" Not installed, so not measured: {', '.join(data['missing'])}."
        if data["missing"]
        else ""
    )
    return [
        "## uvloop and orjson",
        "",
        "Neither is a dependency; both come with the `fast` extra. When",
        "installed, the benchmark runs",
        "modelslab-async's throughput at concurrency 10 on uvloop's event",
        "loop, and with orjson as the client's JSON backend (what the",
        "`fast` extra gives: `pip install 'modelslab-async[fast]'`), each",
        "beside the default in the same round, in a worker thread with its",
        "own event loop. Every other figure on this page uses the standard",
        "library's json, as a plain install does." + missing,
        "",
        *_table(("Variant", "Jobs/s", "CPU µs/job", "vs default"), rows),
    ]


_SECTIONS: Final[dict[str, Callable[[dict[str, Any]], list[str]]]] = {
    "throughput": _throughput,
    "polling": _polling,
    "webhooks": _webhooks,
    "scale": _scale,
    "outputs": _outputs,
    "hotpaths": _hotpaths,
}


def render(results: dict[str, Any]) -> str:
    """
    The Markdown (MyST) page for *results*.
    """
    lines = [*_header(results["meta"]), *_targets(results)]
    for name, section in _SECTIONS.items():
        data = results.get("benchmarks", {}).get(name)
        if data is not None:
            lines += section(data)
    lines += [
        "## Running it",
        "",
        "```sh",
        "nox -s bench                   # what produced this page",
        "python -m benchmarks --quick   # tiny sizes, writes nothing here",
        "python -m benchmarks --only polling",
        "```",
        "",
        "`--only` reruns one benchmark and merges it into the results. The",
        "test suite runs every benchmark at tiny sizes and checks only the",
        "shape of its results, never a timing.",
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_doc(results: dict[str, Any], path: Path) -> None:
    """
    Render *results* to *path*.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(results), encoding="utf-8")


def command_line(argv: Sequence[str]) -> str:
    """
    The command as typed, for the page.
    """
    return " ".join(["python -m benchmarks", *argv]).strip()
