"""``/testdbalive`` (the OsiriX watchdog probe) and ``/health`` (JSON for people and scripts).

A probe that says "alive" while the archive cannot store is worse than none, so the check does
what a C-STORE needs: a write transaction on the index through the server's own connection pool
(with SQLite in WAL mode a plain read is *not* blocked by another process holding an exclusive
lock, so a read alone would report success on a stuck database), and a file written, fsynced and
removed in the store's temporary folder. The in-process index writer lock is taken too, so a
writer hung inside this process also fails the probe instead of passing it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..archive import Archive

ALIVE_BODY = "Test DB Alive succeeded"
BUSY_TIMEOUT_MS = 2000  # how long the probe waits for a locked SQLite database before failing
WRITER_LOCK_TIMEOUT_S = 5.0

router = APIRouter(tags=["health"])


class HealthError(RuntimeError):
    """One part of the archive failed its check; the message says which and why."""


def check_index(archive: Archive) -> None:
    """The index's write path, as a C-STORE takes it, changing nothing (``Index.check_writable``)."""
    try:
        archive.index.check_writable(WRITER_LOCK_TIMEOUT_S, BUSY_TIMEOUT_MS)
    except Exception as exc:
        raise HealthError(f"index: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def check_storage(archive: Archive) -> None:
    """Write, fsync and remove a small file where incoming instances are written."""
    path = archive.blobs.tmp_dir / f"alive-{os.getpid()}-{threading.get_ident()}.probe"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"alive")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(path)
    except OSError as exc:
        raise HealthError(f"storage folder {archive.blobs.tmp_dir} not writable: {exc.strerror}") from None


@router.get("/testdbalive", response_class=Response, responses={200: {"content": {"text/html": {}}}, 500: {}})
def testdbalive(request: Request) -> Response:
    """OsiriX watchdog probe: 200 ``Test DB Alive succeeded`` when index and storage can be written."""
    archive: Archive = request.app.state.archive
    try:
        check_index(archive)
        check_storage(archive)
    except HealthError as exc:
        return PlainTextResponse(f"Test DB Alive failed: {exc}", status_code=500)
    return Response(ALIVE_BODY, media_type="text/html")


@router.get("/health")
def health(request: Request) -> JSONResponse:
    """JSON status: index and storage checks, uptime, DICOM associations and workers, free space.

    503 when the index or storage check fails.
    """
    archive: Archive = request.app.state.archive
    body: dict[str, Any] = {
        "status": "ok",
        "pid": os.getpid(),
        "uptime_s": round(time.time() - archive.started_at, 1),
        "ae_title": archive.settings.dicom.ae_title,
        "dicom_port": archive.settings.dicom.port,
    }
    for name, check in (("index", check_index), ("storage", check_storage)):
        try:
            check(archive)
            body[name] = "ok"
        except HealthError as exc:
            body[name] = str(exc)
            body["status"] = "failing"
    if archive.dicom_status is not None:
        body["dicom"] = archive.dicom_status()
    try:
        body["free_mb"] = archive.blobs.free_bytes() // (1024 * 1024)
    except OSError:
        body["free_mb"] = None
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)
