"""
Jobs outlive their process: killed runs are resumed by the next one.
"""

from __future__ import annotations

import os
import signal

import anyio
import pytest

from conftest import KEY
from modelslab_async import JobPhase
from modelslab_async._engine import Secret, account_of
from modelslab_async.stores import SQLiteStore
from processes import (
    emulator_process,
    finish,
    free_port,
    killed_at_exit,
    worker,
)


pytestmark = pytest.mark.anyio


async def test_a_killed_batch_is_finished_by_the_next_process(tmp_path):
    """SIGKILL mid-batch of 50: the next process finishes every job made."""
    journal = str(tmp_path / "jobs.sqlite3")
    # Callbacks come to the same port in both runs, as behind a tunnel: a
    # job made the instant before the kill has no id in the journal, and
    # only its webhook can find it.
    port = str(free_port())
    options = ("--eta", "1.0", "--eta-error", "0.3", "--queue-limit", "5")
    with emulator_process(*options, "--seed", "3") as emulator:
        batch = worker(
            "journal_batch", emulator.url, journal, "submit", "50", port
        )
        with killed_at_exit([batch]):
            with anyio.fail_after(60):
                while emulator.stats()["jobs_created"] < 20:
                    await anyio.sleep(0.02)
            os.kill(batch.pid, signal.SIGKILL)
        made_by_the_batch = emulator.tracks()

        resumed = finish(
            worker("journal_batch", emulator.url, journal, "resume", "0", port)
        )
        made = emulator.tracks()
        stats = emulator.stats()

    store = SQLiteStore(journal)
    states = await store.open(account_of(Secret(KEY)), max_queued=None)
    phases = {track_id: (await states.get(track_id)) for track_id in made}
    uncertain = [
        state.track_id
        for n in range(50)
        if (state := await states.get(f"job-{n}")) is not None
        and state.phase is JobPhase.UNCERTAIN
    ]
    await states.aclose()

    assert 20 <= len(made_by_the_batch) < 50  # killed mid-batch
    assert made == made_by_the_batch  # the next process submitted nothing
    assert stats["duplicates"] == {}
    assert all(count == 1 for count in made.values())
    # Every job the emulator made is finished by someone, journaled so.
    unfinished = {
        t: s and s.phase
        for t, s in phases.items()
        if s is None or not s.phase.is_finished
    }
    assert unfinished == {}, resumed
    # The uncertain ones are reported as such, with their track_id: their
    # submit never made a job.
    reported = {
        line["track_id"] for line in resumed if line["outcome"] == "uncertain"
    }
    assert reported == set(uncertain)
    assert not reported & set(made)
    assert all(
        line["outcome"] in {"finished", "uncertain"} for line in resumed
    )


async def test_a_job_made_as_its_process_died_is_found_by_its_webhook(
    tmp_path,
):
    """Killed while a made job's answer was in flight: its webhook finds it."""
    journal = str(tmp_path / "jobs.sqlite3")
    port = str(free_port())
    with emulator_process(
        "--eta", "1.5", "--fault", "submit:stall:1.0", "--seed", "4"
    ) as emulator:
        batch = worker(
            "journal_batch", emulator.url, journal, "submit", "1", port
        )
        with killed_at_exit([batch]):
            with anyio.fail_after(30):
                while emulator.stats()["jobs_created"] < 1:
                    await anyio.sleep(0.02)
            os.kill(batch.pid, signal.SIGKILL)
        emulator.post("/_emulator/settings", {"faults": {"rates": {}}})

        resumed = finish(
            worker("journal_batch", emulator.url, journal, "resume", "0", port)
        )
        stats = emulator.stats()

    assert resumed == [{"track_id": "job-0", "outcome": "finished"}]
    assert stats["jobs_created"] == 1
    assert stats["fetches"] == 0  # no id to fetch by: the webhook did it
