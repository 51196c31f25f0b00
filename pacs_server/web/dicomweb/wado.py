"""WADO-RS (PS3.18 10.4): instances, metadata, frames, bulk data, rendered images, thumbnails.

- Instances go out as ``multipart/related; type="application/dicom"`` streamed from the stored
  files. ``transfer-syntax=*`` (or none) sends them exactly as stored; asking for Explicit VR
  Little Endian decompresses compressed ones.
- Metadata comes from the cache written at ingest (``Index.series_metadata`` and
  ``Index.instance_metadata``): no file is opened; relative BulkDataURIs in the cache are made
  absolute here.
- Frames: ``transfer-syntax=*`` returns each frame in its stored encoding (a JPEG codestream
  stays one); otherwise frames are native little-endian pixels, decoded server-side if needed.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import AsyncIterator, Iterable
from typing import Any, BinaryIO

import anyio
import pydicom
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydicom.encaps import generate_frames

from ... import render
from ...archive import Archive
from ...index import Query as IndexQuery
from ...index import StoredInstance
from ...retrieve import local_file, open_instance
from .. import audited
from ..auth import Principal, require_download, require_read
from ..lookup import check_uid, instances, one_instance
from ..zerocopy import SENDFILES
from .common import DICOM_JSON, base_url, not_acceptable, parse_accept

router = APIRouter(tags=["WADO-RS"])

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CHUNK = 4 << 20
BATCH_FILES = 16  # files read per worker-thread call when streaming a series
MAX_FRAMES_PER_REQUEST = 10_000


def _boundary() -> str:
    return "macpacs-" + os.urandom(12).hex()


def _multipart(boundary: str, part_type: str) -> str:
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def _part_header(boundary: str, content_type: str, location: str = "") -> bytes:
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if location:
        lines.append(f"Content-Location: {location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- instances ---------------------------------------------------------------------------------
def _dicom_choice(request: Request) -> str | None:
    """The transfer syntax asked for: None = as stored; ``EXPLICIT_LE`` = uncompressed."""
    for media in parse_accept(request):
        if media.media_type in ("*/*", "multipart/*") or media.part_type in ("application/dicom", "*/*", ""):
            ts = media.transfer_syntax
            if ts in (None, "*", ""):
                return None
            if ts in (EXPLICIT_LE, "1.2.840.10008.1.2"):
                return EXPLICIT_LE
            return ts  # checked against each instance below
    raise not_acceptable(
        request.headers.get("accept", ""),
        'multipart/related; type="application/dicom" (transfer-syntax=* or 1.2.840.10008.1.2.1)',
    )


async def _stream_instances(
    archive: Archive, found: list[StoredInstance], ts: str | None, base: str | None, boundary: str
) -> AsyncIterator[bytes]:
    """The multipart body. Small files are read a batch at a time in one worker-thread call and
    sent as one block: per-file thread hops and sends, not the disk, limit speed otherwise."""
    pending: list[StoredInstance] = []
    for inst in found:
        if ts is None or ts == inst.transfer_syntax_uid:
            pending.append(inst)
            if len(pending) < BATCH_FILES:
                continue
        if pending:
            async for block in _stored_blocks(archive, pending, base, boundary):
                yield block
            pending = []
        if ts is not None and ts != inst.transfer_syntax_uid:
            data = await run_in_threadpool(_decompressed_file, archive, inst)
            yield _instance_header(boundary, inst, EXPLICIT_LE, base) + data + b"\r\n"
    if pending:
        async for block in _stored_blocks(archive, pending, base, boundary):
            yield block
    yield f"--{boundary}--\r\n".encode()


async def _stored_blocks(
    archive: Archive, batch: list[StoredInstance], base: str | None, boundary: str
) -> AsyncIterator[bytes]:
    small, large, opened = await run_in_threadpool(_read_small, archive, batch, base, boundary)
    if small:
        yield small
    for inst in large:  # big multi-frame files: streamed in chunks, never whole in memory
        fh = opened or await run_in_threadpool(open_instance, archive.blobs, inst)
        opened = None
        yield _instance_header(boundary, inst, inst.transfer_syntax_uid, base)
        async with anyio.wrap_file(fh) as source:
            while chunk := await source.read(CHUNK):
                yield chunk
        yield b"\r\n"


def _read_small(
    archive: Archive, batch: list[StoredInstance], base: str | None, boundary: str
) -> tuple[bytes, list[StoredInstance], BinaryIO | None]:
    """Parts for the files of ``batch`` up to CHUNK bytes, in order; the first larger file and
    everything after it are returned to be streamed (order is kept), the first one already open."""
    parts: list[bytes] = []
    for n, inst in enumerate(batch):
        fh = open_instance(archive.blobs, inst)
        if os.fstat(fh.fileno()).st_size > CHUNK:
            return b"".join(parts), batch[n:], fh
        with fh:
            parts += [_instance_header(boundary, inst, inst.transfer_syntax_uid, base), fh.read(), b"\r\n"]
    return b"".join(parts), [], None


def _instance_header(boundary: str, inst: StoredInstance, ts: str, base: str | None) -> bytes:
    location = f"{base}/instances/{inst.sop_instance_uid}" if base else ""
    return _part_header(boundary, f"application/dicom; transfer-syntax={ts}", location)


class _SentFromFiles(Response):
    """A multipart/related body of stored files sent with ``sendfile(2)``: only the part headers
    pass through Python; the file bytes go from the page cache to the socket in the kernel.

    Used when the server offers the ASGI zero-copy extension (plain HTTP, see ``web/zerocopy.py``)
    and every file goes out as stored; otherwise ``_stream_instances`` reads and sends bytes.
    """

    def __init__(self, parts: list[tuple[bytes, str, int]], boundary: str, length: int) -> None:
        super().__init__(media_type=_multipart(boundary, "application/dicom"), headers={"Content-Length": str(length)})
        # Each file's CRLF goes out in front of the next part's header (or the closing delimiter).
        self.parts = [
            (header if n == 0 else b"\r\n" + header, path, size) for n, (header, path, size) in enumerate(parts)
        ]
        self.closing = (b"\r\n" if parts else b"") + f"--{boundary}--\r\n".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": SENDFILES, "parts": self.parts, "trailer": self.closing, "more_body": False})


def _stored_parts(
    archive: Archive, found: list[StoredInstance], base: str | None, boundary: str
) -> tuple[list[tuple[bytes, str, int]] | None, int]:
    """Each file's part header, path and size, and the whole body's length; None when the store
    keeps no local files (an object store: the body is streamed from ``open_instance``)."""
    parts = []
    total = len(f"--{boundary}--\r\n")
    for inst in found:
        local = local_file(archive.blobs, inst)
        if local is None:
            return None, 0
        path, size = local
        header = _instance_header(boundary, inst, inst.transfer_syntax_uid, base)
        parts.append((header, path, size))
        total += len(header) + size + 2
    return parts, total


def _decompressed_file(archive: Archive, inst: StoredInstance) -> bytes:
    with open_instance(archive.blobs, inst) as fh:
        ds = render.read(fh)
    ds.decompress()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _plan(
    archive: Archive, study: str, series: str | None, sop: str | None, ts: str | None, base: str | None, boundary: str
) -> tuple[list[StoredInstance], list[tuple[bytes, str, int]] | None, int]:
    """The instances, and when all go out as stored, their parts and the body length: one
    worker-thread call (the lookup and the stat of every file), not one per step."""
    found = instances(archive, study, series, sop)
    if all(ts is None or i.transfer_syntax_uid == ts for i in found):
        parts, length = _stored_parts(archive, found, base, boundary)
        return found, parts, length
    return found, None, 0


async def _retrieve(
    request: Request, who: Principal, study: str, series: str | None = None, sop: str | None = None
) -> Response:
    archive: Archive = request.app.state.archive
    ts = _dicom_choice(request)
    boundary = _boundary()
    # Parts carry a Content-Location when the series is known (not for a whole study).
    base = f"{base_url(request)}/studies/{study}/series/{series}" if series else None
    found, parts, length = await run_in_threadpool(_plan, archive, study, series, sop, ts, base, boundary)
    await run_in_threadpool(
        audited.record, request, who, "retrieve", studies=[study], count=len(found), detail="WADO-RS", coalesce=60
    )
    if ts not in (None, EXPLICIT_LE):
        wrong = [i for i in found if i.transfer_syntax_uid != ts]
        if wrong:
            raise not_acceptable(
                f"transfer-syntax={ts}",
                f"the stored encoding ({wrong[0].transfer_syntax_uid}) or 1.2.840.10008.1.2.1",
            )
    headers = {}
    if parts is not None:
        if SENDFILES in request.scope.get("extensions", {}):
            return _SentFromFiles(parts, boundary, length)
        headers["Content-Length"] = str(length)
    return StreamingResponse(
        _stream_instances(archive, found, ts, base, boundary),
        media_type=_multipart(boundary, "application/dicom"),
        headers=headers,
    )


_MULTIPART_DICOM: dict[int | str, dict[str, Any]] = {200: {"content": {"multipart/related": {}}}, 404: {}, 406: {}}


@router.get("/studies/{study}", response_class=Response, responses=_MULTIPART_DICOM)
async def retrieve_study(request: Request, study: str, who: Principal = Depends(require_download)) -> Response:  # noqa: B008
    """All instances of a study."""
    return await _retrieve(request, who, study)


@router.get("/studies/{study}/series/{series}", response_class=Response, responses=_MULTIPART_DICOM)
async def retrieve_series(
    request: Request,
    study: str,
    series: str,
    who: Principal = Depends(require_download),  # noqa: B008
) -> Response:
    """All instances of a series."""
    return await _retrieve(request, who, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}", response_class=Response, responses=_MULTIPART_DICOM)
async def retrieve_instance(
    request: Request,
    study: str,
    series: str,
    sop: str,
    who: Principal = Depends(require_download),  # noqa: B008
) -> Response:
    """One instance."""
    return await _retrieve(request, who, study, series, sop)


# -- metadata ----------------------------------------------------------------------------------
def _absolute(blob: bytes, prefix: bytes) -> bytes:
    """Turn the cache's relative BulkDataURIs (``instances/…``) into absolute ones."""
    return zlib.decompress(blob).replace(b'"BulkDataURI":"instances/', b'"BulkDataURI":"' + prefix + b"instances/")


