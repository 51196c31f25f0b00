"""Core JSON endpoints under ``/api`` (the browser pages add their own in ``ui_api``).

The archive's status is not here: it is the one status document at ``/health`` (``status``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from .auth import Principal, require_read

router = APIRouter(tags=["API"])


@router.get("/whoami")
async def whoami(who: Principal = Depends(require_read)) -> dict[str, Any]:  # noqa: B008
    """The caller as the server sees it (user and role, or anonymous)."""
    return {
        "user": who.name,
        "role": who.user.role if who.user else None,
        "address": who.address,
    }
