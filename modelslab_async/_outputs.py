"""
Output images: fetch, decode, save.

An output arrives in one of four forms, and :meth:`Output.read` turns each
into image bytes: a plain image URL; a URL of a ``.base64`` text file, with
or without a ``data:`` prefix (what ``base64`` mode gives); an inline
``data:`` URI; or inline raw base64.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import logging
import os
import re
import secrets
import socket
import threading
import time

from pathlib import Path
from typing import Final, Protocol
from urllib.parse import unquote, urlsplit

import anyio
import attrs

from .errors import OutputError


__all__ = [
    "Downloader",
    "Output",
    "decode_image",
    "decode_image_async",
    "sniff_extension",
]

log = logging.getLogger("modelslab_async")

#: How long a missing output (403/404) is retried when nothing else says.
MISSING_GRACE: Final = 60.0

#: Base64 text longer than this is decoded in a worker thread. Measured
#: with ``python -m benchmarks.offloop`` (2 vCPUs, CPython 3.11, medians
#: of several runs): a trip to a thread costs the loop's thread 80-150 us
#: of CPU (100-120 us round trip), and decoding costs 4-5 us per KiB:
#: 40-70 us at 16 KiB, 160-270 us at 64 KiB, 14-21 ms for the 4 MB of a
#: 3 MB PNG. The hop pays from about 24 KiB; from 64 KiB it clearly does.
OFF_LOOP_BYTES: Final = 64 * 1024

#: Base64 is decoded this many characters at a time (a multiple of 4),
#: releasing the GIL between pieces. binascii holds the GIL through a
#: call, so one call in a thread still stalls the loop for all of it, and
#: without the release the loop waits out the 5 ms switch interval for
#: each turn. Reading 4 such PNGs per job, a 1 ms heartbeat was late by
#: (p99) 78-108 ms on the loop, 18-34 ms in a thread in one call, 8-13 ms
#: in pieces, 2.0-4.3 ms in pieces releasing the GIL, at 80-115 ms per
#: job against 75-115 on the loop. Pieces of 32-64 KiB cost more time per
#: job for no less lag; from 512 KiB the lag grows again.
B64_CHUNK: Final = 128 * 1024

#: Age after which a ``.part`` file whose writer cannot be checked is
#: stale. A write of bytes already in memory takes seconds at most; the
#: hour leaves room for a slow network disk.
STALE_PART_AGE: Final = 3600.0

_MAGIC: Final = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
)


def sniff_extension(data: bytes) -> str | None:
    """
    The file extension the bytes' signature says, or ``None``.
    """
    for magic, extension in _MAGIC:
        if data.startswith(magic):
            return extension
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return None


def _shorten(text: str) -> str:
    return text if len(text) <= 100 else text[:97] + "..."


def _a2b(text: bytes, chunk: int = B64_CHUNK) -> bytes:
    """
    ``binascii.a2b_base64(text, strict_mode=True)``, in *chunk* steps.

    Raises:
        binascii.Error: Exactly when the one call would.
    """
    if len(text) <= chunk:
        return binascii.a2b_base64(text, strict_mode=True)
    # Cut only where a group of four characters ends before any padding:
    # there each piece decodes alone to what the one call gives, while
    # padding, which each Python version checks its own way, stays in the
    # last piece, after a character that is not padding.
    padding = text.find(b"=")
    end = len(text) if padding < 0 else padding
    cut = max(0, (end - 1) // 4 * 4)
    view = memoryview(text)
    pieces = []
    for start in range(0, cut, chunk):
        piece = view[start : min(start + chunk, cut)]
        pieces.append(binascii.a2b_base64(piece, strict_mode=True))
        # Releases the GIL: the event loop's thread, if it waits for it,
        # takes it now rather than after the switch interval.
        time.sleep(0)
    pieces.append(binascii.a2b_base64(view[cut:], strict_mode=True))
    return b"".join(pieces)


def _strict_b64(text: bytes) -> bytes | None:
    if text.startswith(b"data:"):
        _, _, text = text.partition(b",")
    try:
        # The common case, clean padded base64, decodes without a copy
        # of the text.
        return _a2b(text)
    except (binascii.Error, ValueError):
        pass
    compact = b"".join(text.split())
    if b"-" in compact or b"_" in compact:
        compact = compact.translate(_URLSAFE)
    compact += b"=" * (-len(compact) % 4)
    try:
        return _a2b(compact)
    except (binascii.Error, ValueError):
        return None


_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")


def _complete(data: bytes, extension: str | None) -> bool:
    """
    Whether an image of a known type ends where its format says it ends.

    A proxy can cut a body short with a matching Content-Length; the
    signature is then fine and only the end shows the loss.
    """
    if extension == ".png":
        return data.endswith(b"IEND\xaeB`\x82")
    if extension == ".jpg":
        return data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if extension == ".gif":
        return data.endswith(b";")
    if extension == ".webp":
        # The RIFF size counts what follows it, padded to an even length.
        size = int.from_bytes(data[4:8], "little") + 8
        return len(data) in (size, size + 1)
    return True


def decode_image(raw: bytes, *, content_type: str | None = None) -> bytes:
    """
    Return image bytes from a download or an inline output.

    Bytes with an image signature are returned as they are; base64 text,
    with or without a ``data:`` prefix, is decoded. Known image types must
    also be whole.

    Raises:
        OutputError: The bytes are neither an image nor base64, or are a
            truncated image.
    """
    image = raw
    extension = sniff_extension(raw)
    if extension is None:
        decoded = _strict_b64(raw.strip())
        if decoded:
            image, extension = decoded, sniff_extension(decoded)
        elif not (content_type or "").startswith("image/"):
            raise OutputError(
                "answer is neither an image nor base64 of one "
                f"(starts with {raw[:16]!r})"
            )
    if not _complete(image, extension):
        raise OutputError(f"truncated {extension} image ({len(image)} bytes)")
    return image


async def decode_image_async(
    raw: bytes, *, content_type: str | None = None
) -> bytes:
    """
    :func:`decode_image`, without holding up the event loop for long.

    Base64 text longer than :data:`OFF_LOOP_BYTES` is decoded in a worker
    thread; shorter text, and bytes that already are an image (only
    checked, never decoded), cost the loop less than the trip to a thread
    would.

    Raises:
        OutputError: As :func:`decode_image`.
    """
    if len(raw) <= OFF_LOOP_BYTES or sniff_extension(raw) is not None:
        return decode_image(raw, content_type=content_type)
    return await anyio.to_thread.run_sync(
        functools.partial(decode_image, raw, content_type=content_type)
    )


class Downloader(Protocol):
    """
    What an :class:`Output` fetches its URL through: the client, in use.

    A public method on purpose, so outputs depend on an interface rather
    than on the client's insides.
    """

    async def download(
        self, url: str, *, missing_until: float | None
    ) -> bytes:
        """
        Return the decoded image at *url*.

        Args:
            url: The output's URL.
            missing_until: ``time.monotonic()`` until which a 403 or 404
                means "not there yet" and is retried.

        Raises:
            OutputError: It could not be fetched or is not an image.
        """
        ...


@attrs.frozen
class Output:
    """
    One image a job produced.

    Outputs are made by the client (not constructed directly); read or
    save them while the client is open. Reading never sends the API key.

    Attributes:
        url: The output's URL, or the inline data the server sent.
        index: Its position among the job's outputs.
        job_id: The job it belongs to.
    """

    url: str = attrs.field(repr=lambda url: repr(_shorten(url)))
    index: int = 0
    job_id: str | None = None
    _downloader: Downloader | None = attrs.field(
        default=None, repr=False, eq=False, alias="downloader"
    )
    _deadline: float | None = attrs.field(
        default=None, repr=False, eq=False, alias="deadline"
    )

    @property
    def is_inline(self) -> bool:
        """
        Whether the data came in the response itself rather than by URL.
        """
        return not self.url.startswith(("http://", "https://"))

    @property
    def name(self) -> str:
        """
        A file name stem, from the URL, or ``<job id>-<index>`` inline.
        """
        if not self.is_inline:
            stem = Path(unquote(urlsplit(self.url).path)).stem
            if stem:
                return stem
        return f"{self.job_id or 'output'}-{self.index}"

    async def read(self, *, timeout: float | None = None) -> bytes:
        """
        Return the image's bytes, base64 already decoded.

        A URL that answers 403 or 404 is retried until the job's deadline
        or *timeout* seconds, since ``future_links`` and fresh CDN uploads
        answer so until the file exists.

        Raises:
            OutputError: It could not be fetched or is not an image.
        """
        if self.is_inline:
            raw = self.url.encode("ascii", "replace")
            return await decode_image_async(raw)
        if self._downloader is None:
            raise OutputError("this output has no client to fetch it")
        now = time.monotonic()
        if timeout is not None:
            until = now + timeout
        elif self._deadline is not None and self._deadline > now:
            until = self._deadline
        else:
            until = now + MISSING_GRACE
        return await self._downloader.download(self.url, missing_until=until)

    async def save(
        self,
        target: str | os.PathLike[str] = ".",
        *,
        timeout: float | None = None,
    ) -> Path:
        """
        Write the image to *target* atomically and return its path.

        If *target* is a directory (existing, or written with a trailing
        slash), the file is named after the output with the extension its
        bytes call for. A file path without a suffix gets that extension.
        The write happens in a worker thread, through a temporary file that
        is renamed into place, so readers never see half a file.

        Raises:
            OutputError: It could not be fetched, decoded or written.
        """
        data = await self.read(timeout=timeout)
        extension = sniff_extension(data) or ".bin"
        # Resolving the target stats the disk too, so it shares the thread.
        return await anyio.to_thread.run_sync(
            _save, target, self.name + extension, data, self.url
        )


def os_reason(exc: OSError) -> str:
    """
    Why the OS refused, as it says it (``strerror``), for error messages.
    """
    return exc.strerror or str(exc)


def _save(
    target: str | os.PathLike[str], name: str, data: bytes, url: str
) -> Path:
    path = Path(target)
    try:
        path = _target_path(path, name)
        _write_atomically(path, data)
    except OSError as exc:
        raise OutputError(
            f"cannot write {path}: {os_reason(exc)}", url=url
        ) from exc
    return path


def _target_path(target: str | os.PathLike[str], name: str) -> Path:
    path = Path(target)
    as_dir = str(target).endswith(("/", os.sep)) or path.is_dir()
    if as_dir:
        return path / name
    if not path.suffix:
        return path.with_suffix(Path(name).suffix)
    return path


#: Who writes a temporary file: a pid is only proof of life on its own
#: machine (and PID namespace, which a container's hostname tells apart),
#: so temporary names carry a short digest of the hostname beside it.
_HOST: Final = hashlib.blake2s(
    socket.gethostname().encode(), digest_size=4
).hexdigest()

#: ``.{name}.{host}-{pid}.{token}.part``, or ``.{name}.{token}.part`` as
#: earlier versions named them, without a writer to check. The name is
#: matched lazily, so a writer is found whenever the name has one.
_PART: Final = re.compile(
    r"\..+?\.(?:(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,9})\.)?"
    r"[0-9a-f]{12}\.part",
    re.ASCII,
)

#: Folders already cleaned in this process, oldest first; bounded, since
#: a service may save into a new folder per job for months.
_CLEANED: dict[str, None] = {}
_CLEANED_MAX: Final = 4096
_CLEANED_LOCK: Final = threading.Lock()


def _temp_path(path: Path) -> Path:
    """
    A unique temporary name beside *path*, naming this process as writer.
    """
    token = secrets.token_hex(6)
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.{token}.part")


def _alive(pid: int) -> bool:
    try:
        # Signal 0 only asks whether the process exists.
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        # EPERM: it exists, as another user's process.
        return True
    return True


def _is_stale(entry: os.DirEntry[str], now: float) -> bool:
    """
    Whether a ``.part`` file is one of ours that no live writer can own.
    """
    match = _PART.fullmatch(entry.name)
    if match is None or not entry.is_file(follow_symlinks=False):
        return False
    pid = match["pid"]
    # On Windows, os.kill(pid, 0) would terminate the process.
    if pid is not None and match["host"] == _HOST and os.name != "nt":
        return not _alive(int(pid))
    return now - entry.stat(follow_symlinks=False).st_mtime > STALE_PART_AGE


def _clean_stale_parts(folder: Path) -> None:
    """
    Remove the ``.part`` files in *folder* that killed writers left.

    Runs once per folder per process: a SIGKILL between the open and the
    rename leaves a hidden temporary file that nothing else removes.
    """
    key = str(folder.absolute())
    with _CLEANED_LOCK:
        if key in _CLEANED:
            return
        _CLEANED[key] = None
        if len(_CLEANED) > _CLEANED_MAX:
            del _CLEANED[next(iter(_CLEANED))]
    now = time.time()
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if _is_stale(entry, now):
                        Path(entry.path).unlink()
                        log.info("removed stale temporary file %s", entry.path)
                except OSError:
                    # Gone already, or not ours to remove: the save matters.
                    continue
    except OSError:
        # No folder yet, so nothing to clean; or one we cannot list, and
        # then the write itself says what is wrong.
        return


def _write_atomically(path: Path, data: bytes) -> None:
    # A unique temporary name beside the target, then one rename: readers
    # see the old file or the new one, never half of one. Unlike mkstemp's
    # 0600, the file gets the usual 0666 less the umask.
    _clean_stale_parts(path.parent)
    temp = _temp_path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(temp, flags, 0o666)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
