"""The blob store interface: what the archive asks of wherever instance files live.

Every protocol reads and writes files through a ``BlobStore``, and nothing outside
``pacs_server/storage/`` builds or reads a storage path or its staging folder. A blob's key is
derived from a hash of its SOP Instance UID (``blob_key``), never the raw UID, so that a hostile
UID (``../``, ``/``, NUL) can never choose where anything is written.

The life of a blob: a receiver asks ``stage()`` for a file to write into (on the store's own
volume, so that ``put`` can rename it), hands the staged file's name to ingest, and ingest
``put``s it under its key once it is checked. After ``put`` returns, the blob survives a power
cut (or, for an object store, once the store has confirmed the object). The local file system
is ``filesystem.FileStore``; an S3-compatible object store is ``s3.S3Store``, which stages
locally too and returns None from ``local_path``: readers use ``open``, and only the file
system store's ``local_path`` feeds ``sendfile``.

A full disk is a fault like any other: a staged file refuses to grow once free space falls
below the floor the ingestor sets (``keep_free``: ``storage.min_free_mb``), checked every
``ROOM_EVERY`` bytes while data streams in, so that the index (whose commits need space too)
never finds the volume full because of us; the receivers turn that refusal, and a real ENOSPC,
into 0xA700 or HTTP 507 (``is_disk_full``) and remove what they staged.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import IO, BinaryIO, Protocol

# Free space is checked once per this many bytes written to a staged file: one statvfs per
# 16 MB costs nothing, where one per network PDU (16 KB) would be felt on the hot path.
ROOM_EVERY = 16 * 1024 * 1024
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX = re.compile(r"[A-Za-z0-9!_.*'()/-]*")  # S3's "safe characters" for key names


class StorageError(OSError):
    """The store could not write or read a blob (disk full, read-only volume...)."""


class KeyLockTimeout(TimeoutError):
    """Another ingest held the lock of a key (``BlobStore.lock``) longer than the bounded wait."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` means "no space left": a real ENOSPC or EDQUOT, or the store's free-space floor."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


class StagedFile:
    """A file being received into the staging area, as ``BlobStore.stage`` returns it.

    It behaves as ``tempfile.NamedTemporaryFile(delete=False)`` does for its users (``name``,
    ``write``, ``close``, ``file``, a context manager), and every ``ROOM_EVERY`` bytes written
    asks ``room`` whether the volume still has the space the store keeps free, which raises
    StorageError (ENOSPC) when not. Hot loops write to ``file`` directly and call ``room``
    themselves (``dimse/codec.receive_dataset``).
    """

    __slots__ = ("_next_check", "file", "name", "room", "written")

    def __init__(self, file: BinaryIO, name: str, room: Callable[[], None]) -> None:
        self.file = file
        self.name = name
        self.room = room
        self.written = 0
        self._next_check = 0

    def write(self, data: bytes | memoryview) -> int:
        if self.written >= self._next_check:
            self.room()
            self._next_check = self.written + ROOM_EVERY
        count = self.file.write(data)
        self.written += count
        return count

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def discard(self) -> None:
        """Close and remove the file (whatever was written is not wanted: disk full, a refused request)."""
        with suppress(OSError):  # the buffered tail could not be written either: the file goes anyway
            self.file.close()
        with suppress(FileNotFoundError):
            os.unlink(self.name)

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()


def blob_key(sop_instance_uid: str) -> str:
    """The key of an instance: ``ab/cd/<sha256 hex>.dcm`` of its SOP Instance UID."""
    digest = hashlib.sha256(sop_instance_uid.encode("ascii", "strict")).hexdigest()
    return f"{digest[:2]}/{digest[2:4]}/{digest}.dcm"