def _series_of(archive: Archive, study: str, series: str | None) -> list[str]:
    keys = {"StudyInstanceUID": check_uid(study, "study UID")}
    if series is not None:
        keys["SeriesInstanceUID"] = check_uid(series, "series UID")
    rows = archive.index.find_all(IndexQuery(level="SERIES", keys=keys))
    if not rows:
        raise HTTPException(404, f"not found: study {study}" + (f", series {series}" if series else ""))
    return [row["SeriesInstanceUID"] for row in rows]


def _metadata(archive: Archive, base: str, study: str, series: str | None, sop: str | None) -> bytes:
    parts: list[bytes] = []
    if sop is not None:
        (series_uid,) = _series_of(archive, study, series)
        blob = archive.index.instance_metadata(series_uid, check_uid(sop, "instance UID"))
        if blob is None:
            raise HTTPException(404, f"not found: instance {sop}")
        parts.append(_absolute(blob, f"{base}/studies/{study}/series/{series_uid}/".encode()))
    else:
        for series_uid in _series_of(archive, study, series):
            prefix = f"{base}/studies/{study}/series/{series_uid}/".encode()
            parts.extend(_absolute(blob, prefix) for blob in archive.index.series_metadata(series_uid))
    return b"[" + b",".join(parts) + b"]"


