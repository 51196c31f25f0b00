"""The ``worklist`` plugin: a Modality Worklist SCP, fed by HL7 orders and a REST API.

Modalities ask it with C-FIND on the Modality Worklist Information Model - FIND
(1.2.840.10008.5.1.4.31) for the procedures scheduled on them; it answers from the
``scheduled_procedure`` table (index/worklist_table.py), which the ``hl7`` plugin fills from
ORM^O01 / OMI^O23 orders and ``POST /api/worklist`` fills with one item in DICOM JSON. MPPS
(the ``mpps`` plugin) and HL7 status changes end steps: completed, discontinued and cancelled
steps leave the worklist.

Matching keys (PS3.4 K.6.1.2; single value, wildcards, date and time ranges, as every query of
the archive): PatientName, PatientID, IssuerOfPatientID, PatientBirthDate, PatientSex,
AccessionNumber, RequestedProcedureID, StudyInstanceUID, and in the Scheduled Procedure Step
Sequence ScheduledStationAETitle, Modality, ScheduledProcedureStepStartDate and StartTime
(each its own range), ScheduledPerformingPhysicianName, ScheduledProcedureStepID,
ScheduledStationName and ScheduledProcedureStepStatus. Other keys are return keys: every key
of the request comes back, with the item's value or empty (PS3.4 K.6.1.2.2).

``Worklist`` is the API the other plugins use to add, change and end steps.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID, generate_uid
from pynetdicom.dsutils import encode

from .. import dicom_status
from ..dimse.find import status_with_comment
from ..index.matcher import QueryError
from ..index.worklist_table import ACTIVE, ENDED, PATIENT_COLUMNS, STATUSES, ProcedureTable, writing
from ..uids import is_uid
from ..web.auth import require_admin
from . import hookimpl
from .dicom_services import DicomRequest, DicomService, FindResponse

if TYPE_CHECKING:
    from ..archive import Archive

log = logging.getLogger(__name__)

MODEL = "1.2.840.10008.5.1.4.31"  # Modality Worklist Information Model - FIND
SPS = "ScheduledProcedureStepSequence"
# Item attribute → column, at the top level and in the Scheduled Procedure Step item.
TOP_COLUMNS = {
    **PATIENT_COLUMNS,
    "AccessionNumber": "accession_number",
    "RequestedProcedureID": "requested_procedure_id",
    "StudyInstanceUID": "study_uid",
}
STEP_COLUMNS = {
    "ScheduledProcedureStepID": "sps_id",
    "Modality": "modality",
    "ScheduledStationAETitle": "station_ae",
    "ScheduledStationName": "station_name",
    "ScheduledProcedureStepStartDate": "start_date",
    "ScheduledProcedureStepStartTime": "start_time",
    "ScheduledPerformingPhysicianName": "performing_physician",
}
LIMITS = {"start_date": 8, "patient_birth_date": 8, "modality": 16, "station_ae": 16, "station_name": 16}


class ItemError(ValueError):
    """A worklist item that cannot be scheduled; the message says which attribute and why."""


def item_columns(item: Dataset) -> dict[str, str]:
    """The columns of ``scheduled_procedure`` for one item (one Scheduled Procedure Step)."""
    steps = item.get(SPS)
    if not steps or len(steps) != 1:
        raise ItemError(f"{SPS} must hold exactly one item (one scheduled step per worklist item)")
    step = steps[0]
    columns: dict[str, str] = {}
    for source, names in ((item, TOP_COLUMNS), (step, STEP_COLUMNS)):
        for keyword, column in names.items():
            value = _text(source[keyword].value) if keyword in source else ""
            limit = LIMITS.get(column, 324 if column in ("patient_name", "performing_physician") else 64)
            if len(value) > limit:
                raise ItemError(f"{keyword} is {len(value)} characters long (at most {limit})")
            columns[column] = value
    if columns["study_uid"] and not is_uid(columns["study_uid"]):
        raise ItemError(f"StudyInstanceUID {columns['study_uid'][:80]!r} is not a valid UID")
    status = _text(step.get("ScheduledProcedureStepStatus", ""))
    columns["status"] = status.upper() or "SCHEDULED"
    if columns["status"] not in STATUSES:
        raise ItemError(f"ScheduledProcedureStepStatus {status!r} is not one of {', '.join(STATUSES)}")
    if not columns["patient_id"] and not columns["patient_name"]:
        raise ItemError("the item names no patient (PatientID or PatientName)")
    return columns


def prepared(item: Dataset) -> Dataset:
    """``item`` with what a modality needs filled in (in place): Study Instance UID, step and procedure IDs."""
    if not item.get("StudyInstanceUID"):
        item.StudyInstanceUID = generate_uid()
    steps = item.get(SPS)
    if steps and len(steps) == 1:
        if not steps[0].get("ScheduledProcedureStepID"):
            steps[0].ScheduledProcedureStepID = secrets.token_hex(6).upper()
        if not item.get("RequestedProcedureID"):
            item.RequestedProcedureID = steps[0].ScheduledProcedureStepID
    return item


def to_json(item: Dataset) -> str:
    return json.dumps(item.to_json_dict(), separators=(",", ":"))


def from_json(text: str | Mapping[str, Any]) -> Dataset:
    return Dataset.from_json(text if isinstance(text, str) else dict(text))


@dataclass
class Staged:
    """An item made ready to write (completed, its columns and DICOM JSON), outside the write
    transaction: the HL7 intake builds these in the connection's thread, so that its one writer
    only runs SQL. ``named_study``: the item came with its own Study Instance UID."""

    item: Dataset
    columns: dict[str, str]
    json: str
    named_study: bool

    @classmethod
    def of(cls, item: Dataset) -> Staged:
        """ItemError when the item cannot be scheduled."""
        named = bool(item.get("StudyInstanceUID"))
        item = prepared(item)
        return cls(item, item_columns(item), to_json(item), named)


class AnswerCache:
    """The answers of recently matched rows, encoded, and the items they are made from.

    Modalities ask the same question (the same keys, other dates) again and again, and building
    an answer cost ~0.6 ms a match: decoding the item's DICOM JSON, selecting the requested keys,
    pydicom's encoder. An answer depends only on the row and on the shape of the request (which
    keys, nested how; not their values) and the transfer syntax, so it is kept encoded under
    those. A row's entries are used only while its ``updated_at`` is unchanged: every write of a
    row (an HL7 order or ADT message, MPPS, in this process or another) sets it, so a changed
    row is answered afresh. Items are read-only once cached (``_select`` copies what it takes).
    """

    def __init__(self, size: int = 5000) -> None:
        self.size = size  # rows; each keeps its item and an answer per request shape
        self._rows: OrderedDict[int, tuple[float, Dataset, dict[Any, bytes]]] = OrderedDict()
        self._lock = threading.Lock()  # associations answer in threads of their own

    def answer(self, row: Mapping[str, Any], identifier: Dataset, shape: Any, syntax: UID) -> bytes:
        pk, stamp = row["pk"], row["updated_at"]
        key = (shape, syntax)
        with self._lock:
            hit = self._rows.get(pk)
            if hit is not None and hit[0] == stamp:
                self._rows.move_to_end(pk)
                encoded = hit[2].get(key)
                if encoded is not None:
                    return encoded
                item = hit[1]
            else:
                hit = None
        if hit is None:
            item = current(row)
        encoded = encode(answer(identifier, item), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        if encoded is None:
            raise ValueError(f"the answer for worklist item {pk} could not be encoded")
        with self._lock:
            entry = self._rows.get(pk)
            if entry is None or entry[0] != stamp:
                entry = self._rows[pk] = (stamp, item, {})
            entry[2][key] = encoded
            self._rows.move_to_end(pk)
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)
        return encoded


def shape(ds: Dataset) -> tuple[Any, ...]:
    """The structure of a request (tags, VRs, nested items), without its values: what an answer depends on."""
    return tuple(
        (element.tag, element.VR, tuple(shape(item) for item in element.value) if element.VR == "SQ" else None)
        for element in ds
    )


class Worklist:
    """Scheduled procedure steps of one archive: what the plugins add, change, end and match."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.table = ProcedureTable(archive.index)
        self.answers = AnswerCache()

    def add(self, item: Dataset, *, source: str = "api") -> int:
        """Schedule one item (REST API); returns its id. ItemError when it cannot be scheduled."""
        item = prepared(item)
        columns = item_columns(item)
        with writing(self.archive.index) as conn:
            return self.table.insert(conn, f"{source}:{secrets.token_hex(8)}", source, columns, to_json(item))

    def put(self, conn: Any, key: str, item: Dataset | Staged, *, source: str, message_time: str = "") -> str:
        """Create or replace the step ``key`` (``item``, completed in place; or staged before the
        transaction) in the caller's transaction: ``created``, ``updated`` or ``stale`` (older
        than the message last applied to it: nothing changed)."""
        staged = item if isinstance(item, Staged) else Staged.of(item)
        existing = self.table.by_key(conn, key)
        if existing is not None and not staged.named_study:
            # An order change keeps the study it named: the item is completed again with it.
            staged.item.StudyInstanceUID = existing["study_uid"]
            staged = Staged.of(staged.item)
        columns = staged.columns | {"message_time": message_time}
        if existing is None:
            self.table.insert(conn, key, source, columns, staged.json)
            return "created"
        if message_time and existing["message_time"] > message_time:
            return "stale"
        if existing["status"] in ENDED and columns["status"] == "SCHEDULED":
            columns["status"] = existing["status"]  # an order change does not reopen an ended step
        self.table.change(conn, existing["pk"], columns, staged.json)
        return "updated"

    def end(self, conn: Any, keys: list[str], status: str, *, message_time: str = "") -> int:
        """Set the status of the steps ``keys`` (cancel, discontinue, complete); how many changed."""
        changed = 0
        for key in keys:
            row = self.table.by_key(conn, key)
            if row is None or (message_time and row["message_time"] > message_time):
                continue
            self.table.change(conn, row["pk"], {"status": status, "message_time": message_time or row["message_time"]})
            changed += 1
        return changed

    # -- C-FIND ------------------------------------------------------------------------------------
    def find(self, request: DicomRequest) -> Iterator[FindResponse]:
        identifier = request.dataset
        if identifier is None:
            yield (
                status_with_comment(dicom_status.DOES_NOT_MATCH_SOP_CLASS, "the C-FIND request has no identifier"),
                None,
            )
            return
        keys = matching_keys(identifier)
        request_shape, syntax = shape(identifier), UID(request.transfer_syntax)
        settings = self.archive.settings.dicom
        try:
            rows = self.table.find(
                keys, case_insensitive=settings.case_insensitive_names, limit=settings.max_find_results
            )
            count = 0
            for row in rows:
                if request.is_cancelled():
                    yield dicom_status.CANCEL, None
                    return
                yield dicom_status.PENDING, self.answers.answer(row, identifier, request_shape, syntax)
                count += 1
        except QueryError as exc:
            log.warning("worklist C-FIND from %s refused: %s", request.calling_ae, exc)
            yield status_with_comment(dicom_status.QUERY_UNABLE_TO_PROCESS, str(exc)), None
            return
        log.info("worklist C-FIND from %s: %d items (%s)", request.calling_ae, count, _describe(keys))
        yield dicom_status.SUCCESS, None


