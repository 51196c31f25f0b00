"""The ingest write path on real files and a real SQLite index: durability order, several
processes writing one index, remembered parent keys that another process made stale, and the
metadata cache entry that ingest encodes itself for plain elements."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from sqlalchemy import event

from macpacs.pacs_server import archive
from macpacs.pacs_server.config import load
from macpacs.pacs_server.index.attributes import ATTRIBUTES
from macpacs.pacs_server.ingest import BULK_THRESHOLD, Ingestor, Outcome, RejectedInstance, read_instance
from macpacs.pacs_server.storage import blob_key
from tests.conftest import both_indexes, index_url_for
from tests.synthetic import make_instance, write_series


def open_archive(data_dir: Path) -> Ingestor:
    return archive.open_archive(load(overrides={"storage": {"data_dir": str(data_dir)}}, environ={})).ingestor


def query(data_dir: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(data_dir / "index.sqlite")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_commit_comes_after_both_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow fsyncs must both have returned when the index commits."""
    ingestor = open_archive(tmp_path / "data")
    source = write_series(tmp_path / "in", 1, size=16)[0]
    synced: list[str] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.05)  # a slow disk: a commit that does not wait would come first
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc to name the synced descriptors")
    monkeypatch.setattr(os, "fsync", slow_fsync)
    at_commit: list[list[str]] = []
    event.listen(ingestor.index.engine, "commit", lambda _conn: at_commit.append(list(synced)))

    result = ingestor.ingest_file(source)

    assert result.outcome is Outcome.STORED
    final = Path(ingestor.blobs.local_path(blob_key(result.sop_instance_uid)))
    assert len(at_commit) == 1
    done = at_commit[0]
    assert str(final.parent) in done, "the folder holding the renamed file was synced before the commit"
    assert any(name.startswith(str(tmp_path / "data" / "tmp")) or name == str(final) for name in done), done


def test_folder_sync_failure_refuses_and_removes_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ingestor = open_archive(tmp_path / "data")
    source = write_series(tmp_path / "in", 1, size=16)[0]
    real_fsync = os.fsync

    def failing_dir_fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).is_dir():
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc to name the synced descriptors")
    monkeypatch.setattr(os, "fsync", failing_dir_fsync)
    result = ingestor.ingest_file(source)
    assert result.outcome is Outcome.OUT_OF_RESOURCES
    assert "cannot store file" in result.message
    assert query(tmp_path / "data", "SELECT count(*) FROM instance") == [(0,)]
    assert list(ingestor.blobs.iter_keys()) == []


def _ingest_all(data_dir: str, files: list[str]) -> list[str]:
    ingestor = open_archive(Path(data_dir))
    return [ingestor.ingest_file(Path(f)).outcome.value for f in files]


def test_two_processes_write_one_index(tmp_path: Path) -> None:
    """Same patients, studies and series from two processes at once: no duplicates, right counts."""
    data = tmp_path / "data"
    open_archive(data).index.close()
    files: list[str] = []
    for n in range(4):
        study = generate_uid()
        for s in range(2):
            paths = write_series(
                tmp_path / f"in{n}-{s}",
                6,
                size=16,
                study_uid=study,
                patient_id=f"P{n % 2}",
                modality="CT" if s else "MR",
            )
            files += [str(p) for p in paths]
    halves = [files[0::2], files[1::2]]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        outcomes = pool.starmap(_ingest_all, [(str(data), half) for half in halves])
    assert [o for part in outcomes for o in part] == ["stored"] * len(files)

    assert query(data, "SELECT count(*) FROM instance") == [(48,)]
    assert query(data, "SELECT count(*), sum(num_studies), sum(num_series), sum(num_instances) FROM patient") == [
        (2, 4, 8, 48)
    ]
    assert query(data, "SELECT count(*), sum(num_series), sum(num_instances) FROM study") == [(4, 8, 48)]
    assert query(data, "SELECT DISTINCT modalities_in_study FROM study") == [("CT\\MR",)]
    assert query(data, "SELECT DISTINCT num_instances FROM series") == [(6,)]
    assert query(data, "SELECT count(*) FROM instance_metadata") == [(48,)]


