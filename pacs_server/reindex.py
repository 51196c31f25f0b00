"""Rebuild the index from the stored files alone (``macpacs reindex``, and a corrupt index at start)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .index import Index
from .ingest import Outcome, RejectedInstance, read_instance
from .storage import FileStore

log = logging.getLogger(__name__)


@dataclass
class ReindexReport:
    indexed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def reindex(store: FileStore, index: Index, progress: Callable[[int], None] | None = None) -> ReindexReport:
    """Empty the index, then index every file in the store through the ingest parser."""
    report = ReindexReport()
    index.clear()
    for path in store.iter_files():
        try:
            parsed = read_instance(path)
            if parsed.record.instance["storage_key"] != str(path.relative_to(store.root)):
                raise RejectedInstance(Outcome.INVALID, "file is not at the path its SOP Instance UID gives")
            index.add_instance(parsed.record, replace=True)
            report.indexed += 1
        except RejectedInstance as exc:
            report.failed.append((str(path), str(exc)))
            log.error("reindex: skipped %s: %s", path, exc)
        if progress:
            progress(1)
    log.info("reindex: %d instances indexed, %d files skipped", report.indexed, len(report.failed))
    return report
