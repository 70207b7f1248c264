"""
The modelslab-async command: batches, reports, fetch, emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pty
import re
import subprocess
import sys

from pathlib import Path

import pytest

from PIL import Image

import modelslab_async

from conftest import KEY
from modelslab_async import Client, Text2Img
from modelslab_async._cli import _args, _generate, main
from modelslab_async._cli._folder import OutFolder
from modelslab_async._outputs import Output


PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    """
    No key in the environment: the CLI must pick the emulator itself.
    """
    monkeypatch.delenv("MODELSLAB_API_KEY", raising=False)


def test_generate_on_the_emulator(tmp_path, capsys):
    """Without a key it says so once and writes real PNGs, printing paths."""
    out = tmp_path / "out"

    status = main(
        ["generate", "a lighthouse at dawn", "--samples", "2", "-o", str(out)]
    )

    printed = capsys.readouterr()
    assert status == 0
    assert printed.err.count("built-in emulator") == 1
    paths = [Path(line) for line in printed.out.splitlines()]
    assert [p.name for p in paths] == [
        "0001-a-lighthouse-at-dawn-1.png",
        "0001-a-lighthouse-at-dawn-2.png",
    ]
    for path in paths:
        assert path.read_bytes().startswith(PNG)


def test_a_batch_from_a_file(tmp_path, capsys):
    """20 prompts x 2 samples give 40 PNGs, a manifest and a contact sheet."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# twenty prompts\n"
        + "\n".join(f"prompt number {i}" for i in range(20))
        + "\n\n"
    )
    out = tmp_path / "out"

    status = main(
        ["generate", "-f", str(prompts), "--samples", "2", "--out", str(out),
         "--width", "64", "--height", "64", "--max-queued", "20"]
    )  # fmt: skip

    assert status == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 40
    assert all(p.read_bytes().startswith(PNG) for p in pngs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"] == {
        "jobs": 20, "succeeded": 20, "failed": 0, "interrupted": 0,
        "pending": 0, "images": 40,
    }  # fmt: skip
    assert manifest["emulator"] is True
    jobs = manifest["jobs"]
    assert [j["prompt"] for j in jobs] == [
        f"prompt number {i}" for i in range(20)
    ]
    assert len({j["job_id"] for j in jobs}) == 20
    assert all(isinstance(j["seed"], int) for j in jobs)
    assert sorted(f for j in jobs for f in j["files"]) == [
        p.name for p in pngs
    ]
    sheet = (out / "index.html").read_text()
    assert sorted(re.findall(r'<img src="([^"]+)"', sheet)) == [
        p.name for p in pngs
    ]
    capsys.readouterr()


def test_json_lines_carry_fields(tmp_path, capsys):
    """JSON lines set per-job fields; --json prints one line per job."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "wide", "width": 96, "height": 32, "seed": 7}\n'
        "plain line\n"
    )
    out = tmp_path / "out"

    status = main(["generate", "-f", str(prompts), "-o", str(out), "--json"])

    events = [
        json.loads(line) for line in capsys.readouterr().out.splitlines()
    ]
    assert status == 0
    wide, plain = sorted(events, key=lambda event: event["index"])
    assert [wide, plain] == json.loads((out / "manifest.json").read_text())[
        "jobs"
    ]
    assert wide["seed"] == 7
    with Image.open(out / wide["files"][0]) as image:
        assert image.size == (96, 32)
    with Image.open(out / plain["files"][0]) as image:
        assert image.size == (512, 512)


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ('{"prompt": "p", "width": 4096}', "width=4096 is invalid"),
        ('{"prompt": "p", "colour": "red"}', "no field 'colour'"),
        ('{"width": 64}', 'needs a "prompt"'),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_lines_are_named(tmp_path, capsys, line, complaint):
    """A bad line stops the run before sending, naming file and line."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(f"fine\n{line}\n")

    status = main(["generate", "-f", str(prompts), "-o", str(tmp_path)])

    err = capsys.readouterr().err
    assert status == 2
    assert "p.jsonl:2: " in err
    assert complaint in err
    assert not (tmp_path / "manifest.json").exists()


def test_failures_exit_non_zero_with_a_summary(tmp_path, capsys):
    """Some failed jobs: the rest are saved, the exit status says so."""
    out = tmp_path / "out"

    status = main(
        [
            "generate",
            "good one",
            "a [fail] one",
            "another good",
            "-o",
            str(out),
        ]
    )

    err = capsys.readouterr().err
    assert status == 1
    assert "2 of 3 jobs" in err
    assert "failed #2 'a [fail] one'" in err
    manifest = json.loads((out / "manifest.json").read_text())
    statuses = [(j["status"], j["error_type"]) for j in manifest["jobs"]]
    assert statuses == [
        ("success", None),
        ("failed", "GenerationFailedError"),
        ("success", None),
    ]
    failed = manifest["jobs"][1]
    assert failed["job_id"] is not None  # what `modelslab-async fetch` needs
    assert failed["track_id"].startswith("mlb-")
    assert len(list(out.glob("*.png"))) == 2