def matching_keys(identifier: Dataset) -> dict[str, str]:
    """Matching keys of a worklist identifier, top level and Scheduled Procedure Step item, as text."""
    keys: dict[str, str] = {}
    sources = [identifier]
    steps = identifier.get(SPS)
    if steps:
        sources.append(steps[0])
    for source in sources:
        for element in source:
            if element.VR != "SQ" and element.keyword and element.value not in (None, ""):
                keys[element.keyword] = _text(element.value)
    return keys


def answer(identifier: Dataset, item: Dataset) -> Dataset:
    """The pending response for ``item`` (``current`` of a row): every key of ``identifier``, valued from it."""
    response = _select(identifier, item)
    if any(not str(v).isascii() for v in _texts(response)):
        response.SpecificCharacterSet = "ISO_IR 192"
    return response


def current(row: Mapping[str, Any]) -> Dataset:
    """The whole item of ``row`` as it stands: the patient as the index knows it now (ADT updates
    and merges change the columns, not the stored item) and the step's status."""
    item = from_json(row["item"])
    for keyword, column in PATIENT_COLUMNS.items():
        if row[column]:
            setattr(item, keyword, row[column])
        elif keyword in item:
            del item[keyword]
    if SPS in item and item[SPS].value:
        item[SPS].value[0].ScheduledProcedureStepStatus = row["status"]
    return item


