"""
Outputs: every delivery form decodes to the image, saved atomically.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import os
import stat
import subprocess
import sys
import tempfile
import time

from pathlib import Path

import anyio
import pytest

from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from conftest import FAST_RETRY, KEY
from modelslab_async import (
    Client,
    FluxKleinText2Img,
    JobResponse,
    JobResult,
    JobStatus,
    Output,
    Text2Img,
)
from modelslab_async import _outputs as outputs_module
from modelslab_async._outputs import (
    OFF_LOOP_BYTES,
    _a2b,
    decode_image,
    decode_image_async,
    sniff_extension,
)
from modelslab_async.emulator import Faults
from modelslab_async.emulator._images import render_png
from modelslab_async.errors import OutputError


pytestmark = pytest.mark.anyio

PNG = b"\x89PNG\r\n\x1a\n"


def expected_png(emulator, result, index=0) -> bytes:
    """
    The bytes the emulator rendered for one output of a job.
    """
    job = emulator.job(result.id)
    return render_png(job.seed + index, job.prompt, job.width, job.height)


@pytest.mark.parametrize(
    ("delivery", "base64_mode", "inline"),
    [
        ("url", False, False),
        ("url", True, False),
        ("url_data_uri", True, False),
        ("inline", True, True),
        ("inline_data_uri", True, True),
    ],
)
async def test_each_form_saves_the_image(  # noqa: PLR0917 (fixtures)
    emulator, client, tmp_path, delivery, base64_mode, inline
):
    """Plain, .base64 (raw or data:) and inline outputs save the PNG."""
    emulator.base64_delivery = delivery

    result = await client.generate(
        FluxKleinText2Img(
            prompt="a lighthouse", width=96, height=64, base64=base64_mode
        )
    )
    (output,) = result.outputs
    path = await output.save(tmp_path)

    assert output.is_inline is inline
    if base64_mode and not inline:
        assert output.url.endswith(".base64")
    assert path.suffix == ".png"
    assert path.read_bytes() == expected_png(emulator, result)
    with Image.open(path) as image:
        assert image.size == (96, 64)


async def test_late_outputs_are_retried_until_they_exist(
    emulator, client, tmp_path
):
    """An output that answers 404 at first is fetched once it exists."""
    emulator.cdn_delay = 0.3

    result = await client.generate(Text2Img(prompt="p", width=64, height=64))
    data = await result.outputs[0].read()

    assert data == expected_png(emulator, result)
    statuses = [r.status for r in emulator.requests("download")]
    assert statuses[0] == 404
    assert statuses[-1] == 200


async def test_outputs_missing_past_the_deadline(emulator, client):
    """An output still missing after the timeout raises OutputError."""
    emulator.cdn_delay = 60

    result = await client.generate(Text2Img(prompt="p", width=64, height=64))
    with pytest.raises(OutputError) as caught:
        await result.outputs[0].read(timeout=0.2)

    assert caught.value.http_status == 404
    assert caught.value.url == result.outputs[0].url


async def test_downloads_never_carry_the_key(emulator, client, tmp_path):
    """Neither the URL nor any header of a download holds the API key."""
    result = await client.generate(Text2Img(prompt="p", samples=2))

    await result.save_all(tmp_path)

    downloads = emulator.requests("download")
    assert len(downloads) == 2
    for record in downloads:
        assert KEY not in record.path
        assert all(KEY not in v for v in record.headers.values())
        assert "Cookie" not in record.headers


async def test_save_all_names_files_apart(emulator, client, tmp_path):
    """save_all writes each output once, in order, with no temp files."""
    result = await client.generate(Text2Img(prompt="p", samples=3))

    paths = await result.save_all(tmp_path / "deep" / "dir")

    assert len(set(paths)) == 3
    for index, path in enumerate(paths):
        assert path.read_bytes() == expected_png(emulator, result, index)
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(
        p.name for p in paths
    )


async def test_save_to_a_file_path(emulator, client, tmp_path):
    """A path without suffix gets the sniffed one; with suffix, kept."""
    result = await client.generate(Text2Img(prompt="p"))
    (output,) = result.outputs

    bare = await output.save(tmp_path / "picture")
    named = await output.save(tmp_path / "picture.image")
    again = await output.save(tmp_path / "picture.png")

    assert bare == tmp_path / "picture.png"
    assert named == tmp_path / "picture.image"
    assert again == bare
    assert bare.read_bytes() == named.read_bytes()


@pytest.fixture(name="cdn")
async def _cdn():
    """
    A CDN that serves a JPEG under a .png name and HTML under .jpg.
    """
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(jpeg, format="JPEG")
    webp = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(webp, format="WEBP")
    files = {
        "/lying.png": (jpeg.getvalue(), "image/png"),
        "/image.webp.base64": (
            base64.b64encode(webp.getvalue()),
            "text/plain",
        ),
        "/page.jpg": (b"<html>not found</html>", "text/html"),
    }

    async def serve(request: web.Request) -> web.Response:
        body, content_type = files[request.path]
        return web.Response(body=body, content_type=content_type)

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_a_late_file_does_not_block_other_downloads(emulator):
    """Waiting out a late file holds no download slot."""
    emulator.eta = 0
    emulator.cdn_delay = 30
    async with Client(
        KEY, base_url=emulator.url, download_concurrency=1, retry=FAST_RETRY
    ) as client:
        late = await client.generate(Text2Img(prompt="late"))
        ready = await client.generate(Text2Img(prompt="ready"))
        emulator.job(ready.id).ready_at -= 60  # its file is long there
        waiting = asyncio.create_task(late.outputs[0].read(timeout=10))
        await asyncio.sleep(0.05)

        data = await ready.outputs[0].read(timeout=5)

        assert data.startswith(PNG)
        assert not waiting.done()
        waiting.cancel()


async def test_type_comes_from_the_bytes(cdn, tmp_path):
    """The extension follows the bytes, not the URL; HTML is refused."""
    async with Client(KEY, base_url=cdn, retry=FAST_RETRY) as client:
        lying = Output(f"{cdn}/lying.png", downloader=client._engine)
        webp = Output(f"{cdn}/image.webp.base64", downloader=client._engine)
        page = Output(f"{cdn}/page.jpg", downloader=client._engine)

        jpeg_path = await lying.save(tmp_path)
        webp_path = await webp.save(tmp_path)
        with pytest.raises(OutputError, match="neither an image"):
            await page.read()

    assert jpeg_path.name == "lying.jpg"
    assert webp_path.name == "image.webp.webp"
    assert sniff_extension(webp_path.read_bytes()) == ".webp"


class CountingDownloader:
    """
    A Downloader of its own: counts calls, then asks a real client.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.calls: list[tuple[str, float | None]] = []

    async def download(
        self, url: str, *, missing_until: float | None
    ) -> bytes:
        """
        Record the call and download through the client.
        """
        self.calls.append((url, missing_until))
        return await self.client._engine.download(
            url, missing_until=missing_until
        )


