"""
Many processes, one account: whole clients in real OS processes sharing a
RedisStore, against the emulator in a process of its own.

Each replica is ``tests/workers/replica.py``: ``Client(max_queued=...,
store=RedisStore(...))`` with its own event loop. The emulator enforces the
account's queue cap itself (``--queue-limit``) and counts what it saw: the
most jobs queued at once, 429s, jobs per ``track_id``, fetches, webhooks.

No timing is asserted: the figures live in ``benchmarks/many_processes.py``.
Every test is bounded by ``anyio.fail_after`` and each worker by its own
``--deadline``; every process is killed when its test ends.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from conftest import KEY
from modelslab_async import Client, JobPhase, JobState, Text2Img
from modelslab_async._engine import Secret, account_of
from modelslab_async.emulator import Emulator, Faults
from modelslab_async.errors import SubmitUncertainError
from modelslab_async.stores import RedisStore
from processes import (
    EmulatorProcess,
    emulator_process,
    finish,
    free_port,
    worker,
)


pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ROOT = Path(__file__).resolve().parent.parent
CAP = 5
#: Short leases keep a dead replica's hand-over quick; a third of one is
#: the heartbeat.
LEASE = "1.5"


@pytest.fixture
def anyio_backend():
    """
    redis-py's asyncio client and the store run on asyncio.
    """
    return "asyncio"


class Replicas:
    """
    Replica processes of one test, killed when it ends.
    """

    def __init__(self, emulator: EmulatorProcess, redis_url: str) -> None:
        self.emulator = emulator
        self.redis_url = redis_url
        self.processes: list[subprocess.Popen[str]] = []

    def start(
        self,
        name: str,
        *options: str,
        redis_url: str | None = None,
        prefix: Sequence[str] = (),
    ) -> subprocess.Popen[str]:
        """
        Start ``replica.py`` on the emulator and the test's Redis (or
        *redis_url*), under *prefix* if given.
        """
        process = worker(
            "replica",
            "--base-url",
            self.emulator.url,
            "--redis",
            redis_url or self.redis_url,
            "--name",
            name,
            "--prefix",
            f"{name}-",
            "--max-queued",
            str(CAP),
            "--lease",
            LEASE,
            "--deadline",
            "50",
            *options,
            stdin=subprocess.PIPE,
            prefix=prefix,
        )
        self.processes.append(process)
        return process

    @staticmethod
    async def ready(process: subprocess.Popen[str]) -> dict[str, Any]:
        """
        Wait for the replica's first line: its client is open.
        """
        assert process.stdout is not None
        line = await anyio.to_thread.run_sync(process.stdout.readline)
        assert line, f"replica exited: {process.wait()}"
        return json.loads(line)

    @staticmethod
    async def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
        """
        Close the replica's standard input (a serving or draining one
        stops), wait for it to end; its last line, its report.
        """
        lines = await anyio.to_thread.run_sync(finish, process, 55)
        return lines[-1]

    @staticmethod
    def tell(process: subprocess.Popen[str], line: str = "go") -> None:
        """
        Write a line to the replica's standard input.
        """
        assert process.stdin is not None
        process.stdin.write(line + "\n")
        process.stdin.flush()

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate()


@contextlib.contextmanager
def replicas(redis_url: str, *emulator_options: str) -> Iterator[Replicas]:
    """
    An emulator with the account's cap, and replicas to start on it.
    """
    with emulator_process(
        "--queue-limit", str(CAP), *emulator_options
    ) as emulator:
        group = Replicas(emulator, redis_url)
        try:
            yield group
        finally:
            group.kill()


def assert_cap_kept(stats: dict[str, Any]) -> None:
    """
    The emulator never had more than the cap queued, and never said 429.
    """
    assert stats["max_queued"]["overall"] <= CAP
    assert stats["rate_limited"] == 0
    assert stats["duplicates"] == {}


async def journaled(redis_url: str, track_ids: Sequence[str]) -> dict:
    """
    The journal's record of each track_id, read as a client would.
    """
    journal = await RedisStore(redis_url).open(
        account_of(Secret(KEY)), max_queued=None
    )
    try:
        return {t: await journal.get(t) for t in track_ids}
    finally:
        await journal.aclose()


async def all_finished(
    emulator: EmulatorProcess, redis_url: str, timeout: float = 30
) -> None:
    """
    Wait until every job the emulator made is finished in the journal.
    """
    with anyio.fail_after(timeout):
        while True:
            states = await journaled(redis_url, list(emulator.tracks()))
            if all(
                s is not None and s.phase.is_finished for s in states.values()
            ):
                return
            await anyio.sleep(0.1)


def phases(states: dict[str, JobState | None]) -> collections.Counter:
    return collections.Counter(
        None if state is None else state.phase for state in states.values()
    )


# --- one cap ---------------------------------------------------------------


async def test_three_replicas_share_one_cap_of_five(redis_url):
    """3 processes, 300 jobs, cap 5: never over 5 queued, no 429, 300 jobs."""
    with anyio.fail_after(60), replicas(redis_url, "--eta", "0.05") as group:
        started = [
            group.start(name, "--count", "100") for name in ("a", "b", "c")
        ]
        reports = [await group.finish(p) for p in started]
        stats = group.emulator.stats()
        tracks = group.emulator.tracks()
    assert_cap_kept(stats)
    assert stats["jobs_created"] == 300
    assert len(tracks) == 300
    assert stats["max_queued"]["overall"] == CAP  # the cap was used
    for report in reports:
        assert len(report["outcomes"]) == 100
        assert all(o["ok"] for o in report["outcomes"]), report["outcomes"]
        assert report["unfinished"] == []
        assert report["adopted"] == []
    states = await journaled(redis_url, list(tracks))
    assert phases(states) == {JobPhase.SUCCEEDED: 300}


async def test_a_freed_slot_goes_to_the_process_that_waited(redis_url):
    """Cap 1, two processes claiming again at once: turns alternate."""
    with anyio.fail_after(40), replicas(redis_url, "--eta", "0.05") as group:
        options = (
            "--count",
            "8",
            "--sequential",
            "--max-queued",
            "1",
            "--wait-go",
        )
        started = [group.start(name, *options) for name in ("a", "b")]
        for process in started:
            await group.ready(process)
        for process in started:
            group.tell(process)
        reports = [await group.finish(p) for p in started]
        stats = group.emulator.stats()

    assert stats["max_queued"]["overall"] == 1
    assert stats["jobs_created"] == 16
    # Each process asks for the slot again the moment it gives it back;
    # the other, already waiting, must get it all the same.
    grants = sorted(
        (granted, report["name"])
        for report in reports
        for _, _, granted, _ in report["claims"]
    )
    turns = [name for _, name in grants]
    runs = [len(list(run)) for _, run in itertools.groupby(turns)]
    # Told to go together, a loaded machine may still start one process
    # late (or end one early): alone, it takes every turn. While both
    # are claiming, strict turns.
    assert len(runs) >= 4, turns
    assert max(runs[1:-1]) == 1, turns


# --- a replica dies --------------------------------------------------------


async def test_a_killed_replicas_jobs_are_finished_by_the_survivors(
    redis_url,
):
    """SIGKILL mid-run: the others adopt its jobs; all made jobs finish."""
    with anyio.fail_after(60), replicas(redis_url, "--eta", "0.4") as group:
        options = ("--count", "10", "--drain")
        started = {
            name: group.start(name, *options) for name in ("a", "b", "c")
        }
        for process in started.values():
            await group.ready(process)
        # Killed in the middle of a round of jobs, when every slot is held
        # by a queued job and no submit is in flight: a job whose submit
        # was cut short is another story (only a webhook could find it).
        with anyio.fail_after(30):
            while group.emulator.stats()["jobs_created"] < 10:
                await anyio.sleep(0.01)
        await anyio.sleep(0.2)
        # The one with the most jobs in the running round: rounds run in
        # step, and the emulator lists jobs in the order it made them.
        running = [
            t.split("-")[0] for t in list(group.emulator.tracks())[-CAP:]
        ]
        doomed = max(started, key=running.count)
        victim = started.pop(doomed)
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate()
        await all_finished(group.emulator, redis_url)
        # Their standard input closes: draining ones stop.
        reports = [await group.finish(p) for p in started.values()]
        stats = group.emulator.stats()
        tracks = group.emulator.tracks()

    assert_cap_kept(stats)
    assert all(count == 1 for count in tracks.values())
    adopted = [t for report in reports for t, _, _ in report["adopted"]]
    assert adopted  # the victim held slots when it died
    assert all(t.startswith(f"{doomed}-") for t in adopted)
    assert len(adopted) == len(set(adopted))  # each by one survivor
    # The survivors finished what they adopted (their watchers fetched
    # them), and only then gave back the slots.
    settled = {
        track_id: phase
        for report in reports
        for track_id, phase, _ in report["settles"]
    }
    assert {t: settled.get(t) for t in adopted} == dict.fromkeys(
        adopted, "succeeded"
    )
    assert all(o["ok"] for r in reports for o in r["drained"])
    # Every job the emulator made is finished in the journal.
    states = await journaled(redis_url, list(tracks))
    assert phases(states) == {JobPhase.SUCCEEDED: len(tracks)}
    for report in reports:
        assert len(report["outcomes"]) == 10
        assert all(o["ok"] for o in report["outcomes"])
        assert report["unfinished"] == []


async def test_a_replica_killed_mid_submit_keeps_its_slot_until_the_job_ends(
    redis_url,
):
    """Killed while its job was made but unanswered: no slot freed early."""
    port = free_port()
    hooks = f"http://127.0.0.1:{port}/modelslab/webhooks/"
    with anyio.fail_after(60), replicas(redis_url, "--eta", "2.5") as group:
        # One public webhook URL for all, as behind a load balancer: here
        # it leads to replica a.
        lease = ("--lease", "1.2", "--drain", "--wait-go")
        first = group.start(
            "a", "--count", "3", "--serve-webhooks", str(port), *lease
        )
        second = group.start(
            "c", "--count", "2", "--webhook-url", hooks, *lease
        )
        for process in (first, second):
            await group.ready(process)
        # The victim's submit makes its job, then gets no answer.
        group.emulator.post(
            "/_emulator/settings",
            {
                "faults": {
                    "schedule": {"submit": ["stall"]},
                    "stall_seconds": 30,
                }
            },
        )
        victim = group.start("b", "--count", "1", "--webhook-url", hooks)
        with anyio.fail_after(20):
            while group.emulator.stats()["jobs_created"] < 1:
                await anyio.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate()
        # Four slots for five jobs: one claim waits while the dead
        # replica's job is adopted, and must keep waiting until it ends.
        for process in (first, second):
            group.tell(process)
        await all_finished(group.emulator, redis_url)
        reports = [await group.finish(p) for p in (first, second)]
        stats = group.emulator.stats()
        tracks = group.emulator.tracks()

    assert_cap_kept(stats)
    assert stats["jobs_created"] == 6
    assert all(count == 1 for count in tracks.values())
    adopted = [t for report in reports for t, _, _ in report["adopted"]]
    assert adopted == ["b-0"]
    # No id to fetch it by: its webhook, on replica a, finished it.
    states = await journaled(redis_url, list(tracks))
    assert phases(states) == {JobPhase.SUCCEEDED: 6}
    assert stats["fetches"] == 0
    for report in reports:
        assert all(o["ok"] for o in report["outcomes"])
        assert report["unfinished"] == []


async def test_an_uncertain_submit_keeps_its_slot_past_a_lease(redis_url):
    """A 500 after the job was made: its slot outlives the lease."""
    faults = Faults(schedule={"submit": [None, "http_500_after"]})
    async with (
        Emulator(eta=1.0, queue_limit=1, faults=faults) as emulator,
        # Short leases, renewed every 0.15 s: the uncertain job's slot
        # must be renewed with its process's other jobs, not left to lapse
        # and be freed by the other client's heartbeat.
        Client(
            KEY,
            base_url=emulator.url,
            max_queued=1,
            store=RedisStore(redis_url, lease=0.45),
        ) as first,
        Client(
            KEY,
            base_url=emulator.url,
            max_queued=1,
            store=RedisStore(redis_url, lease=0.45),
        ) as second,
    ):
        with anyio.fail_after(30):
            # One job first: the client learns how long jobs take.
            await first.generate(Text2Img(prompt="one", track_id="t-1"))
            with pytest.raises(SubmitUncertainError):
                await first.submit(Text2Img(prompt="two", track_id="t-2"))
            made = time.monotonic()
            await second.generate(Text2Img(prompt="three", track_id="t-3"))
            waited = time.monotonic() - made

    assert emulator.rate_limited == 0
    assert emulator.max_queued() == 1
    assert emulator.jobs_created == 3
    # Held for 1.5 times the job's 1 s: over three leases.
    assert waited > 1.0


# --- webhooks on any replica ---------------------------------------------


async def test_callbacks_for_one_replica_all_reach_another(redis_url):
    """A's jobs call back to B's receiver: each resolves in A, no fetch."""
    port = free_port()
    with anyio.fail_after(60), replicas(redis_url, "--eta", "0.3") as group:
        serving = group.start(
            "b", "--mode", "serve", "--serve-webhooks", str(port)
        )
        await group.ready(serving)
        # A serves no webhooks: its callbacks name B's receiver.
        hooks = f"http://127.0.0.1:{port}/modelslab/webhooks/"
        submitting = group.start("a", "--count", "20", "--webhook-url", hooks)
        report = await group.finish(submitting)
        served = await group.finish(serving)
        stats = group.emulator.stats()

    assert_cap_kept(stats)
    assert stats["jobs_created"] == 20
    assert stats["webhooks"].get("sent") == 20, (stats, report, served)
    assert stats["fetches"] == 0  # every job was settled by its webhook
    assert all(o["ok"] for o in report["outcomes"])
    assert len(report["outcomes"]) == 20
    # Each outcome reached A through the journal, recorded by B.
    assert sorted(t for t, _ in report["heard"]) == sorted(
        o["track_id"] for o in report["outcomes"]
    )
    assert served["adopted"] == []


async def test_no_callback_is_lost_when_a_replicas_redis_link_drops(
    redis_url, redis_server
):
    """A's Redis connections cut for 1 s mid-run: every job resolves."""
    from _redis_server import CutProxy  # noqa: PLC0415

    port = free_port()
    proxy = CutProxy(redis_server.port)
    await proxy.start()
    try:
        with (
            anyio.fail_after(60),
            replicas(redis_url, "--eta", "0.5") as group,
        ):
            # Leases longer than the cut: A is away, not dead.
            lease = ("--lease", "5")
            serving = group.start(
                "b", "--mode", "serve", "--serve-webhooks", str(port), *lease
            )
            await group.ready(serving)
            hooks = f"http://127.0.0.1:{port}/modelslab/webhooks/"
            submitting = group.start(
                "a",
                "--count",
                "30",
                "--webhook-url",
                hooks,
                *lease,
                redis_url=proxy.url,
            )
            await group.ready(submitting)
            with anyio.fail_after(30):
                while group.emulator.stats()["jobs_created"] < 8:
                    await anyio.sleep(0.01)
            await proxy.cut()
            cut = group.emulator.stats()
            await anyio.sleep(1.0)
            await proxy.start()
            report = await group.finish(submitting)
            await group.finish(serving)
            stats = group.emulator.stats()
    finally:
        await proxy.aclose()

    # Callbacks came while A was cut off: B recorded them, and A read
    # them from its inbox once back.
    assert stats["webhooks"]["sent"] > cut["webhooks"].get("sent", 0)
    assert_cap_kept(stats)
    assert stats["jobs_created"] == 30
    assert stats["fetches"] == 0
    assert len(report["outcomes"]) == 30
    assert all(o["ok"] for o in report["outcomes"]), report["outcomes"]
    assert len(report["heard"]) == 30