def _select(wanted: Dataset, item: Dataset) -> Dataset:
    out = Dataset()
    for element in wanted:
        if element.tag.group == 0x0002 or element.keyword == "SpecificCharacterSet":
            continue
        have = item.get(element.tag)
        if element.VR == "SQ":
            if have is None or have.VR != "SQ" or not have.value:
                out.add(DataElement(element.tag, "SQ", Sequence()))
            elif not element.value:  # an empty sequence asks for all of it
                out.add(DataElement(element.tag, "SQ", have.value))  # shared, never changed (AnswerCache)
            else:
                out.add(DataElement(element.tag, "SQ", Sequence([_select(element.value[0], i) for i in have.value])))
        elif have is not None:
            out.add(DataElement(element.tag, have.VR, have.value))
        else:
            out.add(DataElement(element.tag, element.VR, None))
    return out


def _texts(ds: Dataset) -> Iterator[Any]:
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from _texts(item)
        elif isinstance(element.value, str):
            yield element.value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _describe(keys: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in keys.items()) or "no matching keys"


# -- the hooks -------------------------------------------------------------------------------------
@hookimpl
def dicom_services(archive: Archive) -> DicomService:
    worklist = Worklist(archive)
    return DicomService(sop_class_uid=MODEL, name="Modality Worklist", right="query", find=worklist.find)


