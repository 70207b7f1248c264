"""
The output folder: checked before anything is sent, locked for one run,
and home of the batch's journal.

Layout of ``OUT/.modelslab-async/``:

- ``journal.sqlite3`` (with SQLite's ``-wal`` and ``-shm``): the
  :class:`~modelslab_async.stores.SQLiteStore` of the batch's jobs.
- ``batch.json``: the batch id the ``track_id`` values derive from; only
  ``--fresh`` changes it.
- ``lock``: held while a run uses the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile

from collections.abc import Iterator
from pathlib import Path
from typing import Final

from ._common import UsageError


__all__ = ["STATE", "OutFolder"]

#: The batch's own files, beside the images.
STATE: Final = ".modelslab-async"
#: The batch id of every batch until a ``--fresh`` one.
_FIRST_BATCH: Final = "modelslab-async generate"
_JOURNAL_FILES: Final = ("journal.sqlite3", "journal.sqlite3-wal")


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

    def batch_id(self, *, fresh: bool) -> str:
        """
        The batch id the ``track_id`` values derive from: the same on
        every run until ``--fresh``, which picks a new one and forgets the
        journal.

        Raises:
            UsageError: ``batch.json`` is there but unreadable: a new id
                would change every ``track_id``, and a run would send
                again every job the journal holds.
        """
        record = self.state / "batch.json"
        if fresh:
            for name in (*_JOURNAL_FILES, "journal.sqlite3-shm"):
                (self.state / name).unlink(missing_ok=True)
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
