"""
The output folder: checked before anything is sent, locked for one run,
and home of the batch's journal.

Layout of ``OUT/.modelslab-async/``:

- ``journal.sqlite3`` (with SQLite's ``-wal`` and ``-shm``): the
  :class:`~modelslab_async.stores.SQLiteStore` of the batch's jobs.
- ``batch.json``: the batch id the ``track_id`` values derive from; only
  ``--fresh`` changes it.
- ``lock``: held while a run uses the folder.

``--fresh`` deletes nothing: it moves the earlier batch whole (images,
manifest, contact sheet, journal, batch id) into ``OUT/earlier-<time>/``,
where the same command with that ``--out`` resumes it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets
import shutil
import sqlite3
import tempfile

from collections.abc import Iterator
from pathlib import Path
from typing import Final, Literal

from ._common import UsageError


__all__ = ["STATE", "OutFolder"]

#: The batch's own files, beside the images.
STATE: Final = ".modelslab-async"
#: The batch id of every batch until a ``--fresh`` one.
_FIRST_BATCH: Final = "modelslab-async generate"
_JOURNAL_FILES: Final = (
    "journal.sqlite3",
    "journal.sqlite3-wal",
    "journal.sqlite3-shm",
)
#: The name of an image the command saves: ``0001-<slug>-1.png``.
_IMAGE: Final = re.compile(r"\d{4,}-[a-z0-9-]+-\d+\.[A-Za-z0-9]+")
#: What else a batch leaves in ``OUT``.
_REPORT: Final = ("manifest.json", "index.html")


class OutFolder:
    """
    ``--out``, checked: a folder that exists (made if need be) and that we
    can write to.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state = path / STATE

    @classmethod
    def prepare(cls, path: Path) -> OutFolder:
        """
        Make *path* a writable folder, or say in one line why it is not.

        Raises:
            UsageError: It is a file, cannot be created, or is read-only.
        """
        where = f"--out {path}"
        if path.exists() and not path.is_dir():
            msg = f"{where}: is a file, not a folder"
            raise UsageError(msg)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            msg = f"{where}: cannot create it: a part of the path is a file"
            raise UsageError(msg) from None
        except OSError as exc:
            msg = f"{where}: cannot create it: {exc.strerror or exc}"
            raise UsageError(msg) from None
        # Try it: permission bits do not tell root, ACLs or read-only
        # mounts apart.
        try:
            descriptor, probe = tempfile.mkstemp(
                dir=path, prefix=".modelslab-async-probe-"
            )
            os.close(descriptor)
            Path(probe).unlink()
            (path / STATE).mkdir(exist_ok=True)
        except OSError as exc:
            msg = f"{where}: not writable: {exc.strerror or exc}"
            raise UsageError(msg) from None
        return cls(path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """
        Hold the folder for this run: two runs on one journal would each
        adopt the other's jobs.

        Raises:
            UsageError: Another run holds it.
        """
        try:
            import fcntl  # noqa: PLC0415 (POSIX only)
        except ImportError:  # pragma: no cover (Windows: no lock)
            yield
            return
        with (self.state / "lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                msg = (
                    f"--out {self.path}: another modelslab-async run is "
                    "using it; wait for it, or choose another --out"
                )
                raise UsageError(msg) from None
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @property
    def journal(self) -> Path:
        """
        The batch's SQLite journal.
        """
        return self.state / _JOURNAL_FILES[0]

    def made_on(self) -> Literal["api", "emulator"] | None:
        """
        What the batch in the folder was made on, if one is there: a
        journal means the API (the built-in emulator keeps none, its jobs
        die with it); else the manifest says.
        """
        if any((self.state / name).exists() for name in _JOURNAL_FILES):
            return "api"
        try:
            text = (self.path / "manifest.json").read_text("utf-8")
            manifest = json.loads(text)
        except (OSError, ValueError):
            return None
        emulated = (
            manifest.get("emulator") if isinstance(manifest, dict) else None
        )
        if emulated is True:
            return "emulator"
        return "api" if emulated is False else None

    def set_aside(self) -> tuple[Path, str] | None:
        """
        For ``--fresh``: move the earlier batch whole into a new
        ``earlier-<UTC time>/`` folder: its images, manifest, contact
        sheet and journal, with a copy of its batch id, so that nothing is
        overwritten or deleted, and that folder as ``--out`` resumes it.

        Returns:
            That folder and what was moved, in words, or ``None`` when
            there was no earlier batch.

        Raises:
            UsageError: A file could not be moved.
        """
        names = self._earlier_files()
        journal = self._settled_journal()
        if not names and not journal:
            return None
        try:
            aside = self._new_aside()
            for name in names:
                (self.path / name).replace(aside / name)
            (aside / STATE).mkdir()
            record = self.state / "batch.json"
            if record.is_file():
                shutil.copy2(record, aside / STATE / record.name)
            for name in journal:
                (self.state / name).replace(aside / STATE / name)
        except OSError as exc:
            msg = (
                f"--out {self.path}: --fresh cannot move the earlier batch "
                f"aside: {exc.strerror or exc}"
            )
            raise UsageError(msg) from None
        images = sum(name not in _REPORT for name in names)
        moved = [f"{images} image(s)"] if images else []
        if "manifest.json" in names:
            moved.append("its manifest")
        if journal:
            moved.append("its journal")
        if len(moved) > 1:
            return aside, f"{', '.join(moved[:-1])} and {moved[-1]}"
        return aside, moved[0] if moved else "its contact sheet"

    def _earlier_files(self) -> list[str]:
        """
        The names in ``OUT`` of what an earlier batch left: its report,
        the files its manifest lists, and every file named as the command
        names images (a run killed with ``kill -9`` left no manifest).
        """
        names = {n for n in _REPORT if (self.path / n).is_file()}
        try:
            text = (self.path / "manifest.json").read_text("utf-8")
            jobs = json.loads(text).get("jobs", [])
            listed = {str(f) for job in jobs for f in job.get("files", [])}
        except (OSError, ValueError, AttributeError, TypeError):
            listed = set()
        names |= {
            n
            for n in listed
            if Path(n).name == n and (self.path / n).is_file()
        }
        with contextlib.suppress(OSError):
            names |= {
                path.name
                for path in self.path.iterdir()
                if _IMAGE.fullmatch(path.name) and path.is_file()
            }
        return sorted(names)

    def _settled_journal(self) -> list[str]:
        """
        The journal's files, its write-ahead log first folded into it
        where SQLite can, so that moving them is moving one file.
        """
        if (self.state / _JOURNAL_FILES[1]).exists():
            # A run killed mid-batch leaves its -wal: checkpointed and
            # closed, it goes, and the moves cannot split the journal.
            with contextlib.suppress(sqlite3.Error):
                connection = sqlite3.connect(self.journal)
                try:
                    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                finally:
                    connection.close()
        return [n for n in _JOURNAL_FILES if (self.state / n).exists()]

    def _new_aside(self) -> Path:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        for attempt in range(1, 1000):
            suffix = "" if attempt == 1 else f"-{attempt}"
            aside = self.path / f"earlier-{stamp}{suffix}"
            try:
                aside.mkdir()
            except FileExistsError:
                continue
            return aside
        msg = f"--out {self.path}: too many earlier-{stamp}-* folders"
        raise UsageError(msg)

    def batch_id(self, *, fresh: bool) -> str:
        """
        The batch id the ``track_id`` values derive from: the same on
        every run until ``--fresh``, which picks a new one (after
        :meth:`set_aside`).

        Raises:
            UsageError: ``batch.json`` is there but unreadable: a new id
                would change every ``track_id``, and a run would send
                again every job the journal holds.
        """
        record = self.state / "batch.json"
        if fresh:
            batch = f"{_FIRST_BATCH} {secrets.token_hex(8)}"
            try:
                _write_durably(record, json.dumps({"batch_id": batch}) + "\n")
            except OSError as exc:
                msg = f"{record}: cannot write it: {exc.strerror or exc}"
                raise UsageError(msg) from None
            return batch
        try:
            text = record.read_text("utf-8")
        except FileNotFoundError:
            return _FIRST_BATCH  # no --fresh yet
        except UnicodeDecodeError:
            raise _unreadable(record, "not UTF-8") from None
        except OSError as exc:
            raise _unreadable(record, exc.strerror or str(exc)) from None
        try:
            data = json.loads(text)
        except ValueError:
            raise _unreadable(record, "not valid JSON") from None
        found = data.get("batch_id") if isinstance(data, dict) else None
        if not isinstance(found, str) or not found:
            raise _unreadable(record, 'no "batch_id" string in it')
        return found


def _unreadable(record: Path, why: str) -> UsageError:
    return UsageError(
        f"{record}: cannot read the batch id ({why}); every track_id "
        "derives from it: restore the file, or start over with --fresh "
        "(which sends every prompt again)"
    )


def _write_durably(path: Path, text: str) -> None:
    """
    Replace *path* with *text* through a synced temporary file and a
    rename: a kill or a power cut leaves the old file or the new one,
    never an empty or half-written one.
    """
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with partial.open("w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """
    Make a rename in *folder* durable, where the system allows it.
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover (Windows opens no folders)
        return
    try:
        os.fsync(descriptor)
    except OSError:  # pragma: no cover (some filesystems refuse)
        pass
    finally:
        os.close(descriptor)