@both_indexes
def test_remembered_parents_deleted_by_another_process(
    tmp_path: Path, request: pytest.FixtureRequest, index_backend: str
) -> None:
    """A series deleted (and, on SQLite, its primary keys reused) elsewhere is found again, not
    written into. On PostgreSQL the counters and the inserts of an instance go in one pipeline,
    so the stale keys show in that pipeline's answers."""
    data = tmp_path / "data"
    url = index_url_for(request, index_backend)

    def opened() -> Ingestor:
        overrides = {"storage": {"data_dir": str(data)}, "index": {"url": url}}
        return archive.open_archive(load(overrides=overrides, environ={})).ingestor

    def rows(sql: str) -> list[tuple]:
        with first.index.engine.connect() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(sql)]

    first = opened()
    other = opened()  # another process's index: its own remembered keys
    study, series = generate_uid(), generate_uid()
    old = write_series(tmp_path / "a", 3, size=16, study_uid=study, series_uid=series, patient_id="A")
    assert first.ingest_file(old[0]).outcome is Outcome.STORED  # `first` remembers the series' keys

    other.index.remove_instances([row[0] for row in rows("SELECT pk FROM instance")])
    assert rows("SELECT count(*) FROM series") == [(0,)]
    new = write_series(tmp_path / "b", 2, size=16, patient_id="B")
    assert all(other.ingest_file(p).outcome is Outcome.STORED for p in new)  # on SQLite, likely the same pks

    assert first.ingest_file(old[1]).outcome is Outcome.STORED
    found = rows(
        "SELECT p.patient_id, st.study_uid, se.series_uid, se.num_instances, st.num_instances, p.num_instances "
        "FROM series se JOIN study st ON st.pk = se.study_pk JOIN patient p ON p.pk = st.patient_pk "
        "ORDER BY p.patient_id",
    )
    assert found[0] == ("A", study, series, 1, 1, 1)
    assert found[1][0] == "B" and found[1][3:] == (2, 2, 2)
    # Each metadata row is its own instance's (its key is lastval() or last_insert_rowid()).
    described = rows(
        "SELECT i.sop_instance_uid, m.data FROM instance i JOIN instance_metadata m ON m.instance_pk = i.pk"
    )
    assert len(described) == 3 == rows("SELECT count(*) FROM instance_metadata")[0][0]
    for uid, blob in described:
        assert json.loads(zlib.decompress(blob))["00080018"]["Value"] == [uid]


def _pydicom_json(ds: Dataset, sop_uid: str) -> dict:
    """What pydicom makes of each element (bulk data as the same URIs), element by element."""
    doc = {}
    for tag in ds.keys():  # noqa: SIM118 -- keys, not decoded elements
        try:
            doc[f"{tag:08X}"] = ds[tag].to_json_dict(lambda e: f"instances/{sop_uid}/bulk/{e.tag:08X}", BULK_THRESHOLD)
        except Exception:  # left out, as ingest leaves it out
            continue
    return doc


def _odd_values(tmp_path: Path, syntax: str) -> Path:
    """Plain VRs with padding, empty and multiple values, numbers written oddly, and non-ASCII text."""
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=1, size=8)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "", "AXIAL"]
    ds.StudyDescription = "Tête  "
    ds.SeriesDescription = "A \\B "
    ds.StationName = ""
    ds.InstitutionName = "  lead"
    ds.PixelSpacing = ["0.5", " 1e-1 "]
    ds.SliceThickness = "5"
    ds.SeriesNumber = "+7"
    ds.AcquisitionNumber = "3.0"  # pydicom accepts an integral float as IS; ingest leaves it to pydicom
    ds.WindowCenter = ["40", "400"]
    ds.add_new(0x00181030, "LO", "")
    ds.add_new(0x00080054, "AE", [" STORE ", "B"])
    ds.add_new(0x00280106, "US", 3)
    ds.add_new(0x00181150, "IS", "")
    ds.add_new(0x00189306, "FD", [1.5, -2.25])
    ds.add_new(0x00189307, "FL", 0.1)
    path = tmp_path / f"odd-{syntax}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian])
def test_metadata_cache_is_what_pydicom_makes(tmp_path: Path, syntax: str) -> None:
    path = _odd_values(tmp_path, syntax)
    parsed = read_instance(path)
    ours = json.loads(zlib.decompress(parsed.record.metadata))
    reference = json.loads(
        json.dumps(_pydicom_json(read_instance(path, metadata=False).dataset, parsed.sop_instance_uid))
    )
    ours.pop("7FE00010")
    reference.pop("7FE00010", None)
    assert ours == reference
    assert ours["00080008"]["Value"] == ["ORIGINAL", "", "AXIAL"]
    assert ours["00080054"]["Value"] == ["STORE", "B"]


