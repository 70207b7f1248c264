"""
Batches that survive interruption: SIGINT, SIGTERM, SIGKILL, then a rerun
of the same command that finishes the batch and never pays twice.

The CLI and the emulator each run in a process of their own. To stop the
batch at a point that means the same on every run, the emulator's jobs
turn long midway: once all five queue slots hold long jobs whose ids the
batch has journaled, no submit can be on the wire.
"""

from __future__ import annotations

import json
import os
import signal

from pathlib import Path

import anyio
import pytest

from cli_helpers import Command, environment, run, running
from conftest import KEY
from processes import EmulatorProcess, emulator_process


pytestmark = pytest.mark.anyio

PROMPTS = 50
SHORT, LONG = 0.3, 4.0


def prompts_file(folder: Path, count: int = PROMPTS) -> Path:
    path = folder / "prompts.txt"
    path.write_text(
        "# the batch\n" + "".join(f"harbour study {n}\n" for n in range(count))
    )
    return path


def batch_args(url: str, *extra: str) -> list[str]:
    return [
        "generate", "-f", "prompts.txt", "--out", "out", "--base-url", url,
        "--max-queued", "5", "--width", "64", "--height", "64", *extra,
    ]  # fmt: skip


def manifest(folder: Path) -> dict:
    return json.loads((folder / "out" / "manifest.json").read_text())


async def slots_full_of_long_jobs(
    emulator: EmulatorProcess, batch: Command, *, after: int
) -> dict[str, str]:
    """
    Let *after* jobs be made, make new jobs long, and wait until the five
    queue slots all hold long jobs the batch has journaled; return those
    jobs (id to track_id).
    """
    with anyio.fail_after(60):
        while emulator.stats()["jobs_created"] < after:
            await anyio.sleep(0.02)
        emulator.post("/_emulator/settings", {"eta": LONG})
        while True:
            recorded = batch.jobs("queued")
            long = {
                job_id: track_id
                for job_id, track_id in recorded.items()
                if (job := emulator.get(f"/_emulator/jobs/{job_id}"))["status"]
                == "processing"
                and job["eta"] == LONG
            }
            if len(long) == 5:
                return long
            await anyio.sleep(0.02)


def assert_one_job_per_prompt(emulator: EmulatorProcess, final: dict) -> None:
    tracks = emulator.tracks()
    assert len(final["jobs"]) == PROMPTS
    assert all(job["status"] == "success" for job in final["jobs"])
    assert set(tracks) == {job["track_id"] for job in final["jobs"]}
    assert set(tracks.values()) == {1}
    assert emulator.stats()["duplicates"] == {}


async def test_sigint_midway_then_the_same_command_finishes(tmp_path):
    """Ctrl-C mid-batch: summary, manifest, 130; a rerun saves all 50 once."""
    prompts_file(tmp_path)
    env = environment(KEY)
    with emulator_process("--eta", str(SHORT), "--queue-limit", "5") as emu:
        args = batch_args(emu.url)
        with running(*args, "-v", env=env, cwd=tmp_path) as batch:
            running_jobs = await slots_full_of_long_jobs(emu, batch, after=15)
            os.kill(batch.pid, signal.SIGINT)
            status = batch.wait()
        emu.post("/_emulator/settings", {"eta": SHORT})
        first = manifest(tmp_path)
        sheet = (tmp_path / "out" / "index.html").read_text()
        made_first = emu.tracks()

        rerun = run(*args, env=env, cwd=tmp_path)
        final = manifest(tmp_path)
        assert_one_job_per_prompt(emu, final)

    err = "\n".join(batch.err)
    assert status == 130, err
    assert "interrupted by SIGINT" in err
    for job_id in running_jobs:
        assert f" job {job_id}" in err
    assert "To resume, run the same command again" in err
    # The exact command, as run (here: python -m modelslab_async).
    assert err.rstrip().endswith(
        " -m modelslab_async " + " ".join([*args, "-v"])
    )
    interrupted = {
        job["job_id"]: job["track_id"]
        for job in first["jobs"]
        if job["status"] == "interrupted"
    }
    assert interrupted == running_jobs
    statuses = {job["status"] for job in first["jobs"]}
    assert statuses == {"success", "interrupted", "pending"}
    # Every job made so far is in the manifest, saved or interrupted.
    listed = {
        job["track_id"]
        for job in first["jobs"]
        if job["status"] in ("success", "interrupted")
    }
    assert listed == set(made_first)
    assert sheet.count('class="interrupted"') == 5

    assert rerun.returncode == 0, rerun.stderr
    saved_before = sum(job["status"] == "success" for job in first["jobs"])
    assert f"({saved_before} saved by an earlier run)" in rerun.stderr
    by_track = {job["track_id"]: job for job in final["jobs"]}
    # The interrupted jobs were attached to, not sent again.
    for job_id, track_id in running_jobs.items():
        assert by_track[track_id]["job_id"] == job_id
    assert len(list((tmp_path / "out").glob("*.png"))) == PROMPTS


