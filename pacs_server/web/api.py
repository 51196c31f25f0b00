"""Core JSON endpoints under ``/api`` (the browser pages add their own in ``ui_api``)."""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from ..archive import Archive
from .auth import Principal, require_read

router = APIRouter(tags=["API"])


@router.get("/status")
async def status(request: Request, who: Principal = Depends(require_read)) -> dict[str, Any]:  # noqa: B008
    """What this archive holds and how it runs: counts, ports, uptime, free space."""
    archive: Archive = request.app.state.archive
    counts = await run_in_threadpool(archive.index.counts)
    s = archive.settings
    return {
        "ae_title": s.dicom.ae_title,
        "dicom_port": s.dicom.port,
        "web_port": s.web.port,
        "xmlrpc_port": s.xmlrpc.port if s.xmlrpc.enabled else None,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - archive.started_at, 1),
        "free_mb": archive.blobs.free_bytes() // (1024 * 1024),
        "counts": counts,
        "user": who.name,
    }


@router.get("/whoami")
async def whoami(who: Principal = Depends(require_read)) -> dict[str, Any]:  # noqa: B008
    """The caller as the server sees it (user and role, or anonymous)."""
    return {
        "user": who.name,
        "role": who.user.role if who.user else None,
        "address": who.address,
    }
