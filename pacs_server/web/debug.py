"""Fault switches for the supervisor's end-to-end tests, mounted only when MACPACS_DEBUG_FAULTS=1.

``POST /debug/kill-web-listener`` stops the web listener while the process (DICOM, XML-RPC)
stays alive: the state a watchdog must detect and repair. Never enable this in production.
"""

from __future__ import annotations

import os

from fastapi import APIRouter, BackgroundTasks, Request
from fastapi.responses import PlainTextResponse

from ..archive import Archive

ENV = "MACPACS_DEBUG_FAULTS"

router = APIRouter(prefix="/debug", tags=["debug"], include_in_schema=False)


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


@router.post("/kill-web-listener")
def kill_web_listener(request: Request, background: BackgroundTasks) -> PlainTextResponse:
    archive: Archive = request.app.state.archive
    background.add_task(archive.stop_web_listener)
    return PlainTextResponse("web listener stopping; the process stays up\n", status_code=202)