async def test_any_downloader_with_a_public_download_serves(cdn, tmp_path):
    """Output fetches through the public download() of its downloader."""
    assert "Downloader" in outputs_module.__all__
    async with Client(KEY, base_url=cdn, retry=FAST_RETRY) as client:
        downloader = CountingDownloader(client)
        output = Output(f"{cdn}/lying.png", downloader=downloader)

        path = await output.save(tmp_path, timeout=5)

    ((url, until),) = downloader.calls
    assert url == f"{cdn}/lying.png"
    assert until is not None
    assert sniff_extension(path.read_bytes()) == ".jpg"


@pytest.mark.parametrize(
    "encode",
    [
        base64.b64encode,
        lambda b: b"data:image/png;base64," + base64.b64encode(b),
        lambda b: base64.b64encode(b).rstrip(b"="),
        base64.urlsafe_b64encode,
        lambda b: b"\n".join(
            base64.b64encode(b)[i : i + 76]
            for i in range(0, len(base64.b64encode(b)), 76)
        ),
    ],
    ids=["raw", "data-uri", "unpadded", "urlsafe", "wrapped"],
)
def test_base64_spellings(encode):
    """Base64 with or without prefix, padding or line breaks decodes."""
    image = render_png(1, "p", 33, 17)

    assert decode_image(encode(image)) == image


async def test_bad_bodies_are_fetched_again(emulator, client):
    """A cut-off, HTML or empty body is retried until the image is whole."""
    emulator.faults = Faults(
        schedule={"download": ["malformed", "html", "empty"]}
    )

    result = await client.generate(Text2Img(prompt="p", width=64, height=64))
    data = await result.outputs[0].read()

    assert data == expected_png(emulator, result)
    faults = [r.fault for r in emulator.requests("download")]
    assert faults == ["malformed", "html", "empty", None]


ODD_URLS = [
    "http://a..b/x",  # a host IDNA cannot encode
    "//x/y",  # no scheme
    "http:///x",  # no host
    "ftp://x/y",  # not HTTP
    "x",
    "",
    "http://[::1/x",  # a broken IPv6 host
    "http://x:99999/y",  # no such port
    f"http://a..b/{KEY}",  # a key in it is never shown
]


