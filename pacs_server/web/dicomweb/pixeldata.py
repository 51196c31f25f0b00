"""WADO-RS Retrieve Pixel Data of a whole series (the PS3.18 "Pixel Data" resource, ``.../series/{uid}/pixeldata``).

Every frame of every instance of the series in one streamed multipart/related response, one
part per frame, each with ``Content-Location`` (the frame's WADO-RS URL) and ``Content-Length``.
The browser viewer asks for this so that a 1,000-slice series costs one HTTP request instead of
a thousand: per-request overhead (routing, authentication, lookup, response set-up) is most of
the cost of one frame request, while reading a frame is ~0.5 ms.

Frames come from the same places as ``/frames``: instances through the one retrieve path
(``index.instances`` + ``retrieve.open_instance``) and bytes through ``render.stored_frame`` /
``render.uncompressed_frame`` (server-side decoding of compressed syntaxes when uncompressed
frames are asked for, which is the default).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydicom.uid import ExplicitVRLittleEndian

from ... import render
from ...archive import Archive
from ...index import Query, QueryError
from ...retrieve import FileMissing, open_instance
from ..auth import Principal, require_read
from .common import base_url, parse_accept

log = logging.getLogger(__name__)
router = APIRouter()
READER = Depends(require_read)


def _as_stored(request: Request) -> bool:
    """True for ``transfer-syntax=*`` (frames as stored); False for uncompressed (the default)."""
    for media in parse_accept(request):
        part = media.part_type if media.media_type == "multipart/related" else media.media_type
        if part not in ("application/octet-stream", "*/*", "multipart/*", ""):
            continue
        ts = media.transfer_syntax
        if ts == "*":
            return True
        if ts in (None, "", ExplicitVRLittleEndian):
            return False
    raise HTTPException(
        406,
        'series pixel data is offered as multipart/related; type="application/octet-stream" '
        f"(uncompressed {ExplicitVRLittleEndian}, or transfer-syntax=* for the stored encoding)",
    )


@router.get("/studies/{study}/series/{series}/pixeldata", response_class=StreamingResponse)
def series_pixeldata(request: Request, study: str, series: str, _who: Principal = READER) -> StreamingResponse:
    """Every frame of the series, in index order, streamed as it is read."""
    archive: Archive = request.app.state.archive
    as_stored = _as_stored(request)
    keys = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
    try:
        found = archive.index.instances(Query("SERIES", keys))
        frames = {
            row["SOPInstanceUID"]: row["NumberOfFrames"] or 1
            for row in archive.index.find_all(Query("IMAGE", {**keys, "SOPInstanceUID": None, "NumberOfFrames": None}))
        }
    except QueryError as exc:
        raise HTTPException(400, f"invalid UID: {exc}") from None
    if not found:
        raise HTTPException(404, f"series {series} of study {study} is not in the archive")
    boundary = "macpacs-" + os.urandom(12).hex()
    base = f"{base_url(request)}/studies/{quote(study)}/series/{quote(series)}/instances"
    read = render.stored_frame if as_stored else render.uncompressed_frame

    def stream() -> Iterator[bytes]:
        for inst in found:
            try:
                fh = open_instance(archive.blobs, inst)
            except FileMissing:
                continue  # logged by retrieve; the client sees this instance's frames missing
            with fh:
                for number in range(1, frames.get(inst.sop_instance_uid, 1) + 1):
                    try:
                        frame = read(fh, number - 1)
                    except render.RenderError as exc:
                        log.warning("pixeldata: frame %d of %s skipped: %s", number, inst.sop_instance_uid, exc)
                        continue
                    header = (
                        f"--{boundary}\r\n"
                        f"Content-Type: {frame.media_type}; transfer-syntax={frame.transfer_syntax_uid}\r\n"
                        f"Content-Location: {base}/{quote(inst.sop_instance_uid)}/frames/{number}\r\n"
                        f"Content-Length: {len(frame.data)}\r\n\r\n"
                    )
                    yield header.encode() + frame.data + b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    media = "application/octet-stream"
    return StreamingResponse(stream(), media_type=f'multipart/related; type="{media}"; boundary={boundary}')