def test_metadata_cache_of_pydicom_test_files(pydicom_test_files: list[Path]) -> None:
    compared = 0
    for path in pydicom_test_files:
        try:
            parsed = read_instance(path)
        except RejectedInstance:
            continue
        ours = json.loads(zlib.decompress(parsed.record.metadata))
        ours.pop("7FE00010", None)
        reference = _pydicom_json(read_instance(path, metadata=False).dataset, parsed.sop_instance_uid)
        reference.pop("7FE00010", None)
        assert ours == json.loads(json.dumps(reference)), path.name
        compared += 1
    assert compared > 50


def _pydicom_columns(path: Path) -> dict[str, object]:
    """The index columns as pydicom's decoded values give them (what ingest did before decoding
    plain elements itself)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    columns: dict[str, object] = {}
    for attr in ATTRIBUTES:
        if attr.kind in ("count", "multi"):
            continue
        value = ds.get(attr.keyword)
        if attr.kind == "uid":
            columns[attr.column] = str(value).strip().rstrip("\x00")
            continue
        if attr.kind == "int":
            try:
                columns[attr.column] = (
                    None if value in (None, "") else int(value[0] if isinstance(value, MultiValue) else value)
                )
            except (TypeError, ValueError, IndexError):
                columns[attr.column] = None
            continue
        if value is None:
            text = ""
        elif isinstance(value, MultiValue):
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
        columns[attr.column] = text[: attr.length]
    return columns


def _ingest_columns(path: Path) -> dict[str, object]:
    record = read_instance(path).record
    everything = {**record.patient, **record.study, **record.series, **record.instance}
    return {attr.column: everything[attr.column] for attr in ATTRIBUTES if attr.kind not in ("count", "multi")}


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian])
def test_index_columns_are_what_pydicom_decodes(tmp_path: Path, syntax: str) -> None:
    path = _odd_values(tmp_path, syntax)
    ds = pydicom.dcmread(path)
    ds.PatientName = "DOE^JOHN^^DR=^^"
    ds.ReferringPhysicianName = ["A^B", "C"]
    ds.PatientSize = " 1.80"
    ds.save_as(path, enforce_file_format=True)
    columns = _ingest_columns(path)
    assert columns == _pydicom_columns(path)
    assert columns["series_number"] == 7 and columns["acquisition_number"] == 3


def test_index_columns_of_pydicom_test_files(pydicom_test_files: list[Path]) -> None:
    compared = 0
    for path in pydicom_test_files:
        try:
            columns = _ingest_columns(path)
        except RejectedInstance:
            continue
        assert columns == _pydicom_columns(path), path.name
        compared += 1
    assert compared > 50


def test_index_asks_sqlite_for_full_fsync(tmp_path: Path) -> None:
    """On macOS SQLite's commits and checkpoints must flush the drive cache (F_FULLFSYNC) too."""
    ingestor = open_archive(tmp_path / "data")
    with ingestor.index.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA fullfsync").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA checkpoint_fullfsync").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_flush_uses_full_fsync_where_it_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where F_FULLFSYNC exists (macOS) it is used; a volume refusing it gets a plain fsync."""
    import fcntl

    from macpacs.pacs_server.storage import filesystem as storage

    calls: list[str] = []
    monkeypatch.setattr(storage, "FULLFSYNC", 51)  # F_FULLFSYNC's value on macOS
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    refuse = False

    def fake_fcntl(fd: int, cmd: int) -> int:
        assert cmd == 51
        calls.append("F_FULLFSYNC")
        if refuse:
            raise OSError(45, "Operation not supported")
        return 0

    monkeypatch.setattr(fcntl, "fcntl", fake_fcntl)
    with open(tmp_path / "f", "wb") as fh:
        storage.flush_to_disk(fh.fileno())
        assert calls == ["F_FULLFSYNC"]
        refuse = True
        storage.flush_to_disk(fh.fileno())
        assert calls == ["F_FULLFSYNC", "F_FULLFSYNC", "fsync"]
