"""The common queries keep their indexed plans (SQLite's EXPLAIN QUERY PLAN), so that they stay fast
at the seed's 25 million instances: a plan that scans a whole table is caught here, not in a
hospital's slow study list.

The queries are the matcher's own statements (``matcher.build``) for what C-FIND, QIDO-RS and the
study list ask most: a patient name wildcard, a Patient ID, an accession number, a month of
study dates, the series of a study and the instances of a series, a page of the study list
sorted by date, and a QIDO page with no key.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from macpacs.pacs_server.index import Index, Query
from macpacs.pacs_server.index.matcher import build

# query → what its plan must contain (each an indexed SEARCH), and the table it may scan, if any.
PLANS: dict[str, tuple[Query, list[str], str | None]] = {
    "patient name wildcard": (
        Query("STUDY", {"PatientName": "SMITH*", "StudyInstanceUID": None}),
        ["SEARCH patient USING INDEX ix_patient_name_norm", "SEARCH study USING INDEX ix_study_patient"],
        None,
    ),
    "patient id": (
        Query("STUDY", {"PatientID": "PID123", "StudyInstanceUID": None}),
        ["SEARCH patient USING COVERING INDEX sqlite_autoindex_patient_1", "SEARCH study USING INDEX ix_study_patient"],
        None,
    ),
    "accession number": (
        Query("STUDY", {"AccessionNumber": "A123", "StudyInstanceUID": None}),
        ["SEARCH study USING INDEX ix_study_accession"],
        None,
    ),
    "one month of studies": (
        Query("STUDY", {"StudyDate": "20260101-20260131", "StudyInstanceUID": None}),
        ["SEARCH study USING INDEX ix_study_date (study_date>? AND study_date<?)"],
        None,
    ),
    "series of a study": (
        Query("SERIES", {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": None}),
        ["SEARCH study USING INDEX sqlite_autoindex_study_1", "SEARCH series USING INDEX ix_series_study"],
        None,
    ),
    "instances of a series": (
        Query("IMAGE", {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4", "SOPInstanceUID": None}),
        ["SEARCH series USING INDEX sqlite_autoindex_series_1", "SEARCH instance USING INDEX ix_instance_series"],
        None,
    ),
    # The study list: the date index is walked in order and the walk stops after one page.
    "study list page by date": (
        Query(
            "STUDY",
            {"StudyDate": None, "PatientName": None},
            order_by=[("StudyDate", True), ("StudyTime", True)],
            limit=50,
        ),
        ["SCAN study USING INDEX ix_study_date"],
        None,
    ),
    # QIDO-RS with limit=100 and no key: rows in storage order, the scan stops at the limit.
    "qido page without keys": (
        Query("STUDY", {"StudyInstanceUID": None, "PatientName": None}, limit=100),
        [],
        "study",
    ),
}


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    path: Path = tmp_path_factory.mktemp("plans") / "index.sqlite"
    opened = Index(f"sqlite:///{path}")
    opened.migrate()
    return opened


def _plan(index: Index, query: Query) -> list[str]:
    statement, _ = build(query)
    compiled = statement.compile(dialect=index.engine.dialect)
    params = tuple(compiled.params[k] for k in compiled.positiontup) if compiled.positional else compiled.params
    with index.engine.connect() as conn:
        return [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + compiled.string, params)]


@pytest.mark.parametrize("name", PLANS)
def test_common_queries_use_their_indexes(index: Index, name: str) -> None:
    query, expected, may_scan = PLANS[name]
    plan = _plan(index, query)
    for step in expected:
        assert any(line.startswith(step) for line in plan), f"{name}: no {step!r} in the plan {plan}"
    scans = [line for line in plan if line.startswith("SCAN ") and "USING INDEX" not in line]
    allowed = [line for line in scans if may_scan and line.split()[1] == may_scan]
    assert scans == allowed, f"{name}: a table is scanned whole: {plan}"
    if may_scan:
        assert query.limit, f"{name}: a scan is only acceptable when a limit stops it"
