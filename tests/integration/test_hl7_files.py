"""ADT^A08 and ADT^A40 with ``[plugins.hl7] rewrite_files = true``: the stored files follow the index.

A real server, instances sent with DCMTK ``storescu``, HL7 over raw MLLP sockets, answers read
with DCMTK ``findscu``, the files read back through WADO-URI. After each message the
``patient-files`` job rewrites the files; the index's content hash is that of the new file (what
storage commitment checks) and WADO-RS metadata says the same. An instance that arrives after a
merge with the prior patient ID is indexed under the surviving patient and rewritten too.
"""

from __future__ import annotations

import io
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from macpacs.pacs_server.ingest import stream_hash
from tests.conftest import ServerProcess, findscu, run_tool
from tests.integration.helpers import ack_code, integration_server, message, msh, segment, send_mllp
from tests.synthetic import write_series


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with integration_server(tmp_path_factory.mktemp("hl7files"), extra="rewrite_files = true\n") as started:
        yield started


def _jobs_done(server: ServerProcess, count: int, timeout: float = 30.0) -> list[str]:
    """Wait until ``count`` patient-files jobs are done; their messages."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(server.data_dir / "index.sqlite") as db:
            rows = db.execute("SELECT state, message FROM job WHERE kind = 'patient-files' ORDER BY pk").fetchall()
        if len(rows) >= count and all(state == "done" for state, _ in rows):
            return [text for _, text in rows]
        assert time.monotonic() < deadline, f"patient-files jobs not done: {rows}"
        time.sleep(0.2)


def _stored(server: ServerProcess, uids: tuple[str, str, str]) -> tuple[pydicom.Dataset, bytes]:
    """The stored file of an instance, through WADO-URI, as it is on disk (parsed, and its bytes)."""
    study, series, sop = uids
    params = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop}
    params["contentType"] = "application/dicom"
    got = requests.get(f"http://127.0.0.1:{server.web_port}/wado", params=params, timeout=10)
    assert got.status_code == 200, got.text
    return pydicom.dcmread(io.BytesIO(got.content)), got.content


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _index_hash(server: ServerProcess, sop: str) -> str:
    with sqlite3.connect(server.data_dir / "index.sqlite") as db:
        return db.execute("SELECT content_hash FROM instance WHERE sop_instance_uid = ?", (sop,)).fetchone()[0]


def test_update_and_merge_rewrite_the_stored_files(server, tmp_path) -> None:
    port = server.hl7_port
    kept = write_series(tmp_path / "a", 2, patient_id="F100", patient_name="DOE^JOHN", size=16)
    merged = write_series(tmp_path / "b", 1, patient_id="F300", patient_name="OLD^NAME", size=16)
    run_tool("storescu", *server.dicom_args(), "+sd", "+r", str(tmp_path / "a"), str(tmp_path / "b"))
    original, original_bytes = _stored(server, _uids(kept[0]))

    a08 = message(
        msh("R1", "ADT^A08^ADT_A01"),
        segment("PID", {1: "1", 3: "F100^^^HOSP^MR", 5: "DOE^JONATHAN^Q", 7: "19700101", 8: "M"}),
    )
    assert ack_code(send_mllp(port, a08)[0])[0] == "AA"
    assert "2 of 2 files rewritten to patient F100" in _jobs_done(server, 1)[0]
    for path in kept:
        ds, data = _stored(server, _uids(path))
        assert (str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex) == ("DOE^JONATHAN^Q", "19700101", "M")
        assert ds.PatientID == "F100"
        # The index's hash is the new file's (storage commitment checks it).
        assert _index_hash(server, ds.SOPInstanceUID) == stream_hash(io.BytesIO(data))
    rewritten, rewritten_bytes = _stored(server, _uids(kept[0]))
    assert rewritten_bytes != original_bytes and rewritten.PixelData == original.PixelData
    assert (
        rewritten.StudyDate == original.StudyDate
        and rewritten.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    )
    study_uid = original.StudyInstanceUID
    metadata = requests.get(f"http://127.0.0.1:{server.web_port}/dicom-web/studies/{study_uid}/metadata", timeout=10)
    assert {m["00100010"]["Value"][0]["Alphabetic"] for m in metadata.json()} == {"DOE^JONATHAN^Q"}

    a40 = message(
        msh("R2", "ADT^A40^ADT_A39"),
        segment("PID", {1: "1", 3: "F100^^^HOSP^MR", 5: "DOE^JONATHAN^Q"}),
        segment("MRG", {1: "F300^^^HOSP^MR"}),
    )
    assert ack_code(send_mllp(port, a40)[0])[0] == "AA"
    messages = _jobs_done(server, 2)
    assert "1 of 3 files rewritten to patient F100" in messages[1], messages
    ds, _ = _stored(server, _uids(merged[0]))
    assert (ds.PatientID, str(ds.PatientName)) == ("F100", "DOE^JONATHAN^Q")

    # Merges are remembered: a study that arrives later with the prior ID is the surviving patient's,
    # in C-FIND at once and in its file once its job has run.
    late = write_series(tmp_path / "c", 1, patient_id="F300", patient_name="OLD^NAME", size=16)
    run_tool("storescu", *server.dicom_args(), str(late[0]))
    assert findscu(server, tmp_path / "f1", "QueryRetrieveLevel=PATIENT", "PatientID=F300", model="-P") == []
    studies = findscu(server, tmp_path / "f2", "QueryRetrieveLevel=STUDY", "PatientID=F*", "StudyInstanceUID")
    assert sorted(s.PatientID for s in studies) == ["F100"] * 3
    messages = _jobs_done(server, 3)
    assert "1 of 1 files rewritten to patient F100" in messages[2], messages
    ds, _ = _stored(server, _uids(late[0]))
    assert (ds.PatientID, str(ds.PatientName)) == ("F100", "DOE^JONATHAN^Q")
