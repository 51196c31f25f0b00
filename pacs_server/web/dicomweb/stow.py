"""STOW-RS (PS3.18 10.5): ``POST /dicom-web/studies[/{study}]`` through the one ingest path.

The multipart/related body is streamed part by part into files staged by the blob store
(``BlobStore.stage``, never held in memory), then each ``application/dicom`` part goes through
``Ingestor.ingest`` exactly like a C-STORE. The answer lists stored instances in
ReferencedSOPSequence (with WarningReason when the archive kept a different stored copy) and
refused ones in FailedSOPSequence with the DICOM failure reason; the human-readable reasons are
in ``Warning`` headers and the log. 200: all stored; 202: some refused or with warnings;
409: none stored; 507: none stored because the data volume is full. A body over
``web.max_upload_mb`` is refused with 413, malformed multipart with 400, other media types with
415; nothing is kept from a refused request.

Uploads are bounded: at most ``web.max_concurrent_uploads`` requests are received at once
(more get 503 with Retry-After, before any byte of their body is read), and free space is
checked before the body is read and every 16 MB while parts stream in (``StagedFile``): below
``storage.min_free_mb``, or on a real ENOSPC, the request ends with 507 and every part it
staged is removed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from python_multipart.multipart import MultipartParser, parse_options_header

from ... import dicom_status
from ...archive import Archive
from ...index import Query
from ...ingest import IngestResult, Outcome
from ...storage import StagedFile, StorageError, is_disk_full
from .. import audited
from ..auth import Principal, require_upload
from ..lookup import check_uid
from .common import DICOM_JSON, base_url, warning_header

log = logging.getLogger(__name__)
router = APIRouter(tags=["STOW-RS"])

MAX_PARTS = 100_000
RETRY_AFTER_S = 5  # what a client refused for too many uploads at once is told to wait


class UploadSlots:
    """How many STOW-RS requests are being received and stored; one per web app, in its event loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0

    def take(self) -> None:
        """One more upload, or 503 with Retry-After when ``limit`` are running."""
        if self.taken >= self.limit:
            raise HTTPException(
                503,
                f"{self.taken} uploads are already being received (web.max_concurrent_uploads = {self.limit}): "
                f"nothing of this request was read; send it again in {RETRY_AFTER_S} s",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.taken += 1

    def give_back(self) -> None:
        self.taken -= 1


def _slots(request: Request, archive: Archive) -> UploadSlots:
    slots: UploadSlots | None = getattr(request.app.state, "upload_slots", None)
    if slots is None:  # the event loop runs one coroutine at a time: no race here
        slots = request.app.state.upload_slots = UploadSlots(archive.settings.web.max_concurrent_uploads)
    return slots


def _disk_full(exc: OSError) -> HTTPException:
    """507 for a request whose parts could not all be staged: the volume is full."""
    reason = exc.strerror or str(exc)
    if not isinstance(exc, StorageError):
        reason = f"the data volume is full ({reason})"
    return HTTPException(
        507, f"nothing of this request was stored: {reason}. Stores resume by themselves once space is freed"
    )


@dataclass
class Part:
    path: Path
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "application/dicom").split(";")[0].strip().lower()