# --- one track_id, one job -------------------------------------------------


async def test_three_replicas_sending_the_same_requests_make_each_job_once(
    redis_url,
):
    """Same 200 track_ids, 3 orders: 200 jobs, every result everywhere."""
    with anyio.fail_after(60), replicas(redis_url, "--eta", "0.05") as group:
        started = [
            group.start(
                name, "--count", "200", "--prefix", "job-", "--shuffle", seed
            )
            for name, seed in (("a", "1"), ("b", "2"), ("c", "3"))
        ]
        reports = [await group.finish(p) for p in started]
        stats = group.emulator.stats()

    assert_cap_kept(stats)
    assert stats["jobs_created"] == 200
    ids = collections.defaultdict(set)
    for report in reports:
        outcomes = report["outcomes"]
        assert len(outcomes) == 200
        assert all(o["ok"] for o in outcomes), outcomes
        for outcome in outcomes:
            ids[outcome["track_id"]].add(outcome["id"])
    assert len(ids) == 200
    assert all(len(job_ids) == 1 for job_ids in ids.values())
    # Each job was sent by exactly one of them.
    won = collections.Counter(
        track_id
        for report in reports
        for track_id, _, _, won in report["claims"]
        if won
    )
    assert len(won) == 200
    assert set(won.values()) == {1}


