"""MPPS and Storage Commitment through pynetdicom's SCU against a real server (DICOM worker processes).

MPPS: IN PROGRESS, then COMPLETED or DISCONTINUED, and the worklist follows. Storage
commitment: committed and failed instances (unknown, wrong class, damaged on disk) reported in
an N-EVENT-REPORT on the same association, and on a new one to a requester that hung up.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    HangingProtocolInformationModelFind,
    ModalityPerformedProcedureStep,
    StorageCommitmentPushModel,
)

from tests.conftest import MACPACS, ServerProcess, free_port, run_tool
from tests.integration.helpers import Step, findscu_worklist, integration_server, item, post_item
from tests.plugin_site import install_plugin
from tests.synthetic import write_series

SPS = "ScheduledProcedureStepSequence[0]"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


# A site's own plugin, installed the way pip installs one (a module and its dist-info with the entry
# point), serving a SOP class of its own through the same hook as ours.
SITE_PLUGIN = """
from pydicom.dataset import Dataset

from macpacs.pacs_server.plugins import hookimpl
from macpacs.pacs_server.plugins.dicom_services import DicomService

HANGING_PROTOCOL_FIND = "1.2.840.10008.5.1.4.38.2"


def find(request):
    ds = Dataset()
    ds.HangingProtocolName = "CHEST FOR " + request.calling_ae
    yield 0xFF00, ds
    yield 0x0000, None


@hookimpl
def dicom_services(archive):
    return [
        DicomService(sop_class_uid=HANGING_PROTOCOL_FIND, name="site hanging protocols", find=find),
        DicomService(sop_class_uid="1.2.840.10008.1.1", name="site echo", find=find),
    ]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    site = install_plugin(tmp_path_factory.mktemp("site") / "packages", "site_hanging", "site-hanging", SITE_PLUGIN)
    with integration_server(tmp_path_factory.mktemp("mpps"), site=site, more=("site-hanging",)) as started:
        yield started


