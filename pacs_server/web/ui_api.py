"""JSON endpoints of the pages under ``/api/ui``: study search, nodes, send, delete, ZIP.

Each is a thin adapter over the archive's one way of doing the job: the study search is one
query through the one matcher, sorted, paged and counted by the index (``Index.page``),
nodes through ``nodes.NodeRegistry`` and ``dimse.scu.echo`` (as ``macpacs nodes`` does), sending
as a ``send`` job of the archive's queue (``jobs``, also listed, retried and cancelled here),
delete through ``delete.delete_matching``, and the ZIP reads files through ``retrieve``.
State-changing calls need the page's CSRF token in ``X-CSRF-Token``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import zipfile
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from ..archive import Archive
from ..delete import delete_matching
from ..dimse import scu
from ..dimse.subops import PeerError
from ..index import Query, QueryError
from ..jobs import Job, JobError
from ..nodes import Node, NodeError
from ..retrieve import FileMissing, open_instance
from . import audited
from .auth import Principal, require_admin, require_delete, require_download, require_read, require_send
from .csrf import require_csrf_header
from .lookup import check_uid

log = logging.getLogger(__name__)
router = APIRouter(tags=["pages"])
READER = Depends(require_read)
ADMIN = Depends(require_admin)
DOWNLOADER = Depends(require_download)
SENDER = Depends(require_send)
DELETER = Depends(require_delete)
CSRF = [Depends(require_csrf_header)]

STUDY_FIELDS = (
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "AccessionNumber",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SORTABLE = set(STUDY_FIELDS) - {"StudyInstanceUID"}
MAX_PAGE = 500
MAX_OFFSET = 10**9  # further than any archive's study list; the index's integers hold far more
DATE_RE = re.compile(r"^\d{4}-?\d{2}-?\d{2}$")


def _archive(request: Request) -> Archive:
    return request.app.state.archive


def _contains(text: str) -> str:
    """User text → a DICOM wildcard match: as typed when it has wildcards, else "contains"."""
    text = text.strip()
    return text if ("*" in text or "?" in text) else f"*{text}*"


def _prefix(text: str) -> str:
    text = text.strip()
    return text if ("*" in text or "?" in text) else f"{text}*"


def _day(value: str, what: str) -> str:
    if not DATE_RE.match(value):
        raise HTTPException(400, f"{what} {value[:20]!r} is not a date (YYYY-MM-DD)")
    return value.replace("-", "")


# -- study list --------------------------------------------------------------------------------------
@router.get("/studies")
def search_studies(
    request: Request,
    name: str = "",
    patient_id: str = "",
    accession: str = "",
    description: str = "",
    modality: str = "",
    date_from: str = "",
    date_to: str = "",
    sort: str = "StudyDate",
    order: str = "desc",
    limit: int = 50,
    offset: int = 0,
    who: Principal = READER,
) -> dict[str, Any]:
    """Studies matching the search form, one page of them, sorted, with the total count."""
    if sort not in SORTABLE:
        raise HTTPException(400, f"cannot sort by {sort[:40]!r} (use one of {', '.join(sorted(SORTABLE))})")
    if order not in ("asc", "desc"):
        raise HTTPException(400, 'order must be "asc" or "desc"')
    if not 1 <= limit <= MAX_PAGE or not 0 <= offset <= MAX_OFFSET:
        raise HTTPException(400, f"limit must be 1-{MAX_PAGE} and offset 0-{MAX_OFFSET}")
    keys: dict[str, str | None] = dict.fromkeys(STUDY_FIELDS)
    if name.strip():
        keys["PatientName"] = _contains(name)
    if patient_id.strip():
        keys["PatientID"] = _prefix(patient_id)
    if accession.strip():
        keys["AccessionNumber"] = _prefix(accession)
    if description.strip():
        keys["StudyDescription"] = _contains(description)
    if modality.strip():
        keys["ModalitiesInStudy"] = modality.strip().upper()
    if date_from or date_to:
        low = _day(date_from, "from date") if date_from else ""
        high = _day(date_to, "to date") if date_to else ""
        keys["StudyDate"] = low if low and low == high else f"{low}-{high}"
    descending = order == "desc"
    ordering = [(sort, descending)] + ([("StudyTime", descending)] if sort == "StudyDate" else [])
    archive = _archive(request)
    query = Query(
        "STUDY",
        keys,
        case_insensitive_names=archive.settings.dicom.case_insensitive_names,
        order_by=ordering,
        limit=limit,
        offset=offset,
    )
    try:
        page, total = archive.index.page(query)
    except QueryError as exc:
        raise HTTPException(400, f"invalid search: {exc}") from None
    audited.record_rows(request, who, "query", page, detail=f"study list {request.url.query}"[:500].strip())
    studies = [{k: row[k] for k in STUDY_FIELDS} for row in page]
    return {"total": total, "offset": offset, "limit": limit, "studies": studies}


@router.get("/studies/{study_uid}/series/{series_uid}/transfer-syntaxes")
def transfer_syntaxes(request: Request, study_uid: str, series_uid: str, _who: Principal = READER) -> dict[str, str]:
    """SOP Instance UID → stored transfer syntax, for the viewer.

    Frames of compressed files reach the viewer decoded by the server (interleaved, YBR turned
    into RGB); those of uncompressed files arrive as stored (planar or YBR as the file says). The
    DICOM JSON metadata does not carry the transfer syntax, so the viewer asks here.
    """
    keys = {
        "StudyInstanceUID": check_uid(study_uid, "study UID"),
        "SeriesInstanceUID": check_uid(series_uid, "series UID"),
    }
    found = _archive(request).index.instances(Query("SERIES", keys))
    return {inst.sop_instance_uid: inst.transfer_syntax_uid for inst in found}


# -- delete, ZIP -------------------------------------------------------------------------------------
def _study_query(uid: str, level: str = "STUDY", **more: str) -> Query:
    return Query(level, {"StudyInstanceUID": uid, **more})


@router.delete("/studies/{study_uid}", dependencies=CSRF)
def delete_study(
    request: Request,
    study_uid: str,
    who: Principal = DELETER,
) -> dict[str, Any]:
    archive = _archive(request)
    study_uid = check_uid(study_uid, "study UID")
    patients = archive.index.patient_ids([study_uid])  # before the rows are gone
    result = delete_matching(archive.index, archive.blobs, _study_query(study_uid), reason=f"web, {who.name}")
    audited.record(
        request,
        who,
        "delete",
        studies=[study_uid],
        patients=patients,
        count=result.instances,
        outcome="success" if result.instances else "failure",
        detail=str(result) if result.instances else "no such study",
    )
    if not result.instances:
        raise HTTPException(404, f"study {study_uid} is not in the archive (already deleted?)")
    return {
        "message": f"Study deleted: {result.instances} images in {result.series} series removed.",
        **dataclasses.asdict(result),
    }


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _folder(*parts: Any) -> str:
    """A file-system-safe folder name from DICOM text (never a path separator or '..')."""
    text = "_".join(str(p) for p in parts if p not in (None, ""))
    return _UNSAFE.sub("_", text).strip("._")[:60] or "unnamed"


class _Sink(io.RawIOBase):
    """Where zipfile writes; the response takes what accumulated after each file chunk."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.chunks.append(bytes(data))
        self.position += len(data)
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out