def test_no_prompt_is_a_usage_error(capsys, tmp_path):
    """generate without prompts explains itself."""
    assert main(["generate", "-o", str(tmp_path)]) == 2
    assert "at least one PROMPT" in capsys.readouterr().err


def test_fetch_needs_a_key(capsys):
    """fetch cannot use an embedded emulator, so it asks for a key."""
    assert main(["fetch", "123"]) == 2
    assert "MODELSLAB_API_KEY" in capsys.readouterr().err


def _cli(*args: str, **kwargs) -> list[str]:
    return [sys.executable, "-m", "modelslab_async", *args]


@pytest.mark.anyio
async def test_fetch_reattaches_to_a_job(emulator, tmp_path):
    """fetch JOB_ID waits for a job made elsewhere and saves its images."""
    emulator.eta = 0.3
    async with Client(KEY, base_url=emulator.url) as client:
        job = await client.submit(Text2Img(prompt="made elsewhere", samples=2))
    out = tmp_path / "fetched"

    process = await asyncio.create_subprocess_exec(
        *_cli("fetch", job.id, "--base-url", emulator.url, "-o", str(out)),
        env={**os.environ, "MODELSLAB_API_KEY": KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()

    assert process.returncode == 0, stderr.decode()
    paths = stdout.decode().split()
    assert len(paths) == 2
    assert all(Path(p).read_bytes().startswith(PNG) for p in paths)
    assert "made-elsewhere" in paths[0]


def test_progress_bar_on_a_terminal(tmp_path):
    """On a terminal, generate draws a progress bar to stderr."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        _cli("generate", *[f"p{i}" for i in range(6)], "-o", str(tmp_path)),
        stdout=subprocess.DEVNULL,
        stderr=follower,
        env={k: v for k, v in os.environ.items() if k != "MODELSLAB_API_KEY"},
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)

    assert process.wait(timeout=60) == 0
    text = seen.decode(errors="replace")
    assert "6/6" in text
    assert "100%" in text
    assert "\r" in text  # redrawn in place


def test_no_progress_bar_when_piped(tmp_path):
    """Piped, stderr carries only the notice and the summary."""
    process = subprocess.run(
        _cli("generate", "p1", "p2", "-o", str(tmp_path)),
        capture_output=True,
        env={k: v for k, v in os.environ.items() if k != "MODELSLAB_API_KEY"},
        timeout=60,
        check=True,
    )

    lines = process.stderr.decode().splitlines()
    assert len(lines) == 2
    assert "%" not in process.stderr.decode()


@pytest.mark.anyio
async def test_the_emulator_command(tmp_path):
    """modelslab-async emulator serves until stopped, URL first."""
    process = await asyncio.create_subprocess_exec(
        *_cli("emulator", "--port", "0", "--eta", "0.1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        url = (await process.stdout.readline()).decode().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api/", url)
        async with Client("any", base_url=url) as client:
            result = await client.generate(Text2Img(prompt="p"))
            data = await result.outputs[0].read()
        assert data.startswith(PNG)
    finally:
        process.terminate()
        await process.communicate()


def test_version(capsys):
    """--version prints the installed version."""
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])

    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"modelslab-async {modelslab_async.__version__}"
    )


def test_every_option_has_help():
    """Each option of each command has help text; defaults are shown."""

    def command(*_):
        return None

    root = _args.parser(
        version="0", generate=command, fetch=command,
        emulator=command, fault=str,
    )  # fmt: skip
    commands = next(
        a for a in root._actions if isinstance(a, argparse._SubParsersAction)
    )
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)
        text = sub.format_help()
        if name == "generate":
            assert "--max-queued N" in text
            assert "(default: 5)" in text
            assert "(default: twice --max-queued)" in text


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["--concurrency", "0"],
            "argument --concurrency: must be 1 or more, not 0",
        ),
        (
            ["--max-queued", "0"],
            "argument --max-queued: must be 1 or more, not 0",
        ),
        (
            ["--timeout", "0"],
            "argument --timeout: must be more than 0 seconds",
        ),
        (
            ["--width", "2000"],
            "argument --width: 2000 is invalid: must be an integer from 1 to 1024",
        ),
        (["--samples", "9"], "argument --samples: 9 is invalid"),
    ],
)
def test_bad_options_are_named_by_their_flag(tmp_path, capsys, args, says):
    """A bad option value is named by its flag, never a Python name."""
    with contextlib.suppress(SystemExit):
        status = main(["generate", "p", "-o", str(tmp_path), *args])
        assert status == 2

    err = capsys.readouterr().err
    assert says in err
    assert "_" not in err.split(":", 1)[1].split("invalid", 1)[0]
    assert not (tmp_path / "manifest.json").exists()


def test_quiet_and_verbose(tmp_path, capsys):
    """-q prints no notice or summary; -v says each job sent and retries."""
    quiet = main(["generate", "p1", "p2", "-o", str(tmp_path / "q"), "-q"])
    quiet_err = capsys.readouterr().err
    loud = main(["generate", "p1", "p2", "-o", str(tmp_path / "v"), "-v"])
    loud_err = capsys.readouterr().err

    assert (quiet, loud) == (0, 0)
    assert quiet_err == ""
    assert (
        len(re.findall(r"^#\d job \d+ queued \(mlb-", loud_err, re.MULTILINE))
        == 2
    )


def test_json_is_one_line_per_job_for_jq(tmp_path, capsys):
    """--json: one JSON object per line, one per job, failures included."""
    status = main(
        ["generate", "a", "b [fail]", "c", "d", "-o", str(tmp_path), "--json"]
    )

    lines = capsys.readouterr().out.splitlines()
    events = [json.loads(line) for line in lines]
    assert status == 1
    assert sorted(e["index"] for e in events) == [0, 1, 2, 3]
    assert [e["status"] for e in sorted(events, key=lambda e: e["index"])] == [
        "success", "failed", "success", "success",
    ]  # fmt: skip
    assert all(
        (tmp_path / name).is_file() for e in events for name in e["files"]
    )


def test_rerun_reuses_what_is_saved(tmp_path, capsys):
    """The same command again sends nothing for prompts already saved."""
    assert main(["generate", "one", "two", "-o", str(tmp_path)]) == 0
    first = json.loads((tmp_path / "manifest.json").read_text())
    capsys.readouterr()

    assert main(["generate", "one", "two", "three", "-o", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    second = json.loads((tmp_path / "manifest.json").read_text())

    assert "(2 saved by an earlier run)" in err
    assert second["jobs"][:2] == [
        {**job, "previous": True} for job in first["jobs"]
    ]
    assert second["jobs"][2]["previous"] is False


def test_an_unexpected_error_saving_one_job_fails_only_that_job(
    tmp_path, capsys, monkeypatch
):
    """A non-ModelsLabError saving one job fails that job, not the batch."""
    save = Output.save

    async def odd_save(self, target=".", **kwargs):
        if Path(target).name.startswith("0002-"):
            msg = "odd URL 'http://a..b/x'"
            raise ValueError(msg)
        return await save(self, target, **kwargs)

    monkeypatch.setattr(Output, "save", odd_save)
    out = tmp_path / "out"

    status = main(["generate", "p1", "p2", "p3", "-o", str(out)])

    err = capsys.readouterr().err
    jobs = json.loads((out / "manifest.json").read_text())["jobs"]
    assert status == 1, err
    assert [job["status"] for job in jobs] == ["success", "failed", "success"]
    assert jobs[1]["error"] == "saving: ValueError: odd URL 'http://a..b/x'"
    assert jobs[1]["error_type"] is None
    assert jobs[1]["job_id"] is not None
    assert "failed #2 'p2': saving: ValueError" in err


def test_a_bug_mid_batch_still_leaves_the_manifest(
    tmp_path, capsys, monkeypatch
):
    """A bug escaping the batch still writes the manifest, with job ids."""

    async def broken(entry, result, out):
        msg = "a bug in saving"
        raise RuntimeError(msg)

    monkeypatch.setattr(_generate, "save_result", broken)
    out = tmp_path / "out"

    with pytest.raises(ExceptionGroup) as raised:
        main(["generate", "p1", "-o", str(out)])

    assert raised.group_contains(RuntimeError, match="a bug in saving")
    assert "the manifest is in " in capsys.readouterr().err
    jobs = json.loads((out / "manifest.json").read_text())["jobs"]
    assert [job["status"] for job in jobs] == ["interrupted"]
    assert jobs[0]["job_id"] is not None


@pytest.mark.parametrize(
    "record",
    [b"", b'{"batch_id": "modelslab-async gen', b'{"batch_id": 5}', b"\xff"],
    ids=["empty", "cut short", "not a string", "not UTF-8"],
)
def test_an_unreadable_batch_record_stops_the_run(tmp_path, capsys, record):
    """A damaged batch.json is one line naming it, not a new batch id."""
    out = tmp_path / "out"
    path = out / ".modelslab-async" / "batch.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(record)

    status = main(["generate", "p1", "-o", str(out)])

    err = capsys.readouterr().err
    assert status == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"modelslab-async: {path}: ")
    assert "--fresh" in err
    assert not (out / "manifest.json").exists()
    assert path.read_bytes() == record


def test_fresh_replaces_the_batch_record_atomically(tmp_path, monkeypatch):
    """Killed as --fresh writes batch.json: the old record is intact."""
    folder = OutFolder.prepare(tmp_path / "out")
    first = folder.batch_id(fresh=True)

    def killed(*_):
        raise SystemExit(137)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed)
        with pytest.raises(SystemExit):
            folder.batch_id(fresh=True)

    assert folder.batch_id(fresh=False) == first
    assert [p.name for p in folder.state.iterdir()] == ["batch.json"]