async def _metadata_response(
    request: Request, who: Principal, study: str, series: str | None = None, sop: str | None = None
) -> Response:
    for media in parse_accept(request):
        if media.media_type in (DICOM_JSON, "application/json", "*/*", "application/*"):
            break
    else:
        raise not_acceptable(request.headers.get("accept", ""), DICOM_JSON)
    body = await run_in_threadpool(_metadata, request.app.state.archive, base_url(request), study, series, sop)
    # A viewer opens a series with its metadata, then fetches frames: this is the access recorded.
    await run_in_threadpool(
        audited.record, request, who, "view", studies=[study], detail="WADO-RS metadata", coalesce=60
    )
    return Response(body, media_type=DICOM_JSON)


_JSON: dict[int | str, dict[str, Any]] = {200: {"content": {DICOM_JSON: {}}}, 404: {}, 406: {}}


@router.get("/studies/{study}/metadata", response_class=Response, responses=_JSON)
async def study_metadata(request: Request, study: str, who: Principal = Depends(require_read)) -> Response:  # noqa: B008
    """Metadata (DICOM JSON, bulk data as URIs) of every instance of a study."""
    return await _metadata_response(request, who, study)


@router.get("/studies/{study}/series/{series}/metadata", response_class=Response, responses=_JSON)
async def series_metadata(
    request: Request,
    study: str,
    series: str,
    who: Principal = Depends(require_read),  # noqa: B008
) -> Response:
    """Metadata of every instance of a series, from the ingest cache."""
    return await _metadata_response(request, who, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata", response_class=Response, responses=_JSON)
async def instance_metadata(
    request: Request,
    study: str,
    series: str,
    sop: str,
    who: Principal = Depends(require_read),  # noqa: B008
) -> Response:
    """Metadata of one instance."""
    return await _metadata_response(request, who, study, series, sop)


# -- frames ------------------------------------------------------------------------------------
def _frame_numbers(text: str) -> list[int]:
    numbers = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise HTTPException(400, f"frame list {text[:80]!r}: frames are numbers from 1, separated by commas")
        numbers.append(int(item))
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise HTTPException(400, f"at most {MAX_FRAMES_PER_REQUEST} frames per request")
    return numbers


def _frames_choice(request: Request, stored_ts: str) -> bool:
    """True: frames as stored; False: uncompressed. 406 when nothing acceptable is offered."""
    stored_media = render.FRAME_MEDIA_TYPES.get(stored_ts, "application/octet-stream")
    for media in parse_accept(request):
        part = media.part_type if media.media_type == "multipart/related" else media.media_type
        ts = media.transfer_syntax
        if part in ("application/octet-stream", "*/*", "", "multipart/*"):
            if ts == "*" or (ts == stored_ts and stored_ts != EXPLICIT_LE):
                return True
            if ts in (None, "", EXPLICIT_LE):
                return False
        elif part == stored_media and ts in (None, "", "*", stored_ts):
            return True
    raise not_acceptable(
        request.headers.get("accept", ""),
        f'multipart/related; type="application/octet-stream" (uncompressed, or transfer-syntax=* for the '
        f"stored {stored_ts}) or type={stored_media}",
    )


def _read_frames(fh: BinaryIO, numbers: list[int], as_stored: bool) -> list[render.Frame]:
    read = render.stored_frame if as_stored else render.uncompressed_frame
    try:
        return [read(fh, n - 1) for n in numbers]
    except render.RenderError as exc:
        raise HTTPException(404, str(exc)) from None


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}",
    response_class=Response,
    responses=_MULTIPART_DICOM,
)
async def retrieve_frames(
    request: Request,
    study: str,
    series: str,
    sop: str,
    frames: str,
    _who: Principal = Depends(require_read),  # noqa: B008
) -> Response:
    """Frames of an instance (numbered from 1)."""
    numbers = _frame_numbers(frames)
    archive: Archive = request.app.state.archive
    inst, fh = await run_in_threadpool(one_instance, archive, study, series, sop)
    with fh:
        as_stored = _frames_choice(request, inst.transfer_syntax_uid)
        got = await run_in_threadpool(_read_frames, fh, numbers, as_stored)
    boundary = _boundary()
    body = bytearray()
    for frame in got:
        body += _part_header(boundary, f"{frame.media_type}; transfer-syntax={frame.transfer_syntax_uid}")
        body += frame.data
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return Response(bytes(body), media_type=_multipart(boundary, got[0].media_type))


