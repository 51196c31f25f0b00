"""Crash windows of the ingest path (issue 15, finding 8), on real files, a real SQLite index and
real processes.

- Two stores of one UID with different content at once, from two processes (and from two
  threads of one): the key's lock serialises them, so one is stored, the other kept, and the
  index describes the file on disk.
- A file renamed into place whose index commit never came (the ingesting process is killed with
  SIGKILL while it waits for the index writer lock, held by another process): a re-send in another
  transfer syntax ("kept") and an identical one ("duplicate") are acknowledged only once the
  instance is in the index again.
- Every folder a store creates is fsynced, up to ``files/`` itself.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from macpacs.pacs_server import archive as archive_module
from macpacs.pacs_server.archive import Archive
from macpacs.pacs_server.config import load
from macpacs.pacs_server.index import Query
from macpacs.pacs_server.ingest import Outcome, stream_hash
from macpacs.pacs_server.storage import blob_key
from tests.synthetic import make_instance

# Opens the archive at argv[1], says so by creating argv[2] + ".<pid>", then ingests argv[3:] once
# the file argv[2] exists, printing each outcome.
INGEST = """
import os, sys, time
from pathlib import Path
from macpacs.pacs_server.archive import open_archive
from macpacs.pacs_server.config import load
archive = open_archive(load(overrides={"storage": {"data_dir": sys.argv[1]}}, environ={}), migrate=False)
Path(f"{sys.argv[2]}.{os.getpid()}").touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.0005)
for name in sys.argv[3:]:
    print(archive.ingestor.ingest_file(Path(name)).outcome.value, flush=True)
