"""C-FIND with DCMTK findscu at every level and matching type (issue 2)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files
from pydicom.uid import ExplicitVRLittleEndian

from tests.conftest import BACKENDS, findscu, index_url_for, run_tool, store_studies
from tests.synthetic import write_series

STUDIES = [
    # name, patient id, date, modality, accession, description, slices
    ("DOE^JOHN", "PID001", "20240115", "CT", "ACC001", "CT CHEST", 3),
    ("DOE^JANE", "PID002", "20240220", "MR", "ACC002", "MR BRAIN", 2),
    ("SMITH^ANNA", "PID003", "20231201", "CT", "ACC003", "CT ABDOMEN", 4),
    ("smith^peter", "PID004", "20220704", "MR", "ACC004", "US LIVER", 1),  # stored as MR: no US in ModalitiesInStudy
]


@pytest.fixture(scope="module", params=BACKENDS)
def archive(tmp_path_factory, request):
    """One server per index database for the whole module, loaded once with known studies (read-only tests)."""
    from tests.conftest import ServerProcess, free_port

    base = tmp_path_factory.mktemp("find")
    url = index_url_for(request, request.param)
    server = ServerProcess(base / "data", free_port(), free_port(), free_port(), index_url=url).start()
    uids = store_studies(server, base / "in", STUDIES)
    yield server, uids, base
    server.stop()


def study_find(archive, *keys: str, extra: tuple[str, ...] = ()) -> list[pydicom.Dataset]:
    server, _uids, base = archive
    return findscu(
        server,
        base / "rsp",
        "QueryRetrieveLevel=STUDY",
        "StudyInstanceUID",
        "PatientName",
        "PatientID",
        *keys,
        extra=extra,
    )


def ids(responses: list[pydicom.Dataset]) -> list[str]:
    return sorted(str(r.PatientID) for r in responses)


def test_universal_returns_everything_with_counts(archive):
    found = study_find(
        archive,
        "NumberOfStudyRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "ModalitiesInStudy",
        "StudyDescription",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyDate",
        "StudyTime",
        "PatientComments",
    )
    assert ids(found) == ["PID001", "PID002", "PID003", "PID004"]
    anna = next(r for r in found if r.PatientID == "PID003")
    assert int(anna.NumberOfStudyRelatedInstances) == 6
    assert int(anna.NumberOfStudyRelatedSeries) == 2
    assert list(anna.ModalitiesInStudy) == ["CT", "MR"]
    assert anna.StudyDescription == "CT ABDOMEN"
    assert anna.ReferringPhysicianName == "WELBY^MARCUS"
    assert "PatientComments" in anna and not anna.PatientComments  # not indexed: returned empty
    assert anna.RetrieveAETitle == "MACPACS"


def test_single_value_and_wildcards(archive):
    assert ids(study_find(archive, "PatientID=PID002")) == ["PID002"]
    assert ids(study_find(archive, "PatientName=DOE*")) == ["PID001", "PID002"]
    assert ids(study_find(archive, "PatientName=DOE^JA?E")) == ["PID002"]
    assert ids(study_find(archive, "PatientName=*ANN*")) == ["PID003"]
    assert ids(study_find(archive, "AccessionNumber=ACC00?")) == ["PID001", "PID002", "PID003", "PID004"]
    assert ids(study_find(archive, "StudyDescription=CT*")) == ["PID001", "PID003"]
    # SQL wildcards in a value are literal characters, not patterns.
    assert study_find(archive, "PatientName=DOE%") == []
    assert study_find(archive, "PatientID=PID00_") == []


def test_person_names_match_without_case(archive):
    assert ids(study_find(archive, "PatientName=smith*")) == ["PID003", "PID004"]
    assert ids(study_find(archive, "PatientName=doe^john")) == ["PID001"]
    # Other strings stay case-sensitive, as the standard says.
    assert study_find(archive, "StudyDescription=ct*") == []


def test_date_ranges(archive):
    assert ids(study_find(archive, "StudyDate=20240101-20241231")) == ["PID001", "PID002"]
    assert ids(study_find(archive, "StudyDate=-20231231")) == ["PID003", "PID004"]
    assert ids(study_find(archive, "StudyDate=20231201-")) == ["PID001", "PID002", "PID003"]
    assert ids(study_find(archive, "StudyDate=20240115")) == ["PID001"]
    assert ids(study_find(archive, "StudyTime=1000-1100")) == ["PID001", "PID002", "PID003", "PID004"]
    assert study_find(archive, "StudyTime=1016-") == []


def test_uid_lists_and_modalities(archive):
    _server, uids, _base = archive
    both = f"StudyInstanceUID={uids['PID001']}\\{uids['PID004']}"
    found = findscu(archive[0], archive[2] / "rsp", "QueryRetrieveLevel=STUDY", both, "PatientID")
    assert ids(found) == ["PID001", "PID004"]
    assert ids(study_find(archive, "ModalitiesInStudy=MR")) == ["PID002", "PID003", "PID004"]
    assert ids(study_find(archive, "ModalitiesInStudy=CT\\US")) == ["PID001", "PID003"]


def test_patient_root_patient_level(archive):
    server, _uids, base = archive
    found = findscu(
        server,
        base / "rsp",
        "QueryRetrieveLevel=PATIENT",
        "PatientName=SMITH*",
        "PatientID",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedInstances",
        model="-P",
    )
    assert ids(found) == ["PID003", "PID004"]
    anna = next(r for r in found if r.PatientID == "PID003")
    assert int(anna.NumberOfPatientRelatedStudies) == 1
    assert int(anna.NumberOfPatientRelatedInstances) == 6


def test_patient_root_study_level(archive):
    server, _uids, base = archive
    found = findscu(
        server,
        base / "rsp",
        "QueryRetrieveLevel=STUDY",
        "PatientID=PID001",
        "StudyInstanceUID",
        "StudyDate",
        model="-P",
    )
    assert len(found) == 1 and found[0].StudyDate == "20240115"


def test_series_and_image_levels(archive):
    server, uids, base = archive
    series = findscu(
        server,
        base / "rsp",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={uids['PID003']}",
        "SeriesInstanceUID",
        "Modality",
        "NumberOfSeriesRelatedInstances",
        "SeriesNumber",
    )
    assert sorted((s.Modality, int(s.NumberOfSeriesRelatedInstances)) for s in series) == [("CT", 4), ("MR", 2)]
    ct = next(s for s in series if s.Modality == "CT")
    images = findscu(
        server,
        base / "rsp",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={uids['PID003']}",
        f"SeriesInstanceUID={ct.SeriesInstanceUID}",
        "SOPInstanceUID",
        "InstanceNumber",
        "SOPClassUID",
        "Rows",
    )
    assert sorted(int(i.InstanceNumber) for i in images) == [1, 2, 3, 4]
    assert all(i.Rows == 32 and i.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" for i in images)
    third = findscu(
        server,
        base / "rsp",
        "QueryRetrieveLevel=IMAGE",
        f"SeriesInstanceUID={ct.SeriesInstanceUID}",
        "InstanceNumber=3",
        "SOPInstanceUID",
    )
    assert len(third) == 1


def _find_status(archive, *keys: str) -> str:
    server, _uids, _base = archive
    args = ["-S", "-v", *server.dicom_args(), "-k", "QueryRetrieveLevel=STUDY"]
    for key in keys:
        args += ["-k", key]
    proc = run_tool("findscu", *args, check=False)
    return proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "key",
    [
        "StudyDate=2024-2025-2026",
        "StudyDate=2024AB01",
        "StudyTime=99:99",
        "StudyInstanceUID=../../etc",
        "PatientName=" + "*A" * 800,
    ],
)
def test_malformed_keys_fail_cleanly(archive, key):
    out = _find_status(archive, key)
    assert "Received Final Find Response (Failed: UnableToProcess)" in out, out
    # The server is still fine afterwards.
    assert ids(study_find(archive, "PatientID=PID001")) == ["PID001"]


def test_wrong_level_for_model(archive):
    out = _find_status(archive)  # STUDY root with PATIENT level below
    assert "Success" in out
    server, _uids, _base = archive
    proc = run_tool(
        "findscu", "-S", "-v", *server.dicom_args(), "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID", check=False
    )
    assert "Error: DataSetDoesNotMatchSOPClass" in proc.stderr  # 0xA900


def test_cancel_is_honoured(make_server, tmp_path):
    server = make_server()
    write_series(tmp_path / "in", 800, size=8)
    run_tool("storescu", *server.dicom_args(), "+sd", str(tmp_path / "in"))
    proc = run_tool(
        "findscu",
        "-S",
        "-v",
        "--cancel",
        "3",
        *server.dicom_args(),
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        "SOPInstanceUID",
        "-k",
        "InstanceNumber",
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert out.count("Find Response:") < 800
    assert "Received Final Find Response (Cancel" in out, out[-500:]
    assert server.logged("C-FIND cancelled by the peer")


CHARSET_FILES = [
    Path(p)
    for p in get_charset_files("chr*.dcm")
    if not p.endswith(("chrJapMulti.dcm", "chrFrenMulti.dcm", "chrSQEncoding.dcm", "chrSQEncoding1.dcm"))
]


def test_character_sets_are_preserved(make_server, tmp_path):
    server = make_server()
    for path in CHARSET_FILES:
        run_tool("storescu", *server.dicom_args(), str(path))
    for path in CHARSET_FILES:
        original = pydicom.dcmread(path)
        [answer] = findscu(
            server,
            tmp_path / "rsp",
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={original.StudyInstanceUID}",
            "PatientName",
            "PatientID",
        )
        assert str(answer.PatientName) == str(original.PatientName), path.name
        assert answer.SpecificCharacterSet == original.SpecificCharacterSet, path.name
    # Matching works on the decoded names too.
    found = findscu(server, tmp_path / "rsp", "QueryRetrieveLevel=STUDY", "PatientID=SCSGERM", "PatientName")
    assert str(found[0].PatientName) == "Äneas^Rüdiger"


def test_explicit_vr_requestor_gets_the_same_answers(archive):
    """A pynetdicom requestor that proposes only Explicit VR Little Endian (findscu gets Implicit)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    server, _uids, _base = archive
    keys = ("PatientName", "PatientID", "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedInstances")
    implicit = {str(r.StudyInstanceUID): r for r in study_find(archive, *keys[2:])}
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    for keyword in keys:
        setattr(identifier, keyword, "")
    try:
        answers = list(assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    statuses = [int(status.Status) for status, _ in answers]
    assert statuses == [0xFF00] * len(implicit) + [0x0000]
    for _status, found in answers[:-1]:
        expected = implicit[str(found.StudyInstanceUID)]
        assert [(e.tag, e.VR, e.value) for e in found] == [(e.tag, e.VR, e.value) for e in expected]
