"""Reindex and verify on an archive in S3: the bucket is listed page by page and each object
read through a local copy; a stray object and a lost one are found as on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from macpacs.pacs_server import verify
from macpacs.pacs_server.archive import open_archive
from macpacs.pacs_server.config import load
from macpacs.pacs_server.index import Query
from macpacs.pacs_server.reindex import reindex
from macpacs.pacs_server.storage import blob_key
from tests.s3gateway import Gateway
from tests.synthetic import write_series


def test_reindex_and_verify_read_the_bucket(tmp_path: Path, gateway: Gateway, s3_url: str, monkeypatch) -> None:
    from macpacs.pacs_server.storage import s3

    monkeypatch.setattr(s3, "LIST_PAGE", 2)
    for name, value in gateway.env().items():
        monkeypatch.setenv(name, value)
    settings = load(overrides={"storage": {"data_dir": str(tmp_path / "data"), "url": s3_url}})
    archive = open_archive(settings)
    try:
        files = [
            *write_series(tmp_path / "in", 4, patient_id="MAINT", size=32),
            Path(get_testdata_file("CT_small.dcm")),
        ]
        assert all(archive.ingestor.ingest_file(path).ok for path in files)
        every = Query(level="IMAGE", keys={"SOPInstanceUID": None})
        assert len(archive.index.instances(every)) == 5

        report = reindex(archive.blobs, archive.index)
        assert (report.indexed, report.failed) == (5, [])
        assert verify.verify(archive).remaining == 0

        lost = archive.index.instances(every)[0]
        archive.blobs.delete(lost.storage_key)
        stray = archive.blobs.stage()
        stray.write(b"not DICOM")
        stray.close()
        archive.blobs.put(stray.name, blob_key("1.2.3.4.5"))
        found = verify.verify(archive).found
        assert (found["missing"], found["unreadable"]) == (1, 1), found
    finally:
        archive.close()


@pytest.mark.parametrize("url", ["s3://", "s3://Bad_Bucket/x", "s3://ok-bucket/../x", "http://x"])
def test_a_wrong_storage_url_is_a_config_error(url: str) -> None:
    from macpacs.pacs_server.config import ConfigError

    with pytest.raises(ConfigError, match=r"storage\.url"):
        load(overrides={"storage": {"url": url}}, environ={}).validate()
