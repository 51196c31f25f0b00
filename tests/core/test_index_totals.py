"""The status document's totals are the index's own counters (``Index.counts``, ``stored_bytes``),
so that ``/health`` never reads 25 million instance rows: they must stay equal to a recount of
the rows through ingest, an instance written again, delete, and the 0008 migration that fills
``study.stored_bytes`` on an existing archive. In process, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from pydicom.uid import generate_uid

from macpacs.pacs_server.delete import delete_matching
from macpacs.pacs_server.index import Index, Query
from macpacs.pacs_server.index.db import MIGRATIONS
from macpacs.pacs_server.ingest import read_instance
from tests.conftest import both_indexes
from tests.synthetic import write_series

pytestmark = both_indexes


def _recount(index: Index) -> tuple[dict[str, int], int]:
    with index.engine.connect() as conn:
        one = lambda sql: conn.exec_driver_sql(sql).scalar_one()  # noqa: E731
        tables = {"patients": "patient", "studies": "study", "series": "series", "instances": "instance"}
        counts = {name: one(f"SELECT count(*) FROM {table}") for name, table in tables.items()}
        return counts, one("SELECT coalesce(sum(file_size), 0) FROM instance")


def _totals(index: Index) -> tuple[dict[str, int], int]:
    return index.counts(), index.stored_bytes()


@pytest.fixture
def loaded(archive: Any, tmp_path: Path) -> Any:
    """Two patients: one study of two series (8×8 and 32×32 slices), one of one series."""
    study = generate_uid()
    for folder, count, size, pid, uid in (
        ("a", 3, 8, "P1", study),
        ("b", 2, 32, "P1", study),
        ("c", 2, 16, "P2", None),
    ):
        for path in write_series(tmp_path / folder, count, size=size, patient_id=pid, study_uid=uid):
            assert archive.ingestor.ingest_file(path).outcome.value == "stored"
    return archive


def test_the_totals_follow_ingest_and_delete(loaded: Any) -> None:
    index = loaded.index
    assert _totals(index) == _recount(index)
    assert index.counts() == {"patients": 2, "studies": 2, "series": 3, "instances": 7}
    (one,) = index.find_all(Query("IMAGE", {"PatientID": "P2", "InstanceNumber": "1", "SOPInstanceUID": None}))
    delete_matching(index, loaded.blobs, Query("IMAGE", {"SOPInstanceUID": one["SOPInstanceUID"]}))
    assert _totals(index) == _recount(index)
    series = index.find_all(Query("SERIES", {"PatientID": "P1", "SeriesInstanceUID": None}))
    delete_matching(index, loaded.blobs, Query("SERIES", {"SeriesInstanceUID": series[0]["SeriesInstanceUID"]}))
    assert _totals(index) == _recount(index)
    delete_matching(index, loaded.blobs, Query("PATIENT", {"PatientID": "P2"}))
    assert _totals(index) == _recount(index)
    assert index.counts()["patients"] == 1


def test_an_instance_written_again_counts_its_new_size_once(loaded: Any, tmp_path: Path) -> None:
    """The replace path (a lost file sent again, reindex) swaps the old size for the new one."""
    (path,) = write_series(tmp_path / "again", 1, size=8, patient_id="P3")
    assert loaded.ingestor.ingest_file(path).outcome.value == "stored"
    before = loaded.index.stored_bytes()
    record = read_instance(path).record
    record.instance["file_size"] += 1000
    loaded.index.add_instance(record, replace=True)
    assert loaded.index.stored_bytes() == before + 1000
    assert _totals(loaded.index) == _recount(loaded.index)


def test_migration_0008_fills_the_study_bytes_of_an_existing_archive(loaded: Any) -> None:
    index = loaded.index
    expected = _recount(index)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with index.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0007")  # the archive as it was before the counter existed
        if index.is_sqlite:
            conn.exec_driver_sql("DELETE FROM sqlite_stat1")
    index.engine.dispose()
    index.migrate()
    assert _totals(index) == expected
    if index.is_sqlite:  # and the planner's statistics were taken after upgrading
        with index.engine.connect() as conn:
            analyzed = set(conn.exec_driver_sql("SELECT tbl FROM sqlite_stat1").scalars())
        assert {"patient", "study", "series", "instance"} <= analyzed