@pytest.mark.parametrize("url", ODD_URLS)
async def test_odd_output_urls_are_output_errors(client, caplog, url):
    """A URL nothing can be fetched from is one OutputError, at once."""
    caplog.set_level(logging.INFO, logger="modelslab_async")
    with anyio.fail_after(10), pytest.raises(OutputError) as caught:
        await client._engine.download(url, missing_until=None)

    assert type(caught.value) is OutputError
    assert caught.value.url == url
    assert KEY not in str(caught.value)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def image_bytes(image_format: str) -> bytes:
    """
    A small real image in *image_format*.
    """
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "green").save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated_images_are_refused(image_format):
    """A whole image passes; the same cut short is an OutputError."""
    whole = image_bytes(image_format)

    assert decode_image(whole) == whole
    assert decode_image(base64.b64encode(whole)) == whole
    with pytest.raises(OutputError, match="truncated"):
        decode_image(whole[: len(whole) - 3])
    with pytest.raises(OutputError, match="truncated"):
        decode_image(base64.b64encode(whole[:-3]))


@pytest.mark.parametrize(
    "raw", [b"", b"<html>oops</html>", b'{"status": "error"}', b"\x00\x01"]
)
def test_not_an_image(raw):
    """Bytes that are neither an image nor base64 raise OutputError."""
    with pytest.raises(OutputError):
        decode_image(raw)


def test_inline_names():
    """Inline outputs are named after their job and index."""
    output = Output("aGVsbG8=", index=2, job_id="77")

    assert output.is_inline
    assert output.name == "77-2"
    assert Path(Output("https://x/a/b-0.base64").name) == Path("b-0")


async def test_a_success_without_output_uses_future_links(emulator, client):
    """A success answer with an empty output list falls back to future_links."""
    emulator.eta = 0.1
    job = await client.submit(Text2Img(prompt="p", width=64, height=64))
    future = job.response.future_links

    job._record(JobResponse(status=JobStatus.SUCCESS, id=job.id, output=()))
    await asyncio.sleep(0.15)  # until the emulator has the file
    (output,) = job.outputs

    assert output.url == future[0]
    assert (await output.read()).startswith(PNG)


async def test_saved_files_get_the_usual_mode(emulator, client, tmp_path):
    """A saved image is readable like any new file (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)

    result = await client.generate(Text2Img(prompt="p", width=64, height=64))
    path = await result.outputs[0].save(tmp_path / "new" / "image")

    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["image.png"]


async def test_save_all_raises_the_output_error_itself(
    emulator, client, tmp_path
):
    """save_all() fails with the OutputError, not an exception group."""
    emulator.cdn_delay = 60
    result = await client.generate(Text2Img(prompt="p", samples=2))

    with pytest.raises(OutputError) as caught:
        await result.save_all(tmp_path, timeout=0.2)

    assert caught.value.http_status == 404
    assert list(tmp_path.iterdir()) == []


def inline_result(count: int = 2) -> JobResult:
    """
    A finished job whose outputs are inline base64 PNGs: no network.
    """
    links = tuple(
        base64.b64encode(render_png(index, "p", 16, 16)).decode()
        for index in range(count)
    )
    return JobResult(
        id="7",
        endpoint="v6",
        outputs=tuple(
            Output(link, index, "7") for index, link in enumerate(links)
        ),
        track_id=None,
        generation_time=None,
        meta={},
        response=JobResponse(status=JobStatus.SUCCESS, id="7", output=links),
        request=None,
    )


@pytest.mark.parametrize(
    ("where", "reason"),
    [("blocker", "File exists"), ("blocker/sub", "Not a directory")],
)
async def test_save_all_names_a_folder_it_cannot_create(
    tmp_path, where, reason
):
    """A file where the folder should be is an OutputError, not OSError."""
    (tmp_path / "blocker").write_bytes(b"in the way")
    folder = tmp_path / where

    with pytest.raises(OutputError) as caught:
        await inline_result().save_all(folder)

    assert str(folder) in str(caught.value)
    assert reason in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)


async def test_save_names_a_parent_it_cannot_create(tmp_path):
    """A file where the parent folder should be is an OutputError."""
    (tmp_path / "blocker").write_bytes(b"in the way")
    output = inline_result().outputs[0]

    with pytest.raises(OutputError, match="Not a directory") as caught:
        await output.save(tmp_path / "blocker" / "deeper" / "picture")

    assert str(tmp_path / "blocker") in str(caught.value)
    assert caught.value.url == output.url
    assert (tmp_path / "blocker").read_bytes() == b"in the way"


#: Saves where the OS says "Permission denied", run in a child process
#: that is not root (root may write anywhere): it drops to ``nobody``
#: after importing everything it needs, when it starts as root.
_UNPRIVILEGED_SAVES = """
import asyncio, json, os, sys
from pathlib import Path
import anyio
sys.path.insert(0, sys.argv[2])
from test_outputs import inline_result
from modelslab_async.errors import OutputError

