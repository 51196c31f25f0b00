"""The one retrieve path: matching keys → stored instances → their files.

C-GET, C-MOVE, WADO-URI and WADO-RS all read instances through here, so that what a
workstation retrieves is exactly what C-FIND showed it, and a missing file is reported the
same way everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import BinaryIO

from .index import Index, Query, StoredInstance
from .storage import BlobStore

log = logging.getLogger(__name__)


class FileMissing(FileNotFoundError):
    """The index lists an instance whose file is gone from the store (restore or repair needed)."""


def locate(index: Index, keys: Mapping[str, str | None], *, case_insensitive: bool = True) -> list[StoredInstance]:
    """Every stored instance matching ``keys`` (DICOM keywords → matching values)."""
    return index.instances(Query(level="IMAGE", keys=keys, case_insensitive_names=case_insensitive))


def open_instance(blobs: BlobStore, instance: StoredInstance) -> BinaryIO:
    """The file of a stored instance, exactly as it was received (file meta + dataset), opened
    for reading and seekable: the stored file itself, or an object store's copy in its read
    cache. The caller closes it."""
    try:
        return blobs.open(instance.storage_key)
    except FileNotFoundError:
        raise _missing(blobs, instance) from None


def local_file(blobs: BlobStore, instance: StoredInstance) -> tuple[str, int] | None:
    """The local path of a stored instance's file and its size, from one ``stat``, for
    ``sendfile``; None when the store keeps no local files (an object store: use ``open_instance``).

    A series retrieval takes hundreds of these before its first byte, so the path stays a
    ``str``: 500 files in ~0.5 ms, against ~2.5 ms through pathlib.
    """
    path = blobs.local_path(instance.storage_key)
    if path is None:
        return None
    size = blobs.size(instance.storage_key)
    if size is None:
        raise _missing(blobs, instance)
    return path, size


def _missing(blobs: BlobStore, instance: StoredInstance) -> FileMissing:
    log.error(
        "file of instance %s is missing from the store (%s); run `macpacs reindex` after restoring files",
        instance.sop_instance_uid,
        blobs.local_path(instance.storage_key) or f"{instance.storage_key} of {blobs.describe()}",
    )
    return FileMissing(f"file of instance {instance.sop_instance_uid} is missing from the store")