# -- bulk data ---------------------------------------------------------------------------------
def _bulk(fh: BinaryIO, tag: int) -> list[tuple[str, bytes]]:
    ds = pydicom.dcmread(fh)
    if tag not in ds:
        raise HTTPException(404, f"the instance has no element {tag:08X}")
    element = ds[tag]
    if tag == 0x7FE00010 and ds.file_meta.TransferSyntaxUID.is_compressed:
        media = render.FRAME_MEDIA_TYPES.get(str(ds.file_meta.TransferSyntaxUID), "application/octet-stream")
        frames: Iterable[bytes] = generate_frames(element.value, number_of_frames=render.number_of_frames(ds))
        return [(f"{media}; transfer-syntax={ds.file_meta.TransferSyntaxUID}", f) for f in frames]
    if not isinstance(element.value, bytes):
        raise HTTPException(404, f"element {tag:08X} is not bulk data")
    return [("application/octet-stream", element.value)]


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/bulk/{tag}",
    response_class=Response,
    responses={200: {"content": {"multipart/related": {}, "application/octet-stream": {}}}, 404: {}},
)
async def retrieve_bulk(
    request: Request,
    study: str,
    series: str,
    sop: str,
    tag: str,
    _who: Principal = Depends(require_read),  # noqa: B008
) -> Response:
    """A bulk data value named by a BulkDataURI of the metadata (top-level tags)."""
    if len(tag) != 8 or any(c not in "0123456789abcdefABCDEF" for c in tag):
        raise HTTPException(400, f"bulk data tag {tag[:20]!r} must be 8 hexadecimal digits")
    archive: Archive = request.app.state.archive
    _inst, fh = await run_in_threadpool(one_instance, archive, study, series, sop)
    with fh:
        parts = await run_in_threadpool(_bulk, fh, int(tag, 16))
    accept = parse_accept(request)
    if len(parts) == 1 and accept and accept[0].media_type == "application/octet-stream":
        return Response(parts[0][1], media_type="application/octet-stream")
    boundary = _boundary()
    body = bytearray()
    for content_type, data in parts:
        body += _part_header(boundary, content_type) + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return Response(bytes(body), media_type=_multipart(boundary, parts[0][0].split(";")[0]))