# --- Redis itself fails ------------------------------------------------------


async def test_redis_stopped_for_3_s_mid_run_keeps_the_cap(
    redis_url, redis_server
):
    """Redis down 3 s: nothing passes the cap; all completes after."""
    with anyio.fail_after(60), replicas(redis_url, "--eta", "0.1") as group:
        # The default lease: longer than the outage.
        options = ("--count", "30", "--lease", "10")
        started = [group.start(name, *options) for name in ("a", "b", "c")]
        with anyio.fail_after(30):
            while group.emulator.stats()["jobs_created"] < 20:
                await anyio.sleep(0.01)
        await anyio.to_thread.run_sync(
            lambda: redis_server.restart(3.0, keep_data=True)
        )
        reports = [await group.finish(p) for p in started]
        stats = group.emulator.stats()

    assert_cap_kept(stats)
    assert stats["jobs_created"] == 90
    for report in reports:
        assert len(report["outcomes"]) == 30
        assert all(o["ok"] for o in report["outcomes"]), report["outcomes"]
        assert report["adopted"] == []


@pytest.mark.skipif(
    shutil.which("faketime") is None,
    reason="libfaketime's `faketime` is not installed (apt-get install "
    "faketime): the skewed-clock test needs it",
)
async def test_replicas_with_clocks_30_s_off_share_the_cap(redis_url):
    """Clocks +30 s and -30 s among replicas: the cap holds, none adopts."""
    with anyio.fail_after(60), replicas(redis_url, "--eta", "0.1") as group:
        started = [
            group.start(
                "a", "--count", "20", prefix=["faketime", "-f", "+30s"]
            ),
            group.start("b", "--count", "20"),
            group.start(
                "c", "--count", "20", prefix=["faketime", "-f", "-30s"]
            ),
        ]
        clocks = [
            (await group.ready(p))["wall"] - time.time() for p in started
        ]
        reports = [await group.finish(p) for p in started]
        stats = group.emulator.stats()

    assert clocks[0] > 25  # really skewed
    assert abs(clocks[1]) < 5
    assert clocks[2] < -25
    assert_cap_kept(stats)
    assert stats["jobs_created"] == 60
    for report in reports:
        assert len(report["outcomes"]) == 20
        assert all(o["ok"] for o in report["outcomes"]), report["outcomes"]
        # Leases timed by a replica's own clock would look lapsed (or
        # everlasting) 30 s off: someone would have adopted jobs.
        assert report["adopted"] == []