base = Path(sys.argv[1])
anyio.run(anyio.to_thread.run_sync, print, "")  # load the thread backend
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)

async def attempt(call):
    try:
        await call
    except OutputError as exc:
        return ["OutputError", str(exc)]
    except BaseException as exc:
        return [type(exc).__name__, str(exc)]
    return ["saved", ""]

async def main():
    result = inline_result()
    return {
        "save_all": await attempt(result.save_all(base / "locked" / "new")),
        "save": await attempt(result.outputs[0].save(base / "locked" / "x")),
        "stat": await attempt(result.outputs[0].save(base / "shut" / "a" / "b")),
    }

print(json.dumps(asyncio.run(main())))
"""


def test_permission_denied_is_an_output_error():
    """Saves the OS refuses raise OutputError naming the path and why."""
    with tempfile.TemporaryDirectory() as name:
        base = Path(name)
        base.chmod(0o755)  # so the unprivileged child may enter it
        (base / "locked").mkdir(mode=0o555)
        (base / "shut").mkdir(mode=0o000)
        try:
            child = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _UNPRIVILEGED_SAVES,
                    str(base),
                    str(Path(__file__).parent),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
        finally:
            (base / "locked").chmod(0o755)
            (base / "shut").chmod(0o755)
        outcomes = json.loads(child.stdout.splitlines()[-1])

    assert outcomes["save_all"] == [
        "OutputError",
        f"cannot create folder {base / 'locked' / 'new'}: Permission denied",
    ]
    for case, where in [("save", "locked"), ("stat", "shut")]:
        kind, message = outcomes[case]
        assert kind == "OutputError", (case, message)
        assert str(base / where) in message
        assert message.endswith("Permission denied")


def part_files(folder: Path) -> set[str]:
    """
    The names of the temporary ``.part`` files in *folder*.
    """
    return {p.name for p in folder.iterdir() if p.name.endswith(".part")}


#: A writer that saves the same big file again and again until killed.
_ENDLESS_WRITER = """
import sys
from pathlib import Path
from modelslab_async._outputs import _write_atomically
target = Path(sys.argv[1]) / "big.png"
data = bytes(16 << 20)
print("writing", flush=True)
while True:
    _write_atomically(target, data)
"""

#: A writer caught in the middle of its write: the temporary file named
#: as a real save names it, half written, held open while it lives.
_STUCK_WRITER = """
import sys, time
from pathlib import Path
from modelslab_async._outputs import _temp_path
temp = _temp_path(Path(sys.argv[1]) / "stuck.png")
with temp.open("wb") as file:
    file.write(b"half an image")
    file.flush()
    print(temp.name, flush=True)
    time.sleep(120)
