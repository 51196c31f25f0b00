"""Rebuild the index from the stored files alone (``macpacs reindex``, and a corrupt index at start)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .index import Index
from .ingest import Outcome, RejectedInstance, dataset_hash, read_instance
from .storage import BlobStore

log = logging.getLogger(__name__)


@dataclass
class ReindexReport:
    indexed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def reindex(blobs: BlobStore, index: Index, progress: Callable[[int], None] | None = None) -> ReindexReport:
    """Empty the index, then index every stored blob through the ingest parser, with its content hash.

    Plugins are not told: nothing new arrived.
    """
    report = ReindexReport()
    index.clear()
    for key in blobs.iter_keys():
        path = blobs.local_path(key)
        try:
            if path is None:
                raise RejectedInstance(Outcome.UNREADABLE, f"{blobs.describe()} has no local file to read")
            parsed = read_instance(path)
            if parsed.record.instance["storage_key"] != key:
                raise RejectedInstance(Outcome.INVALID, "file is not at the path its SOP Instance UID gives")
            parsed.record.instance["content_hash"] = dataset_hash(path)
            index.add_instance(parsed.record, replace=True)
            report.indexed += 1
        except RejectedInstance as exc:
            report.failed.append((path or key, str(exc)))
            log.error("reindex: skipped %s: %s", path or key, exc)
        if progress:
            progress(1)
    log.info("reindex: %d instances indexed, %d files skipped", report.indexed, len(report.failed))
    return report