@router.get("/studies/{study_uid}/zip")
def study_zip(
    request: Request,
    study_uid: str,
    who: Principal = DOWNLOADER,
) -> StreamingResponse:
    """The study's files as received, in Patient/Study/Series folders (no DICOMDIR), streamed."""
    archive = _archive(request)
    study_uid = check_uid(study_uid, "study UID")
    study = archive.index.find_all(
        Query(
            "STUDY",
            {
                "StudyInstanceUID": study_uid,
                "PatientName": None,
                "PatientID": None,
                "StudyDate": None,
                "StudyDescription": None,
            },
        )
    )
    series = archive.index.find_all(
        Query(
            "SERIES",
            {"StudyInstanceUID": study_uid, "SeriesNumber": None, "SeriesDescription": None, "Modality": None},
        )
    )
    if not study:
        raise HTTPException(404, f"study {study_uid} is not in the archive")
    s = study[0]
    audited.record(request, who, "download", studies=[study_uid], patients=[s["PatientID"]], detail="ZIP")
    top = f"{_folder(s['PatientName'], s['PatientID'])}/{_folder(s['StudyDate'], s['StudyDescription'])}"
    plan = []
    for se in series:
        folder = _folder(
            f"{se['SeriesNumber'] or 0:03d}" if se["SeriesNumber"] is not None else "",
            se["Modality"],
            se["SeriesDescription"],
        )
        instances = archive.index.instances(
            _study_query(study_uid, "SERIES", SeriesInstanceUID=se["SeriesInstanceUID"])
        )
        plan.append((f"{top}/{folder}", instances))

    def stream() -> Iterator[bytes]:
        sink = _Sink()
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zip_out:
            for folder, instances in plan:
                for n, inst in enumerate(instances, 1):
                    try:
                        src = open_instance(archive.blobs, inst)
                    except FileMissing:
                        continue  # logged by retrieve; the rest of the study still downloads
                    with src, zip_out.open(f"{folder}/IM{n:05d}.dcm", "w", force_zip64=True) as dst:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                            yield sink.take()
                    yield sink.take()
        yield sink.take()

    name = _folder(s["PatientName"], s["StudyDate"]) + ".zip"
    return StreamingResponse(
        stream(), media_type="application/zip", headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


# -- send to a node, jobs ------------------------------------------------------------------------------
class SendRequest(BaseModel):
    node: str = Field(max_length=64)


@router.post("/studies/{study_uid}/send", dependencies=CSRF)
def send_study(
    request: Request,
    study_uid: str,
    body: SendRequest,
    who: Principal = SENDER,
) -> dict[str, Any]:
    """Queue a send of the study to a node (a ``send`` job: dimse/transfer_jobs.py); poll ``/jobs/{id}``."""
    archive = _archive(request)
    study_uid = check_uid(study_uid, "study UID")
    try:
        node = archive.nodes.get(body.node)
    except NodeError as exc:
        raise HTTPException(404, str(exc)) from None
    if node.status != "active":
        raise HTTPException(409, f"node {node.name} awaits approval: an admin must activate it first")
    log.info("web: %s sends study %s to %s", who.name, study_uid, node.name)
    job = archive.jobs.submit(
        "send", f"send study {study_uid} to {node.name}", {"node": node.name, "keys": {"StudyInstanceUID": study_uid}}
    )
    audited.record(request, who, "send", studies=[study_uid], detail=f"to {node.name}: job {job.id}")
    return job.as_json()


def _job(request: Request, job_id: int) -> Job:
    job = _archive(request).jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id} (finished jobs are forgotten after jobs.keep_days)")
    return job