"""

# Takes the index writer lock of the database argv[1], says so by creating argv[2], holds it until killed.
HOLD = """
import sys, time
from pathlib import Path
from macpacs.pacs_server.index.writer_lock import WriterLock
WriterLock(Path(sys.argv[1]), timeout=60).acquire()
Path(sys.argv[2]).touch()
time.sleep(3600)
"""


def open_archive(data_dir: Path) -> Archive:
    return archive_module.open_archive(load(overrides={"storage": {"data_dir": str(data_dir)}}, environ={}))


def write_versions(folder: Path, count: int, variant: int) -> list[Path]:
    """``count`` instances with fixed UIDs (the same for every variant), pixels differing by variant."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"
    paths = []
    for number in range(1, count + 1):
        ds = make_instance(study_uid=study, series_uid=series, number=number + 100 * variant, size=32)
        ds.InstanceNumber = number
        ds.SeriesDescription = f"variant {variant}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1.3.{number}"
        paths.append(folder / f"{number:03}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def index_rows(data_dir: Path) -> dict[str, tuple[str, int, str]]:
    con = sqlite3.connect(data_dir / "index.sqlite")
    try:
        rows = con.execute("SELECT sop_instance_uid, content_hash, file_size, storage_key FROM instance").fetchall()
    finally:
        con.close()
    return {uid: (digest, size, key) for uid, digest, size, key in rows}


def assert_index_describes_the_disk(data_dir: Path, count: int) -> None:
    rows = index_rows(data_dir)
    assert len(rows) == count
    for uid, (digest, size, key) in rows.items():
        blob = data_dir / "files" / key
        with open(blob, "rb") as fh:
            assert (stream_hash(fh), blob.stat().st_size) == (digest, size), f"{uid}: the index describes another file"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def wait_until(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.01)


def test_two_processes_storing_one_uid_with_different_content(tmp_path: Path, processes: list) -> None:
    data = tmp_path / "data"
    open_archive(data).close()  # migrated once, as the server's main process does
    count = 20
    go = tmp_path / "go"
    for variant in (1, 2):
        files = write_versions(tmp_path / f"v{variant}", count, variant)
        argv = [sys.executable, "-c", INGEST, str(data), str(go), *map(str, files)]
        processes.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
    wait_until(lambda: len(list(tmp_path.glob("go.*"))) == 2, 60)  # both opened their archive
    go.touch()
    outcomes = [proc.communicate(timeout=60)[0].split() for proc in processes]
    assert all(proc.returncode == 0 for proc in processes)
    for first, second in zip(*outcomes, strict=True):
        assert sorted((first, second)) == ["kept-existing", "stored"], outcomes
    assert_index_describes_the_disk(data, count)


def test_two_threads_storing_one_uid_with_different_content(tmp_path: Path) -> None:
    archive = open_archive(tmp_path / "data")
    try:
        count = 20
        sets = [write_versions(tmp_path / f"v{variant}", count, variant) for variant in (1, 2)]
        outcomes: list[list[str]] = [[], []]
        start = threading.Barrier(2)

        def run(which: int) -> None:
            start.wait()
            for path in sets[which]:
                outcomes[which].append(archive.ingestor.ingest_file(path).outcome.value)

        threads = [threading.Thread(target=run, args=(n,)) for n in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for first, second in zip(*outcomes, strict=True):
            assert sorted((first, second)) == ["kept-existing", "stored"], outcomes
        assert_index_describes_the_disk(tmp_path / "data", count)
    finally:
        archive.close()


def test_a_file_renamed_but_never_indexed_is_indexed_before_a_resend_is_acknowledged(
    tmp_path: Path, processes: list
) -> None:
    data = tmp_path / "data"
    archive = open_archive(data)
    try:
        kept, same = write_versions(tmp_path / "sent", 2, 1)
        uids = ["1.2.826.0.1.3680043.10.1.3.1", "1.2.826.0.1.3680043.10.1.3.2"]
        # The crash: each ingest renames its file into place, then waits for the index writer lock
        # (held by another process), and is killed there.
        locked = tmp_path / "locked"
        processes.append(subprocess.Popen([sys.executable, "-c", HOLD, str(data / "index.sqlite"), str(locked)]))
        wait_until(locked.exists, 30)
        go = tmp_path / "go"
        for path in (kept, same):
            processes.append(subprocess.Popen([sys.executable, "-c", INGEST, str(data), str(go), str(path)]))
        wait_until(lambda: len(list(tmp_path.glob("go.*"))) == 2, 60)  # both opened their archive
        go.touch()  # both store at once, well within the writer lock's 10 s wait
        blobs = [data / "files" / blob_key(uid) for uid in uids]
        wait_until(lambda: all(blob.exists() for blob in blobs), 8)
        for proc in reversed(processes):  # the ingests first: the holder's end would let them commit
            proc.kill()
            proc.wait()
        assert index_rows(data) == {}, "renamed, never committed"

        # Re-sent in another transfer syntax: the stored copy is kept, and indexed first.
        other = make_instance(
            study_uid="1.2.826.0.1.3680043.10.1.1", series_uid="1.2.826.0.1.3680043.10.1.2", number=1, size=32
        )
        other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = uids[0]
        other.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        other.save_as(tmp_path / "implicit.dcm", enforce_file_format=True)
        result = archive.ingestor.ingest_file(tmp_path / "implicit.dcm")
        assert result.outcome is Outcome.KEPT_EXISTING
        # Re-sent identical: acknowledged as a duplicate, indexed first.
        assert archive.ingestor.ingest_file(same).outcome is Outcome.DUPLICATE
        for uid in uids:
            assert archive.index.instances(Query(level="IMAGE", keys={"SOPInstanceUID": uid})), f"{uid} is findable"
        assert_index_describes_the_disk(data, 2)
    finally:
        archive.close()


def test_every_new_folder_is_fsynced_up_to_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc to name the synced descriptors")
    archive = open_archive(tmp_path / "data")
    try:
        ds = make_instance(study_uid=str(generate_uid()), series_uid=str(generate_uid()), number=1, size=16)
        ds.save_as(tmp_path / "one.dcm", enforce_file_format=True)
        synced: list[str] = []
        real_fsync = os.fsync

        def recording_fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", recording_fsync)
        assert archive.ingestor.ingest_file(tmp_path / "one.dcm").outcome is Outcome.STORED
        final = tmp_path / "data" / "files" / blob_key(str(ds.SOPInstanceUID))
        for folder in (final.parent, final.parent.parent, final.parent.parent.parent):
            assert str(folder) in synced, f"{folder} was changed and must be fsynced"
    finally:
        archive.close()
