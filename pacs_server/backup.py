"""``macpacs backup DEST`` and ``macpacs restore SRC``: the SQLite index copied while the server runs, and put back.

A backup is a folder: ``index.sqlite``, a consistent copy of the index made online with SQLite's
backup API while ingest goes on (``index/sqlite_backup.py`` says how), and ``manifest.json``
(when, by which version, the schema revision, the row counts, the copy's size and SHA-256),
written last, so that a folder with a manifest holds a complete, checked copy.

The stored files are not in it: they are plain files for the site's own backup (Time Machine,
rsync, snapshots). After a restore, files stored since the backup are on disk but not in the
restored index, and rows of files deleted since remain: ``macpacs verify --repair`` indexes
the first and drops the second, so the admin is told to run it.

A PostgreSQL index is backed up with PostgreSQL's own tools (``pg_dump``, ``pg_restore``): this
module says so instead of copying anything.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import Settings
from .index import WriterLockTimeout
from .index.sqlite_backup import BackupFailed, contents, integrity_problems, online_copy, swap_in, unknown_revisions
from .pidfile import AlreadyRunning, PidFile
from .storage import flush_to_disk

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DATABASE = "index.sqlite"
FORMAT = "macpacs-index-backup-1"


class BackupError(Exception):
    """A backup or restore cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Restored:
    """What a restore put in place and where the index it replaced went."""

    manifest: dict[str, Any]
    previous: Path | None  # the index in use before, kept beside it (None: there was none)


def sqlite_file(settings: Settings) -> Path:
    """The index's SQLite file; BackupError for an index on a database server."""
    url = settings.index_url
    if not url.startswith("sqlite:///"):
        raise BackupError(
            f"the index is on a database server ({url.split(':', 1)[0]}), not in an SQLite file: back it up with "
            "that server's own tools, for PostgreSQL `pg_dump -Fc DBNAME > macpacs.dump` (online and consistent) "
            "and `pg_restore --clean -d DBNAME macpacs.dump` to put it back; then `macpacs verify --repair`"
        )
    return Path(url.removeprefix("sqlite:///").split("?")[0])


def backup(settings: Settings, dest: Path, progress: Any = None) -> dict[str, Any]:
    """Copy the index into the new folder ``dest`` with its manifest; returns the manifest.

    ``progress(done, total)`` hears of the pages copied.
    """
    database = sqlite_file(settings)
    if not database.exists():
        raise BackupError(f"there is no index at {database} yet: nothing to back up")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(
            f"{dest} exists and is not an empty folder: give a new folder for each backup "
            "(for example one named after today's date), so that no earlier backup is overwritten"
        )
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"cannot create {dest}: {exc.strerror}") from None
    partial = dest / f"{DATABASE}.part"
    try:
        online_copy(database, partial, progress)
        _flush(partial)
        problems = integrity_problems(partial)
        if problems:
            raise BackupError(
                f"the copy fails SQLite's integrity check ({'; '.join(problems[:3])}): the index itself may be "
                "damaged. Run `macpacs verify`; if the server reports a corrupt index it rebuilds it from the files"
            )
        revisions, counts = contents(partial)
        manifest = {
            "format": FORMAT,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "macpacs_version": package_version(),
            "host": socket.gethostname(),
            "source": str(database),
            "revisions": revisions,
            "counts": counts,
            "database": DATABASE,
            "bytes": partial.stat().st_size,
            "sha256": _sha256(partial),
        }
        partial.replace(dest / DATABASE)
        _write_manifest(dest, manifest)
    except BackupFailed as exc:
        raise BackupError(str(exc)) from None
    except OSError as exc:
        raise BackupError(
            f"writing the backup into {dest} failed: {exc.strerror or exc}; the folder holds no complete backup "
            "(no manifest.json): free space there or choose another folder, then run it again"
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    log.info("index backed up to %s: %s", dest, _counts_text(counts))
    return manifest


def read_backup(src: Path) -> dict[str, Any]:
    """The manifest of a backup folder, after checking that its copy is whole and sound."""
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"{src} has no {MANIFEST}: it is not a folder written by `macpacs backup`") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"{src / MANIFEST} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{src / MANIFEST} is not a macpacs index backup manifest ({FORMAT})")
    copy = src / DATABASE
    try:
        digest = _sha256(copy)
    except OSError as exc:
        raise BackupError(f"the backup's copy {copy} cannot be read: {exc.strerror}") from None
    if digest != manifest.get("sha256"):
        raise BackupError(f"{copy} is not the file that was backed up (its SHA-256 differs): it was changed or damaged")
    problems = integrity_problems(copy)
    if problems:
        raise BackupError(f"{copy} fails SQLite's integrity check: {'; '.join(problems[:3])}")
    try:
        revisions, _counts = contents(copy)
    except BackupFailed as exc:
        raise BackupError(str(exc)) from None
    newer = unknown_revisions(revisions)
    if newer:
        raise BackupError(
            f"the backup's schema revision {', '.join(newer)} is unknown to macpacs {package_version()}: it was "
            f"made by a newer version ({manifest.get('macpacs_version')}); install that version to restore it"
        )
    return manifest


def restore(settings: Settings, src: Path) -> Restored:
    """Put the backup in ``src`` in place of the index, keeping the current one aside.

    Refused while a server runs on this data folder (its PID file's lock, held here too until the
    new index is in place, so that none starts meanwhile), and before anything changes when the
    backup is not whole and sound.
    """
    database = sqlite_file(settings)
    manifest = read_backup(src)
    lock = PidFile(settings.pid_file, settings.data_dir)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        raise BackupError(
            f"the server is running: {exc}. Stop it first (macOS: `launchctl bootout gui/$(id -u)/org.macpacs.server`, "
            "or system/org.macpacs.server for a daemon; Linux: `sudo systemctl stop macpacs`), then restore"
        ) from None
    staged = database.with_name(f".{database.name}.restoring-{os.getpid()}")
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / DATABASE, staged)
        _flush(staged)
        previous = swap_in(database, staged)
        _flush(database.parent)
    except WriterLockTimeout as exc:
        raise BackupError(
            f"another process is writing the index ({exc}): stop it (a `macpacs import`?), then restore; "
            "the index in use was not changed"
        ) from None
    except OSError as exc:
        raise BackupError(
            f"restoring into {database} failed: {exc.strerror or exc}; the index in use was not changed"
        ) from None
    finally:
        staged.unlink(missing_ok=True)
        lock.release()
    log.warning(
        "index restored from %s (made %s: %s); the index in use before is kept as %s",
        src,
        manifest.get("created"),
        _counts_text(manifest.get("counts", {})),
        previous or "(there was none)",
    )
    return Restored(manifest, previous)


def package_version() -> str:
    try:
        return importlib.metadata.version("macpacs")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts.get(name, '?')} {name}" for name in ("patients", "studies", "series", "instances"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(dest: Path, manifest: dict[str, Any]) -> None:
    staged = dest / f".{MANIFEST}.part"
    staged.write_text(json.dumps(manifest, indent=1) + "\n")
    _flush(staged)
    staged.replace(dest / MANIFEST)
    _flush(dest)


def _flush(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        flush_to_disk(fd)
    finally:
        os.close(fd)
