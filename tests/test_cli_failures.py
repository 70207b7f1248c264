"""
The command fails well: one line, a distinct exit status, and nothing paid
for when it stops before sending.

Each case runs ``modelslab-async`` as a real process; where an emulator is
there to count, it runs in a process of its own and must have received no
submit.
"""

from __future__ import annotations

import json
import shutil
import socket

from pathlib import Path

import aiohttp
import anyio
import pytest

from aiohttp import web

from cli_helpers import environment, read_only, run, running
from conftest import KEY
from modelslab_async import Text2Img
from processes import emulator_process, free_port


pytestmark = pytest.mark.anyio


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def no_pillow(folder: Path) -> dict[str, str]:
    """
    An environment where ``import PIL`` fails, as on a plain install.
    """
    site = folder / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nsys.modules['PIL'] = None  # as if never installed\n"
    )
    return environment(PYTHONPATH=str(site))


def test_without_pillow_the_demo_says_which_extra(tmp_path):
    """No Pillow: one line naming the emulator extra, status 3, at once."""
    env = no_pillow(tmp_path)

    demo = run(
        "generate", "a lighthouse", "--out", "out", env=env, cwd=tmp_path
    )
    serve = run("emulator", "--port", "0", env=env, cwd=tmp_path)

    for process in (demo, serve):
        assert process.returncode == 3
        line = one_line(process.stderr)
        assert 'pip install "modelslab-async[emulator]"' in line
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_an_unusable_out_stops_before_sending(tmp_path, case):
    """--out a file, uncreatable or read-only: one line, status 2, 0 submits."""
    out = tmp_path / "out"
    if case == "a file":
        out.write_text("not a folder")
        reason = "is a file, not a folder"
    elif case == "under a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
        reason = "cannot create it"
    else:
        out.mkdir()
        reason = "not writable"
    with emulator_process("--eta", "0.1") as emulator:
        args = ["generate", "p1", "p2", "--out", str(out)]
        args += ["--base-url", emulator.url]
        if case == "read-only":
            with read_only(out):
                process = run(*args, env=environment(KEY), cwd=tmp_path)
        else:
            process = run(*args, env=environment(KEY), cwd=tmp_path)
        counts = emulator.stats()["counts"]

    assert process.returncode == 2
    assert one_line(process.stderr).startswith(
        f"modelslab-async: --out {out}: {reason}"
    )
    assert "submit" not in counts
    assert "fetch" not in counts


def test_a_bad_key_stops_before_any_submit(tmp_path):
    """A refused key: one line, status 4, and the emulator got no submit."""
    with emulator_process("--eta", "0.1") as emulator:
        emulator.post("/_emulator/settings", {"keys": ["the-good-key"]})
        process = run(
            "generate", *[f"p{n}" for n in range(20)], "--out", "out",
            "--base-url", emulator.url,
            env=environment("a-bad-key"), cwd=tmp_path,
        )  # fmt: skip
        counts = emulator.stats()["counts"]

    assert process.returncode == 4
    line = one_line(process.stderr)
    assert "the API key was refused" in line
    assert "MODELSLAB_API_KEY" in line
    assert "submit" not in counts


