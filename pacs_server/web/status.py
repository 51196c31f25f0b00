"""The one status document: is the archive healthy, what does it hold, how does it run.

``/health`` serves it as JSON and the status page renders it, so that a monitoring script and a
person looking at the page see the same figures from the same checks. It is built from the
running archive's own parts when asked for: the index and storage checks that ``/testdbalive``
also runs, the index's counts and stored bytes (its counters added up, no scan of the instance
rows), free space, the DICOM associations and workers (``archive.dicom_status``), uptime,
version and the watchdog's last round (the supervisor's status file, when
``server.supervisor_status_file`` names it).

A check that says "ok" while the archive cannot store is worse than none, so the checks do what
a C-STORE needs: a write transaction on the index through the server's own connection pool
(``Index.check_writable``: in SQLite's WAL mode a plain read is *not* blocked by another
process holding an exclusive lock, so a read alone would call a stuck database healthy), with
this process's index writer lock taken too, and a file written where incoming blobs are staged
(``BlobStore.probe``).

A corrupt SQLite index fails the index check whichever process met the corruption and whatever
table it is in: the recovery file (``index/corruption.py``) says so before any statement runs.
While the server rebuilds the index from the files, the index check passes (the fresh index
takes stores, so ``/testdbalive`` answers as alive and the supervisor does not restart a server
that is repairing itself), but the document's ``status`` is ``"rebuilding"`` and ``/health``
answers 503: queries are incomplete until the rebuild ends.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .. import verify
from ..archive import Archive
from ..config import Settings

BUSY_TIMEOUT_MS = 2000  # how long the index check waits for a locked SQLite database before failing
WRITER_LOCK_TIMEOUT_S = 5.0
# Warn when free space is under this multiple of storage.min_free_mb (where stores are refused).
WARN_FACTOR = 4


class HealthError(RuntimeError):
    """One part of the archive failed its check; the message says which and why."""


def check_index(archive: Archive) -> None:
    """The index's write path, as a C-STORE takes it, changing nothing (``Index.check_writable``).

    Fails at once when some process found the index corrupt (the recovery file).
    """
    state = archive.index.recovery_state()
    if state is not None and state.get("state") == "corrupt":
        repair = (
            "the server is moving it aside to rebuild it from the stored files"
            if archive.settings.server.server_mode
            else "server.server_mode is false: stop the server and run `macpacs reindex`"
        )
        raise HealthError(
            f"index: the database is corrupt ({state.get('error', '?')}; found {state.get('found_at', '?')} by "
            f"PID {state.get('found_by_pid', '?')}); {repair}"
        )
    try:
        archive.index.check_writable(WRITER_LOCK_TIMEOUT_S, BUSY_TIMEOUT_MS)
    except Exception as exc:
        raise HealthError(f"index: {type(exc).__name__}: {exc}".splitlines()[0]) from None


class StorageFull(HealthError):
    """The store can be written but its volume is full: no restart would free a byte."""


def check_storage(archive: Archive) -> None:
    """A small file written where incoming instances are staged (``BlobStore.probe``): HealthError
    when it cannot be (a read-only or missing volume, no permission, an I/O error), StorageFull
    when only space is missing."""
    try:
        archive.blobs.probe()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(
                f"storage: the data volume is full ({exc.strerror}); stores are refused with 0xA700 "
                "until space is freed, then resume by themselves"
            ) from None
        raise HealthError(f"storage: {exc.strerror or exc}") from None


def package_version() -> str:
    try:
        return version("macpacs")
    except PackageNotFoundError:
        return "0"


def node_name(settings: Settings) -> str:
    """Which node answered (``server.node_name``, else host name and DICOM port): behind a load
    balancer, the one name that tells the nodes sharing an index apart."""
    return settings.server.node_name or f"{socket.gethostname()}:{settings.dicom.port}"


def supervisor_state(path_text: str) -> dict[str, Any]:
    """The watchdog's last round from its ``--status-file``, or ``state`` and why it is unknown."""
    if not path_text:
        return {"state": "not configured"}
    path = Path(path_text).expanduser()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"state": "unknown", "detail": f"no status file at {path} yet (is the watchdog running?)"}
    except (OSError, ValueError) as exc:
        return {"state": "unknown", "detail": f"status file {path} unreadable: {exc}"}
    return {
        "state": data.get("state", "?"),
        "last_check": data.get("last_check", "?"),
        "restarts_24h": data.get("restarts_24h", 0),
        "failed": [
            {"probe": r.get("probe"), "detail": r.get("detail")} for r in data.get("results", []) if not r.get("ok")
        ],
    }


