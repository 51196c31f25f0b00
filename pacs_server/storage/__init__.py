"""Where instance files live: the ``BlobStore`` interface and its file system implementation."""

from .base import BlobStore, StorageError, blob_key, stage_copy
from .filesystem import FileStore, flush_to_disk

__all__ = ["BlobStore", "FileStore", "StorageError", "blob_key", "flush_to_disk", "stage_copy"]