def test_a_refused_connection_stops_at_once(tmp_path):
    """Nothing listening at --base-url: one line naming it, status 7."""
    url = f"http://127.0.0.1:{free_port()}/api/"

    process = run(
        "generate", "p1", "--out", "out", "--base-url", url,
        env=environment(KEY), cwd=tmp_path, timeout=30,
    )  # fmt: skip

    assert process.returncode == 7
    line = one_line(process.stderr)
    assert f"cannot reach the API at {url}" in line
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("http_status", "message", "status", "says"),
    [
        (401, "Invalid API key", 4, "the API key was refused"),
        (402, "Insufficient credits", 5, "out of credits"),
        (403, "Not available on your plan", 6, "your plan does not allow"),
    ],
)
async def test_a_batch_fatal_answer_stops_the_batch(
    tmp_path, http_status, message, status, says
):
    """The first 401/402/403 on a submit ends the batch with one message."""
    submits = 0

    async def fetch(_: web.Request) -> web.Response:
        body = {"status": "error", "message": "Request not found"}
        return web.json_response(body, status=404)

    async def submit(_: web.Request) -> web.Response:
        nonlocal submits
        submits += 1
        body = {"status": "error", "message": message}
        return web.json_response(body, status=http_status)

    app = web.Application()
    app.router.add_post("/api/" + Text2Img.route.fetch + "{id}", fetch)
    app.router.add_post("/api/" + Text2Img.route.submit, submit)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/api/"
    try:
        process = await anyio.to_thread.run_sync(
            lambda: run(
                "generate",
                *[f"p{n}" for n in range(40)],
                "--out",
                "out",
                "--base-url",
                url,
                "--concurrency",
                "4",
                env=environment(KEY),
                cwd=tmp_path,
            )
        )
    finally:
        await runner.cleanup()

    assert process.returncode == status, process.stderr
    assert process.stderr.count(says) == 1
    assert "failed #" not in process.stderr
    assert 1 <= submits <= 4  # the ones in flight, then no more
    jobs = json.loads((tmp_path / "out" / "manifest.json").read_text())["jobs"]
    assert sum(job["status"] == "pending" for job in jobs) >= 36


def test_a_prompts_file_that_is_not_utf8(tmp_path):
    """A Latin-1 prompts file: one line saying so, status 2, 0 submits."""
    (tmp_path / "prompts.txt").write_bytes(b"a caf\xe9 at dawn\n")
    with emulator_process("--eta", "0.1") as emulator:
        process = run(
            "generate", "-f", "prompts.txt", "--base-url", emulator.url,
            env=environment(KEY), cwd=tmp_path,
        )  # fmt: skip
        counts = emulator.stats()["counts"]

    assert process.returncode == 2
    assert one_line(process.stderr) == (
        "modelslab-async: --file prompts.txt: not UTF-8 text (byte 0xe9 on "
        "line 1); save it as UTF-8"
    )
    assert "submit" not in counts


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n\n"])
def test_an_empty_prompts_file(tmp_path, text):
    """A file with no prompts says so, naming the file, not 'give --file'."""
    (tmp_path / "prompts.txt").write_text(text)
    with emulator_process("--eta", "0.1") as emulator:
        process = run(
            "generate", "-f", "prompts.txt", "--base-url", emulator.url,
            env=environment(KEY), cwd=tmp_path,
        )  # fmt: skip
        counts = emulator.stats()["counts"]

    assert process.returncode == 2
    line = one_line(process.stderr)
    assert line.startswith("modelslab-async: prompts.txt has no prompts")
    assert "at least one PROMPT" not in line
    assert "submit" not in counts