def document(archive: Archive) -> dict[str, Any]:
    """The status document. ``status`` is ``"ok"`` only when the index and storage checks pass
    and no repair of the index is under way (``"rebuilding"``; otherwise ``"failing"``).

    ``index`` and ``storage`` are ``"ok"`` or what failed; figures that could not be read are
    None rather than missing, so that a reader need not guess which keys exist.
    """
    s = archive.settings
    body: dict[str, Any] = {
        "status": "ok",
        "node": node_name(s),
        "version": package_version(),
        "pid": os.getpid(),
        "started": datetime.fromtimestamp(archive.started_at, UTC).isoformat(timespec="seconds"),
        "uptime_s": round(time.time() - archive.started_at, 1),
        "ae_title": s.dicom.ae_title,
        "dicom_port": s.dicom.port,
        "web_port": s.web.port,
        "https": bool(s.web.tls_cert),
        "xmlrpc_port": s.xmlrpc.port if s.xmlrpc.enabled else None,
    }
    start = time.perf_counter()
    body["index"] = _outcome(check_index, archive)
    body["index_ms"] = round((time.perf_counter() - start) * 1000, 1) if body["index"] == "ok" else None
    body["storage"] = _outcome(check_storage, archive)
    state = archive.index.recovery_state()
    try:
        if state is not None and state.get("state") == "corrupt":  # not a statement on a corrupt file
            raise HealthError("index: corrupt")
        body["counts"] = archive.index.counts()
        # int(): a SUM over PostgreSQL's bigint is a Decimal, which JSON cannot carry
        body["stored_bytes"] = int(archive.index.stored_bytes())
        body["index_files"] = archive.index.database_files()
    except Exception as exc:  # the document must still say what is wrong
        body.update(counts=None, stored_bytes=None, index_files={})
        if body["index"] == "ok":
            body["index"] = f"index: {type(exc).__name__}: {exc}".splitlines()[0]
    try:
        free = archive.blobs.free_bytes()
        body["free_mb"] = free // (1024 * 1024)
        body["low_disk"] = free < WARN_FACTOR * s.storage.min_free_mb * 1024 * 1024
    except OSError:
        body["free_mb"] = body["low_disk"] = None
    body["index_recovery"] = _recovery(archive)
    if archive.dicom_status is not None:
        body["dicom"] = archive.dicom_status()
    body["supervisor"] = supervisor_state(s.server.supervisor_status_file)
    body["jobs"] = _jobs(archive)
    body["verify"] = verify.health_field(s.data_dir)  # the last `macpacs verify`; never fails the status
    if body["index"] != "ok" or body["storage"] != "ok":
        body["status"] = "failing"
    elif body["index_recovery"] is not None:
        body["status"] = "rebuilding"
    return body


def _recovery(archive: Archive) -> dict[str, Any] | None:
    """The index's repair in progress (``detail``: "rebuilding: n of m files"), or None."""
    if archive.recovery is not None:
        return archive.recovery.status()
    state = archive.index.recovery_state()
    return None if state is None else {"state": state.get("state"), "detail": state.get("state")}


def _jobs(archive: Archive) -> dict[str, int] | None:
    """The job queue by state; ``alerting``: jobs that failed ``jobs.alert_after`` times (pacs_server/jobs.py)."""
    try:
        return archive.jobs.counts()
    except Exception:  # the index check already says what is wrong
        return None


def _outcome(check: Callable[[Archive], None], archive: Archive) -> str:
    """``"ok"``, or the check's message."""
    try:
        check(archive)
    except HealthError as exc:
        return str(exc)
    return "ok"
