"""SQLite index files for ``macpacs backup`` and ``restore``: an online copy, its checks, the swap.

The copy uses SQLite's backup API in steps (``sqlite3.Connection.backup``), inside one read
transaction on the source held from the first step to the last. That transaction is what makes
the copy consistent while the server ingests: in WAL mode a reader never blocks writers, and its
snapshot does not move, so every step copies pages of the same moment. (Without it, a write by
another connection between two steps makes SQLite start the copy again from the first page,
which under steady ingest may never finish.) Stores go on meanwhile; the WAL grows until the copy
ends, because a checkpoint cannot pass the snapshot.

The copy is then switched out of WAL mode (one self-contained file, read-only use creates nothing
beside it) and checked with ``PRAGMA integrity_check`` before anyone relies on it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from . import schema
from .db import MIGRATIONS, SQLITE_BUSY_TIMEOUT_MS
from .writer_lock import WriterLock

PAGES_PER_STEP = 2048  # 8 MB of 4 KB pages between two progress reports
SIDE_FILES = ("-wal", "-shm")  # SQLite's files beside a database in WAL mode
COUNTED = (("patients", schema.patient), ("studies", schema.study), ("series", schema.series))


class BackupFailed(Exception):
    """A copy, check or swap could not be done; the message says why and what to do."""


def online_copy(
    database: Path,
    dest: Path,
    progress: Callable[[int, int], None] | None = None,
    pages_per_step: int = PAGES_PER_STEP,
) -> None:
    """Copy ``database`` (in use, being written) to the new file ``dest``, consistent.

    ``progress(done, total)`` hears of the pages copied after each step. The caller makes ``dest``
    durable (the blob store's flush: F_FULLFSYNC on macOS).
    """
    source = sqlite3.connect(database, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    try:
        target = sqlite3.connect(dest, isolation_level=None)
        try:
            source.execute("BEGIN")
            source.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot starts here
            report = None if progress is None else (lambda _s, left, total: progress(total - left, total))
            source.backup(target, pages=pages_per_step, progress=report)
            source.execute("COMMIT")
            target.execute("PRAGMA journal_mode=DELETE").fetchone()
        finally:
            target.close()
    except sqlite3.Error as exc:
        raise BackupFailed(f"copying {database} failed: {exc}") from exc
    finally:
        source.close()


def integrity_problems(path: Path, limit: int = 20) -> list[str]:
    """What ``PRAGMA integrity_check`` finds wrong with a database file (empty: it is sound), read-only."""
    try:
        with closing(_read_only(path)) as conn:
            rows = conn.execute(f"PRAGMA integrity_check({int(limit)})").fetchall()
    except sqlite3.Error as exc:
        return [str(exc)]
    found = [str(row[0]) for row in rows]
    return [] if found == ["ok"] else found


def contents(path: Path) -> tuple[list[str], dict[str, int]]:
    """The schema revisions (Alembic heads) and the row counts of a database file, read-only."""
    try:
        with closing(_read_only(path)) as conn:
            revisions = sorted(row[0] for row in conn.execute("SELECT version_num FROM alembic_version"))
            counts = {
                name: conn.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0]  # our own table names
                for name, table in (*COUNTED, ("instances", schema.instance))
            }
    except sqlite3.Error as exc:
        raise BackupFailed(f"{path} is not a macpacs index: {exc}") from exc
    return revisions, counts


def unknown_revisions(revisions: list[str]) -> list[str]:
    """Revisions this version of macpacs has no migration for (a backup made by a newer version)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    return [revision for revision in revisions if revision not in known]


def swap_in(database: Path, staged: Path) -> Path | None:
    """Put ``staged`` (in the same folder) in place of ``database``, keeping the old one and its WAL
    beside it as ``<name>.before-restore-<time>``; returns that name (None: there was none).

    The index writer lock is held meanwhile, so a process that still writes (an import) makes this
    fail after the lock's bounded wait, naming it, rather than write into a file being moved. The
    caller flushes the folder.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = database.with_name(f"{database.name}.before-restore-{stamp}")
    moved = None
    with WriterLock(database, SQLITE_BUSY_TIMEOUT_MS / 1000):
        if database.exists():
            for suffix in ("", *SIDE_FILES):
                part = Path(f"{database}{suffix}")
                if part.exists():
                    part.rename(f"{aside}{suffix}")
            moved = aside
        try:
            staged.replace(database)
        except OSError:
            if moved is not None:  # put the index in use back as it was
                for suffix in ("", *SIDE_FILES):
                    part = Path(f"{aside}{suffix}")
                    if part.exists():
                        part.rename(f"{database}{suffix}")
            raise
    return moved


def _read_only(path: Path) -> sqlite3.Connection:
    # A URI, so that nothing is created when the file is missing; percent-encoded by as_uri.
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