def test_the_emulator_on_a_busy_port(tmp_path):
    """emulator --port on a port in use: one line, status 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = run(
            "emulator", "--port", str(port), env=environment(), cwd=tmp_path
        )

    assert process.returncode == 2
    assert one_line(process.stderr) == (
        f"modelslab-async: port {port} is in use; choose another with --port"
    )


async def test_the_manifest_survives_an_out_that_turns_read_only(tmp_path):
    """OUT turns read-only mid-run: the manifest goes to a printed temp file."""
    out = tmp_path / "out"
    with emulator_process("--eta", "1.5") as emulator:
        args = ["generate", "p1", "p2", "p3", "--out", "out"]
        with running(
            *args, "--base-url", emulator.url,
            env=environment(KEY), cwd=tmp_path,
        ) as batch:  # fmt: skip
            with anyio.fail_after(30):
                while emulator.stats()["jobs_created"] < 3:
                    await anyio.sleep(0.02)
            with read_only(out):
                status = batch.wait()

    err = "\n".join(batch.err)
    assert status == 1, err
    note = next(line for line in batch.err if "the manifest is in" in line)
    assert "cannot write into out: " in note
    elsewhere = Path(note.rsplit("the manifest is in ", 1)[1])
    jobs = json.loads(elsewhere.read_text())["jobs"]
    shutil.rmtree(elsewhere.parent)
    assert [job["status"] for job in jobs] == ["failed"] * 3
    assert all(job["job_id"] for job in jobs)
    assert all(job["error"].startswith("saving: ") for job in jobs)
    assert not (out / "manifest.json").exists()


async def test_proxy_variables_are_honoured(tmp_path):
    """With HTTP_PROXY set, every request goes through the proxy."""
    seen: list[str] = []

    async def forward(request: web.Request) -> web.Response:
        # A forward proxy gets the absolute URL as the request target.
        seen.append(str(request.url))
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method,
                request.url,
                data=await request.read(),
                headers={"Content-Type": request.content_type},
            ) as answer,
        ):
            return web.Response(
                body=await answer.read(),
                status=answer.status,
                content_type=answer.content_type,
            )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    proxy = f"http://127.0.0.1:{runner.addresses[0][1]}"
    env = environment(KEY, HTTP_PROXY=proxy)
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        env.pop(name, None)
    try:
        with emulator_process("--eta", "0.2") as emulator:
            process = await anyio.to_thread.run_sync(
                lambda: run(
                    "generate",
                    "p1",
                    "p2",
                    "--out",
                    "out",
                    "--base-url",
                    emulator.url,
                    env=env,
                    cwd=tmp_path,
                )
            )
            counts = emulator.stats()["counts"]
    finally:
        await runner.cleanup()

    assert process.returncode == 0, process.stderr
    assert sum(url.endswith("/text2img") for url in seen) == 2
    assert sum(counts["submit"].values()) == 2
    assert any("/api/v6/images/fetch/" in url for url in seen)
    # The images too: an output link is fetched through the proxy.
    assert sum(url.endswith(".png") for url in seen) >= 2, seen


def files_of(out: Path) -> dict[str, tuple[int, int]]:
    """
    Each file in *out*, with what a rewrite would change: inode and mtime.
    """
    return {
        path.name: (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in out.iterdir()
        if path.is_file()
    }


@pytest.mark.parametrize(
    "case",
    [
        "real, then emulator",
        "real killed, then emulator",
        "emulator, then real",
    ],
)
def test_a_folder_of_the_other_kind_of_run_is_refused(tmp_path, case):
    """The emulator never overwrites a real batch, nor the reverse: status 2."""
    out = tmp_path / "out"
    with emulator_process("--eta", "0.1") as emulator:
        real = (
            [
                "generate",
                "p1",
                "p2",
                "--out",
                "out",
                "--base-url",
                emulator.url,
            ],
            environment(KEY),
        )
        demo = (["generate", "p1", "p2", "--out", "out"], environment())
        first, second = (
            (demo, real) if case.startswith("emulator") else (real, demo)
        )
        made = run(*first[0], env=first[1], cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        if case == "real killed, then emulator":
            # A kill -9 leaves the journal and the images, no manifest.
            (out / "manifest.json").unlink()
        before = files_of(out)
        jobs = emulator.stats()["jobs_created"]

        refused = run(*second[0], env=second[1], cwd=tmp_path)
        counts = emulator.stats()

    assert refused.returncode == 2
    line = one_line(refused.stderr)
    assert line.startswith(
        f"modelslab-async: --out {Path('out')} holds a batch"
    )
    assert "--fresh" in line
    assert "another --out" in line
    if case.startswith("real"):
        assert "set MODELSLAB_API_KEY" in line
    assert files_of(out) == before
    assert len([name for name in before if name.endswith(".png")]) == 2
    assert counts["jobs_created"] == jobs
