"""Where instance files live: the ``BlobStore`` interface and its file system implementation."""

from .base import (
    ROOM_EVERY,
    BlobStore,
    KeyLockTimeout,
    StagedFile,
    StorageError,
    blob_key,
    is_disk_full,
    stage_copy,
)
from .filesystem import FileStore, flush_to_disk

__all__ = [
    "ROOM_EVERY",
    "BlobStore",
    "FileStore",
    "KeyLockTimeout",
    "StagedFile",
    "StorageError",
    "blob_key",
    "flush_to_disk",
    "is_disk_full",
    "stage_copy",
]