@router.get("/jobs/{job_id}")
def job_progress(request: Request, job_id: int, _who: Principal = READER) -> dict[str, Any]:
    return _job(request, job_id).as_json()


@router.get("/jobs")
def list_jobs(request: Request, state: str = "", limit: int = 50, _who: Principal = ADMIN) -> list[dict[str, Any]]:
    """The newest jobs (of one state, if given), for the status page."""
    if not 1 <= limit <= MAX_PAGE:
        raise HTTPException(400, f"limit must be 1-{MAX_PAGE}")
    try:
        jobs = _archive(request).jobs.list([state] if state else [], limit=limit)
    except JobError as exc:
        raise HTTPException(400, str(exc)) from None
    return [job.as_json() for job in jobs]


@router.post("/jobs/{job_id}/{action}", dependencies=CSRF)
def change_job(request: Request, job_id: int, action: str, who: Principal = ADMIN) -> dict[str, Any]:
    """Retry or cancel a job (an admin's, as ``macpacs jobs retry|cancel``)."""
    jobs = _archive(request).jobs
    if action not in ("retry", "cancel"):
        raise HTTPException(404, f"a job can be retried or cancelled, not {action[:20]!r}")
    _job(request, job_id)
    try:
        job = jobs.retry(job_id) if action == "retry" else jobs.cancel(job_id)
    except JobError as exc:
        raise HTTPException(409, str(exc)) from None
    log.info("web: %s: %s job %d", who.name, action, job_id)
    return job.as_json()


