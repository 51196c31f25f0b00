"""The file system blob store: instance files under ``<data_dir>/files``, staged ones under ``tmp``.

A blob is written to a staged file on the same volume, fsynced, renamed into place, and its
folder (and each new folder above it) fsynced: after ``put`` returns, the file survives a power
cut.

The fsyncs run in the calling thread, one after the other. Handing them to a thread pool so
that they overlap the parse of the same instance was measured slower (5,000 small instances
on one association: 256–272 against 294–306 inst/s): the pool thread needs the GIL to start
its fsync, and the parsing thread holds it, so the fsync mostly began only once the parser
waited for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO

from .base import StorageError

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


def _flush_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        flush_to_disk(fd)
    finally:
        os.close(fd)


class FileStore:
    """A ``BlobStore`` on a local (or mounted) volume."""

    def __init__(self, data_dir: Path) -> None:
        self._root = Path(data_dir) / "files"
        self._staging = Path(data_dir) / "tmp"
        self._root.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        self._root_text = str(self._root)

    def stage(self) -> IO[bytes]:
        return tempfile.NamedTemporaryFile(dir=self._staging, prefix=f"in-{os.getpid()}-", suffix=".part", delete=False)

    def put(self, staged: str | Path, key: str) -> None:
        final = self._root / key
        try:
            _flush_path(staged)
            created = not final.parent.exists()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
            for folder in (final.parent, final.parent.parent) if created else (final.parent,):
                _flush_path(folder)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot store file {final}: {exc.strerror}") from exc

    def open(self, key: str) -> BinaryIO:
        return open(os.path.join(self._root_text, key), "rb")

    def size(self, key: str) -> int | None:
        try:
            info = os.stat(os.path.join(self._root_text, key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._root_text, key))

    def local_path(self, key: str) -> str:
        # A str, not a Path: a series retrieval asks for hundreds of these before its first byte.
        return os.path.join(self._root_text, key)

    def iter_keys(self) -> Iterator[str]:
        for path in sorted(self._root.glob("??/??/*.dcm")):
            yield path.relative_to(self._root).as_posix()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self._root).free

    def clean_staging(self, older_than: float = 3600.0) -> int:
        removed = 0
        cutoff = time.time() - older_than
        for entry in self._staging.iterdir():
            with contextlib.suppress(OSError):
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
        return removed

    def probe(self) -> None:
        # A file written and flushed to disk where blobs are staged, as an instance would be; an
        # unnamed temporary file, so that nothing is left behind whatever happens.
        try:
            with tempfile.TemporaryFile(dir=self._staging, prefix="probe-") as fh:
                fh.write(b"alive")
                fh.flush()
                flush_to_disk(fh.fileno())
        except OSError as exc:
            raise StorageError(exc.errno, f"storage folder {self._staging} not writable: {exc.strerror}") from exc

    def describe(self) -> str:
        return f"files in {self._root}"
