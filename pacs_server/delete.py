"""The one delete path: whatever a query matches → index rows removed → files removed.

XML-RPC ``DBWindowFind`` with ``execute: Delete`` uses it, and so will the web pages. The order is
chosen so that a crash in the middle never leaves the index pointing at missing files: rows (with
the parents they leave empty and the counters of the rest) go in one transaction first, files after
it commits. A crash between the two leaves orphan files only; they cost disk space and are logged,
and nothing a client can query refers to them.

Each file is removed under its key's lock (``BlobStore.lock``, the one ingest holds from its
check to its commit), and only if no row describes it by then: an instance sent again while it
was being deleted, and acknowledged, keeps its file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .index import Index, Query
from .storage import BlobStore, KeyLockTimeout

KEY_LOCK_TIMEOUT_S = 15.0  # as ingest's: a store holding the key waits at most 10 s for the index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deleted:
    """What one delete removed."""

    instances: int
    series: int
    studies: int
    patients: int
    files_not_removed: int  # files that were already missing or could not be unlinked

    def __str__(self) -> str:
        return (
            f"{self.studies} studies, {self.series} series, {self.instances} instances, "
            f"{self.patients} patients removed"
        )


def delete_matching(index: Index, blobs: BlobStore, query: Query, *, reason: str = "") -> Deleted:
    """Remove every instance under what ``query`` matches at its level, and the parents left empty.

    A Series query removes those series only, never their whole study; an Image query removes
    single instances. ``reason`` (who asked) goes into the log line.
    """
    victims = index.instances(query)
    if not victims:
        return Deleted(0, 0, 0, 0, 0)
    removed = index.remove_instances([v.pk for v in victims])
    not_removed = 0
    for victim in victims:
        try:
            with blobs.lock(victim.storage_key, KEY_LOCK_TIMEOUT_S):
                if blobs.size(victim.storage_key) is None:
                    not_removed += 1
                    continue
                if index.instances(Query(level="IMAGE", keys={"SOPInstanceUID": victim.sop_instance_uid})):
                    continue  # stored again meanwhile, and acknowledged: it stays
                blobs.delete(victim.storage_key)
        except (OSError, KeyLockTimeout) as exc:
            not_removed += 1
            log.error(
                "delete: could not remove file %s of instance %s: %s", victim.storage_key, victim.sop_instance_uid, exc
            )
    result = Deleted(removed["instances"], removed["series"], removed["studies"], removed["patients"], not_removed)
    log.warning("delete%s: %s", f" ({reason})" if reason else "", result)
    if not_removed:
        log.warning("delete: %d files were already missing or could not be removed", not_removed)
    return result
