"""A short path for the commonest WADO-RS request: one frame of one instance.

Viewers that fetch a series frame by frame send hundreds of these per second, and in the
FastAPI route most of each request's cost was the framework (routing through every route,
dependency solving, validation, two worker-thread hops), not reading the frame. This ASGI
middleware answers ``GET /dicom-web/studies/{st}/series/{se}/instances/{sop}/frames/{n}`` itself
with the same parts the route uses: ``auth.require_read`` (the same authentication and
anonymous-access rule), ``lookup.one_instance`` (the one retrieve path), the route's own Accept
negotiation (``wado._frames_choice``) and ``wado._read_frames`` (``render``), in one worker-thread
hop.

Anything it does not answer with a 200 (an error, a frame list, an unusual Accept, HTTP Basic
credentials) is handed to the full app, which produces the same answer and error messages as
before: the request is only re-done, never answered differently. It sits inside the CORS
middleware, so CORS headers apply.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import HTTPException
from starlette.requests import Request

from ...archive import Archive
from ...index import QueryError
from ...retrieve import FileMissing
from ...storage import StorageError
from ..auth import require_read
from ..lookup import one_instance
from .wado import _boundary, _frames_choice, _multipart, _part_header, _read_frames

_UID = r"([0-9.]{1,64})"
_FRAME_PATH = re.compile(rf"^/dicom-web/studies/{_UID}/series/{_UID}/instances/{_UID}/frames/([1-9][0-9]{{0,8}})$")


def _one_frame(request: Request, study: str, series: str, sop: str, number: int) -> list[bytes] | None:
    """The response body's pieces, or None to let the full app answer (errors included)."""
    archive: Archive = request.app.state.archive
    try:
        require_read(request, request.app.state.auth)
        inst, fh = one_instance(archive, study, series, sop)
        with fh:
            as_stored = _frames_choice(request, inst.transfer_syntax_uid)
            (frame,) = _read_frames(fh, [number], as_stored)
    except (HTTPException, FileMissing, QueryError, StorageError):
        return None
    boundary = _boundary()
    header = _part_header(boundary, f"{frame.media_type}; transfer-syntax={frame.transfer_syntax_uid}")
    closing = f"\r\n--{boundary}--\r\n".encode()
    return [_multipart(boundary, frame.media_type).encode(), header, frame.data, closing]


class FrameShortPath:
    """ASGI middleware: single-frame GETs answered without the router (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        match = _FRAME_PATH.match(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:6].lower() == b"basic ":
                # Passwords go through the full app only, so a wrong one is counted (throttled) once.
                await self.app(scope, receive, send)
                return
        study, series, sop, number = match.groups()
        # The event loop's own executor: a lighter hop than anyio's thread pool (no limiter or
        # cancel scope), which showed in profiles at hundreds of requests per second.
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(None, _one_frame, Request(scope, receive), study, series, sop, int(number))
        if answer is None:
            await self.app(scope, receive, send)
            return
        content_type, header, data, closing = answer
        length = str(len(header) + len(data) + len(closing)).encode()
        headers = [(b"content-type", content_type), (b"content-length", length)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        # Three writes instead of joining a copy of the frame first: 13 % less server CPU per
        # frame in an A/B run (2.06 vs 2.36 ms, 8 clients, same load).
        await send({"type": "http.response.body", "body": header, "more_body": True})
        await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": closing, "more_body": False})
