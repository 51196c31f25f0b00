"""``instance_jobs``: a plugin's jobs commit in the transaction that indexes the instance (issue 16).

A site plugin is "installed" into a folder (its module and a dist-info naming its entry point)
and runs in this process's archive, whose one ingest path (``Ingestor.ingest_file``) stores
real files into a real SQLite index. The job table is made to refuse inserts with a SQLite
trigger, a real fault inside the ingest's own transaction: the instance is then neither
acknowledged nor indexed nor kept, so an instance can never be stored without its jobs.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from macpacs.pacs_server.archive import Archive, open_archive
from macpacs.pacs_server.config import load
from macpacs.pacs_server.index import Query
from macpacs.pacs_server.ingest import Outcome
from macpacs.pacs_server.storage import blob_key
from tests.plugin_site import install_plugin
from tests.synthetic import write_series

PLUGIN = """
from macpacs.pacs_server.plugins import JobSpec, hookimpl


@hookimpl
def instance_jobs(archive, instance, outcome):
    what = str(instance.dataset.get("SeriesDescription", ""))
    if what == "NOT JSON":
        return [JobSpec("copy", "a payload json cannot hold", {"when": object()})]
    if what == "NOT A LIST":
        return 42
    if what == "KIND TOO LONG":
        return [JobSpec("k" * 40, "a kind the job table cannot hold", {})]
    uid = instance.sop_instance_uid
    return [JobSpec("copy", f"copy {uid} ({outcome})", {"uid": uid}, None, f"copy:{uid}:{instance.content_hash[:16]}")]


@hookimpl
def instance_stored(archive, instance, outcome):
    # Once instance_stored is called the instance is committed, and its job with it.
    queued = [job.payload["uid"] for job in archive.jobs.list(kinds=["copy"])]
    with open(archive.settings.data_dir / "stored.txt", "a") as fh:
        fh.write(f"{instance.sop_instance_uid} {queued.count(instance.sop_instance_uid)}\\n")
"""


@pytest.fixture
def archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Archive]:
    site = install_plugin(tmp_path / "site", "macpacs_copier", "copier", PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    settings = load(
        overrides={"storage": {"data_dir": str(tmp_path / "data")}, "plugins": {"enable": ["copier"]}}, environ={}
    )
    opened = open_archive(settings)
    yield opened
    opened.close()


def _copies(archive: Archive) -> list[tuple[str, str]]:
    return sorted((job.payload["uid"], job.description) for job in archive.jobs.list(kinds=["copy"]))


def _indexed(archive: Archive, uid: str) -> bool:
    return bool(archive.index.instances(Query(level="IMAGE", keys={"SOPInstanceUID": uid})))


def test_jobs_commit_with_the_instance_or_not_at_all(archive: Archive, tmp_path: Path) -> None:
    first, second = write_series(tmp_path / "in", 2, size=16)
    uid1, uid2 = (str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (first, second))

    assert archive.ingestor.ingest_file(first).outcome is Outcome.STORED
    assert _copies(archive) == [(uid1, f"copy {uid1} (stored)")]
    lines = (archive.settings.data_dir / "stored.txt").read_text().split()
    assert lines == [uid1, "1"], "the job was committed when instance_stored ran"

    # An identical re-send changes nothing, so nothing is queued.
    assert archive.ingestor.ingest_file(first).outcome is Outcome.DUPLICATE
    assert len(_copies(archive)) == 1

    # The job table refuses inserts: the ingest fails as a whole and keeps nothing.
    db = sqlite3.connect(archive.index.path)
    db.execute("CREATE TRIGGER refuse BEFORE INSERT ON job BEGIN SELECT RAISE(ABORT, 'job table refuses'); END")
    db.commit()
    refused = archive.ingestor.ingest_file(second)
    assert refused.outcome is Outcome.OUT_OF_RESOURCES and "job table refuses" in refused.message
    assert not _indexed(archive, uid2), "not indexed without its job"
    assert archive.blobs.size(blob_key(uid2)) is None, "the file of an unacknowledged instance is not kept"
    assert len(_copies(archive)) == 1

    # Once the index takes writes again the re-send (the sender retries after 0xA700) is stored with its job.
    db.execute("DROP TRIGGER refuse")
    db.commit()
    db.close()
    assert archive.ingestor.ingest_file(second).outcome is Outcome.STORED
    assert _indexed(archive, uid2)
    assert [uid for uid, _ in _copies(archive)] == sorted([uid1, uid2])


@pytest.mark.parametrize(
    ("series", "logged"),
    [
        ("NOT JSON", "a plugin's job is dropped: copy job 'a payload json cannot hold': its payload cannot be stored"),
        ("NOT A LIST", "plugin copier's instance_jobs returned 42, not a list of JobSpec (ignored)"),
        ("KIND TOO LONG", f"a plugin's job is dropped: job kind {'k' * 40!r}: must be a text of 1 to 32 bytes"),
    ],
)
def test_a_job_the_index_cannot_hold_is_logged_and_the_instance_stored(
    archive: Archive, tmp_path: Path, caplog: pytest.LogCaptureFixture, series: str, logged: str
) -> None:
    (path,) = write_series(tmp_path / "in", 1, size=16, series_description=series)
    with caplog.at_level(logging.ERROR):
        result = archive.ingestor.ingest_file(path)
    assert result.outcome is Outcome.STORED
    assert _indexed(archive, result.sop_instance_uid)
    assert logged in caplog.text
    assert _copies(archive) == []
