"""The file system blob store (``FileStore``): instance files under ``<data_dir>/files``, staged
ones under ``tmp``; and that local staging with its locks (``LocalStaging``), which the S3 store
uses too.

A blob is written to a staged file on the same volume, fsynced, renamed into place, and its
folder (and each new folder above it, up to ``files/`` itself) fsynced: after ``put`` returns,
the file survives a power cut.

Per-key locks (``lock``) are ``flock``s on one of 256 files in ``locks/``, chosen by the
key's first folder (``ab`` of ``ab/cd/<hash>.dcm``), with a thread lock in front (one process's
threads share its descriptor, and so its flock). Taking the first folder as the bucket also
makes each folder's creation and fsync happen under one lock, so that no ingest can rename a
file into a folder another one has created but not yet made durable.

The fsyncs run in the calling thread, one after the other. Handing them to a thread pool so
that they overlap the parse of the same instance was measured slower (5,000 small instances
on one association: 256–272 against 294–306 inst/s): the pool thread needs the GIL to start
its fsync, and the parsing thread holds it, so the fsync mostly began only once the parser
waited for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO

import psutil

from .base import KeyLockTimeout, StagedFile, StorageError

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


_STAGED_NAME = re.compile(r"in-(\d+)-")  # stage()'s prefix: the writer's PID
_BUCKET = re.compile(r"[0-9a-f]{2}")
_TWO = re.compile(r"[^.].")  # the glob ``??`` of the two folder levels (it skips hidden names)
_BLOB_NAME = re.compile(r"[^.].*\.dcm")


class LocalStaging:
    """The local half of every blob store: the staging folder ``<data_dir>/tmp`` that files are
    received into, its free-space floor, and the per-key locks in ``<data_dir>/locks``.

    ``FileStore`` renames staged files into ``files/``; an object store uploads them from here,
    so the staging volume's free space matters for both (``free_bytes``, ``check_room``).
    """

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = Path(data_dir)
        self._staging = self._data_dir / "tmp"
        self._locks = self._data_dir / "locks"
        self._staging.mkdir(parents=True, exist_ok=True)
        self._locks.mkdir(parents=True, exist_ok=True)
        self._floor = 0
        self._buckets: dict[str, tuple[threading.Lock, int]] = {}
        self._buckets_pid = os.getpid()
        self._buckets_guard = threading.Lock()

    def stage(self) -> StagedFile:
        fd, name = tempfile.mkstemp(dir=self._staging, prefix=f"in-{os.getpid()}-", suffix=".part")
        return StagedFile(os.fdopen(fd, "wb"), name, self.check_room)

    def scratch(self) -> IO[bytes]:
        return tempfile.TemporaryFile(dir=self._staging, prefix="scratch-")

    def keep_free(self, nbytes: int) -> None:
        self._floor = nbytes

    def check_room(self) -> None:
        if not self._floor:
            return
        free = self.free_bytes()
        if free < self._floor:
            raise StorageError(
                errno.ENOSPC,
                f"only {free >> 20} MB free on the data volume ({self._data_dir}), below the "
                f"{self._floor >> 20} MB kept free (storage.min_free_mb): incoming images are refused "
                "until space is freed; delete old studies or add storage, nothing else is needed",
            )

    @contextlib.contextmanager
    def lock(self, key: str, timeout: float) -> Iterator[None]:
        thread_lock, fd = self._bucket(key[:2])
        deadline = time.monotonic() + timeout
        if not thread_lock.acquire(timeout=timeout):
            raise KeyLockTimeout(f"the lock of folder {key[:2]} was held by another store for {timeout:.0f} s")
        try:
            delay = 0.0005
            while True:  # polled: the lock is contended only by two stores into one folder at once
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise KeyLockTimeout(
                            f"the lock of folder {key[:2]} was held by another process for {timeout:.0f} s"
                        ) from None
                    time.sleep(delay)
                    delay = min(2 * delay, 0.02)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            thread_lock.release()

    def _bucket(self, name: str) -> tuple[threading.Lock, int]:
        if not _BUCKET.fullmatch(name):
            raise ValueError(f"not a blob key: {name!r}...")
        with self._buckets_guard:
            if self._buckets_pid != os.getpid():  # a forked child: the parent's descriptors share its locks
                self._buckets, self._buckets_pid = {}, os.getpid()
            bucket = self._buckets.get(name)
            if bucket is None:
                fd = os.open(self._locks / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                bucket = self._buckets[name] = (threading.Lock(), fd)
            return bucket

    def free_bytes(self) -> int:
        return shutil.disk_usage(self._staging).free

    def clean_staging(self, older_than: float = 3600.0) -> int:
        removed = 0
        cutoff = time.time() - older_than
        for entry in self._staging.iterdir():
            with contextlib.suppress(OSError):
                info = entry.stat()
                if stat.S_ISREG(info.st_mode) and (info.st_mtime < cutoff or not _writer_alive(entry.name, info)):
                    entry.unlink()
                    removed += 1
        return removed

    def probe_staging(self) -> None:
        """StorageError when the staging folder cannot take a file flushed to disk now."""
        # A file written and flushed to disk where blobs are staged, as an instance would be; an
        # unnamed temporary file, so that nothing is left behind whatever happens.
        try:
            with tempfile.TemporaryFile(dir=self._staging, prefix="probe-") as fh:
                fh.write(b"alive")
                fh.flush()
                flush_to_disk(fh.fileno())
        except OSError as exc:
            raise StorageError(exc.errno, f"storage folder {self._staging} not writable: {exc.strerror}") from exc


class FileStore(LocalStaging):
    """A ``BlobStore`` on a local (or mounted) volume: blobs in ``<data_dir>/files``."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self._root = self._data_dir / "files"
        self._root.mkdir(parents=True, exist_ok=True)
        self._root_text = str(self._root)

    def put(self, staged: str | Path, key: str) -> None:
        # Every folder this creates is fsynced in its parent, up to files/ itself. Callers hold
        # the key's lock, which covers its first folder: see the module docstring.
        final = self._root / key
        first, second = final.parent.parent, final.parent
        try:
            _flush_path(staged)
            changed = [second]
            if not second.is_dir():
                if not first.is_dir():
                    first.mkdir(exist_ok=True)
                    changed.append(self._root)
                second.mkdir(exist_ok=True)
                changed.append(first)
            os.replace(staged, final)
            for folder in changed:
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
        # Folder by folder, each sorted: the keys come in ascending order (verify merges them
        # with the index's rows), and no list of a whole archive is held.
        for first in _sorted_names(self._root, _TWO):
            for second in _sorted_names(self._root / first, _TWO):
                folder = self._root / first / second
                for name in _sorted_names(folder, _BLOB_NAME):
                    yield f"{first}/{second}/{name}"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self._root).free

    def probe(self) -> None:
        self.probe_staging()

    def describe(self) -> str:
        return f"files in {self._root}"


def _writer_alive(name: str, info: os.stat_result) -> bool:
    """Whether the process that staged file ``name`` may still be writing it: the PID in its
    name runs, and started before the file was last written (else the PID was reused)."""
    match = _STAGED_NAME.match(name)
    if match is None:
        return False  # not a staged file (a probe or scratch file that outlived a crash)
    try:
        return psutil.Process(int(match.group(1))).create_time() <= info.st_mtime + 1
    except (psutil.Error, ValueError, OverflowError):
        return False


def _sorted_names(folder: Path, pattern: re.Pattern[str]) -> list[str]:
    """The names in ``folder`` that ``pattern`` matches, sorted (none when it is gone)."""
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if pattern.fullmatch(e.name))
    except (FileNotFoundError, NotADirectoryError):
        return []