# -- rendered and thumbnails -------------------------------------------------------------------
def _image_type(request: Request) -> str:
    for media in parse_accept(request):
        if media.media_type in ("image/jpeg", "image/png"):
            return media.media_type
        if media.media_type in ("*/*", "image/*"):
            return "image/jpeg"
    raise not_acceptable(request.headers.get("accept", ""), "image/jpeg or image/png")


def _window(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    parts = text.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        raise HTTPException(400, "window must be center,width[,function]") from None
    if not width >= 1 or abs(center) > 1e9 or width > 1e9:
        raise HTTPException(400, "window width must be at least 1")
    return center, width


def _viewport(text: str | None) -> tuple[int | None, int | None]:
    if not text:
        return None, None
    parts = text.split(",")
    try:
        width, height = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise HTTPException(400, "viewport must be width,height") from None
    if not (1 <= width <= 8192 and 1 <= height <= 8192):
        raise HTTPException(400, "viewport sizes must be between 1 and 8192")
    return height, width


async def _rendered(
    request: Request, fh: BinaryIO, frame: int, window: str | None, viewport: str | None, quality: int
) -> Response:
    media = _image_type(request)
    rows, columns = _viewport(viewport)
    options = render.RenderOptions(
        frame=frame, media_type=media, window=_window(window), max_rows=rows, max_columns=columns, quality=quality
    )
    try:
        data = await run_in_threadpool(render.render, fh, options)
    except render.RenderError as exc:
        raise HTTPException(404 if "does not exist" in str(exc) else 400, str(exc)) from None
    return Response(data, media_type=media)


_IMAGE: dict[int | str, dict[str, Any]] = {200: {"content": {"image/jpeg": {}, "image/png": {}}}, 400: {}, 404: {}}


@router.get("/studies/{study}/series/{series}/instances/{sop}/rendered", response_class=Response, responses=_IMAGE)
async def rendered_instance(
    request: Request,
    study: str,
    series: str,
    sop: str,
    window: str | None = Query(None, max_length=100),
    viewport: str | None = Query(None, max_length=100),
    quality: int = Query(render.JPEG_QUALITY, ge=1, le=100),
    _who: Principal = Depends(require_read),  # noqa: B008
) -> Response:
    """The first frame rendered as JPEG (default) or PNG."""
    _inst, fh = await run_in_threadpool(one_instance, request.app.state.archive, study, series, sop)
    with fh:
        return await _rendered(request, fh, 0, window, viewport, quality)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/rendered",
    response_class=Response,
    responses=_IMAGE,
)
async def rendered_frame(
    request: Request,
    study: str,
    series: str,
    sop: str,
    frame: int,
    window: str | None = Query(None, max_length=100),
    viewport: str | None = Query(None, max_length=100),
    quality: int = Query(render.JPEG_QUALITY, ge=1, le=100),
    _who: Principal = Depends(require_read),  # noqa: B008
) -> Response:
    """One frame (numbered from 1) rendered as JPEG or PNG."""
    if frame < 1:
        raise HTTPException(400, "frames are numbered from 1")
    _inst, fh = await run_in_threadpool(one_instance, request.app.state.archive, study, series, sop)
    with fh:
        return await _rendered(request, fh, frame - 1, window, viewport, quality)


