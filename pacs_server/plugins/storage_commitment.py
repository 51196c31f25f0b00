"""The ``storage-commitment`` plugin: Storage Commitment Push Model SCP (N-ACTION, N-EVENT-REPORT).

A modality that sent instances asks the archive (N-ACTION, action type 1, with a Transaction
UID and the instances' SOP class and instance UIDs) to take responsibility for them; once told
they are committed it may delete its own copies. The N-ACTION is answered at once; the result
follows as an N-EVENT-REPORT (event type 1: all committed, 2: some failed), on the same
association when the requester keeps it open, else on a new association to the requester's
registered node (``macpacs nodes``: its host and port), as PS3.4 J.3.3 allows.

An instance is committed when the index has it with the same SOP class, its stored file can be
read from the blob store, and the file's dataset hash equals the one recorded at ingest
(``instance.content_hash``): what the archive would send back is what it received. Failure
reasons (PS3.4 J.3.2.1.1.2): 0x0112 no such object instance, 0x0119 class-instance conflict,
0x0110 processing failure (file missing, unreadable, or not what was received).

``[plugins.storage-commitment] report = "auto"`` (default; same association if still open, else
a new one), ``"same"`` or ``"new"``. A result that cannot be delivered is logged; the requester
asks again (nothing is kept across a restart: the check is cheap to redo).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom.presentation import build_context, build_role

from .. import dicom_status
from ..dimse.find import status_with_comment
from ..index import Query
from ..ingest import stream_hash
from ..uids import is_uid
from . import hookimpl
from .dicom_services import DicomRequest, DicomService, Response

if TYPE_CHECKING:
    from ..archive import Archive
    from ..nodes import Node

log = logging.getLogger(__name__)

NAME = "storage-commitment"
PUSH_MODEL = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP instance
REQUEST_COMMITMENT = 1  # action type
ALL_COMMITTED, SOME_FAILED = 1, 2  # event types
UIDS_PER_QUERY = 1000
# Seconds after the N-ACTION before the report is sent on the requester's association (see _send).
GRACE_S = 1.0


class Commitments:
    """Checks requested instances against the index and the blob store, and reports the result."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        report = str(archive.plugins.options(NAME).get("report", "auto"))
        if report not in ("auto", "same", "new"):
            log.error('[plugins.storage-commitment] report = %r: use "auto", "same" or "new"; using "auto"', report)
            report = "auto"
        self.report = report

    def n_action(self, request: DicomRequest) -> Response:
        if request.action_type_id != REQUEST_COMMITMENT:
            return status_with_comment(
                dicom_status.NO_SUCH_ACTION_TYPE, f"action type {request.action_type_id} (use 1)"
            ), None
        ds = request.dataset if request.dataset is not None else Dataset()
        transaction = str(ds.get("TransactionUID", "")).strip()
        if not is_uid(transaction):
            return status_with_comment(dicom_status.MISSING_ATTRIBUTE, "TransactionUID is missing or not a UID"), None
        refs = []
        for item in ds.get("ReferencedSOPSequence", []):
            refs.append(
                (
                    str(item.get("ReferencedSOPClassUID", "")).strip(),
                    str(item.get("ReferencedSOPInstanceUID", "")).strip(),
                )
            )
        if not refs:
            return status_with_comment(dicom_status.MISSING_ATTRIBUTE, "ReferencedSOPSequence is empty"), None
        log.info(
            "storage commitment %s from %s: %d instances asked; the result follows in an N-EVENT-REPORT",
            transaction,
            request.calling_ae,
            len(refs),
        )
        # After the N-ACTION-RSP: pynetdicom sends a request on the association only once the
        # response to the current one has left (its reactor is paused between messages).
        threading.Thread(
            target=self._answer,
            args=(request, transaction, refs, time.monotonic()),
            name="storage-commitment",
            daemon=True,
        ).start()
        return dicom_status.SUCCESS, None

    # -- the check --------------------------------------------------------------------------------------
    def check(self, refs: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str, int]]]:
        """(committed, failed with reason) for the (SOP class, SOP instance) pairs asked about."""
        stored = {}
        uids = [uid for _cls, uid in refs if is_uid(uid)]
        for start in range(0, len(uids), UIDS_PER_QUERY):
            chunk = uids[start : start + UIDS_PER_QUERY]
            query = Query(level="IMAGE", keys={"SOPInstanceUID": "\\".join(chunk)})
            for inst in self.archive.index.instances(query):
                stored[inst.sop_instance_uid] = inst
        committed, failed = [], []
        for sop_class, uid in refs:
            inst = stored.get(uid)
            if inst is None:
                failed.append((sop_class, uid, dicom_status.NO_SUCH_OBJECT_INSTANCE))
            elif inst.sop_class_uid != sop_class:
                failed.append((sop_class, uid, dicom_status.CLASS_INSTANCE_CONFLICT))
            elif not self._intact(inst):
                failed.append((sop_class, uid, dicom_status.PROCESSING_FAILURE))
            else:
                committed.append((sop_class, uid))
        return committed, failed

    def _intact(self, inst: Any) -> bool:
        """The stored file is there, readable, and holds the dataset that was received."""
        recorded = self.archive.index.content_hash(inst.sop_instance_uid)
        try:
            with self.archive.blobs.open(inst.storage_key) as fh:
                actual = stream_hash(fh)
        except OSError as exc:
            log.error("storage commitment: the file of %s cannot be read: %s", inst.sop_instance_uid, exc)
            return False
        if recorded is None:
            log.warning(
                "storage commitment: %s has no recorded hash (indexed before revision 0003); committed on its "
                "readable file alone. `macpacs reindex` records the hashes",
                inst.sop_instance_uid,
            )
            return True
        if actual != recorded:
            log.error(
                "storage commitment: the stored file of %s is not what was received (SHA-256 %s, recorded %s): "
                "the file was changed or damaged on disk; restore it from a backup or have it sent again",
                inst.sop_instance_uid,
                actual[:16],
                recorded[:16],
            )
            return False
        return True

    # -- the report -------------------------------------------------------------------------------------
    def _answer(self, request: DicomRequest, transaction: str, refs: list[tuple[str, str]], asked: float) -> None:
        try:
            committed, failed = self.check(refs)
            event = event_report(transaction, committed, failed, self.archive.settings.dicom.ae_title)
            event_type = SOME_FAILED if failed else ALL_COMMITTED
            where = self._send(request, event, event_type, asked)
        except Exception:
            log.exception("storage commitment %s for %s: the result could not be sent", transaction, request.calling_ae)
            return
        log.info(
            "storage commitment %s for %s: %d committed, %d failed, reported %s",
            transaction,
            request.calling_ae,
            len(committed),
            len(failed),
            where,
        )

    def _send(self, request: DicomRequest, event: Dataset, event_type: int, asked: float) -> str:
        """Deliver the report: on the requester's association if it still holds it, else on a new one."""
        assoc = request.assoc
        if self.report != "new":
            # A requester that waits for the report keeps the association; one that hangs up (Orthanc)
            # does so right after the N-ACTION response. Give it that moment before choosing.
            time.sleep(max(0.0, GRACE_S - (time.monotonic() - asked)))
            if assoc is not None and assoc.is_established:
                try:
                    status, _reply = assoc.send_n_event_report(event, event_type, PUSH_MODEL, PUSH_MODEL_INSTANCE)
                except (RuntimeError, ValueError) as exc:  # pynetdicom: the association ended meanwhile
                    status, why = None, str(exc)
                else:
                    why = _status_text(status)
                if status is not None and int(status.get("Status", 0xFFFF)) == 0:
                    return "on the same association"
                if self.report == "same":
                    raise RuntimeError(f"the requester did not take the N-EVENT-REPORT ({why})")
                log.info("storage commitment: the requester's association did not take the report (%s)", why)
            elif self.report == "same":
                raise RuntimeError("the requester closed the association before the report (report = same)")
        node = request.node or self.archive.nodes.by_ae_title(request.calling_ae)
        if node is None:
            raise RuntimeError(
                f"the requester {request.calling_ae} closed the association and is not a registered node, so "
                "there is nowhere to send the report: register it with `macpacs nodes add`"
            )
        return self._send_new(node, event, event_type)

    def _send_new(self, node: Node, event: Dataset, event_type: int) -> str:
        from ..dimse import scu, subops  # the archive's own SCU: timeouts, TLS and error messages

        ae = scu.client_ae(self.archive.settings)
        context = build_context(PUSH_MODEL)
        # We are the Storage Commitment SCP opening the association: SCP role (PS3.4 J.3.3).
        role = build_role(PUSH_MODEL, scu_role=False, scp_role=True)
        assoc = subops.associate(ae, node, [context], ext_neg=[role])
        try:
            status, _reply = assoc.send_n_event_report(event, event_type, PUSH_MODEL, PUSH_MODEL_INSTANCE)
        finally:
            assoc.release()
        if status is None or int(status.get("Status", 0xFFFF)) != 0:
            raise RuntimeError(f"node {node.name} answered the N-EVENT-REPORT with {_status_text(status)}")
        return f"on a new association to node {node.name} ({node.host}:{node.port})"


def event_report(
    transaction: str, committed: list[tuple[str, str]], failed: list[tuple[str, str, int]], retrieve_ae: str
) -> Dataset:
    """The N-EVENT-REPORT's event information (PS3.4 J.3.3.1.1)."""
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.RetrieveAETitle = retrieve_ae
    if committed:
        items = []
        for sop_class, uid in committed:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = uid
            items.append(item)
        ds.ReferencedSOPSequence = DicomSequence(items)
    if failed:
        items = []
        for sop_class, uid, reason in failed:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = uid
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = DicomSequence(items)
    return ds


def _status_text(status: Any) -> str:
    if status is None or "Status" not in status:
        return "no answer"
    return f"status 0x{int(status.Status):04X}"


@hookimpl
def dicom_services(archive: Archive) -> DicomService:
    commitments = Commitments(archive)
    return DicomService(
        sop_class_uid=PUSH_MODEL, name="Storage Commitment Push Model", right="store", n_action=commitments.n_action
    )