class _Receiver:
    """python-multipart callbacks writing each part into its own staged file."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.parts: list[Part] = []
        self._fh: StagedFile | None = None
        self._field = b""
        self._value = b""
        self.finished = False

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.part_begin,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_end": self.end,
        }

    def part_begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise HTTPException(413, f"more than {MAX_PARTS} parts in one request")
        self._fh = self.archive.blobs.stage()  # closed in part_end / close
        self.parts.append(Part(Path(self._fh.name)))

    def part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._fh is not None
        self._fh.write(data[start:end])
        self.parts[-1].size += end - start

    def part_end(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.parts[-1].headers[name] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def end(self) -> None:
        self.finished = True

    def close(self) -> None:
        self.part_end()

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # a full disk may refuse the last buffered bytes too
            self.close()
        for part in self.parts:
            with contextlib.suppress(FileNotFoundError):
                part.path.unlink()


async def _receive(request: Request, archive: Archive) -> _Receiver:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/related":
        raise HTTPException(415, 'STOW-RS takes multipart/related; type="application/dicom" with a boundary parameter')
    part_type = params.get(b"type", b"application/dicom").decode("latin-1").lower()
    if part_type not in ("application/dicom", ""):
        raise HTTPException(415, f"part type {part_type!r} is not supported: send application/dicom parts")
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "multipart/related without a boundary parameter")
    limit = archive.settings.web.max_upload_mb * 1024 * 1024
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {int(declared)} bytes exceeds web.max_upload_mb = {limit >> 20}")
    try:
        archive.blobs.check_room()
    except OSError as exc:
        raise _disk_full(exc) from None
    receiver = _Receiver(archive)
    try:
        parser = MultipartParser(boundary, receiver.callbacks(), max_header_count=32, max_header_size=16384)
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise HTTPException(413, f"request body exceeds web.max_upload_mb = {limit >> 20}")
            await run_in_threadpool(parser.write, chunk)
        parser.finalize()
        receiver.close()
        if not receiver.finished or not receiver.parts:
            raise HTTPException(400, "malformed multipart body: no parts, or the closing boundary is missing")
    except HTTPException:
        receiver.discard()
        raise
    except OSError as exc:  # writing a part: the volume is full, or cannot be written
        receiver.discard()
        if is_disk_full(exc):
            raise _disk_full(exc) from None
        log.error("STOW-RS: cannot stage an uploaded part: %s", exc)
        raise HTTPException(
            503, f"the archive cannot write to its data volume ({exc.strerror or exc}): nothing was stored"
        ) from None
    except Exception as exc:  # python-multipart raises its own errors on malformed bodies
        receiver.discard()
        raise HTTPException(400, f"malformed multipart body: {exc}") from None
    return receiver


def _store(archive: Archive, parts: list[Part], study: str | None, source: str) -> list[IngestResult]:
    """Ingest each part (ingest refuses a part of another study than the URL's: 0xA900)."""
    return [archive.ingestor.ingest(part.path, via="stow", source=source, study=study or "") for part in parts]


def _uid_element(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


async def _stow(request: Request, who: Principal, study: str | None) -> JSONResponse:
    archive: Archive = request.app.state.archive
    if study is not None:
        study = check_uid(study, "study UID")
    slots = _slots(request, archive)
    slots.take()
    try:
        receiver = await _receive(request, archive)
        wrong = [p for p in receiver.parts if p.content_type != "application/dicom"]
        if wrong:
            receiver.discard()
            raise HTTPException(
                415, f"part of type {wrong[0].content_type!r}: only application/dicom parts are accepted"
            )
        results = await run_in_threadpool(_store, archive, receiver.parts, study, "STOW-RS")
    finally:
        slots.give_back()
    base = base_url(request)
    stored, failed, warnings = [], [], []
    studies = set()
    for result in results:
        item = {
            "00081150": _uid_element(result.sop_class_uid),
            "00081155": _uid_element(result.sop_instance_uid),
        }
        if result.ok:
            uid = result.sop_instance_uid
            inst = await run_in_threadpool(_location, archive, uid)
            if inst:
                studies.add(inst[0])
                item["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{inst[0]}/series/{inst[1]}/instances/{uid}"]}
            if result.outcome is Outcome.KEPT_EXISTING:
                # The stored copy was kept, the one sent discarded.
                item["00081196"] = {"vr": "US", "Value": [dicom_status.ELEMENTS_DISCARDED]}
                warnings.append(f"{uid}: {result.message}")
            stored.append(item)
        else:
            item["00081197"] = {"vr": "US", "Value": [result.dicom_status]}
            failed.append(item)
            warnings.append(f"{result.sop_instance_uid or 'part'}: {result.message}")
            log.warning("STOW-RS refused %s: %s", result.sop_instance_uid or "a part", result.message)
    body: dict[str, Any] = {}
    if study or len(studies) == 1:
        body["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study or next(iter(studies))}"]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    status = 200 if not failed and not warnings else (409 if not stored else 202)
    if not stored and all(r.disk_full for r in results if not r.ok):
        status = 507  # nothing stored, for want of space alone: the client should wait, not give up
    headers = {"Warning": warning_header(warnings)} if warnings else {}
    await run_in_threadpool(
        audited.record,
        request,
        who,
        "upload",
        studies=sorted(studies),
        count=len(stored),
        outcome="failure" if failed else "success",
        detail=f"STOW-RS: {len(stored)} stored, {len(failed)} refused",
    )
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=headers)


def _location(archive: Archive, sop_uid: str) -> tuple[str, str] | None:
    rows = archive.index.find_all(Query(level="IMAGE", keys={"SOPInstanceUID": sop_uid}))
    return (rows[0]["StudyInstanceUID"], rows[0]["SeriesInstanceUID"]) if rows else None


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {DICOM_JSON: {}}},
    202: {"content": {DICOM_JSON: {}}},
    400: {},
    409: {"content": {DICOM_JSON: {}}},
    413: {},
    415: {},
    503: {},
    507: {"content": {DICOM_JSON: {}}},
}


@router.post("/studies", responses=_RESPONSES)
async def store_instances(request: Request, who: Principal = Depends(require_upload)) -> JSONResponse:  # noqa: B008
    """Store instances (multipart/related; type="application/dicom")."""
    return await _stow(request, who, None)


@router.post("/studies/{study}", responses=_RESPONSES)
async def store_study_instances(
    request: Request,
    study: str,
    who: Principal = Depends(require_upload),  # noqa: B008
) -> JSONResponse:
    """Store instances of one study; instances of other studies are refused."""
    return await _stow(request, who, study)