async def _thumbnail(request: Request, study: str, series: str | None = None, sop: str | None = None) -> Response:
    media = _image_type(request)
    archive: Archive = request.app.state.archive
    found = await run_in_threadpool(instances, archive, study, series, sop)
    if sop is None and series is None:
        first_series = await run_in_threadpool(_series_of, archive, study, None)
        found = await run_in_threadpool(instances, archive, study, first_series[0], None)
    inst = found[len(found) // 2]
    fh = await run_in_threadpool(open_instance, archive.blobs, inst)
    try:
        data = await run_in_threadpool(render.thumbnail, fh, media)
    except render.RenderError as exc:
        raise HTTPException(404, f"no thumbnail: {exc}") from None
    finally:
        fh.close()
    return Response(data, media_type=media)


@router.get("/studies/{study}/thumbnail", response_class=Response, responses=_IMAGE)
async def study_thumbnail(request: Request, study: str, _who: Principal = Depends(require_read)) -> Response:  # noqa: B008
    """A small image of the study (middle instance of its first series)."""
    return await _thumbnail(request, study)


@router.get("/studies/{study}/series/{series}/thumbnail", response_class=Response, responses=_IMAGE)
async def series_thumbnail(
    request: Request,
    study: str,
    series: str,
    _who: Principal = Depends(require_read),  # noqa: B008
) -> Response:
    """A small image of the series (its middle instance)."""
    return await _thumbnail(request, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}/thumbnail", response_class=Response, responses=_IMAGE)
async def instance_thumbnail(
    request: Request,
    study: str,
    series: str,
    sop: str,
    _who: Principal = Depends(require_read),  # noqa: B008
) -> Response:
    """A small image of the instance."""
    return await _thumbnail(request, study, series, sop)
