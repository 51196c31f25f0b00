"""A corrupt SQLite index: telling corruption from other errors, keeping every process off the file,
and replacing it with a fresh one without ever renaming a database that a connection still uses.

Corruption is recognised in one place (``is_corruption``: SQLITE_CORRUPT, SQLITE_NOTADB and their
messages; nothing a PostgreSQL driver raises), whichever caller met it: ingest, C-FIND, QIDO-RS,
pages. The process that meets it writes the *recovery file* beside the database
(``index.sqlite.recovery``, JSON, first finder wins). That file is how the processes of one archive
(the server, its DICOM worker processes, a running ``macpacs import``) agree, with no other channel:

- ``"state": "corrupt"``: every process keeps off the database. Its ``Guard`` closes its pooled
  connections within ``POLL_S`` and opens no new one (a caller waits up to ``CONNECT_WAIT_S`` for
  the replacement, then gets ``IndexUnreadable``). The health checks fail.
- the server's main process (``pacs_server.recovery``) or ``macpacs reindex`` then calls
  ``replace_corrupt``: once no process has the file open any more, it is renamed aside with its
  WAL and shared-memory files (``index.sqlite.corrupt-<time>``, kept for inspection) and a fresh,
  migrated database takes its place, with the rows of the tables the files cannot give back
  (nodes, users, sessions, jobs...) copied from the corrupt one where they can still be read.
- ``"state": "rebuilding"``: processes use the fresh database again; the server re-indexes the
  stored files into it, and removes the file when done. A restart in between resumes the rebuild.

Why wait until nobody has the file open: a SQLite connection in WAL mode that closes last deletes
``<database>-wal`` and ``-shm`` *by name*. A connection left on the renamed file would delete the
fresh database's WAL. In WAL mode every open connection holds a shared lock on the database file,
so "nobody has it open" is a lock that can be taken (``in_use``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, insert, inspect, text

from . import schema

if TYPE_CHECKING:
    from .db import Index

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often every process looks at the recovery file
CONNECT_WAIT_S = 5.0  # how long one new connection waits for a corrupt database to be replaced
RELEASE_WAIT_S = 60.0  # how long the replacement waits for other programs to close the file
ABANDONED_S = 2 * RELEASE_WAIT_S  # found corrupt this long ago and not replaced: no server is at it
QUIET_S = 0.5  # the file must stay unused this long before it is renamed
# Rebuilt from the stored files; every other table is copied from the corrupt database.
DERIVED_TABLES = ("patient", "study", "series", "instance", "instance_metadata")

_CORRUPTION_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_CORRUPTION_TEXT = ("database disk image is malformed", "file is not a database", "malformed database schema")
# SQLite's lock bytes (os_unix.c): in WAL mode each open connection holds a shared lock in this range.
_SHARED_FIRST, _SHARED_SIZE = 0x40000002, 510


class IndexUnreadable(Exception):
    """The index database cannot be read: a corrupt file, or not a database at all."""


def is_corruption(exc: BaseException) -> bool:
    """True for an error that means the SQLite file is damaged (not busy, not a full disk, not a bug)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sqlite3.DatabaseError):
            code = getattr(current, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in _CORRUPTION_CODES:
                return True
            if any(phrase in str(current) for phrase in _CORRUPTION_TEXT):
                return True
        current = getattr(current, "orig", None) or current.__cause__
    return False


# -- the recovery file ---------------------------------------------------------------------------
def state_path(database: Path) -> Path:
    return database.with_name(database.name + ".recovery")


def read_state(database: Path) -> dict[str, Any] | None:
    """The recovery file's content, or None when there is none (the usual case: one failed stat)."""
    path = state_path(database)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # Being replaced this instant (written to a temporary name, then renamed), or damaged:
        # treat it as corruption rather than ignore it.
        return {"state": "corrupt", "error": f"recovery file {path} unreadable"}
    return data if isinstance(data, dict) else {"state": "corrupt", "error": f"recovery file {path} unreadable"}


def write_state(database: Path, state: dict[str, Any]) -> None:
    """Replace the recovery file atomically (temporary file, fsync, rename, fsync of the folder)."""
    path = state_path(database)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    _write_synced(tmp, json.dumps(state, indent=1).encode())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def mark_corrupt(database: Path, error: str) -> bool:
    """Record that the database is corrupt; True when this call was first (it logs then)."""
    current = read_state(database)
    if current is not None and current.get("state") == "corrupt":
        return False
    state = {
        "state": "corrupt",
        "error": error,
        "found_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "found_at_epoch": time.time(),
        "found_by_pid": os.getpid(),
        "database": str(database),
    }
    path = state_path(database)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    _write_synced(tmp, json.dumps(state, indent=1).encode())
    if current is None:
        try:
            os.link(tmp, path)  # fails when another process was first: theirs stands
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
    else:  # "rebuilding": the fresh database is corrupt too
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    log.error(
        "index: the database %s is corrupt (%s). Stores, queries and pages that need it fail until it is "
        "replaced: a server in server mode moves it aside and rebuilds it from the stored files by itself; "
        "otherwise stop the server and run `macpacs reindex`",
        database,
        error,
    )
    return True


def clear_state(database: Path) -> None:
    state_path(database).unlink(missing_ok=True)
    _fsync_dir(database.parent)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def in_use(database: Path) -> bool:
    """True while any other process has a connection open on this SQLite file (WAL mode).

    Only call this when the calling process has no connection open on it: closing the probe's
    descriptor drops every POSIX lock this process holds on the file, SQLite's included.
    """
    try:
        fd = os.open(database, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _SHARED_SIZE, _SHARED_FIRST, os.SEEK_SET)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return True
        raise
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, _SHARED_SIZE, _SHARED_FIRST, os.SEEK_SET)
        return False
    finally:
        os.close(fd)


