"""
Looking inside the emulator: bounded memory, exact counts, and the
inspection API that tests in other processes use, over HTTP and the CLI.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys

import aiohttp
import pytest

from modelslab_async.emulator import Emulator, Faults


pytestmark = pytest.mark.anyio

V6 = "v6/images/"
KLEIN = "v1/enterprise/flux_klein/"
V6_BODY = {"key": "k", "model_id": "flux", "prompt": "p"}


@pytest.fixture(name="http")
async def _http():
    """
    A plain aiohttp session.
    """
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http, url, body):
    """
    POST JSON and return (status, decoded body).
    """
    async with http.post(url, json=body) as response:
        return response.status, await response.json(content_type=None)


async def get(http, url):
    """
    GET JSON and return (status, decoded body).
    """
    async with http.get(url) as response:
        return response.status, await response.json()


# --- bounded memory, exact counts ------------------------------------------


async def test_the_log_is_a_ring_and_the_counts_exact(http):
    """Past record_limit old records go; counts stay exact."""
    async with Emulator(eta=0, record_limit=5) as emulator:
        jobs = [
            (await post(http, emulator.url + V6 + "text2img", V6_BODY))[1]
            for _ in range(12)
        ]

    assert [r.job_id for r in emulator.records] == [
        str(job["id"]) for job in jobs[-5:]
    ]
    assert len(emulator.requests("submit")) == 5
    assert emulator.counts["submit", 200, None] == 12
    assert emulator.jobs_created == 12
    assert emulator.stats()["records_kept"] == 5


async def test_no_record_limit_keeps_every_record(http):
    """record_limit=None keeps them all, and a limit may be set later."""
    async with Emulator(eta=0, record_limit=None) as emulator:
        for _ in range(12):
            await post(http, emulator.url + V6 + "text2img", V6_BODY)
        kept = len(emulator.records)
        emulator.record_limit = 3
        await post(http, emulator.url + V6 + "text2img", V6_BODY)

    assert kept == 12
    assert len(emulator.records) == 3


async def test_jobs_outliving_their_ttl_are_dropped(http):
    """A job older than job_ttl is forgotten; the counts remember it."""
    async with Emulator(eta=0, job_ttl=0.05) as emulator:
        _, old = await post(http, emulator.url + V6 + "text2img", V6_BODY)
        await asyncio.sleep(0.1)
        _, new = await post(http, emulator.url + V6 + "text2img", V6_BODY)
        fetched, _ = await post(
            http, emulator.url + V6 + f"fetch/{old['id']}", {"key": "k"}
        )
        async with http.get(old["output"][0]) as response:
            download = response.status

    assert fetched == 404
    assert download == 404
    with pytest.raises(KeyError):
        emulator.job(old["id"])
    assert emulator.job(new["id"]).prompt == "p"
    assert emulator.jobs_created == 2
    assert emulator.stats()["jobs_kept"] == 1


async def test_duplicates_are_track_ids_that_made_two_jobs(http):
    """duplicates() names each track_id that made more than one job."""
    async with Emulator(eta=5) as emulator:
        for track_id in ("same", "same", "other", "same"):
            await post(
                http,
                emulator.url + KLEIN + "text2img",
                {"key": "k", "prompt": "p", "track_id": track_id},
            )

    assert emulator.duplicates() == {"same": 3}
    assert emulator.jobs_for("other") == 1
    assert emulator.jobs_for("never") == 0


async def test_rate_limits_queues_and_fetches_are_counted(http):
    """429s, queue peaks and fetches are counted across routes."""
    faults = Faults(schedule={"fetch": ["rate_limit"]})
    async with Emulator(eta=5, queue_limit=2, faults=faults) as emulator:
        answers = [
            await post(http, emulator.url + V6 + "text2img", V6_BODY)
            for _ in range(4)
        ]
        other = await post(
            http, emulator.url + V6 + "text2img", {**V6_BODY, "key": "b"}
        )
        job_id = answers[0][1]["id"]
        for _ in range(3):
            await post(
                http, emulator.url + V6 + f"fetch/{job_id}", {"key": "k"}
            )
        queued = emulator.queued(), emulator.queued("k")

    assert [status for status, _ in answers] == [200, 200, 429, 429]
    assert other[0] == 200
    assert emulator.rate_limited == 3  # two full queues, one fault
    assert emulator.max_queued() == 2
    assert emulator.max_queued("b") == 1
    assert queued == (3, 2)
    assert emulator.fetches(job_id) == 2  # the fault answered first
    assert emulator.fetches_total == 2


# --- the inspection API over HTTP -------------------------------------------


async def test_stats_over_http_are_the_stats(http):
    """GET /_emulator/stats answers emulator.stats(), counted exactly."""
    faults = Faults(schedule={"submit": [None, "http_500_after"]})
    async with Emulator(eta=5, queue_limit=5, faults=faults) as emulator:
        for track_id in ("a", "a", "b"):
            await post(
                http,
                emulator.url + V6 + "text2img",
                {**V6_BODY, "track_id": track_id},
            )
        await post(http, emulator.url + V6 + "fetch/1", {"key": "k"})
        status, stats = await get(http, emulator.origin + "/_emulator/stats")
        local = emulator.stats()

    assert status == 200
    assert stats == local
    assert stats["jobs_created"] == 3
    assert stats["duplicates"] == {"a": 2}
    assert stats["max_queued"] == {"overall": 3, "by_key": {"k": 3}}
    assert stats["queued"] == {"overall": 3, "by_key": {"k": 3}}
    assert stats["counts"] == {
        "submit": {"200": 2, "500": 1},
        "fetch": {"404": 1},
    }
    assert stats["faults"] == {"submit": {"http_500_after": 1}}
    assert stats["rate_limited"] == 0


async def test_settings_change_over_http(http):
    """POST /_emulator/settings changes settings while it runs."""
    async with Emulator(eta=5) as emulator:
        status, changed = await post(
            http,
            emulator.origin + "/_emulator/settings",
            {
                "eta": 0,
                "eta_bias": 0.5,
                "announce": "nominal",
                "queue_limit": 3,
                "quirks": [],
                "faults": {
                    "rates": {"submit": {"http_503": 1.0}},
                    "webhook_drop": 0.25,
                },
            },
        )
        refused, _ = await post(http, emulator.url + V6 + "text2img", V6_BODY)
        await post(
            http,
            emulator.origin + "/_emulator/settings",
            {"faults": {"rates": {}}},
        )
        made, done = await post(http, emulator.url + V6 + "text2img", V6_BODY)
        _, shown = await get(http, emulator.origin + "/_emulator/settings")

    assert status == 200
    assert changed["settings"]["eta"] == 0
    assert (emulator.eta_bias, emulator.announce) == (0.5, "nominal")
    assert emulator.queue_limit == 3
    assert emulator.faults.webhook_drop == 0.25
    assert refused == 503
    assert (made, done["status"]) == (200, "success")
    assert "messege" not in json.dumps(done)
    assert shown["settings"]["faults"]["rates"] == {}
    assert shown["settings"]["quirks"] == []


@pytest.mark.parametrize(
    "bad",
    [
        {"eta": "fast"},
        {"eta": -1},
        {"eta": 1, "eta_error": 5},
        {"announce": "sometimes"},
        {"quirks": ["nope"]},
        {"keys": "one-key"},
        {"queue_limit": 0},
        {"port": 80},
        {"faults": {"rates": {"submit": {"http_503": 2}}}},
        {"faults": {"rates": {"nowhere": {"http_503": 0.1}}}},
        {"faults": {"schedule": {"submit": ["nope"]}}},
        {"faults": {"seed": 1}},
        {"faults": []},
        [],
    ],
)
async def test_bad_settings_get_400_and_change_nothing(http, bad):
    """A bad setting is refused with a 400; no setting changes."""
    async with Emulator(eta=2) as emulator:
        before = emulator.settings()
        status, answer = await post(
            http, emulator.origin + "/_emulator/settings", bad
        )

    assert status == 400
    assert answer["status"] == "error"
    assert answer["message"]
    assert emulator.settings() == before


async def test_a_job_over_http(http):
    """GET /_emulator/jobs/{id} tells a job's state; unknown ids 404."""
    async with Emulator(eta=5) as emulator:
        _, job = await post(
            http,
            emulator.url + V6 + "text2img",
            {**V6_BODY, "track_id": "t"},
        )
        await post(
            http, emulator.url + V6 + f"fetch/{job['id']}", {"key": "k"}
        )
        status, seen = await get(
            http, emulator.origin + f"/_emulator/jobs/{job['id']}"
        )
        missing, _ = await get(http, emulator.origin + "/_emulator/jobs/1")

    assert status == 200
    assert seen["id"] == str(job["id"])
    assert (seen["status"], seen["fetches"], seen["track_id"]) == (
        "processing",
        1,
        "t",
    )
    assert seen["ready_at"] - seen["created"] == pytest.approx(5)
    assert missing == 404
    assert "other" not in emulator.stats()["counts"]  # not counted