async def test_sigkill_midway_then_the_same_command_finishes(tmp_path):
    """SIGKILL mid-batch: the journal it leaves lets a rerun save all 50 once."""
    prompts_file(tmp_path)
    env = environment(KEY)
    with emulator_process("--eta", str(SHORT), "--queue-limit", "5") as emu:
        args = batch_args(emu.url)
        with running(*args, "-v", env=env, cwd=tmp_path) as batch:
            running_jobs = await slots_full_of_long_jobs(emu, batch, after=15)
            os.kill(batch.pid, signal.SIGKILL)
            status = batch.wait()
        emu.post("/_emulator/settings", {"eta": SHORT})
        made_first = emu.tracks()

        rerun = run(*args, env=env, cwd=tmp_path)
        final = manifest(tmp_path)
        assert_one_job_per_prompt(emu, final)

    assert status == -signal.SIGKILL
    assert 15 <= len(made_first) < PROMPTS
    assert rerun.returncode == 0, rerun.stderr
    by_track = {job["track_id"]: job for job in final["jobs"]}
    for job_id, track_id in running_jobs.items():
        assert by_track[track_id]["job_id"] == job_id


async def test_sigterm_stops_with_143(tmp_path):
    """SIGTERM winds down like Ctrl-C, with exit status 143."""
    prompts_file(tmp_path, 10)
    env = environment(KEY)
    with emulator_process("--eta", str(LONG)) as emu:
        with running(*batch_args(emu.url), "-v", env=env, cwd=tmp_path) as b:
            with anyio.fail_after(30):
                while len(b.jobs("queued")) < 5:
                    await anyio.sleep(0.02)
            os.kill(b.pid, signal.SIGTERM)
            status = b.wait()
        made = emu.tracks()

    first = manifest(tmp_path)
    assert status == 143, "\n".join(b.err)
    assert "terminated by SIGTERM" in "\n".join(b.err)
    statuses = [job["status"] for job in first["jobs"]]
    assert statuses.count("interrupted") == 5
    assert statuses.count("pending") == 5
    assert {j["track_id"] for j in first["jobs"] if j["job_id"]} == set(made)


async def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """Ctrl-C twice while submits hang: out at once, and no prompt twice."""
    prompts_file(tmp_path, 3)
    env = environment(KEY)
    with emulator_process(
        "--eta", str(SHORT), "--fault", "submit:stall:1.0"
    ) as emu:
        args = batch_args(emu.url)
        with running(*args, env=env, cwd=tmp_path) as batch:
            with anyio.fail_after(30):
                while emu.stats()["jobs_created"] < 3:
                    await anyio.sleep(0.02)
            os.kill(batch.pid, signal.SIGINT)
            with anyio.fail_after(30):
                while not any("on the wire" in line for line in batch.err):
                    await anyio.sleep(0.02)
            os.kill(batch.pid, signal.SIGINT)
            status = batch.wait(30)
        emu.post("/_emulator/settings", {"faults": {"rates": {}}})

        rerun = run(*args, "--json", env=env, cwd=tmp_path)
        tracks = emu.tracks()

    err = "\n".join(batch.err)
    assert status == 130, err
    assert "waiting for 3 submit(s) on the wire" in err
    assert "SIGINT again: exiting now" in err
    # Those submits may have made jobs (they did): never sent again.
    assert len(tracks) == 3
    assert set(tracks.values()) == {1}
    events = [json.loads(line) for line in rerun.stdout.splitlines()]
    assert rerun.returncode == 1
    assert {e["error_type"] for e in events} == {"SubmitUncertainError"}