# -- each process's guard ------------------------------------------------------------------------
class Guard:
    """Keeps one process's connections off a database the recovery file calls corrupt.

    ``do_connect`` waits while the state is ``"corrupt"``, so that a C-STORE arriving during the
    replacement (about a second) is written to the fresh database instead of failing: at most
    ``CONNECT_WAIT_S`` (then ``IndexUnreadable``, which a sender retries and the heartbeat counts
    as a read that came back), and not at all once the corruption is ``ABANDONED_S`` old (no
    server replaces it: ``macpacs reindex`` must).
    A watcher thread (started with the first connection) closes the pooled connections within
    ``POLL_S`` of the file appearing; connections busy at that moment are closed when they come
    back. ``released`` says when none of this process's connections is open on the old file.
    ``forget`` is called when the file is given up and again when the fresh one is in use: the
    index drops what it remembers of the old one's rows (primary keys of recent series).
    """

    def __init__(self, engine: Engine, database: Path, forget: Callable[[], None]) -> None:
        self.engine = engine
        self.database = database
        self.forget = forget
        self._lock = threading.Lock()
        self._open: dict[int, int] = {}  # generation -> connections open
        self._generation = 0
        self._retired: list[Any] = []  # pools of earlier generations, closed as connections come back
        self._corrupt = False
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        event.listen(engine, "do_connect", self._before_connect)
        # Counted once the connection is set up (listeners run in order: the pragmas come first).
        event.listen(engine, "connect", self._opened)
        event.listen(engine, "close", self._closed)

    def close(self) -> None:
        self._stop.set()

    def _before_connect(self, _dialect: Any, _record: Any, _cargs: Any, _cparams: Any) -> None:
        self._start_watcher()
        waited = False
        deadline = time.monotonic() + CONNECT_WAIT_S
        while (state := read_state(self.database)) is not None and state.get("state") == "corrupt":
            waited = True
            abandoned = time.time() - float(state.get("found_at_epoch", 0)) > ABANDONED_S
            if abandoned or time.monotonic() > deadline:
                raise IndexUnreadable(
                    f"the index database is corrupt ({state.get('error', '?')}) and "
                    + ("nothing has replaced it" if abandoned else f"not replaced within {CONNECT_WAIT_S:.0f} s")
                    + "; see the server log and /health (a server in server mode replaces it by itself; "
                    "otherwise run `macpacs reindex`)"
                )
            time.sleep(0.05)
        if waited:
            self.forget()
        return None

    def _opened(self, _dbapi: Any, record: Any) -> None:
        with self._lock:
            record.info["macpacs_generation"] = self._generation
            self._open[self._generation] = self._open.get(self._generation, 0) + 1

    def _closed(self, _dbapi: Any, record: Any) -> None:
        generation = record.info.get("macpacs_generation")
        if generation is not None:
            with self._lock:
                self._open[generation] = self._open.get(generation, 1) - 1

    def _start_watcher(self) -> None:
        if self._watcher is not None and self._watcher.is_alive():
            return
        with self._lock:
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(target=self._watch, name="index-guard", daemon=True)
                self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            with contextlib.suppress(Exception):  # the watcher must outlive any odd moment
                self.check()

    def check(self) -> None:
        """Look at the recovery file once: retire this process's connections when it says corrupt."""
        state = read_state(self.database)
        corrupt = state is not None and state.get("state") == "corrupt"
        if corrupt and not self._corrupt:
            self.retire()
        elif self._corrupt and not corrupt:
            self.forget()
        self._corrupt = corrupt
        for pool in list(self._retired):
            pool.dispose()  # closes what came back since
            if self._open_in(pool) == 0:
                self._retired.remove(pool)

    def retire(self) -> None:
        """Close this process's connections now (and the busy ones when they come back)."""
        with self._lock:
            pool = self.engine.pool
            pool.macpacs_generation = self._generation  # type: ignore[attr-defined]
            self._generation += 1
            self._retired.append(pool)
        self.engine.dispose(close=True)  # closes idle connections; new ones get a fresh pool
        pool.dispose()
        self.forget()

    def _open_in(self, pool: Any) -> int:
        with self._lock:
            return self._open.get(pool.macpacs_generation, 0)

    def released(self) -> bool:
        """No connection of this process is open on a retired file."""
        for pool in list(self._retired):
            pool.dispose()
        with self._lock:
            return all(self._open.get(p.macpacs_generation, 0) <= 0 for p in self._retired)


