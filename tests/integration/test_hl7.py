"""The hl7 plugin over real MLLP connections: the hl7 library's own clients and raw sockets.

Orders become worklist items that DCMTK ``findscu -W`` sees; changes, cancels, duplicates and
messages out of order; malformed input gets AR and never stops the listener; ADT updates and
merges reach C-FIND and QIDO-RS; an acknowledged message survives ``kill -9``.
"""

from __future__ import annotations

import io
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from tests.conftest import ServerProcess, findscu, run_tool
from tests.integration.helpers import (
    ack_code,
    findscu_worklist,
    integration_server,
    message,
    msh,
    orm,
    segment,
    send_mllp,
)
from tests.synthetic import write_series

SPS = "ScheduledProcedureStepSequence[0]"
MLLP_SEND = str(Path(sys.executable).with_name("mllp_send"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module's tests; each uses patient IDs of its own."""
    with integration_server(tmp_path_factory.mktemp("hl7")) as started:
        yield started


def _worklist(server, tmp_path: Path, patients: str, **matching: str) -> list:
    """The worklist of the patients ``patients`` matches (a PatientID matching key), findscu -W."""
    keys = ["PatientName", f"PatientID={patients}", "AccessionNumber", f"{SPS}.ScheduledProcedureStepID"]
    keys += [f"{SPS}.{k}={v}" for k, v in {"ScheduledStationAETitle": "", "Modality": "", **matching}.items()]
    return findscu_worklist(server.ae_title, server.dicom_port, tmp_path / "wl", *keys)


def _stations(answers: list) -> list[tuple[str, str]]:
    return sorted((a.AccessionNumber, a.ScheduledProcedureStepSequence[0].ScheduledStationAETitle) for a in answers)


def test_orders_feed_the_worklist(server, tmp_path) -> None:
    port = server.hl7_port
    order = {"patient_id": "O100"}

    # Two new orders with the library's command-line client.
    orders = tmp_path / "orders.hl7"
    second = orm(
        "C2",
        "NW",
        "ORD2",
        patient_id="O200",
        name="ROE^RICHARD",
        accession="ACC200",
        station="MR01",
        modality="MR",
        sps_id="SPS200",
    )
    orders.write_text((orm("C1", "NW", "ORD1", **order) + second).replace("\r", "\n"))
    sent = subprocess.run(
        [MLLP_SEND, "--loose", "-f", str(orders), "-p", str(port), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.count("MSA|AA|C") == 2, sent.stdout
    answers = _worklist(server, tmp_path, "O*", ScheduledStationAETitle="CT01")
    assert _stations(answers) == [("ACC100", "CT01")]
    assert str(answers[0].PatientName) == "DOE^JOHN" and answers[0].PatientID == "O100"
    start = _worklist(server, tmp_path, "O*", ScheduledProcedureStepStartDate="20250101")
    assert len(start) == 2

    # A change moves the step; a duplicate (same MSH-10) is answered again and not applied; an older
    # message arriving late is acknowledged and changes nothing.
    acks = send_mllp(
        port,
        orm("C3", "XO", "ORD1", station="CT02", **order, when="20250101120100"),
        orm("C3", "XO", "ORD1", station="CT09", **order, when="20250101120100"),
        orm("C4", "XO", "ORD1", station="CT07", **order, when="20250101115900"),
    )
    assert [ack_code(a)[0] for a in acks] == ["AA", "AA", "AA"]
    assert _stations(_worklist(server, tmp_path, "O*", Modality="CT")) == [("ACC100", "CT02")]
    assert server.logged("is a duplicate of the message received at")

    # Cancelled: it leaves the worklist. Completed (ORC-1 SC, ORC-5 CM): so does the other.
    acks = send_mllp(
        port,
        orm("C5", "CA", "ORD1", **order, when="20250101120200"),
        orm("C6", "SC", "ORD2", order_status="CM", patient_id="O200", when="20250101120200"),
    )
    assert [ack_code(a)[0] for a in acks] == ["AA", "AA"]
    assert _worklist(server, tmp_path, "O*") == []

    # A cancel that arrives before its order: the late order stays cancelled.
    acks = send_mllp(
        port,
        orm("C7", "CA", "ORD3", **order, sps_id="SPS300", when="20250101130500"),
        orm("C8", "NW", "ORD3", **order, sps_id="SPS300", when="20250101130000"),
    )
    assert [ack_code(a)[0] for a in acks] == ["AA", "AA"]
    assert _worklist(server, tmp_path, "O*") == []

    # OMI^O23: one worklist item per IPC segment (IHE: IPC-1 accession, -3 study UID, -4 step, -5 modality, -9 AE).
    omi = message(
        msh("C9", "OMI^O23^OMI_O23", "20250101140000"),
        segment("PID", {1: "1", 3: "O400^^^HOSP^MR", 5: "POE^EDGAR", 7: "19500101", 8: "M"}),
        segment("ORC", {1: "NW", 2: "ORD4", 5: "SC"}),
        segment("TQ1", {1: "1", 7: "202501021530"}),
        segment("OBR", {1: "1", 2: "ORD4", 4: "MRKNEE^MR KNEE^L"}),
        segment("IPC", {1: "ACC400", 2: "RP400", 3: "1.2.3.4.400", 4: "SPS401", 5: "MR", 9: "MR01"}),
        segment("IPC", {1: "ACC400", 2: "RP400", 3: "1.2.3.4.400", 4: "SPS402", 5: "MR", 9: "MR02"}),
    )
    assert ack_code(send_mllp(port, omi)[0])[0] == "AA"
    answers = _worklist(server, tmp_path, "O*", ScheduledProcedureStepStartDate="20250102")
    assert _stations(answers) == [("ACC400", "MR01"), ("ACC400", "MR02")]


def _raw(port: int, data: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        reply = b""
        while not reply.endswith(b"\x1c\r"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.strip(b"\x0b\x1c\r").decode() + "\r"


def test_malformed_messages_get_ar_or_ae_and_the_listener_goes_on(server, tmp_path) -> None:
    port = server.hl7_port
    database = server.data_dir / "index.sqlite"
    with sqlite3.connect(database) as db:
        before = db.execute("SELECT coalesce(max(pk), 0) FROM hl7_message").fetchone()[0]
    frame = lambda text: b"\x0b" + text.encode() + b"\x1c\r"  # noqa: E731

    code, text = ack_code(_raw(port, frame("this is not HL7")))
    assert code == "AR" and "not an HL7 v2 message" in text
    code, text = ack_code(_raw(port, b"no start block\x1c\r"))
    assert code == "AR" and "not an MLLP block" in text
    code, text = ack_code(_raw(port, frame(message(segment("MSH", {3: "RIS", 9: "ORM^O01", 12: "2.5"})))))
    assert code == "AR" and "MSH-10" in text
    code, text = ack_code(_raw(port, frame(message(msh("X1", "ADT^A01")))))
    assert code == "AR" and "ADT^A01 is not handled" in text
    no_pid = message(msh("X2", "ORM^O01"), segment("ORC", {1: "NW", 2: "XORD9"}), segment("OBR", {1: "1", 2: "XORD9"}))
    code, text = ack_code(_raw(port, frame(no_pid)))
    assert code == "AE" and "no PID segment" in text
    bad_uid = message(
        msh("X3", "ORM^O01"),
        segment("PID", {3: "P9"}),
        segment("ORC", {1: "NW", 2: "XORD9"}),
        segment("OBR", {1: "1", 2: "XORD9"}),
        segment("ZDS", {1: "not-a-uid"}),
    )
    code, text = ack_code(_raw(port, frame(bad_uid)))
    assert code == "AE" and "not a valid Study Instance UID" in text
    # A connection closed in the middle of a message, then a good one: the listener is still there.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x0bMSH|^~\\&|RIS|")
    assert ack_code(send_mllp(port, orm("X4", "NW", "XORD10", patient_id="X100"))[0])[0] == "AA"
    assert server.logged("rejected (AR): not an HL7 v2 message")
    assert server.logged("closed in the middle of a message")
    assert server.proc.poll() is None
    # Every message is kept, with the answer it got.
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT ack_code FROM hl7_message WHERE pk > ? ORDER BY pk", (before,))
        answered = [row[0] for row in rows]
    assert answered == ["AR", "AR", "AR", "AE", "AE", "AA"]


def test_patient_update_and_merge_reach_cfind_qido_and_the_worklist(server, tmp_path) -> None:
    port = server.hl7_port
    write_series(tmp_path / "a", 2, patient_id="P100", patient_name="DOE^JOHN", size=16)
    write_series(tmp_path / "b", 1, patient_id="P300", patient_name="OLD^NAME", size=16)
    run_tool("storescu", *server.dicom_args(), "+sd", "+r", str(tmp_path / "a"), str(tmp_path / "b"))
    assert ack_code(send_mllp(port, orm("M1", "NW", "PORD1", patient_id="P300", name="OLD^NAME"))[0])[0] == "AA"
    # Asked once before the merge: the worklist's answers cached then must not outlive the change.
    assert [str(a.PatientName) for a in _worklist(server, tmp_path, "P300")] == ["OLD^NAME"]

    a08 = message(
        msh("M2", "ADT^A08^ADT_A01"),
        segment("PID", {1: "1", 3: "P100^^^HOSP^MR", 5: "DOE^JONATHAN^Q", 7: "19700101", 8: "M"}),
    )
    assert ack_code(send_mllp(port, a08)[0])[0] == "AA"
    patients = findscu(
        server, tmp_path / "f1", "QueryRetrieveLevel=PATIENT", "PatientID=P100", "PatientName", model="-P"
    )
    assert [str(p.PatientName) for p in patients] == ["DOE^JONATHAN^Q"]
    qido = requests.get(
        f"http://127.0.0.1:{server.web_port}/dicom-web/studies", params={"PatientID": "P100"}, timeout=10
    )
    assert qido.json()[0]["00100010"]["Value"][0]["Alphabetic"] == "DOE^JONATHAN^Q"

    a40 = message(
        msh("M3", "ADT^A40^ADT_A39"),
        segment("PID", {1: "1", 3: "P100^^^HOSP^MR", 5: "DOE^JONATHAN^Q"}),
        segment("MRG", {1: "P300^^^HOSP^MR"}),
    )
    assert ack_code(send_mllp(port, a40)[0])[0] == "AA"
    studies = findscu(
        server, tmp_path / "f2", "QueryRetrieveLevel=STUDY", "PatientID", "PatientName", "StudyInstanceUID"
    )
    assert sorted((s.PatientID, str(s.PatientName)) for s in studies) == [("P100", "DOE^JONATHAN^Q")] * 2
    assert findscu(server, tmp_path / "f3", "QueryRetrieveLevel=PATIENT", "PatientID=P300", model="-P") == []
    patients = findscu(
        server,
        tmp_path / "f4",
        "QueryRetrieveLevel=PATIENT",
        "PatientID=P100",
        "NumberOfPatientRelatedStudies",
        model="-P",
    )
    assert patients[0].NumberOfPatientRelatedStudies == 2
    qido = requests.get(
        f"http://127.0.0.1:{server.web_port}/dicom-web/studies", params={"PatientID": "P100"}, timeout=10
    )
    assert len(qido.json()) == 2
    # The worklist answers with the surviving identity too.
    answers = _worklist(server, tmp_path, "P100")
    assert [(a.PatientID, str(a.PatientName)) for a in answers] == [("P100", "DOE^JONATHAN^Q")]

    # The merge is remembered: a study that arrives later with the prior ID is filed under the
    # surviving patient; its file stays as sent (rewrite_files is off: test_hl7_files.py has it on).
    late = write_series(tmp_path / "c", 1, patient_id="P300", patient_name="OLD^NAME", size=16)
    run_tool("storescu", *server.dicom_args(), str(late[0]))
    assert findscu(server, tmp_path / "f5", "QueryRetrieveLevel=PATIENT", "PatientID=P300", model="-P") == []
    patients = findscu(
        server,
        tmp_path / "f6",
        "QueryRetrieveLevel=PATIENT",
        "PatientID=P100",
        "NumberOfPatientRelatedStudies",
        model="-P",
    )
    assert patients[0].NumberOfPatientRelatedStudies == 3
    stored = _wado(server, late[0])
    assert (stored.PatientID, str(stored.PatientName)) == ("P300", "OLD^NAME")


def _wado(server, path: Path) -> pydicom.Dataset:
    """The stored file of the instance written at ``path``, through WADO-URI."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    params = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID, "seriesUID": ds.SeriesInstanceUID}
    params |= {"objectUID": ds.SOPInstanceUID, "contentType": "application/dicom"}
    got = requests.get(f"http://127.0.0.1:{server.web_port}/wado", params=params, timeout=10)
    assert got.status_code == 200, got.text
    return pydicom.dcmread(io.BytesIO(got.content))


def test_an_acknowledged_message_survives_kill_9(server, tmp_path) -> None:
    """Last in the module: it kills the module's server (and starts it again)."""
    orders = [orm(f"K{n}", "NW", f"KORD{n}", sps_id=f"S{n}", accession=f"A{n}", patient_id=f"K{n}") for n in range(20)]
    acks = send_mllp(server.hl7_port, *orders)
    assert all(ack_code(a)[0] == "AA" for a in acks)
    server.stop(signal.SIGKILL)  # right after the last ACK: nothing had time to be written later
    server.start()
    assert len(_worklist(server, tmp_path, "K*")) == 20