# --- the command ------------------------------------------------------------


def command(*args):
    """
    The ``modelslab-async emulator`` command line.
    """
    return [sys.executable, "-m", "modelslab_async", "emulator", *args]


async def test_the_command_takes_every_setting(http):
    """The emulator command's flags become the emulator's settings."""
    process = await asyncio.create_subprocess_exec(
        *command(
            "--port", "0", "--seed", "3", "--eta", "0.5",
            "--eta-error", "0.1", "--eta-bias", "0.2",
            "--announce", "nominal", "--queue-limit", "4",
            "--retry-after", "0.25", "--strict", "--no-quirks",
            "--base64-delivery", "inline", "--webhook-drop", "0.5",
            "--webhook-duplicate", "0.25",
            "--fault", "submit:http_500_after:0.05",
            "--fault", "submit:stall:0.1", "--fault", "fetch:http_503:1",
            "--record-limit", "7", "--job-ttl", "60",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        url = (await process.stdout.readline()).decode().strip()
        origin = url.removesuffix("/api/")
        _, answer = await get(http, origin + "/_emulator/settings")
        refused, _ = await post(http, url + V6 + "fetch/1", {"key": "k"})
    finally:
        process.terminate()
        await process.communicate()

    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api/", url)
    settings = answer["settings"]
    assert settings["eta"] == 0.5
    assert (settings["eta_error"], settings["eta_bias"]) == (0.1, 0.2)
    assert settings["announce"] == "nominal"
    assert (settings["queue_limit"], settings["retry_after"]) == (4, 0.25)
    assert settings["strict"] is True
    assert settings["quirks"] == []
    assert settings["base64_delivery"] == "inline"
    assert (settings["record_limit"], settings["job_ttl"]) == (7, 60)
    assert settings["faults"]["rates"] == {
        "submit": {"http_500_after": 0.05, "stall": 0.1},
        "fetch": {"http_503": 1},
    }
    assert settings["faults"]["webhook_drop"] == 0.5
    assert settings["faults"]["webhook_duplicate"] == 0.25
    assert refused == 503


def test_a_busy_port_is_one_line_and_exit_2():
    """A port in use: one line naming the way out, exit status 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = subprocess.run(
            command("--port", str(port)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert process.returncode == 2
    assert process.stdout == ""
    assert process.stderr == (
        f"modelslab-async: port {port} is in use; choose another with --port\n"
    )


@pytest.mark.parametrize(
    "fault", ["submit:nope:0.1", "nowhere:stall:0.1", "submit:stall:2", "x"]
)
def test_a_bad_fault_flag_is_a_usage_error(fault):
    """--fault takes ROUTE:KIND:RATE; anything else is a usage error."""
    process = subprocess.run(
        command("--port", "0", "--fault", fault),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert process.returncode == 2
    assert "ROUTE:KIND:RATE" in process.stderr
    assert "Traceback" not in process.stderr


def test_every_option_says_what_it_does_and_its_default():
    """emulator --help gives each option help text and its default."""
    process = subprocess.run(
        command("--help"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    # One block per option: its line, and the help lines under it.
    blocks = re.findall(
        r"^  (--\S+.*(?:\n {6,}\S.*)*)", process.stdout, re.MULTILINE
    )
    names = {block.split()[0] for block in blocks}
    assert names >= {
        "--port", "--seed", "--eta", "--eta-error", "--eta-bias",
        "--queue-limit", "--retry-after", "--strict", "--no-quirks",
        "--base64-delivery", "--webhook-drop", "--webhook-duplicate",
        "--fault",
    }  # fmt: skip
    for block in blocks:
        text = " ".join(block.split())
        assert re.fullmatch(r"--\S+( \S+)? \S.* \(default: [^)]*\)", text), (
            text
        )
