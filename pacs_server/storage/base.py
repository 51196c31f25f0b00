"""The blob store interface: what the archive asks of wherever instance files live.

Every protocol reads and writes files through a ``BlobStore``, and nothing outside
``pacs_server/storage/`` builds or reads a storage path or its staging folder. A blob's key is
derived from a hash of its SOP Instance UID (``blob_key``), never the raw UID, so that a hostile
UID (``../``, ``/``, NUL) can never choose where anything is written.

The life of a blob: a receiver asks ``stage()`` for a file to write into (on the store's own
volume, so that ``put`` can rename it), hands the staged file's name to ingest, and ingest
``put``s it under its key once it is checked. After ``put`` returns, the blob survives a power
cut. Today's implementation is the local file system (``filesystem.FileStore``); an object
store implements the same methods and returns None from ``local_path``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO, Protocol


class StorageError(OSError):
    """The store could not write or read a blob (disk full, read-only volume...)."""


def blob_key(sop_instance_uid: str) -> str:
    """The key of an instance: ``ab/cd/<sha256 hex>.dcm`` of its SOP Instance UID."""
    digest = hashlib.sha256(sop_instance_uid.encode("ascii", "strict")).hexdigest()
    return f"{digest[:2]}/{digest[2:4]}/{digest}.dcm"


class BlobStore(Protocol):
    """Where instance files live. Every method may raise StorageError for a store that fails."""

    def stage(self) -> IO[bytes]:
        """A new, empty file to receive a blob into, open for writing (``.name`` is its path).

        The caller writes and closes it, then gives its name to ingest, which ``put``s or
        deletes it. Files left by a crash are removed by ``clean_staging``.
        """
        ...

    def put(self, staged: str | Path, key: str) -> None:
        """Make the staged file the blob ``key``, durably, atomically replacing one already there."""
        ...

    def open(self, key: str) -> BinaryIO:
        """The blob's bytes, for reading; FileNotFoundError when there is none."""
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
        """Every stored blob's key (reindexing walks these)."""
        ...

    def free_bytes(self) -> int:
        """Free space where new blobs go."""
        ...

    def clean_staging(self, older_than: float = 3600.0) -> int:
        """Remove staged files older than ``older_than`` seconds (left by interrupted transfers)."""
        ...

    def probe(self) -> None:
        """Check that a blob could be written now (the health check); StorageError if not."""
        ...

    def describe(self) -> str:
        """Where the blobs are, for log lines and the status page."""
        ...


def stage_copy(blobs: BlobStore, source: Path) -> str:
    """Copy an outside file into a staged file of ``blobs`` (``macpacs import``); returns its name."""
    with open(source, "rb") as src, blobs.stage() as staged:
        try:
            while chunk := src.read(1 << 20):
                staged.write(chunk)
        except BaseException:
            staged.close()
            Path(staged.name).unlink(missing_ok=True)
            raise
    return staged.name
