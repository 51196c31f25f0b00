"""The blob store: where instance files live, keyed by a hash of the SOP Instance UID.

A file's path is derived from SHA-256 of its SOP Instance UID and never from the UID itself,
so that a hostile UID (``../``, ``/``, NUL) can never choose where we write. Writes go to a
temporary file on the same volume, are fsynced, then renamed into place and the directory
is fsynced: after ``commit`` returns, the file survives a power cut.

The fsyncs run in the calling thread, one after the other. Handing them to a thread pool so
that they overlap the parse of the same instance was measured slower (5,000 small instances
on one association: 256–272 against 294–306 inst/s): the pool thread needs the GIL to start
its fsync, and the parsing thread holds it, so the fsync mostly began only once the parser
waited for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path


class StorageError(OSError):
    """The store could not write or read a file (disk full, read-only volume...)."""


def storage_key(sop_instance_uid: str) -> str:
    """The relative path of an instance: ``ab/cd/<sha256 hex>.dcm``."""
    digest = hashlib.sha256(sop_instance_uid.encode("ascii", "strict")).hexdigest()
    return f"{digest[:2]}/{digest[2:4]}/{digest}.dcm"


# On macOS, fsync(2) only hands the data to the drive, whose cache a power cut empties;
# F_FULLFSYNC makes the drive write it (Apple's fsync(2) man page). Linux has no such flag:
# its fsync already flushes the drive cache.
FULLFSYNC: int | None = getattr(fcntl, "F_FULLFSYNC", None)


def flush_to_disk(fd: int) -> None:
    """Make what was written to ``fd`` survive a power cut: F_FULLFSYNC where it exists, else fsync.

    Some volumes (network shares, some external disks) refuse F_FULLFSYNC; fsync is then the
    best the system offers.
    """
    if FULLFSYNC is not None:
        try:
            fcntl.fcntl(fd, FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        flush_to_disk(fd)
    finally:
        os.close(fd)


def _fsync_and_close(fd: int) -> None:
    try:
        flush_to_disk(fd)
    finally:
        os.close(fd)


def _fsync_dirs(folders: tuple[Path, ...]) -> None:
    for folder in folders:
        _fsync_dir(folder)


class FileStore:
    """Instance files under ``<data_dir>/files``, temporary files under ``<data_dir>/tmp``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "files"
        self.tmp_dir = Path(data_dir) / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key

    def new_temp(self) -> Path:
        """A fresh, unused path in the temporary folder (same volume as the files, so rename is atomic)."""
        return self.tmp_dir / f"in-{os.getpid()}-{time.monotonic_ns()}-{os.urandom(4).hex()}.part"

    def commit(self, temp_path: Path, key: str) -> Path:
        """Make ``temp_path`` durable and move it to ``key`` (atomically replacing a file there):
        fsync the file, rename it, fsync its folder (and the folder above when it is new).
        StorageError when any step fails."""
        final = self.path(key)
        try:
            fd = os.open(temp_path, os.O_RDONLY)
            _fsync_and_close(fd)
            created = not final.parent.exists()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp_path, final)
            _fsync_dirs((final.parent, final.parent.parent) if created else (final.parent,))
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot store file {final}: {exc.strerror}") from exc
        return final

    def copy_in(self, source: Path) -> Path:
        """Copy an outside file into a temporary file of the store (for imports)."""
        temp = self.new_temp()
        try:
            shutil.copyfile(source, temp)
        except OSError:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        return temp

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def iter_files(self) -> Iterator[Path]:
        """Every stored instance file (for reindexing)."""
        yield from sorted(self.root.glob("??/??/*.dcm"))

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def clean_temp(self, older_than: float = 3600.0) -> int:
        """Remove temporary files left by interrupted transfers; returns how many."""
        removed = 0
        cutoff = time.time() - older_than
        for entry in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
        return removed