# --- what Redis pays -------------------------------------------------------


async def test_redis_cost_per_job_through_the_client(redis_url, redis_server):
    """3 round trips and under 2 KiB per job; 2 connections a process."""
    with anyio.fail_after(30), replicas(redis_url, "--eta", "0.05") as group:
        # One job at a time on a cap of 5: no claim waits, the plain path.
        process = group.start(
            "a",
            "--count",
            "20",
            "--sequential",
            "--serve-webhooks",
            str(free_port()),
        )
        await group.ready(process)
        connections = 0
        while process.poll() is None:
            with redis_server.client() as admin:
                names = [c["name"] for c in admin.client_list()]
            ours = collections.Counter(
                n for n in names if n.startswith("modelslab-async:")
            )
            connections = max(connections, *ours.values(), 0)
            await anyio.sleep(0.05)
        report = await group.finish(process)

    with redis_server.client() as admin:
        keys = admin.keys("mla:*")
        jobs = [k for k in keys if ":job:" in k]
        job_bytes = [admin.memory_usage(k) for k in jobs]
        all_bytes = sum(admin.memory_usage(k) or 0 for k in keys)
    assert len(jobs) == 20
    assert connections == 2  # the command connection and the inbox reader
    # Per job: its record (request, job id, outputs, meta, token hash) and
    # its webhook index, all the account's other keys shared out.
    assert max(job_bytes) < 2048
    assert all_bytes / 20 < 2048
    # claim, record the job id, settle: heartbeats and the closing call
    # are per process, not per job.
    usage = report["redis"]
    per_process = usage["counts"]["heartbeats"] + 1
    assert usage["round_trips"] - per_process <= 3 * 20


# --- the benchmark -----------------------------------------------------------


def test_the_benchmark_runs_at_a_tiny_size(redis_server, tmp_path):
    """benchmarks/many_processes.py runs and reports every figure."""
    out = tmp_path / "many_processes.json"
    env = dict(os.environ)
    env["MODELSLAB_REDIS_SERVER"] = redis_server.binary
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.many_processes",
            "--quick",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = json.loads(out.read_text(encoding="utf-8"))["figures"]
    assert set(figures) == {
        "wall_time",
        "handoff_ms",
        "adoption",
        "callbacks_ms",
        "costs",
    }
    for run in figures["wall_time"]["runs"]:
        assert run["failed"] == 0
        assert run["max_queued"] <= CAP
        assert run["rate_limited"] == 0
    assert figures["handoff_ms"]["n"] > 0
    assert figures["adoption"]["jobs_adopted"] > 0
    assert figures["callbacks_ms"]["lost"] == 0
    assert figures["costs"]["connections_per_process"] == 2
