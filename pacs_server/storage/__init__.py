"""Where instance files live: the ``BlobStore`` interface, the file system store, the S3 store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .base import (
    ROOM_EVERY,
    BlobStore,
    KeyLockTimeout,
    StagedFile,
    StorageError,
    blob_key,
    is_disk_full,
    local_copy,
    parse_s3_url,
    stage_copy,
)
from .filesystem import FileStore, LocalStaging, flush_to_disk

if TYPE_CHECKING:
    from .s3 import S3Options


def open_blob_store(url: str, data_dir: Path, s3: S3Options) -> BlobStore:
    """The store ``storage.url`` names: the files folder of ``data_dir`` when empty, else the
    object store ``s3://bucket/prefix`` (boto3, from the ``s3`` extra), staging in ``data_dir``."""
    if not url:
        return FileStore(data_dir)
    try:
        from .s3 import S3Store  # boto3 is imported only by an archive that uses it
    except ImportError as exc:
        raise StorageError(
            0, f"storage.url is {url}, but the S3 client is not installed ({exc}): pip install 'macpacs[s3]'"
        ) from None
    return S3Store(url, data_dir, s3)


__all__ = [
    "ROOM_EVERY",
    "BlobStore",
    "FileStore",
    "KeyLockTimeout",
    "LocalStaging",
    "StagedFile",
    "StorageError",
    "blob_key",
    "flush_to_disk",
    "is_disk_full",
    "local_copy",
    "open_blob_store",
    "parse_s3_url",
    "stage_copy",
]