def test_a_site_plugin_serves_its_own_sop_class(server) -> None:
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(HangingProtocolInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        query = Dataset()
        query.HangingProtocolName = ""
        answers = list(assoc.send_c_find(query, HangingProtocolInformationModelFind))
    finally:
        assoc.release()
    assert [(status.Status, ds.HangingProtocolName if ds else None) for status, ds in answers] == [
        (0xFF00, "CHEST FOR VIEWER"),
        (0x0000, None),
    ]
    assert server.logged("SOP class 1.2.840.10008.1.1 is served by the archive itself: ignored")
    run_tool("echoscu", *server.dicom_args())  # Verification is still the archive's


def _statuses(server, tmp_path: Path) -> dict[str, str]:
    answers = findscu_worklist(
        server.ae_title,
        server.dicom_port,
        tmp_path / "wl",
        "AccessionNumber",
        f"{SPS}.ScheduledProcedureStepStatus",
    )
    return {a.AccessionNumber: a.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus for a in answers}


def _mpps(step: Dataset, status: str) -> Dataset:
    ds = Dataset()
    ref = Dataset()
    ref.StudyInstanceUID = step.StudyInstanceUID
    ref.AccessionNumber = step.AccessionNumber
    ref.RequestedProcedureID = step.RequestedProcedureID
    ref.ScheduledProcedureStepID = step.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID
    ds.ScheduledStepAttributesSequence = Sequence([ref])
    ds.PatientName = step.PatientName
    ds.PatientID = step.PatientID
    ds.PerformedStationAETitle = "MODALITY"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedProcedureStepStartDate = "20250101"
    ds.PerformedProcedureStepStartTime = "100000"
    ds.PerformedProcedureStepStatus = status
    ds.Modality = "CT"
    return ds


def test_mpps_in_progress_completed_discontinued(server, tmp_path) -> None:
    first = item(Step("DOE^JOHN", "P1", "ACC1", "CT01", "CT", "20250101", "100000", "S1"))
    second = item(Step("DOE^JANE", "P2", "ACC2", "CT01", "CT", "20250101", "110000", "S2"))
    post_item(server, first)
    post_item(server, second)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        uid1, uid2 = generate_uid(), generate_uid()
        status, _attrs = assoc.send_n_create(_mpps(first, "IN PROGRESS"), ModalityPerformedProcedureStep, uid1)
        assert status.Status == 0x0000
        assert _statuses(server, tmp_path) == {"ACC1": "STARTED", "ACC2": "SCHEDULED"}

        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        done.PerformedProcedureStepEndDate = "20250101"
        done.PerformedProcedureStepEndTime = "101500"
        status, _attrs = assoc.send_n_set(done, ModalityPerformedProcedureStep, uid1)
        assert status.Status == 0x0000
        assert _statuses(server, tmp_path) == {"ACC2": "SCHEDULED"}, "a completed step leaves the worklist"

        # A completed MPPS may not change any more; an unknown one, a second N-CREATE, a wrong status: refused.
        assert assoc.send_n_set(done, ModalityPerformedProcedureStep, uid1)[0].Status == 0x0110
        assert assoc.send_n_set(done, ModalityPerformedProcedureStep, generate_uid())[0].Status == 0x0112
        assert (
            assoc.send_n_create(_mpps(first, "IN PROGRESS"), ModalityPerformedProcedureStep, uid1)[0].Status == 0x0111
        )
        assert assoc.send_n_create(_mpps(second, "COMPLETED"), ModalityPerformedProcedureStep, uid2)[0].Status == 0x0106

        assert assoc.send_n_create(_mpps(second, "IN PROGRESS"), ModalityPerformedProcedureStep, uid2)[0].Status == 0
        stop = Dataset()
        stop.PerformedProcedureStepStatus = "DISCONTINUED"
        assert assoc.send_n_set(stop, ModalityPerformedProcedureStep, uid2)[0].Status == 0
        assert _statuses(server, tmp_path) == {}
    finally:
        assoc.release()
    assert server.logged("MPPS " + uid1 + " from MODALITY: COMPLETED, 1 scheduled steps follow")


def _stored_file(data_dir: Path, sop_instance_uid: str) -> Path:
    needle = sop_instance_uid.encode()
    for path in (data_dir / "files").rglob("*.dcm"):  # the file store's blobs (storage/filesystem.py)
        if needle in path.read_bytes()[:4096]:
            return path
    raise AssertionError(f"no stored file holds {sop_instance_uid}")


def _commitment_request(refs: list[tuple[str, str]]) -> tuple[Dataset, str]:
    ds = Dataset()
    transaction = generate_uid()
    ds.TransactionUID = transaction
    items = []
    for sop_class, uid in refs:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = uid
        items.append(ref)
    ds.ReferencedSOPSequence = Sequence(items)
    return ds, transaction


def test_storage_commitment_reports_committed_and_failed(server, tmp_path) -> None:
    files = write_series(tmp_path / "s", 3, size=16)
    run_tool("storescu", *server.dicom_args(), *map(str, files))
    sent = [pydicom.dcmread(f) for f in files]
    good, damaged, other = sent
    # Damage one stored file (its last byte): it is no longer what was received.
    blob = _stored_file(server.data_dir, damaged.SOPInstanceUID)
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 0xFF
    blob.write_bytes(bytes(raw))
    unknown = generate_uid()
    refs = [
        (good.SOPClassUID, good.SOPInstanceUID),
        (damaged.SOPClassUID, damaged.SOPInstanceUID),
        ("1.2.840.10008.5.1.4.1.1.4", other.SOPInstanceUID),  # MR class for a CT instance
        (good.SOPClassUID, unknown),
    ]

    reports: list[tuple[int, Dataset]] = []
    answered = threading.Event()

    def on_report(event) -> tuple[int, None]:
        reports.append((int(event.request.EventTypeID), event.event_information))
        return 0x0000, None

    def on_sent(event) -> None:  # our N-EVENT-REPORT-RSP has left: the modality may hang up now
        if type(event.message).__name__ == "N_EVENT_REPORT_RSP":
            answered.set()

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        "127.0.0.1",
        server.dicom_port,
        ae_title=server.ae_title,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report), (evt.EVT_DIMSE_SENT, on_sent)],
    )
    assert assoc.is_established
    try:
        request, transaction = _commitment_request(refs)
        status, _reply = assoc.send_n_action(request, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        assert answered.wait(20), "no N-EVENT-REPORT on the same association"
    finally:
        assoc.release()
    event_type, info = reports[0]
    assert event_type == 2 and info.TransactionUID == transaction
    assert [r.ReferencedSOPInstanceUID for r in info.ReferencedSOPSequence] == [good.SOPInstanceUID]
    failed = {f.ReferencedSOPInstanceUID: f.FailureReason for f in info.FailedSOPSequence}
    assert failed == {damaged.SOPInstanceUID: 0x0110, other.SOPInstanceUID: 0x0119, unknown: 0x0112}
    assert server.logged("is not what was received")
    assert server.logged(f"storage commitment {transaction} for MODALITY: 1 committed, 3 failed, reported on the same")


def test_storage_commitment_report_on_a_new_association(server, tmp_path) -> None:
    files = write_series(tmp_path / "s", 2, size=16)
    run_tool("storescu", *server.dicom_args(), *map(str, files))
    sent = [pydicom.dcmread(f) for f in files]

    # The requester's own SCP, where the report arrives; registered as a node of the archive.
    reports: list[tuple[int, Dataset]] = []
    arrived = threading.Event()

    def on_report(event) -> tuple[int, None]:
        reports.append((int(event.request.EventTypeID), event.event_information))
        arrived.set()
        return 0x0000, None

    port = free_port()
    listener = AE(ae_title="MODALITY")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    scp = listener.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        subprocess.run(
            [
                MACPACS,
                "nodes",
                "add",
                "modality",
                "--ae-title",
                "MODALITY",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data-dir",
                str(server.data_dir),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
        request, transaction = _commitment_request([(d.SOPClassUID, d.SOPInstanceUID) for d in sent])
        status, _reply = assoc.send_n_action(request, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
        assoc.release()  # hangs up at once, as Orthanc does: the report comes on a new association
        assert status.Status == 0x0000
        assert arrived.wait(20), "no N-EVENT-REPORT on a new association"
    finally:
        scp.shutdown()
    event_type, info = reports[0]
    assert event_type == 1 and info.TransactionUID == transaction
    assert sorted(r.ReferencedSOPInstanceUID for r in info.ReferencedSOPSequence) == sorted(
        d.SOPInstanceUID for d in sent
    )
    assert server.logged("on a new association to node modality")


def test_orthanc_as_the_storage_commitment_scu(server, tmp_path) -> None:
    """Orthanc asks through its REST API (``/modalities/{id}/storage-commitment``) and reads the report back."""
    from tests.qr.conftest import OrthancPeer

    files = write_series(tmp_path / "s", 2, size=16)
    run_tool("storescu", *server.dicom_args(), *map(str, files))
    sent = [pydicom.dcmread(f) for f in files]
    peer = OrthancPeer(tmp_path / "orthanc", {"macpacs": [server.ae_title, "127.0.0.1", server.dicom_port]}).start()
    try:
        subprocess.run(
            [MACPACS, "nodes", "add", "orthanc", "--ae-title", OrthancPeer.AET, "--host", "127.0.0.1",
             "--port", str(peer.dicom_port), "--data-dir", str(server.data_dir)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        unknown = generate_uid()
        asked = [{"SOPClassUID": d.SOPClassUID, "SOPInstanceUID": d.SOPInstanceUID} for d in sent]
        asked.append({"SOPClassUID": sent[0].SOPClassUID, "SOPInstanceUID": unknown})
        job = peer.rest("POST", "/modalities/macpacs/storage-commitment", {"DicomInstances": asked, "Timeout": 30})
        deadline = time.monotonic() + 30
        report = peer.rest("GET", job["Path"])
        while report.get("Status") == "Pending" and time.monotonic() < deadline:
            time.sleep(0.2)
            report = peer.rest("GET", job["Path"])
    finally:
        peer.stop()
    assert report["Status"] == "Failure", report
    assert sorted(s["SOPInstanceUID"] for s in report["Success"]) == sorted(d.SOPInstanceUID for d in sent)
    assert [(f["SOPInstanceUID"], f["FailureReason"]) for f in report["Failures"]] == [(unknown, 0x0112)]
