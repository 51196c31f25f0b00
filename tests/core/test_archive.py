"""The in-process Archive: the core opened from settings, with no listener (issue 13)."""

from __future__ import annotations

from pathlib import Path

from macpacs.pacs_server.index import Query
from tests.synthetic import write_series


def test_an_archive_ingests_and_answers_without_a_server(archive, tmp_path: Path) -> None:
    files = write_series(tmp_path / "in", 3, size=16)
    outcomes = [archive.ingestor.ingest_file(path).outcome.value for path in files]
    assert outcomes == ["stored"] * 3
    rows = archive.index.find_all(Query("STUDY", {"PatientName": "DOE*", "StudyInstanceUID": None}))
    assert len(rows) == 1
    assert archive.index.counts()["instances"] == 3
