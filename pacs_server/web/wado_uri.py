"""WADO-URI (PS3.18 chapter 9): ``GET /wado?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…``.

``contentType`` ``application/dicom`` returns the stored file (byte for byte, or decompressed to
Explicit VR Little Endian when ``transferSyntax`` asks for it); ``image/jpeg`` (the default for
images) and ``image/png`` are rendered by ``render`` with ``frameNumber``, ``rows``,
``columns``, ``windowCenter``/``windowWidth`` and ``imageQuality``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import BinaryIO

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response, StreamingResponse

from .. import render
from ..archive import Archive
from . import audited
from .auth import Principal, denied, require_read
from .lookup import one_instance

router = APIRouter(tags=["WADO-URI"])

UNCOMPRESSED = {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"}


@router.get(
    "/wado",
    response_class=Response,
    responses={200: {"content": {"application/dicom": {}, "image/jpeg": {}, "image/png": {}}}},
)
async def wado(
    request: Request,
    requestType: str = Query(..., max_length=16),
    studyUID: str = Query(..., max_length=64),
    seriesUID: str = Query(..., max_length=64),
    objectUID: str = Query(..., max_length=64),
    contentType: str = Query("image/jpeg", max_length=200),
    transferSyntax: str | None = Query(None, max_length=64),
    frameNumber: int = Query(1, ge=1, le=100_000),
    rows: int | None = Query(None, ge=1, le=8192),
    columns: int | None = Query(None, ge=1, le=8192),
    windowCenter: float | None = Query(None, ge=-1e9, le=1e9),
    windowWidth: float | None = Query(None, ge=1, le=1e9),
    imageQuality: int = Query(render.JPEG_QUALITY, ge=1, le=100),
    who: Principal = Depends(require_read),  # noqa: B008
) -> Response:
    """Retrieve one instance as DICOM, JPEG or PNG."""
    if requestType != "WADO":
        raise HTTPException(400, f"requestType must be WADO, not {requestType!r}")
    archive: Archive = request.app.state.archive
    inst, fh = await run_in_threadpool(one_instance, archive, studyUID, seriesUID, objectUID)
    streamed = False
    try:
        media = _choose(contentType)
        if media == "application/dicom" and not who.can("download"):
            raise denied(who, "download")  # the file itself, not a picture of it
        event = "retrieve" if media == "application/dicom" else "view"
        await run_in_threadpool(audited.record, request, who, event, studies=[studyUID], detail="WADO-URI", coalesce=60)
        if media == "application/dicom":
            if transferSyntax and transferSyntax != inst.transfer_syntax_uid:
                if transferSyntax not in UNCOMPRESSED:
                    raise HTTPException(
                        406,
                        f"transferSyntax {transferSyntax} is not available: the instance is stored as "
                        f"{inst.transfer_syntax_uid}; ask for it, or 1.2.840.10008.1.2.1 (uncompressed)",
                    )
                data = await run_in_threadpool(_decompressed, fh)
                return Response(data, media_type="application/dicom")
            disposition = {"Content-Disposition": f'attachment; filename="{objectUID}.dcm"'}
            path = archive.blobs.local_path(inst.storage_key)
            if path is not None:
                return FileResponse(path, media_type="application/dicom", filename=f"{objectUID}.dcm")
            streamed = True  # an object store's copy: the response reads and closes it
            return StreamingResponse(_chunks(fh), media_type="application/dicom", headers=disposition)
        if (windowCenter is None) != (windowWidth is None):
            raise HTTPException(400, "windowCenter and windowWidth go together")
        options = render.RenderOptions(
            frame=frameNumber - 1,
            media_type=media,
            window=(windowCenter, windowWidth) if windowCenter is not None and windowWidth is not None else None,
            max_rows=rows,
            max_columns=columns,
            quality=imageQuality,
        )
        try:
            data = await run_in_threadpool(render.render, fh, options)
        except render.RenderError as exc:
            raise HTTPException(400, f"cannot render instance {objectUID}: {exc}") from None
        return Response(data, media_type=media)
    finally:
        if not streamed:
            fh.close()


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(1 << 20):
            yield chunk


def _choose(content_type: str) -> str:
    """The first acceptable type of a comma-separated ``contentType`` list (PS3.18 9.1.2.1.5)."""
    for item in content_type.split(","):
        media = item.split(";")[0].strip().lower()
        if media in ("image/jpeg", "image/png", "application/dicom"):
            return media
        if media in ("*/*", "image/*"):
            return "image/jpeg"
    raise HTTPException(406, f"contentType {content_type!r}: use application/dicom, image/jpeg or image/png")


def _decompressed(fh: BinaryIO) -> bytes:
    ds = render.read(fh)
    try:
        ds.decompress()
    except Exception as exc:
        raise HTTPException(500, f"cannot decompress the stored instance: {exc}") from None
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