# -- nodes ----------------------------------------------------------------------------------------------
class NodeBody(BaseModel):
    name: str = Field(max_length=64)
    ae_title: str = Field(max_length=64)
    host: str = Field(max_length=255)
    port: int
    status: str = "active"
    description: str = Field("", max_length=1024)
    allow_store: bool = True
    allow_query: bool = True
    allow_retrieve: bool = True


class NodeChanges(BaseModel):
    name: str | None = Field(None, max_length=64)
    ae_title: str | None = Field(None, max_length=64)
    host: str | None = Field(None, max_length=255)
    port: int | None = None
    status: str | None = None
    description: str | None = Field(None, max_length=1024)
    allow_store: bool | None = None
    allow_query: bool | None = None
    allow_retrieve: bool | None = None


def _node_json(node: Node) -> dict[str, Any]:
    return {**dataclasses.asdict(node), "rights": node.rights}


@router.get("/nodes")
def list_nodes(request: Request, _who: Principal = ADMIN) -> list[dict[str, Any]]:
    return [_node_json(n) for n in _archive(request).nodes.list()]


@router.post("/nodes", dependencies=CSRF)
def add_node(request: Request, body: NodeBody, who: Principal = ADMIN) -> dict[str, Any]:
    try:
        node = _archive(request).nodes.add(Node(**body.model_dump()))
    except NodeError as exc:
        raise HTTPException(400, str(exc)) from None
    log.info("web: %s added node %s (%s@%s:%d)", who.name, node.name, node.ae_title, node.host, node.port)
    audited.record(request, who, "node-change", detail=f"added {node.name} ({node.ae_title}@{node.host}:{node.port})")
    return _node_json(node)


@router.put("/nodes/{name}", dependencies=CSRF)
def edit_node(request: Request, name: str, body: NodeChanges, who: Principal = ADMIN) -> dict[str, Any]:
    changes = {k: v for k, v in body.model_dump().items() if v is not None}
    try:
        node = _archive(request).nodes.edit(name, **changes)
    except NodeError as exc:
        raise HTTPException(404 if "no DICOM node named" in str(exc) else 400, str(exc)) from None
    log.info("web: %s changed node %s: %s", who.name, name, ", ".join(sorted(changes)))
    audited.record(request, who, "node-change", detail=f"changed {name}: {', '.join(sorted(changes))}")
    return _node_json(node)


@router.delete("/nodes/{name}", dependencies=CSRF)
def remove_node(request: Request, name: str, who: Principal = ADMIN) -> dict[str, str]:
    try:
        _archive(request).nodes.remove(name)
    except NodeError as exc:
        raise HTTPException(404, str(exc)) from None
    log.info("web: %s removed node %s", who.name, name)
    audited.record(request, who, "node-change", detail=f"removed {name}")
    return {"message": f"node {name} removed"}


@router.post("/nodes/{name}/echo", dependencies=CSRF)
def echo_node(request: Request, name: str, _who: Principal = ADMIN) -> dict[str, Any]:
    """C-ECHO a node: ``ok`` with the round trip in ms, or the reason it failed (still HTTP 200)."""
    archive = _archive(request)
    try:
        node = archive.nodes.get(name)
    except NodeError as exc:
        raise HTTPException(404, str(exc)) from None
    try:
        ms = scu.echo(node, archive.settings)
    except (PeerError, OSError, RuntimeError) as exc:
        return {
            "ok": False,
            "ms": None,
            "message": f"Failed: {exc} ({node.ae_title}@{node.host}:{node.port}; is its DICOM listener running?)",
        }
    return {"ok": True, "ms": ms, "message": f"C-ECHO OK in {ms:.1f} ms"}
