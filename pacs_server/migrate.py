"""``macpacs migrate``: an archive's index and files copied onto another index and store
(PostgreSQL and an S3 object store, for several nodes: docs/scale-out.md), checked, resumable.

The source is the archive of the current settings, and it is only read: nothing in its index or
files changes, so that it stays the archive of record until the copy is verified and the
settings are switched (by the administrator, with the lines ``macpacs migrate`` prints).

One run makes the target equal to the source as it is while the run reads it:

1. every table but the instances' (patients, studies, series, DICOM nodes, users and their
   tokens and sessions, jobs, stable studies, worklist, HL7 messages): rows the target lacks
   are written (``index/table_sync.py``);
2. the instances, in primary-key order, a chunk at a time: the file of each new or changed row
   is streamed from the source store to the target's, its size and dataset hash compared with
   the row's (``file_size``, ``content_hash``), read back from the target store and compared
   byte for byte by SHA-256; only then is its row (with its metadata) written, so that a target
   row always names a checked file. Rows the source no longer has go, with their files;
3. the other tables again (counters that grew meanwhile, rows deleted), and PostgreSQL's key
   sequences moved past the copied keys;
4. a check: every table compared again, row by row. The run is *verified* when that check finds
   no difference and no file failed.

A run that is interrupted (killed, a network failure) leaves the target with complete rows
only; the next run reads both sides again and copies what is missing, so nothing is copied
twice. Ingest into the source may go on during a run: what arrived meanwhile makes the check
find differences, and the next run copies them (stop ingest for the last run, which is then
verified). What the run knows of itself is a small state file in the work folder
(``migration.json``: which source and target); a target that holds data and is not the one that
file names is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .config import Settings
from .index import Index
from .index.table_sync import (
    CHUNK,
    Changes,
    TableSync,
    copied_tables,
    other_tables,
    revisions,
    safe_url,
    schema_heads,
)
from .index.table_sync import (
    counts as table_counts,
)
from .ingest import dataset_hash
from .storage import BlobStore, open_blob_store, parse_s3_url

STATE_FILE = "migration.json"
READ_CHUNK = 1 << 20


class MigrationRefused(Exception):
    """The migration cannot start; the message says why and what to do."""


class Bar(Protocol):
    """What the progress bar offers (``click.progressbar``'s ``update``)."""

    def update(self, n_steps: int) -> None: ...


ProgressFactory = Callable[[str, int], AbstractContextManager[Bar]]


class _NoBar:
    def update(self, n_steps: int) -> None:
        pass


@contextlib.contextmanager
def no_progress(_label: str, _total: int) -> Iterator[Bar]:
    yield _NoBar()


@dataclass
class Report:
    """What one run did and found."""

    tables: dict[str, Changes] = field(default_factory=dict)  # rows written or deleted per table
    files_copied: int = 0
    bytes_copied: int = 0
    files_removed: int = 0
    failures: list[str] = field(default_factory=list)  # instances whose file could not be copied
    differences: dict[str, int] = field(default_factory=dict)  # what the final check found, per table
    counts: dict[str, int] = field(default_factory=dict)  # target rows per table after the run
    seconds: float = 0.0

    @property
    def verified(self) -> bool:
        return not self.failures and not any(self.differences.values())


class Migration:
    """One run of ``macpacs migrate`` from the archive of ``settings`` to ``index_url`` and ``storage_url``."""

    def __init__(
        self,
        settings: Settings,
        index_url: str,
        storage_url: str,
        *,
        work_dir: Path | None = None,
        jobs: int = 4,
        chunk: int = CHUNK,
        progress: ProgressFactory = no_progress,
    ) -> None:
        self.settings = settings
        self.index_url = index_url
        self.storage_url = storage_url
        self.work_dir = Path(work_dir) if work_dir else settings.data_dir / "migration"
        self.jobs = jobs
        self.chunk = chunk
        self.progress = progress
        self.state_path = self.work_dir / STATE_FILE

    @property
    def index_url_shown(self) -> str:
        """The new index's URL as it may be printed (no password)."""
        return safe_url(self.index_url)

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> Report:
        started = time.monotonic()
        try:
            safe_url(self.index_url)
            parse_s3_url(self.storage_url)
        except ValueError as exc:
            raise MigrationRefused(str(exc)) from None
        if safe_url(self.index_url) == safe_url(self.settings.index_url):
            raise MigrationRefused(f"--index is the archive's own index ({safe_url(self.index_url)}): name a new one")
        if self.storage_url and self.storage_url == self.settings.storage.url:
            raise MigrationRefused(f"--storage is the archive's own store ({self.storage_url}): name a new one")
        source = Index(self.settings.index_url)
        target: Index | None = None
        try:
            self._check_source(source)
            self.work_dir.mkdir(parents=True, exist_ok=True)
            ix = self.settings.index
            target = Index(
                self.index_url,
                pool_size=max(ix.pool_size, self.jobs + 2),
                statement_timeout=ix.statement_timeout,
                connect_timeout=ix.connect_timeout,
            )
            source_blobs = open_blob_store(self.settings.storage.url, self.settings.data_dir, self.settings.s3)
            # No read cache: a file read back must come from the store itself.
            target_blobs = open_blob_store(
                self.storage_url, self.work_dir, dataclasses.replace(self.settings.s3, cache_mb=0)
            )
            self._check_target(target, target_blobs)
            report = _Run(self, source, target, source_blobs, target_blobs).execute()
        finally:
            source.close()
            if target is not None:
                target.close()
        report.seconds = time.monotonic() - started
        self._record(report)
        return report

    def _identity(self) -> dict[str, str]:
        return {
            "source_index": safe_url(self.settings.index_url),
            "source_storage": self.settings.storage.url or str(self.settings.data_dir / "files"),
            "target_index": safe_url(self.index_url),
            "target_storage": self.storage_url,
        }

    def _check_source(self, source: Index) -> None:
        have, want = revisions(source), schema_heads()
        if have != want:
            raise MigrationRefused(
                f"the archive's index ({safe_url(self.settings.index_url)}) is at schema revision "
                f"{', '.join(sorted(have)) or 'none'}, this macpacs writes {', '.join(sorted(want))}: start "
                "`macpacs serve` on it once (it upgrades the index), stop it, then migrate"
            )

    def _check_target(self, target: Index, blobs: BlobStore) -> None:
        """Refuse a target that holds data unless it is the one an earlier run of this migration
        began; migrate the target's schema."""
        state = self._read_state()
        identity = self._identity()
        if state is not None:
            begun = {key: state.get(key) for key in identity}
            if begun != identity:
                raise MigrationRefused(
                    f"{self.state_path} records another migration ({begun['source_index']} to "
                    f"{begun['target_index']} and {begun['target_storage']}): finish that one, or give "
                    "this one its own --work-dir"
                )
        at = revisions(target)
        if at and at != schema_heads():
            raise MigrationRefused(
                f"the target index {safe_url(self.index_url)} is at schema revision {', '.join(sorted(at))}, "
                f"not {', '.join(sorted(schema_heads()))}: it is another macpacs version's; use an empty database"
            )
        if state is None:
            held = {name: n for name, n in table_counts(target).items() if n} if at else {}
            first_key = next(iter(blobs.iter_keys()), None)
            if held or first_key is not None:
                what = ", ".join(f"{n} rows in {name}" for name, n in held.items())
                if first_key is not None:
                    what += (", and " if what else "") + f"files ({first_key}...) in {blobs.describe()}"
                raise MigrationRefused(
                    f"the target is not empty ({what}) and no migration to it was begun from "
                    f"{self.work_dir}: migrate into an empty database and an empty bucket or prefix"
                )
            self._write_state({**identity, "begun_at": time.time(), "runs": 0})
        target.migrate()

    # -- the state file --------------------------------------------------------------------------
    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise MigrationRefused(
                f"{self.state_path} cannot be read ({exc}): remove it only if the target is empty"
            ) from None

    def _write_state(self, state: dict[str, Any]) -> None:
        temp = self.state_path.with_suffix(".tmp")
        temp.write_text(json.dumps(state, indent=1), encoding="utf-8")
        os.replace(temp, self.state_path)

    def _record(self, report: Report) -> None:
        state = self._read_state() or self._identity()
        state["runs"] = int(state.get("runs", 0)) + 1
        state["last_run_at"] = time.time()
        state["verified_at"] = time.time() if report.verified else None
        self._write_state(state)


class _Run:
    """The four steps of one run (the module's docstring)."""

    def __init__(
        self, migration: Migration, source: Index, target: Index, source_blobs: BlobStore, target_blobs: BlobStore
    ) -> None:
        self.m = migration
        self.sync = TableSync(source, target, migration.chunk)
        self.source = source
        self.source_blobs = source_blobs
        self.target_blobs = target_blobs
        self.report = Report()

    def execute(self) -> Report:
        others = other_tables()
        for table in others:  # parents first, so that instance rows can refer to them
            self._add(table.name, self.sync.sync_table(table, deletes=False))
        self._instances()
        for table in others:
            self._add(table.name, self.sync.sync_table(table, deletes=False))
        for table in reversed(others):  # children first
            self._add(table.name, self.sync.sync_table(table, upserts=False))
        self.sync.reset_sequences()
        self._check()
        return self.report

    def _add(self, name: str, changes: Changes) -> None:
        total = self.report.tables.setdefault(name, Changes())
        total.written += changes.written
        total.deleted += changes.deleted

    def _instances(self) -> None:
        total = table_counts(self.source)["instance"]
        with self.m.progress("instances", total) as bar, ThreadPoolExecutor(max(1, self.m.jobs)) as pool:
            for chunk in self.sync.instance_chunks():
                results = list(pool.map(self._copy_file, chunk.changed))
                copied = [row for row, (error, _size) in zip(chunk.changed, results, strict=True) if error is None]
                for error, size in results:
                    if error is None:
                        self.report.files_copied += 1
                        self.report.bytes_copied += size
                    else:
                        self.report.failures.append(error)
                self.sync.write_instances(copied, chunk.metadata, chunk.gone)
                self._add("instance", Changes(written=len(copied), deleted=len(chunk.gone)))
                for row in chunk.gone:
                    if not self.sync.key_in_source(row["storage_key"]):
                        self.target_blobs.delete(row["storage_key"])
                        self.report.files_removed += 1
                bar.update(chunk.seen)

    def _copy_file(self, row: dict[str, Any]) -> tuple[str | None, int]:
        """Copy one instance's file and check it: (None, its size), or why it was not copied (its
        row is not written, so the next run tries again)."""
        key, uid = row["storage_key"], row["sop_instance_uid"]
        staged = self.target_blobs.stage()
        digest = hashlib.sha256()
        try:
            try:
                with self.source_blobs.open(key) as src:
                    while chunk := src.read(READ_CHUNK):
                        digest.update(chunk)
                        staged.write(chunk)
                staged.close()
            except FileNotFoundError:
                return f"instance {uid}: its file {key} is missing from the archive (macpacs verify lists such rows)", 0
            size = staged.written
            if size != row["file_size"] or (row["content_hash"] and dataset_hash(staged.name) != row["content_hash"]):
                return (
                    f"instance {uid}: its file {key} ({size} bytes) does not match its index row "
                    f"({row['file_size']} bytes, dataset hash {row['content_hash']}): it changed while it was "
                    "copied (the next run copies it again) or it is damaged (macpacs verify)"
                ), 0
            self.target_blobs.put(staged.name, key)
            back = hashlib.sha256()
            read = 0
            with self.target_blobs.open(key) as fh:
                while chunk := fh.read(READ_CHUNK):
                    back.update(chunk)
                    read += len(chunk)
            if read != size or back.digest() != digest.digest():
                return (
                    f"instance {uid}: {key} read back from {self.target_blobs.describe()} differs from what was sent",
                    0,
                )
        except OSError as exc:
            return f"instance {uid}: {key} could not be copied: {exc}", 0
        finally:
            staged.discard()  # gone already once put
        return None, size

    def _check(self) -> None:
        """Compare every table again without writing: what differs now arrived or changed during the run."""
        differences = self.report.differences
        for table in other_tables():
            found = self.sync.sync_table(table, write=False)
            differences[table.name] = found.written + found.deleted
        differences["instance"] = sum(len(c.changed) + len(c.gone) for c in self.sync.instance_chunks())
        self.report.counts = table_counts(self.sync.target)
        source_counts = table_counts(self.source)
        for table in copied_tables():
            if source_counts[table.name] != self.report.counts[table.name]:
                differences[table.name] = max(differences.get(table.name, 0), 1)
