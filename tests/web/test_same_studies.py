"""The same matching keys through C-FIND, QIDO-RS, XML-RPC ``DBWindowFind`` and the web study list
find the same studies (issue 13): four adapters over the one matcher, each with its own syntax.

Each row of ``KEY_SETS`` is one search written four ways: DICOM matching keys (C-FIND and
QIDO-RS take them as they are), the OsiriX predicate ``DBWindowFind`` takes, and the study list's
form fields. The study list turns a patient ID or accession into a prefix match and a name into
"contains" unless wildcards are typed, so the sample IDs are chosen so that none is a prefix of
another, and names are given with their wildcards. Person names match case-insensitively
(``dicom.case_insensitive_names``, the default), which is ``LIKE[c]`` in a predicate.
"""

from __future__ import annotations

import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ServerProcess, findscu, free_port, store_studies, wait_for_port

STUDIES = [
    # name, patient id, date, modality, accession, description, slices
    ("DOE^JOHN", "PID001", "20240115", "CT", "ACC001", "CT CHEST", 1),
    ("DOE^JANE", "PID002", "20240220", "MR", "ACC002", "MR BRAIN", 1),
    ("SMITH^ANNA", "PID003", "20231201", "CT", "ACC003", "CT ABDOMEN", 1),  # plus an MR series
    ("smith^peter", "PID004", "20220704", "MR", "ACC004", "MR KNEE", 1),
    ("DOEBLER^MAX", "PID005", "", "CT", "ACC005", "CT HEAD", 1),  # no study date
    ("DOE^JOAN", "PID006", "20240101", "CT", "ACC006", "CT SPINE", 1),
]
ALL = {study[1] for study in STUDIES}

# id, DICOM matching keys, DBWindowFind predicate, study list fields, expected patient IDs
KEY_SETS: list[tuple[str, dict[str, str], str, dict[str, str], set[str]]] = [
    ("exact patient ID", {"PatientID": "PID001"}, 'patientID == "PID001"', {"patient_id": "PID001"}, {"PID001"}),
    (
        "name DOE*",
        {"PatientName": "DOE*"},
        'name LIKE[c] "DOE*"',
        {"name": "DOE*"},
        {"PID001", "PID002", "PID005", "PID006"},
    ),
    (
        "name doe* (case)",
        {"PatientName": "doe^j*"},
        'name LIKE[c] "doe^j*"',
        {"name": "doe^j*"},
        {"PID001", "PID002", "PID006"},
    ),
    ("universal *", {"PatientName": "*"}, 'name LIKE[c] "*"', {"name": "*"}, ALL),
    ("single ?", {"PatientName": "DOE^J?HN"}, 'name LIKE[c] "DOE^J?HN"', {"name": "DOE^J?HN"}, {"PID001"}),
    (
        "date range",
        {"StudyDate": "20231201-20240131"},
        'date BETWEEN {"2023-12-01", "2024-01-31"}',
        {"date_from": "2023-12-01", "date_to": "2024-01-31"},
        {"PID001", "PID003", "PID006"},
    ),
    (
        "from a date on",
        {"StudyDate": "20240101-"},
        'date >= "2024-01-01"',
        {"date_from": "2024-01-01"},
        {"PID001", "PID002", "PID006"},
    ),
    (
        "up to a date",
        {"StudyDate": "-20231231"},
        'date <= "2023-12-31"',
        {"date_to": "2023-12-31"},
        {"PID003", "PID004"},
    ),
    (
        "single date",
        {"StudyDate": "20240115"},
        'date == "2024-01-15"',
        {"date_from": "2024-01-15", "date_to": "2024-01-15"},
        {"PID001"},
    ),
    ("modality", {"ModalitiesInStudy": "MR"}, 'modality == "MR"', {"modality": "MR"}, {"PID002", "PID003", "PID004"}),
    ("accession", {"AccessionNumber": "ACC004"}, 'accessionNumber == "ACC004"', {"accession": "ACC004"}, {"PID004"}),
    (
        "combination",
        {"PatientName": "*SMITH*", "StudyDate": "20230101-", "ModalitiesInStudy": "CT"},
        'name LIKE[c] "*SMITH*" AND date >= "2023-01-01" AND modality == "CT"',
        {"name": "SMITH", "date_from": "2023-01-01", "modality": "CT"},
        {"PID003"},
    ),
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("same-studies")
    server = ServerProcess(base / "data", free_port(), free_port(), free_port()).start()
    wait_for_port(server.web_port, proc=server.proc)
    wait_for_port(server.xmlrpc_port, proc=server.proc)
    try:
        server.uids = store_studies(server, base / "in", STUDIES)  # type: ignore[attr-defined]
        server.work = base  # type: ignore[attr-defined]
        yield server
    finally:
        server.stop()


def by_c_find(server: Any, keys: dict[str, str], out: Path) -> set[str]:
    args = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", *(f"{k}={v}" for k, v in keys.items())]
    return {str(ds.StudyInstanceUID) for ds in findscu(server, out, *args)}


def by_qido(server: Any, keys: dict[str, str]) -> set[str]:
    r = requests.get(f"http://127.0.0.1:{server.web_port}/dicom-web/studies", params=keys, timeout=30)
    assert r.status_code == 200, r.text
    return {study["0020000D"]["Value"][0] for study in r.json()}


def by_dbwindowfind(server: Any, predicate: str) -> set[str]:
    proxy = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{server.xmlrpc_port}/")
    reply = proxy.DBWindowFind({"request": predicate, "table": "Study"})
    assert reply["error"] == "0", reply
    return {element["studyInstanceUID"] for element in reply["elements"]}


def by_study_list(server: Any, fields: dict[str, str]) -> set[str]:
    # From this machine the list is open to read without a login (web.anonymous_read = localhost).
    params = {**fields, "limit": "500"}
    r = requests.get(f"http://127.0.0.1:{server.web_port}/api/ui/studies", params=params, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == len(body["studies"])
    return {study["StudyInstanceUID"] for study in body["studies"]}


@pytest.mark.parametrize(
    ("keys", "predicate", "fields", "expected"), [k[1:] for k in KEY_SETS], ids=[k[0] for k in KEY_SETS]
)
def test_four_protocols_find_the_same_studies(
    loaded: Any, tmp_path: Path, keys: dict[str, str], predicate: str, fields: dict[str, str], expected: set[str]
) -> None:
    found = {
        "C-FIND": by_c_find(loaded, keys, tmp_path / "rsp"),
        "QIDO-RS": by_qido(loaded, keys),
        "DBWindowFind": by_dbwindowfind(loaded, predicate),
        "study list": by_study_list(loaded, fields),
    }
    patient_of = {uid: pid for pid, uid in loaded.uids.items()}
    by_protocol = {protocol: sorted(patient_of[uid] for uid in uids) for protocol, uids in found.items()}
    assert by_protocol == dict.fromkeys(found, sorted(expected))