@hookimpl
def register_routes(archive: Archive) -> APIRouter:
    worklist = Worklist(archive)
    router = APIRouter(prefix="/api/worklist", tags=["worklist plugin"], dependencies=[Depends(require_admin)])

    def shown(row: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "id": row["pk"],
            "status": row["status"],
            "source": row["source"],
            "item": current(row).to_json_dict(),
        }

    @router.post("", status_code=201)
    def schedule(body: Annotated[Any, Body()]) -> dict[str, Any]:
        """Schedule one worklist item, given in DICOM JSON (one Scheduled Procedure Step)."""
        try:
            if not isinstance(body, dict):
                raise ItemError(
                    "the body must be one DICOM JSON object (a list is several items: post them one by one)"
                )
            pk = worklist.add(from_json(body))
        except (ItemError, ValueError, TypeError, KeyError) as exc:
            raise HTTPException(400, f"the worklist item cannot be scheduled: {exc}") from None
        row = worklist.table.get(pk)
        assert row is not None
        log.info("worklist: item %d scheduled through the REST API", pk)
        return shown(row)

    @router.get("")
    def listing(
        request: Request,
        include_ended: bool = False,
        limit: int = Query(100, ge=1, le=10000),
    ) -> list[dict[str, Any]]:
        """Scheduled items; any matching key of the worklist as a query parameter (``?Modality=CT``)."""
        keys = {k: v for k, v in request.query_params.items() if k not in ("include_ended", "limit")}
        settings = archive.settings.dicom
        rows = worklist.table.find(
            keys, case_insensitive=settings.case_insensitive_names, include_ended=include_ended, limit=limit
        )
        return [shown(row) for row in rows]

    @router.delete("/{item_id}", status_code=204)
    def remove(item_id: int) -> Response:
        """Remove an item from the worklist (and the index) for good."""
        if not worklist.table.delete(item_id):
            raise HTTPException(404, f"no worklist item {item_id}")
        log.info("worklist: item %d deleted through the REST API", item_id)
        return Response(status_code=204)

    return router


__all__ = ["ACTIVE", "MODEL", "ItemError", "Worklist", "answer", "current", "item_columns", "matching_keys"]