async def test_fresh_starts_over_with_new_jobs(tmp_path):
    """--fresh forgets the journal: every prompt is a new job, new track_id."""
    prompts_file(tmp_path, 3)
    env = environment(KEY)
    with emulator_process("--eta", "0.1") as emu:
        args = batch_args(emu.url)
        first = run(*args, env=env, cwd=tmp_path)
        again = run(*args, env=env, cwd=tmp_path)
        after_again = emu.stats()["jobs_created"]
        fresh = run(*args, "--fresh", env=env, cwd=tmp_path)
        tracks = emu.tracks()

    assert (first.returncode, again.returncode, fresh.returncode) == (0, 0, 0)
    assert "All 3 prompts are already saved" in again.stderr
    assert after_again == 3
    assert len(tracks) == 6
    assert set(tracks.values()) == {1}
    assert not any(job["previous"] for job in manifest(tmp_path)["jobs"])


def test_fresh_moves_the_earlier_batch_aside_whole(tmp_path):
    """--fresh deletes nothing: the real batch moves aside, still resumable."""
    prompts_file(tmp_path, 3)
    out = tmp_path / "out"
    with emulator_process("--eta", "0.1") as emu:
        args = batch_args(emu.url)
        real = run(*args, env=environment(KEY), cwd=tmp_path)
        images = {p.name: p.read_bytes() for p in out.glob("*.png")}
        jobs = {
            job["track_id"]: job["job_id"]
            for job in manifest(tmp_path)["jobs"]
        }
        demo = [a for a in args if a not in ("--base-url", emu.url)]
        fresh = run(*demo, "--fresh", env=environment(), cwd=tmp_path)
        (earlier,) = out.glob("earlier-*")
        there = [str(earlier) if a == "out" else a for a in args]
        resumed = run(*there, env=environment(KEY), cwd=tmp_path)
        made = emu.stats()["jobs_created"]

    assert (real.returncode, fresh.returncode) == (0, 0), fresh.stderr
    moved = f"moved the earlier batch to {earlier.relative_to(tmp_path)}/"
    assert moved in fresh.stderr
    assert {p.name: p.read_bytes() for p in earlier.glob("*.png")} == images
    assert (
        json.loads((earlier / "manifest.json").read_text())["emulator"]
        is False
    )
    assert (earlier / ".modelslab-async" / "journal.sqlite3").is_file()
    assert manifest(tmp_path)["emulator"] is True
    assert len(list(out.glob("*.png"))) == 3
    # Where it was moved, the real batch is whole: nothing is sent again.
    assert resumed.returncode == 0, resumed.stderr
    assert "All 3 prompts are already saved" in resumed.stderr
    assert made == 3
    assert {
        job["track_id"]: job["job_id"]
        for job in json.loads((earlier / "manifest.json").read_text())["jobs"]
    } == jobs


async def test_ctrl_c_sends_nothing_more_after_a_429(tmp_path):
    """Ctrl-C while submits wait out 429s: not one POST more; they stay pending."""
    with emulator_process(
        "--eta", "2", "--queue-limit", "1", "--retry-after", "3"
    ) as emu:
        args = batch_args(emu.url, "-v")
        args[args.index("-f") : args.index("-f") + 2] = [
            "p1",
            "p2",
            "p3",
            "p4",
            "p5",
        ]
        with running(*args, env=environment(KEY), cwd=tmp_path) as batch:
            # One job fills the server's queue; the other four wait out a
            # 429 each, which the -v lines show.
            with anyio.fail_after(30):
                while sum("RateLimitError" in line for line in batch.err) < 4:
                    await anyio.sleep(0.02)
            sent = emu.stats()["counts"]["submit"]
            os.kill(batch.pid, signal.SIGINT)
            status = batch.wait(60)
        stats = emu.stats()
        statuses = [job["status"] for job in manifest(tmp_path)["jobs"]]
        # The rerun waits its 429s out, and sends each prompt once.
        emu.post("/_emulator/settings", {"eta": 0.2, "retry_after": 0.2})
        rerun = run(*args, env=environment(KEY), cwd=tmp_path)
        tracks = emu.tracks()

    err = "\n".join(batch.err)
    assert status == 130, err
    assert stats["counts"]["submit"] == sent
    assert stats["jobs_created"] == 1
    assert statuses.count("pending") == 4
    assert "4 prompt(s) not sent." in err
    assert rerun.returncode == 0, rerun.stderr
    assert "after RateLimitError" in rerun.stderr
    assert len(tracks) == 5
    assert set(tracks.values()) == {1}
