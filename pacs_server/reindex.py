"""Rebuild the index from the stored files alone (``macpacs reindex``, and the server's repair of a corrupt index)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .index import Index, InstanceRecord, WriterLockTimeout
from .ingest import Outcome, RejectedInstance, dataset_hash, read_instance
from .storage import BlobStore, local_copy

log = logging.getLogger(__name__)

LOCK_RETRIES = 3  # a file whose index write meets a hung writer this often in a row is skipped


@dataclass
class ReindexReport:
    indexed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    replaced: Path | None = None  # where a damaged index found on the way was moved


def reindex(
    blobs: BlobStore, index: Index, progress: Callable[[int], None] | None = None, *, live: bool = False
) -> ReindexReport:
    """Index every stored blob through the ingest parser, with its content hash.

    Without ``live`` (``macpacs reindex``) the index is emptied first and every row rewritten.
    ``live`` is the server's rebuild into the fresh index that replaced a corrupt one: that index
    already takes new stores, so it is not emptied and a row already there (an instance stored
    since, newer than a file read a moment ago) is kept. Either way a finished run removes the
    recovery file (``Index.end_recovery``). Plugins are not told: nothing new arrived.
    """
    report = ReindexReport()
    if not live:
        # A file that opens and migrates may still be damaged where start-up does not read
        # (the instance table's pages): then it is moved aside too, and the rebuild goes on.
        problem = index.integrity_problem()
        if problem is not None and index.path is not None:
            log.error("reindex: the index database is damaged (%s): moving it aside", problem)
            report.replaced, _copied = index.replace_corrupt(problem)
        index.clear()
    for key in blobs.iter_keys():
        where = blobs.local_path(key) or key
        try:
            with local_copy(blobs, key) as path:  # an object store's blob is read into a staged copy
                parsed = read_instance(path)
                if parsed.record.instance["storage_key"] != key:
                    raise RejectedInstance(Outcome.INVALID, "file is not at the path its SOP Instance UID gives")
                parsed.record.instance["content_hash"] = dataset_hash(path)
            _add(index, parsed.record, replace=not live)
            report.indexed += 1
        except (RejectedInstance, WriterLockTimeout, FileNotFoundError) as exc:
            report.failed.append((where, str(exc)))
            log.error("reindex: skipped %s: %s", where, exc)
        if progress:
            progress(1)
    index.analyze()  # the planner's statistics describe the rebuilt tables, not the empty ones
    index.end_recovery()
    log.info("reindex: %d instances indexed, %d files skipped", report.indexed, len(report.failed))
    return report


def _add(index: Index, record: InstanceRecord, *, replace: bool) -> None:
    """One index write, tried again when another writer holds the lock past its bounded wait."""
    for attempt in range(LOCK_RETRIES):
        try:
            index.add_instance(record, replace=replace)
            return
        except WriterLockTimeout:
            if attempt == LOCK_RETRIES - 1:
                raise
            time.sleep(1.0)
