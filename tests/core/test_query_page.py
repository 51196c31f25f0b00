"""Ordering, paging and counting through the one matcher (``Query.order_by``, ``Index.page``), in process."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from macpacs.pacs_server.index import Query, QueryError
from tests.conftest import both_indexes
from tests.synthetic import write_series

pytestmark = both_indexes

STUDIES = [("DOE^A", "P1", "20240103"), ("DOE^B", "P2", "20240101"), ("DOE^C", "P3", "20240102"), ("ROE^D", "P4", "")]


@pytest.fixture
def loaded(archive, tmp_path: Path):
    for name, pid, date in STUDIES:
        for path in write_series(tmp_path / pid, 1, study_uid=generate_uid(), patient_name=name, patient_id=pid,
                                 study_date=date, size=8):  # fmt: skip
            assert archive.ingestor.ingest_file(path).outcome.value == "stored"
    return archive


def _page(archive, **query: object) -> tuple[list[str], int]:
    rows, total = archive.index.page(Query("STUDY", {"PatientName": "DOE*", "PatientID": None}, **query))
    return [row["PatientID"] for row in rows], total


def test_a_page_is_ordered_and_counted_over_all_matches(loaded) -> None:
    assert _page(loaded, order_by=[("StudyDate", True)], limit=2) == (["P1", "P3"], 3)
    assert _page(loaded, order_by=[("StudyDate", True)], limit=2, offset=2) == (["P2"], 3)
    assert _page(loaded, order_by=[("PatientName", False)]) == (["P1", "P2", "P3"], 3)
    assert _page(loaded) == (["P1", "P2", "P3"], 3)  # without order_by: the order stored in
    assert _page(loaded, limit=0) == ([], 3)


def test_sorting_by_what_the_level_cannot_return_is_refused(loaded) -> None:
    with pytest.raises(QueryError, match="cannot sort"):
        _page(loaded, order_by=[("Modality", False)])


def test_instance_metadata_is_found_only_in_its_series(loaded) -> None:
    (row,) = loaded.index.find_all(
        Query("IMAGE", {"PatientID": "P1", "SeriesInstanceUID": None, "SOPInstanceUID": None})
    )
    assert loaded.index.instance_metadata(row["SeriesInstanceUID"], row["SOPInstanceUID"])
    assert loaded.index.instance_metadata("1.2.3", row["SOPInstanceUID"]) is None
