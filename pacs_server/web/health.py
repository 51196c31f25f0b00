"""``/testdbalive`` (the OsiriX watchdog probe) and ``/health`` (the status document, as JSON).

Both are always open (no login): watchdogs and load balancers call them. ``/testdbalive`` answers
exactly as OsiriX does, so any OsiriX watchdog script works unchanged; ``/health`` is the one
status document (``status.document``) that the status page renders too.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..archive import Archive
from . import status

ALIVE_BODY = "Test DB Alive succeeded"

router = APIRouter(tags=["health"])


@router.get("/testdbalive", response_class=Response, responses={200: {"content": {"text/html": {}}}, 500: {}})
def testdbalive(request: Request) -> Response:
    """OsiriX watchdog probe: 200 ``Test DB Alive succeeded`` when index and storage can be written.

    500 as soon as any process found the index corrupt; 200 again once a fresh index is in place
    and takes stores, while the files are re-indexed (the watchdog must not restart that server).
    A full data volume is 200 too, with a ``Warning`` header: a restart would not free a byte,
    stores are refused (0xA700) until there is room, and ``/health`` reports it.
    """
    archive: Archive = request.app.state.archive
    try:
        status.check_index(archive)
        status.check_storage(archive)
    except status.StorageFull as exc:
        return Response(ALIVE_BODY, media_type="text/html", headers={"Warning": f'199 - "{exc}"'})
    except status.HealthError as exc:
        return PlainTextResponse(f"Test DB Alive failed: {exc}", status_code=500)
    return Response(ALIVE_BODY, media_type="text/html")


@router.get("/health")
def health(request: Request) -> JSONResponse:
    """The status document: checks, counts, storage, DICOM associations and workers, uptime, version.

    503 when the index or storage check fails, and while the index is rebuilt (``"rebuilding"``).
    """
    body = status.document(request.app.state.archive)
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)