"""


def killed_mid_write(folder: Path) -> set[str]:
    """
    SIGKILL a real writer while its temporary file exists; what it left.
    """
    others = part_files(folder)
    for _ in range(50):
        with subprocess.Popen(
            [sys.executable, "-c", _ENDLESS_WRITER, str(folder)],
            stdout=subprocess.PIPE,
            text=True,
        ) as writer:
            assert writer.stdout.readline() == "writing\n"
            while part_files(folder) <= others and writer.poll() is None:
                pass
            writer.kill()
            writer.wait()
        left = part_files(folder) - others
        if left:
            return left
    pytest.fail("never caught the writer in the middle of a write")


@pytest.fixture(name="stuck_writer")
def _stuck_writer(tmp_path):
    """
    A live process in the middle of a write: the name of its .part file.
    """
    with subprocess.Popen(
        [sys.executable, "-c", _STUCK_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    ) as stuck:
        try:
            yield stuck.stdout.readline().strip()
        finally:
            stuck.kill()


async def test_a_killed_writers_part_file_is_removed(tmp_path, stuck_writer):
    """The first save into a folder removes .part files of dead writers."""
    left = killed_mid_write(tmp_path)
    assert left
    assert stuck_writer in part_files(tmp_path)

    path = await inline_result().outputs[0].save(tmp_path)

    assert path.read_bytes().startswith(PNG)
    assert part_files(tmp_path) == {stuck_writer}


def aged(path: Path, seconds: float) -> Path:
    """
    Create *path* and date its last change *seconds* back.
    """
    path.write_bytes(b"half an image")
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


async def test_part_files_of_unknown_writers_go_by_age(tmp_path):
    """Without a pid to check here, a .part goes only once over an hour old."""
    names = {
        # An older release's names, without the writer's pid.
        ("old", ".a.png.0123456789ab.part", 3 * 3600),
        ("new", ".b.png.0123456789ab.part", 60),
        # Another host's writer: its pid means nothing here.
        ("old", ".c.png.00000000-999999.0123456789ab.part", 3 * 3600),
        ("new", ".d.png.00000000-999999.0123456789ab.part", 60),
        # Not ours at all, however old.
        ("other", ".e.png.part", 3 * 3600),
        ("other", "f.png.0123456789ab.part", 3 * 3600),
    }
    for _, name, age in names:
        aged(tmp_path / name, age)

    await inline_result().outputs[0].save(tmp_path)

    assert part_files(tmp_path) == {n for kind, n, _ in names if kind != "old"}


async def test_a_folder_is_cleaned_once_per_process(tmp_path):
    """Later saves into a cleaned folder leave new .part files alone."""
    first, later = inline_result().outputs
    stale = ".a.png.0123456789ab.part"
    aged(tmp_path / stale, 3 * 3600)
    await first.save(tmp_path)
    assert not part_files(tmp_path)

    aged(tmp_path / stale, 3 * 3600)
    await later.save(tmp_path / "again.png")

    assert part_files(tmp_path) == {stale}


def noise_png(side: int) -> bytes:
    """
    A PNG of random noise, which compresses as badly as a photo.
    """
    pixels = os.urandom(side * side * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(buffer, "PNG")
    return buffer.getvalue()


async def suspends(call) -> tuple[bytes, bool]:
    """
    Await *call*; whether another task got to run before it returned.
    """
    events = []

    async def other() -> None:
        events.append("other")

    # Ready before the call starts: it runs at the call's first suspension.
    task = asyncio.create_task(other())
    result = await call
    events.append("returned")
    await task
    return result, events[0] == "other"


async def test_big_base64_is_decoded_off_the_loop():
    """Base64 above the threshold decodes while other tasks run."""
    image = noise_png(256)
    text = base64.b64encode(image)
    assert len(text) > OFF_LOOP_BYTES

    decoded, suspended = await suspends(decode_image_async(text))

    assert decoded == image
    assert suspended


@pytest.mark.parametrize(
    "raw",
    [
        base64.b64encode(render_png(1, "p", 16, 16)),
        b"data:image/png;base64," + base64.b64encode(render_png(1, "p", 8, 8)),
        noise_png(256),  # an image already: only its end is checked
    ],
    ids=["small base64", "small data URI", "big image bytes"],
)
async def test_cheap_decodes_stay_on_the_loop(raw):
    """Small base64 and image bytes decode at once, without a thread."""
    decoded, suspended = await suspends(decode_image_async(raw))

    assert decoded == decode_image(raw)
    assert sniff_extension(decoded) == ".png"
    assert not suspended


async def test_big_bad_base64_fails_off_the_loop_too():
    """A big truncated or garbled body raises OutputError from the thread."""
    text = base64.b64encode(noise_png(256))

    with pytest.raises(OutputError, match="truncated"):
        await decode_image_async(text[: len(text) // 2])
    with pytest.raises(OutputError, match="neither an image"):
        await decode_image_async(b"<html>" + text)


async def test_inline_outputs_of_photo_size_read_off_the_loop(tmp_path):
    """read() and save() of a big inline output leave the loop free."""
    image = noise_png(256)
    output = Output(
        "data:image/png;base64," + base64.b64encode(image).decode(),
        job_id="9",
    )

    data, suspended = await suspends(output.read())
    path = await output.save(tmp_path)

    assert data == image
    assert suspended
    assert path.read_bytes() == image


TEXTS = st.binary(max_size=64).map(base64.b64encode) | st.binary(max_size=80)
EDITS = st.lists(
    st.tuples(st.integers(0, 120), st.sampled_from(b"==A/+-_ \n\x00")),
    max_size=4,
)


@pytest.mark.property
@given(text=TEXTS, edits=EDITS, chunk=st.sampled_from([4, 8, 12, 64]))
def test_decoding_in_pieces_is_decoding_at_once(text, edits, chunk):
    """Base64 in pieces decodes, or fails, exactly as in one call."""
    for position, byte in edits:
        text = text[:position] + bytes([byte]) + text[position:]
    try:
        whole = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        with pytest.raises(binascii.Error):
            _a2b(text, chunk)
    else:
        assert _a2b(text, chunk) == whole
