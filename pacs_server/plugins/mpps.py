"""The ``mpps`` plugin: a Modality Performed Procedure Step SCP (N-CREATE, N-SET).

A modality creates an MPPS (N-CREATE, status IN PROGRESS) when it starts a scheduled step and
sets it COMPLETED or DISCONTINUED (N-SET) when it ends. Each MPPS is kept in the
``performed_procedure`` table (index/worklist_table.py), and the scheduled steps it refers to
(Scheduled Step Attributes Sequence: Scheduled Procedure Step ID, Accession Number, Study
Instance UID) follow it: STARTED, then COMPLETED or DISCONTINUED, so that they leave the
worklist. Rules of PS3.4 F.7.2: the status of a new MPPS is IN PROGRESS; an MPPS that is
COMPLETED or DISCONTINUED cannot be changed any more (0x0110, "performed procedure step
object may no longer be updated", as PS3.4 F.7.2.2.4 says).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from .. import dicom_status
from ..dimse.find import status_with_comment
from ..index.worklist_table import PerformedTable, ProcedureTable, writing
from ..uids import is_uid
from . import hookimpl
from .dicom_services import DicomRequest, DicomService, Response

if TYPE_CHECKING:
    from ..archive import Archive

log = logging.getLogger(__name__)

MPPS_CLASS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step SOP Class
STEP_STATUS = {"IN PROGRESS": "STARTED", "COMPLETED": "COMPLETED", "DISCONTINUED": "DISCONTINUED"}


class PerformedSteps:
    """The MPPS SCP of one archive: what N-CREATE and N-SET do to the index."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.performed = PerformedTable(archive.index)
        self.procedures = ProcedureTable(archive.index)

    def n_create(self, request: DicomRequest) -> Response:
        uid = request.sop_instance_uid
        ds = request.dataset if request.dataset is not None else Dataset()
        if not uid or not is_uid(uid):
            return status_with_comment(
                dicom_status.INVALID_OBJECT_INSTANCE, "the N-CREATE needs an Affected SOP Instance UID"
            ), None
        status = str(ds.get("PerformedProcedureStepStatus", "")).strip().upper()
        if status != "IN PROGRESS":
            log.warning("MPPS N-CREATE %s from %s refused: status %r", uid, request.calling_ae, status)
            return status_with_comment(
                dicom_status.INVALID_ATTRIBUTE_VALUE, "PerformedProcedureStepStatus must be IN PROGRESS"
            ), None
        with writing(self.archive.index) as conn:
            if self.performed.get(conn, uid) is not None:
                return status_with_comment(dicom_status.DUPLICATE_SOP_INSTANCE, f"MPPS {uid} exists already"), None
            self.performed.insert(conn, uid, status, request.calling_ae, _json(ds))
            steps = self._follow(conn, ds, status)
        log.info("MPPS %s from %s: IN PROGRESS, %d scheduled steps started", uid, request.calling_ae, steps)
        return dicom_status.SUCCESS, ds

    def n_set(self, request: DicomRequest) -> Response:
        uid = request.sop_instance_uid
        changes = request.dataset if request.dataset is not None else Dataset()
        with writing(self.archive.index) as conn:
            row = self.performed.get(conn, uid)
            if row is None:
                return status_with_comment(
                    dicom_status.NO_SUCH_OBJECT_INSTANCE, f"no MPPS {uid} was created here"
                ), None
            if row["status"] != "IN PROGRESS":
                log.warning("MPPS N-SET %s from %s refused: it is %s already", uid, request.calling_ae, row["status"])
                return status_with_comment(
                    dicom_status.PROCESSING_FAILURE, f"MPPS is {row['status']}: it may no longer be updated"
                ), None
            ds = Dataset.from_json(row["dataset"])
            for element in changes:
                ds[element.tag] = element
            status = str(ds.get("PerformedProcedureStepStatus", "")).strip().upper()
            if status not in STEP_STATUS:
                return status_with_comment(
                    dicom_status.INVALID_ATTRIBUTE_VALUE, f"PerformedProcedureStepStatus {status!r}"
                ), None
            self.performed.change(conn, uid, status, _json(ds))
            steps = self._follow(conn, ds, status)
        log.info("MPPS %s from %s: %s, %d scheduled steps follow", uid, request.calling_ae, status, steps)
        return dicom_status.SUCCESS, changes

    def _follow(self, conn: Any, ds: Dataset, status: str) -> int:
        """Set the status of the scheduled steps the MPPS refers to; how many there were."""
        references = []
        for item in ds.get("ScheduledStepAttributesSequence", []):
            references.append(
                {
                    "sps_id": str(item.get("ScheduledProcedureStepID", "") or "").strip(),
                    "accession_number": str(item.get("AccessionNumber", "") or "").strip(),
                    "study_uid": str(item.get("StudyInstanceUID", "") or "").strip(),
                }
            )
        pks = self.procedures.matching_performed(conn, references)
        return self.procedures.set_status(conn, pks, STEP_STATUS[status]) if pks else 0


def _json(ds: Dataset) -> str:
    return json.dumps(ds.to_json_dict(), separators=(",", ":"))


@hookimpl
def dicom_services(archive: Archive) -> DicomService:
    steps = PerformedSteps(archive)
    return DicomService(
        sop_class_uid=MPPS_CLASS,
        name="Modality Performed Procedure Step",
        right="store",
        n_create=steps.n_create,
        n_set=steps.n_set,
    )
