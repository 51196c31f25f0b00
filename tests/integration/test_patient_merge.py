"""Merges remembered (index/patient_records.py), in process over a real index (SQLite and
PostgreSQL): chains, merges back, issuers, and a merge of patients the archive does not know yet."""

from __future__ import annotations

from pathlib import Path

import pydicom

from macpacs.pacs_server.index import Query
from macpacs.pacs_server.index.patient_records import PatientKey, merge
from macpacs.pacs_server.index.worklist_table import writing
from tests.conftest import both_indexes
from tests.synthetic import write_series

pytestmark = both_indexes


def _store(archive, folder: Path, patient_id: str, issuer: str = "") -> str:
    """One instance of a new study for ``patient_id`` (of ``issuer``), through ingest; its Study Instance UID."""
    (path,) = write_series(folder, 1, patient_id=patient_id, size=8)
    ds = pydicom.dcmread(path)
    if issuer:
        ds.IssuerOfPatientID = issuer
        ds.save_as(path, enforce_file_format=True)
    assert archive.ingestor.ingest_file(path).ok
    return ds.StudyInstanceUID


def _patient_of(archive, study_uid: str) -> str:
    (row,) = archive.index.find_all(Query(level="STUDY", keys={"StudyInstanceUID": study_uid, "PatientID": ""}))
    return row["PatientID"]


def _merge(archive, prior: PatientKey, surviving: PatientKey) -> None:
    with writing(archive.index) as conn:
        merge(conn, prior, surviving, {})


def test_merges_chain_and_merge_back(archive, tmp_path) -> None:
    _store(archive, tmp_path / "b", "B")
    _merge(archive, PatientKey("A"), PatientKey("B"))  # A is not in the archive: remembered all the same
    assert _patient_of(archive, _store(archive, tmp_path / "a1", "A")) == "B"
    _merge(archive, PatientKey("B"), PatientKey("C"))  # A into B, then B into C: A's instances go to C
    assert _patient_of(archive, _store(archive, tmp_path / "a2", "A")) == "C"
    assert _patient_of(archive, _store(archive, tmp_path / "b2", "B")) == "C"
    _merge(archive, PatientKey("C"), PatientKey("B"))  # back: B survives again, and is no longer redirected
    assert _patient_of(archive, _store(archive, tmp_path / "b3", "B")) == "B"
    assert _patient_of(archive, _store(archive, tmp_path / "c", "C")) == "B"
    patients = archive.index.find_all(
        Query(level="PATIENT", keys={"PatientID": "", "NumberOfPatientRelatedStudies": ""})
    )
    assert [(p["PatientID"], p["NumberOfPatientRelatedStudies"]) for p in patients] == [("B", 6)]


def test_issuers(archive, tmp_path) -> None:
    _store(archive, tmp_path / "s", "S1", issuer="HOSP")
    _merge(archive, PatientKey("P1", "HOSP"), PatientKey("S1", "HOSP"))
    # Most modalities send no issuer: such an instance follows the merge that named one...
    assert _patient_of(archive, _store(archive, tmp_path / "n", "P1")) == "S1"
    assert _patient_of(archive, _store(archive, tmp_path / "h", "P1", issuer="HOSP")) == "S1"
    # ...but the same ID from another issuer is another patient.
    assert _patient_of(archive, _store(archive, tmp_path / "o", "P1", issuer="OTHER")) == "P1"