# -- the replacement -----------------------------------------------------------------------------
def replace_corrupt(index: Index, error: str) -> tuple[Path, dict[str, int | str]]:
    """Move a corrupt SQLite index aside and put a fresh, migrated one in its place.

    Returns where the corrupt file went and, per copied table, the rows copied (or why not).
    Leaves the recovery file saying ``"rebuilding"``: the caller re-indexes the stored files.
    """
    from .db import Index

    database = index.path
    assert database is not None and index.guard is not None
    mark_corrupt(database, error)
    index.guard.retire()
    _wait_released(index)
    fresh_path = database.with_name(database.name + ".new")
    for suffix in ("", "-wal", "-shm", ".writer-lock"):
        Path(f"{fresh_path}{suffix}").unlink(missing_ok=True)
    fresh = Index(f"sqlite:///{fresh_path}")
    try:
        fresh.migrate()
        copied = _copy_kept_tables(database, fresh.engine)
    finally:
        fresh.close()
    Path(f"{fresh_path}.writer-lock").unlink(missing_ok=True)
    if Path(f"{fresh_path}-wal").exists():  # closed last, SQLite folded its WAL in and removed it
        raise IndexUnreadable(f"the fresh index {fresh_path} still has a WAL file after closing; not installing it")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = database.with_name(f"{database.name}.corrupt-{stamp}")
    for n in range(2, 1000):  # never over an earlier copy
        if not any(Path(f"{moved}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
            break
        moved = database.with_name(f"{database.name}.corrupt-{stamp}-{n}")
    for suffix in ("-wal", "-shm", ""):
        part = Path(f"{database}{suffix}")
        if part.exists():
            part.rename(f"{moved}{suffix}")
    os.replace(fresh_path, database)
    _fsync_dir(database.parent)
    state = read_state(database) or {}
    write_state(
        database,
        {
            **state,
            "state": "rebuilding",
            "moved_to": str(moved),
            "replaced_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "copied_tables": copied,
        },
    )
    index.reset_caches()
    kept = [f"{name} ({n} rows)" for name, n in copied.items() if isinstance(n, int) and n]
    lost = [f"{name} ({n})" for name, n in copied.items() if not isinstance(n, int)]
    unread = f" Could not be read from it: {', '.join(lost)}; re-enter what they held by hand." if lost else ""
    log.error(
        "index: moved the corrupt database to %s (kept for inspection; delete it once it is no longer needed). "
        "A fresh index is in place and takes new images. Copied from the old one: %s.%s",
        moved,
        ", ".join(kept) or "nothing",
        unread,
    )
    return moved, copied


def _wait_released(index: Index) -> None:
    """Wait until no connection, of this process or another, is open on the database."""
    assert index.path is not None and index.guard is not None
    start = time.monotonic()
    quiet_since: float | None = None
    warned = start
    while True:
        now = time.monotonic()
        if index.guard.released() and not in_use(index.path):
            quiet_since = quiet_since or now
            if now - quiet_since >= QUIET_S:
                return
        else:
            quiet_since = None
        if now - start > RELEASE_WAIT_S:
            log.warning(
                "index: another program still has the corrupt database %s open after %.0f s (an sqlite3 shell, "
                "a backup tool, a process of an older version?); replacing it anyway. Stop that program: its "
                "writes go to the old file",
                index.path,
                now - start,
            )
            return
        if now - warned > 10:
            warned = now
            log.warning("index: waiting for other processes to close the corrupt database %s", index.path)
        time.sleep(0.05)


def _copy_kept_tables(corrupt: Path, target: Engine) -> dict[str, int | str]:
    """Copy every table that is not rebuilt from the files, as far as the corrupt file still reads."""
    copied: dict[str, int | str] = {}
    source = create_engine(f"sqlite:///file:{quote(str(corrupt))}?mode=ro&uri=true")
    try:
        try:
            present = set(inspect(source).get_table_names())
        except Exception as exc:
            return {"every table": str(exc).splitlines()[0]}
        for table in schema.metadata.sorted_tables:
            if table.name in DERIVED_TABLES or table.name not in present:
                continue
            try:
                with source.connect() as conn:
                    rows = conn.execute(text(f'SELECT * FROM "{table.name}"')).mappings().all()  # a declared name
                known = set(table.c.keys())
                values = [{k: v for k, v in row.items() if k in known} for row in rows]
                with target.begin() as conn:
                    if values:
                        conn.execute(insert(table), values)
                copied[table.name] = len(values)
            except Exception as exc:
                copied[table.name] = str(exc).splitlines()[0]
                log.error("index: could not copy table %s from the corrupt database: %s", table.name, exc)
    finally:
        source.dispose()
    return copied
