"""The in-process Archive: the core opened from settings, with no listener (issue 13)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from macpacs.pacs_server.archive import open_archive
from macpacs.pacs_server.config import ConfigError, load
from macpacs.pacs_server.index import Query
from tests.synthetic import write_series


def test_an_archive_ingests_and_answers_without_a_server(archive, tmp_path: Path) -> None:
    files = write_series(tmp_path / "in", 3, size=16)
    outcomes = [archive.ingestor.ingest_file(path).outcome.value for path in files]
    assert outcomes == ["stored"] * 3
    rows = archive.index.find_all(Query("STUDY", {"PatientName": "DOE*", "StudyInstanceUID": None}))
    assert len(rows) == 1
    assert archive.index.counts()["instances"] == 3


def test_import_and_c_store_follow_one_rule_for_a_meta_uid_that_differs(archive, server, tmp_path: Path) -> None:
    """pydicom's rtdose.dcm has a MediaStorageSOPInstanceUID that differs from its SOPInstanceUID:
    C-STORE always stored it (the meta comes from the command), and import now does too."""
    import pydicom
    from pydicom.data import get_testdata_file

    from tests.conftest import findscu, run_tool

    path = Path(get_testdata_file("rtdose.dcm"))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
    result = archive.ingestor.ingest_file(path)
    assert result.outcome.value == "stored", result.message
    assert result.sop_instance_uid == ds.SOPInstanceUID  # indexed under the dataset's own UID

    run_tool("storescu", *server.dicom_args(), str(path))
    keys = ("QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={ds.StudyInstanceUID}")
    (found,) = findscu(server, tmp_path / "find", *keys, f"SeriesInstanceUID={ds.SeriesInstanceUID}", "SOPInstanceUID")
    assert found.SOPInstanceUID == ds.SOPInstanceUID


def test_a_c_store_whose_request_names_another_instance_is_refused(server) -> None:
    """pynetdicom sending a file takes the Affected SOP Instance UID from its meta: for rtdose.dcm
    that is not the dataset's instance, so the sender would be told of one and we would keep another."""
    from pydicom.data import get_testdata_file
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import RTDoseStorage

    ae = AE(ae_title="SENDER")
    ae.add_requested_context(RTDoseStorage, ["1.2.840.10008.1.2"])
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
        assert assoc.is_established
        status = assoc.send_c_store(Path(get_testdata_file("rtdose.dcm")))
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    assert status.Status == 0xA900
    assert status.ErrorComment.startswith("the request names SOP Instance UID")  # 64 characters at most


def test_the_content_hash_covers_the_dataset_after_the_file_meta(pydicom_test_files, tmp_path: Path) -> None:
    """Two copies of one instance with different file metas (another sender) have one hash."""
    import hashlib

    import pydicom

    from macpacs.pacs_server.ingest import dataset_hash
    from tests.conftest import dataset_bytes

    checked = 0
    for path in pydicom_test_files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if "FileMetaInformationGroupLength" not in ds.file_meta or path.read_bytes()[128:132] != b"DICM":
            continue
        assert dataset_hash(path) == hashlib.sha256(dataset_bytes(path)).hexdigest(), path.name
        checked += 1
    assert checked > 20
    # The same dataset bytes under another sender's meta, written without a group length.
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    source = Path(pydicom_test_files[0])
    meta = pydicom.dcmread(source, stop_before_pixels=True).file_meta
    meta.ImplementationVersionName = "OTHER_SENDER"
    del meta.FileMetaInformationGroupLength
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=False)
    other = tmp_path / "other.dcm"
    other.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + dataset_bytes(source))
    assert b"OTHER_SENDER" in other.read_bytes() and dataset_hash(other) == dataset_hash(source)


def test_each_sqlite_connection_has_the_configured_page_cache(tmp_path: Path) -> None:
    """index.sqlite_cache_mb bounds every pooled connection's private cache (the soak's memory)."""
    settings = load(environ={"MACPACS_STORAGE_DATA_DIR": str(tmp_path / "data"), "MACPACS_INDEX_SQLITE_CACHE_MB": "3"})
    archive = open_archive(settings, role="command")
    try:
        with archive.index.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -3 * 1024
    finally:
        archive.close()


def test_a_dicom_worker_does_not_import_alembic() -> None:
    """Only what migrates imports alembic: a worker's start is part of a hung server's recovery."""
    code = "import sys, macpacs.pacs_server.dimse.workers, macpacs.pacs_server.archive; print('alembic' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_jobs_nice_out_of_range_is_refused_with_the_range() -> None:
    assert load(environ={}).jobs.nice == 19
    with pytest.raises(ConfigError, match=r"jobs\.nice = 20: use 0 .* to 19"):
        load(environ={"MACPACS_JOBS_NICE": "20"})
