"""The common queries keep their indexed plans (SQLite's EXPLAIN QUERY PLAN), so that they stay fast
at the seed's 25 million instances: a plan that scans a whole table is caught here, not in a
hospital's slow study list.

The queries are the matcher's own statements (``matcher.build``) for what C-FIND, QIDO-RS and the
study list ask most, the write path's look-ups, and the status document's totals. Each plan is
checked twice: on a new archive (no planner statistics), and with the statistics ANALYZE took of
the 25,000,000-instance index of ``bench/bench_scale.py`` (``STATS_25M``), which is what the
planner sees on a site of the seed's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from macpacs.pacs_server.index import Index, Query
from macpacs.pacs_server.index.matcher import build, count_statement

STUDY = ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "AccessionNumber", "ModalitiesInStudy")
STUDY_LIST = Query(
    "STUDY", dict.fromkeys(STUDY), order_by=[("StudyDate", True), ("StudyTime", True)], limit=50
)  # the web study list's first page

# query → what its plan must contain (each an indexed SEARCH), and the table it may scan, if any.
PLANS: dict[str, tuple[Query, list[str], str | None]] = {
    "patient name wildcard": (
        Query("STUDY", {"PatientName": "DOE*", "StudyInstanceUID": None}),
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
    "modality and one month": (
        Query("STUDY", {"ModalitiesInStudy": "MR", "StudyDate": "20260101-20260131", "StudyInstanceUID": None}),
        ["SEARCH study USING INDEX ix_study_date (study_date>? AND study_date<?)"],
        None,
    ),
    "series by modality and date": (
        Query("SERIES", {"Modality": "MR", "SeriesDate": "20260101-20260131", "SeriesInstanceUID": None}),
        ["SEARCH series USING INDEX ix_series_date (series_date>? AND series_date<?)"],
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
    "instances of a study": (
        Query("IMAGE", {"StudyInstanceUID": "1.2.3", "SOPInstanceUID": None}),
        [
            "SEARCH study USING INDEX sqlite_autoindex_study_1",
            "SEARCH series USING INDEX ix_series_study",
            "SEARCH instance USING INDEX ix_instance_series",
        ],
        None,
    ),
    "one instance": (
        Query("IMAGE", {"SOPInstanceUID": "1.2.3.4.5", "SeriesInstanceUID": None}),
        ["SEARCH instance USING INDEX sqlite_autoindex_instance_1"],
        None,
    ),
    # The study list: the date index is walked in order and the walk stops after one page.
    "study list page by date": (STUDY_LIST, ["SCAN study USING INDEX ix_study_date"], None),
    # QIDO-RS with limit=100 and no key: rows in storage order, the scan stops at the limit.
    "qido page without keys": (
        Query("STUDY", {"StudyInstanceUID": None, "PatientName": None}, limit=100),
        [],
        "study",
    ),
}


def _sql(statement: Any, index: Index) -> tuple[str, Any]:
    compiled = statement.compile(dialect=index.engine.dialect)
    params = tuple(compiled.params[k] for k in compiled.positiontup) if compiled.positional else compiled.params
    return compiled.string, params


def _plan(index: Index, sql: str, params: Any) -> list[str]:
    with index.engine.connect() as conn:
        return [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]


def _full_scans(plan: list[str]) -> list[str]:
    """Steps that read a table whole (a SCAN through an index walks it in order, and stops at a limit)."""
    return [line for line in plan if line.startswith("SCAN ") and "USING" not in line]


# sqlite_stat1 of bench/bench_scale.py's index at 25,000,000 instances (Index.analyze: sampled, so the
# row counts are estimates), 2026-12-02.
STATS_25M: list[tuple[str, str | None, str]] = [
    ("instance", "ix_instance_series", "19436924 101"),
    ("instance", "sqlite_autoindex_instance_1", "20420608 1"),
    ("instance_metadata", "ix_metadata_series", "19436924 101"),
    ("patient", "ix_patient_name", "57420 4"),
    ("patient", "ix_patient_name_norm", "57420 4"),
    ("patient", "sqlite_autoindex_patient_1", "35496 1 1"),
    ("series", "ix_series_date", "204800 3"),
    ("series", "ix_series_study", "163488 2"),
    ("series", "sqlite_autoindex_series_1", "221502 1"),
    ("study", "ix_study_accession", "91260 1"),
    ("study", "ix_study_date", "88146 2"),
    ("study", "ix_study_patient", "65113 6"),
    ("study", "ix_study_updated", "82128 1"),
    ("study", "sqlite_autoindex_study_1", "119040 1"),
    ("study_stable", "sqlite_autoindex_study_stable_1", "119040 1"),
]


@pytest.fixture(scope="module", params=["new archive", "25M statistics"])
def index(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path: Path = tmp_path_factory.mktemp("plans") / "index.sqlite"
    opened = Index(f"sqlite:///{path}")
    opened.migrate()
    if request.param == "25M statistics":
        with opened.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM sqlite_stat1")
            for row in STATS_25M:
                conn.exec_driver_sql("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES (?, ?, ?)", row)
        opened.engine.dispose()  # new connections load the statistics
    yield opened
    opened.close()


@pytest.mark.parametrize("name", PLANS)
def test_common_queries_use_their_indexes(index: Index, name: str) -> None:
    query, expected, may_scan = PLANS[name]
    plan = _plan(index, *_sql(build(query)[0], index))
    for step in expected:
        assert any(line.startswith(step) for line in plan), f"{name}: no {step!r} in the plan {plan}"
    scans = _full_scans(plan)
    allowed = [line for line in scans if may_scan and line.split()[1] == may_scan]
    assert scans == allowed, f"{name}: a table is scanned whole: {plan}"
    if may_scan:
        assert query.limit, f"{name}: a scan is only acceptable when a limit stops it"


def test_the_study_lists_total_reads_no_instance_or_series(index: Index) -> None:
    """The "n of total" of the study list counts studies, through indexes only (no row is read)."""
    plan = _plan(index, *_sql(count_statement(STUDY_LIST), index))
    assert _full_scans(plan) == [], plan
    assert not any(table in line for line in plan for table in (" series", " instance")), plan


@pytest.mark.parametrize("name", ["find_patient", "find_study", "find_series", "find_instance"])
def test_the_write_path_finds_each_row_by_its_unique_index(index: Index, name: str) -> None:
    """Each C-STORE looks its instance and parents up: one unique-index search each, at any size."""
    sql, _order, _defaults = index._compile(name)
    plan = _plan(index, sql, ("x",) * sql.count("?"))
    assert len(plan) == 1 and plan[0].startswith("SEARCH "), plan
    assert "USING" in plan[0] and "INDEX" in plan[0], plan


def test_the_status_totals_read_no_instance_row(index: Index) -> None:
    """/health's counts and stored bytes add up counters (patients', studies'): no step reads series or instance."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_rest: Any) -> None:
        seen.append((statement, parameters))

    event.listen(index.engine, "before_cursor_execute", record)
    try:
        index.counts()
        index.stored_bytes()
    finally:
        event.remove(index.engine, "before_cursor_execute", record)
    assert seen
    for sql, params in seen:
        plan = _plan(index, sql, params)
        assert not any(" series" in line or " instance" in line for line in plan), (sql, plan)
