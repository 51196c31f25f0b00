"""``macpacs verify``: every kind of difference between the stored files and the index, found, then
repaired where that loses nothing; and no false alarm while a real server ingests.

The damage is done for real, on the files of a real archive: a file deleted, a byte flipped, a file
cut short, a row from before content hashes (its hash emptied, as revision 0003 left old rows), a
file stored without a row (a crash between rename and commit, or an index restored from an older
backup), a file that is not DICOM, and a copy in the wrong place.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from pydicom.uid import generate_uid

from macpacs.pacs_server import verify as verify_module
from macpacs.pacs_server.index import Query, instance_scan
from macpacs.pacs_server.storage import blob_key, stage_copy
from tests.chromium import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import MACPACS, ServerProcess, findscu, in_process_macpacs, run_macpacs
from tests.synthetic import write_series


def uids(archive) -> set[str]:
    return {row["SOPInstanceUID"] for row in archive.index.find_all(Query("IMAGE", {"SOPInstanceUID": None}))}


@pytest.fixture
def damaged(archive, tmp_path: Path) -> dict[str, object]:
    """An archive of 8 imported instances, then one of each kind of damage; what was done, by kind."""
    files = write_series(tmp_path / "in", 11, size=16)
    for path in files[:8]:
        assert archive.ingestor.ingest_file(path).ok
    stored = sorted(uids(archive))
    blobs = archive.blobs

    def path_of(uid: str) -> Path:
        return Path(blobs.local_path(blob_key(uid)))

    missing, changed, short, unhashed = stored[:4]
    kept = {uid: path_of(uid).read_bytes() for uid in (changed, short)}
    path_of(missing).unlink()
    data = bytearray(kept[changed])
    data[-10] ^= 0xFF  # a pixel: same size, different content
    path_of(changed).write_bytes(bytes(data))
    path_of(short).write_bytes(kept[short][:-100])
    database = archive.settings.data_dir / "index.sqlite"
    with sqlite3.connect(database) as conn:  # a row as revision 0003 found it: no hash yet
        conn.execute("UPDATE instance SET content_hash = NULL WHERE sop_instance_uid = ?", (unhashed,))
    import pydicom

    stray_uid = pydicom.dcmread(files[8], stop_before_pixels=True).SOPInstanceUID
    blobs.put(stage_copy(blobs, files[8]), blob_key(stray_uid))  # stored, never indexed
    junk = archive.settings.data_dir / "files" / "00" / "00" / ("0" * 64 + ".dcm")
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"not a DICOM file at all")
    misplaced_uid = pydicom.dcmread(files[9], stop_before_pixels=True).SOPInstanceUID
    wrong = blob_key(str(generate_uid()))
    blobs.put(stage_copy(blobs, files[9]), wrong)
    # Damage found later: files written just now may still be between rename and commit, and
    # verify would wait for their rows (SETTLE_S); an hour ago they cannot.
    long_ago = time.time() - 3600
    for path in (archive.settings.data_dir / "files").glob("??/??/*.dcm"):
        os.utime(path, (long_ago, long_ago))
    return {
        "missing": missing,
        "hash": changed,
        "size": short,
        "no-hash": unhashed,
        "not-indexed": stray_uid,
        "unreadable": junk,
        "misplaced": misplaced_uid,
        "kept": kept,
        "path_of": path_of,
        "wrong": Path(blobs.local_path(wrong)),
    }


def test_verify_reports_every_kind_then_repairs_what_it_can(archive, damaged, monkeypatch) -> None:
    data_dir = str(archive.settings.data_dir)
    before = uids(archive)
    out = run_macpacs("verify", "--data-dir", data_dir)
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout
    assert "8 instances in the index, 10 files" in text
    for words in verify_module.KINDS.values():
        assert f"  {words:<30} {1:>8}" in text, text
    lines = text.splitlines()
    for kind in ("missing", "hash", "size", "no-hash", "not-indexed", "misplaced"):
        uid = damaged[kind]
        (line,) = [line for line in lines if line.strip().startswith(f"{kind} ")]
        where = str(damaged["wrong"]) if kind == "misplaced" else blob_key(uid)
        assert uid in line and where in line, line
    (line,) = [line for line in lines if line.strip().startswith("unreadable ")]
    assert str(damaged["unreadable"]) in line
    assert "DOE^JOHN" in text and "is lost unless a backup" in text  # which image the missing file was
    assert "7 problems remain; `macpacs verify --repair` fixes what can be fixed." in out.stderr
    assert "Verifying 8 instances" in out.stderr and "100%" not in out.stderr  # a label, no bar, in a log file
    summary = json.loads((archive.settings.data_dir / "verify-summary.json").read_text())
    assert summary["remaining"] == 7 and summary["instances"] == 8 and summary["files"] == 10
    assert {p["kind"] for p in summary["problems"]} == set(verify_module.KINDS)
    assert uids(archive) == before  # a report-only run changes nothing
    assert instance_scan.by_uid(archive.index, damaged["no-hash"]).content_hash is None

    out = in_process_macpacs("verify", "--repair", "--data-dir", data_dir)
    assert out.exit_code == 1, out.output
    assert f"DATA LOSS: {damaged['missing']}: no file, index row dropped" in out.stderr
    assert "1 images were lost" in out.stderr
    assert "[index row dropped]" in out.stdout and "[indexed]" in out.stdout and "[hash recorded]" in out.stdout
    assert "4 problems remain." in out.stderr  # changed, short, not DICOM, misplaced: never deleted
    now = uids(archive)
    assert damaged["missing"] not in now and damaged["not-indexed"] in now
    assert instance_scan.by_uid(archive.index, damaged["no-hash"]).content_hash is not None
    assert damaged["path_of"](damaged["hash"]).exists() and damaged["unreadable"].exists()
    log = (archive.settings.log_dir / "macpacs.log").read_text()
    assert f"DATA LOSS: instance {damaged['missing']} had no file" in log

    # The admin restores the two changed files from a backup and removes the other two by hand.
    for uid, content in damaged["kept"].items():
        damaged["path_of"](uid).write_bytes(content)
    damaged["unreadable"].unlink()
    damaged["wrong"].unlink()
    # Small pages: the index side is read in several pages, merged with the file side.
    monkeypatch.setattr(instance_scan, "PAGE_SIZE", 2)
    report = verify_module.verify(archive)
    assert (report.instances, report.files, report.remaining, sum(report.found.values())) == (8, 8, 0, 0)
    out = in_process_macpacs("verify", "--data-dir", data_dir)
    assert out.exit_code == 0 and "problems remain" not in out.stderr, out.output


def test_pages_come_in_key_order_and_cover_every_row(archive, tmp_path: Path) -> None:
    assert sum(verify_module.verify(archive).found.values()) == 0 and not list(
        instance_scan.by_storage_key(archive.index)
    )
    for path in write_series(tmp_path / "in", 7, size=16):
        archive.ingestor.ingest_file(path)
    rows = list(instance_scan.by_storage_key(archive.index, page_size=3))
    assert [r.storage_key for r in rows] == sorted(blob_key(uid) for uid in uids(archive))
    assert [r.storage_key for r in rows] == list(archive.blobs.iter_keys())


def test_verify_while_a_server_ingests_has_no_false_alarm_and_shows_on_status_and_health(
    make_server, tmp_path: Path
) -> None:
    server: ServerProcess = make_server()
    folder = tmp_path / "send"
    for n in range(4):
        write_series(folder / str(n), 50, size=16, patient_id=f"PID{n}")
    senders = [
        subprocess.Popen(
            ["/usr/bin/storescu", *server.dicom_args(), "+sd", "+r", str(folder / str(n))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,  # Nagle on (no TCP_NODELAY): ~40 ms an instance, a slow modality
        )
        for n in range(4)
    ]
    runs = []
    while any(s.poll() is None for s in senders):
        runs.append(run_macpacs("verify", "--data-dir", str(server.data_dir)))
    for sender in senders:
        assert sender.wait(120) == 0, sender.stderr.read()
    assert runs, "storescu was done before the first verify"
    for run in runs:
        assert run.returncode == 0 and "problems remain" not in run.stderr, run.stdout + run.stderr
    # The same archive opened by this process too, as a second command would, while the server runs.
    from macpacs.pacs_server.archive import open_archive
    from macpacs.pacs_server.config import load

    archive = open_archive(load(overrides={"storage": {"data_dir": str(server.data_dir)}}, environ={}))
    try:
        report = verify_module.verify(archive)
        assert (report.instances, report.files, report.remaining) == (200, 200, 0)

        # A lost file: the status stays ok (nothing to restart for), the page and /health say it.
        lost = next(iter((server.data_dir / "files").glob("??/??/*.dcm")))
        lost.unlink()
        out = in_process_macpacs("verify", "--data-dir", str(server.data_dir))
        assert out.exit_code == 1 and "1 problems remain" in out.stderr, out.output
        health = requests.get(f"http://127.0.0.1:{server.web_port}/health", timeout=10).json()
        assert health["status"] == "ok" and health["verify"]["instances"] == 200
        assert (health["verify"]["remaining"], health["verify"]["lost"]) == (1, 0)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.web_port}/status")
            shown = page.inner_text("#verify")
            browser.close()
        assert shown.startswith("problems ") and "200 instances, 199 files; 1 files missing (images lost)" in shown
        assert "1 remain: run `macpacs verify`" in shown

        report = verify_module.verify(archive, repair=True)
        assert (report.remaining, report.repaired["missing"]) == (0, 1)
        verify_module.save_summary(server.data_dir, report)
    finally:
        archive.close()
    found = findscu(
        server, tmp_path / "find", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "NumberOfStudyRelatedInstances"
    )
    assert sum(int(ds.NumberOfStudyRelatedInstances) for ds in found) == 199
    health = requests.get(f"http://127.0.0.1:{server.web_port}/health", timeout=10).json()
    assert (health["verify"]["remaining"], health["verify"]["lost"]) == (0, 1)


def test_a_file_renamed_before_its_row_commits_is_no_problem(archive, tmp_path: Path, monkeypatch) -> None:
    """Ingest renames the file in place, then commits its row: a verify in between waits for the row."""
    monkeypatch.setattr(verify_module, "SETTLE_S", 5.0)
    (path,) = write_series(tmp_path / "in", 1, size=16)
    import pydicom

    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    archive.blobs.put(stage_copy(archive.blobs, path), blob_key(uid))  # renamed, row not yet committed
    late = threading.Timer(1.0, lambda: archive.ingestor.ingest_file(path))  # the commit, a second later
    late.start()
    started = time.monotonic()
    report = verify_module.verify(archive)
    late.join()
    assert report.remaining == 0 and not report.found, report.examples
    assert 0.9 < time.monotonic() - started < 5.0


def test_progress_bar_on_a_terminal_only(archive, tmp_path: Path) -> None:
    import pty

    for path in write_series(tmp_path / "in", 3, size=16):
        archive.ingestor.ingest_file(path)
    data_dir = str(archive.settings.data_dir)
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([MACPACS, "verify", "--data-dir", data_dir], stdout=secondary, stderr=secondary)
    os.close(secondary)
    screen = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the command ended and closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(primary)
    assert proc.wait(60) == 0
    assert b"Verifying 3 instances" in screen and b"100%" in screen, screen