class BlobStore(Protocol):
    """Where instance files live. Every method may raise StorageError for a store that fails."""

    def stage(self) -> StagedFile:
        """A new, empty file to receive a blob into, open for writing (``.name`` is its path).

        The caller writes and closes it, then gives its name to ingest, which ``put``s or
        deletes it. Files left by a crash are removed by ``clean_staging``. Writing refuses to
        go below the floor set by ``keep_free`` (StorageError, ENOSPC).
        """
        ...

    def scratch(self) -> IO[bytes]:
        """An unnamed temporary file on the store's volume, for work too large for memory
        (inflating a deflated dataset); gone when closed, or when the process dies."""
        ...

    def keep_free(self, nbytes: int) -> None:
        """Keep at least ``nbytes`` free on the volume: staged files stop growing below it."""
        ...

    def check_room(self) -> None:
        """StorageError (ENOSPC, with a message for the administrator) when free space is below the floor."""
        ...

    def lock(self, key: str, timeout: float) -> AbstractContextManager[None]:
        """Hold ``key`` against every other ingest of this store, in any process of the host, for
        the check, ``put`` and index commit of one instance; KeyLockTimeout after ``timeout`` s.
        (Across the nodes sharing an object store, the index's content hash settles conflicts.)"""
        ...

    def put(self, staged: str | Path, key: str) -> None:
        """Make the staged file the blob ``key``, durably, atomically replacing one already there."""
        ...

    def open(self, key: str) -> BinaryIO:
        """The blob's bytes as a seekable local file, for reading; FileNotFoundError when there is
        none. Every reader reads through this (an object store's copy comes through its cache)."""
        ...

    def size(self, key: str) -> int | None:
        """The blob's size in bytes, or None when there is no such blob."""
        ...

    def delete(self, key: str) -> None:
        """Remove the blob (nothing happens when it is already gone)."""
        ...

    def local_path(self, key: str) -> str | None:
        """A file system path of the blob where the backend has one (for ``sendfile``), else None."""
        ...

    def iter_keys(self) -> Iterator[str]:
        """Every stored blob's key, in ascending order, streamed (reindex and verify walk these;
        verify merges them with the index's rows)."""
        ...

    def free_bytes(self) -> int:
        """Free space where new blobs go."""
        ...

    def clean_staging(self, older_than: float = 3600.0) -> int:
        """Remove staged files that no live process is writing (left by a crash, a kill, a power
        cut), and any untouched for ``older_than`` seconds; returns how many went."""
        ...

    def probe(self) -> None:
        """Check that a blob could be written now (the health check); StorageError if not."""
        ...

    def describe(self) -> str:
        """Where the blobs are, for log lines and the status page."""
        ...


def parse_s3_url(url: str) -> tuple[str, str]:
    """The bucket and key prefix (``""`` or ending in ``/``) of ``s3://bucket/prefix``; ValueError
    with what is wrong otherwise."""
    if not url.startswith("s3://"):
        raise ValueError(f"storage.url = {url!r}: an object store is written s3://bucket or s3://bucket/prefix")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"storage.url = {url!r}: {bucket!r} is not a bucket name "
            "(3 to 63 lower-case letters, digits, dots and hyphens)"
        )
    prefix = prefix.strip("/")
    if prefix and (not _PREFIX.fullmatch(prefix) or any(part in ("", ".", "..") for part in prefix.split("/"))):
        raise ValueError(
            f"storage.url = {url!r}: the prefix {prefix!r} may hold letters, digits and !_.*'()- between slashes"
        )
    return bucket, f"{prefix}/" if prefix else ""


def stage_copy(blobs: BlobStore, source: Path) -> str:
    """Copy an outside file into a staged file of ``blobs`` (``macpacs import``); returns its name."""
    with open(source, "rb") as src:
        staged = blobs.stage()
        try:
            while chunk := src.read(1 << 20):
                staged.write(chunk)
            staged.close()
        except BaseException:
            staged.discard()
            raise
    return staged.name


@contextmanager
def local_copy(blobs: BlobStore, key: str) -> Iterator[Path]:
    """A local file holding blob ``key``, for readers that need a path (the ingest parser in
    reindex and verify): the blob itself where the store has one, else a staged copy that is
    removed afterwards. FileNotFoundError when there is no such blob."""
    path = blobs.local_path(key)
    if path is not None:
        yield Path(path)
        return
    staged = blobs.stage()
    try:
        with blobs.open(key) as src:
            while chunk := src.read(1 << 20):
                staged.write(chunk)
        staged.close()
        yield Path(staged.name)
    finally:
        staged.discard()
