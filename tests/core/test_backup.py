"""``macpacs backup`` and ``restore``: an online copy of the index while a real server ingests, and
its restore, refused while the server runs and when the backup is damaged.

The copy must be one moment of the index: its counters (each study's and series' instance count,
kept by ingest in the same transaction as the rows) agree with its rows, and the manifest says
what it holds. A restored index opens, answers C-FIND, and ``verify --repair`` brings back
what was stored after the backup.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from macpacs.pacs_server.index.sqlite_backup import contents, online_copy
from tests.conftest import ServerProcess, findscu, in_process_macpacs, run_macpacs
from tests.synthetic import write_series


def consistent(database: Path) -> tuple[int, int]:
    """(instances, studies) of a database file, after checking its counters against its rows."""
    with sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True) as conn:
        instances = conn.execute("SELECT count(*) FROM instance").fetchone()[0]
        assert conn.execute("SELECT coalesce(sum(num_instances), 0) FROM study").fetchone()[0] == instances
        assert conn.execute("SELECT coalesce(sum(num_instances), 0) FROM series").fetchone()[0] == instances
        assert conn.execute("SELECT count(*) FROM instance_metadata").fetchone()[0] == instances
        studies = conn.execute("SELECT count(*) FROM study").fetchone()[0]
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return instances, studies


def study_instances(server: ServerProcess, out: Path) -> int:
    found = findscu(server, out, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "NumberOfStudyRelatedInstances")
    return sum(int(ds.NumberOfStudyRelatedInstances) for ds in found)


def test_online_copy_is_one_snapshot_while_another_connection_writes(archive, tmp_path: Path) -> None:
    """One page per step, and 5 instances stored between the first two steps: without the held read
    transaction SQLite restarts the copy (or copies half of each); with it the copy is the first moment."""
    files = write_series(tmp_path / "in", 25, size=16)
    for path in files[:20]:
        assert archive.ingestor.ingest_file(path).ok
    database = archive.settings.data_dir / "index.sqlite"
    progress: list[tuple[int, int]] = []

    def step(done: int, total: int) -> None:
        if not progress:
            for path in files[20:]:
                assert archive.ingestor.ingest_file(path).ok
        progress.append((done, total))

    online_copy(database, tmp_path / "copy.sqlite", step, pages_per_step=1)
    assert len(progress) > 10 and [d for d, _t in progress] == sorted(d for d, _t in progress)
    assert progress[-1][0] == progress[-1][1] == progress[0][1]  # never restarted, never grew
    assert consistent(tmp_path / "copy.sqlite") == (20, 1)
    assert archive.index.counts()["instances"] == 25
    revisions, counts = contents(tmp_path / "copy.sqlite")
    assert counts["instances"] == 20 and revisions
    assert not (tmp_path / "copy.sqlite-wal").exists()  # one self-contained file


def test_backup_during_ingest_then_restore_answers_findscu(make_server, tmp_path: Path) -> None:
    server: ServerProcess = make_server()
    folder = tmp_path / "send"
    for n in range(4):
        write_series(folder / str(n), 100, size=16, patient_id=f"PID{n}", study_description=f"S{n}")
    senders = [
        subprocess.Popen(
            ["/usr/bin/storescu", *server.dicom_args(), "+sd", "+r", str(folder / str(n))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,  # Nagle on (no TCP_NODELAY): ~40 ms an instance, a slow modality
        )
        for n in range(4)
    ]
    backups = []
    while any(s.poll() is None for s in senders) or not backups:
        dest = tmp_path / f"backup-{len(backups)}"
        out = run_macpacs("backup", "--data-dir", str(server.data_dir), str(dest))
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"Backup written to {dest}" in out.stdout and "checked" in out.stdout
        backups.append(dest)
    for sender in senders:
        assert sender.wait(120) == 0, sender.stderr.read()
    for dest in backups:
        manifest = json.loads((dest / "manifest.json").read_text())
        assert sorted(p.name for p in dest.iterdir()) == ["index.sqlite", "manifest.json"]
        instances, studies = consistent(dest / "index.sqlite")
        assert manifest["counts"]["instances"] == instances and manifest["counts"]["studies"] == studies
        assert manifest["revisions"] and manifest["sha256"] and manifest["created"]
    first = json.loads((backups[0] / "manifest.json").read_text())["counts"]["instances"]
    assert first < 400, "the first backup was made while storescu still sent"

    refused = in_process_macpacs("restore", "--data-dir", str(server.data_dir), str(backups[0]))
    assert refused.exit_code == 1 and "the server is running" in refused.stderr, refused.output
    assert "systemctl stop macpacs" in refused.stderr
    assert study_instances(server, tmp_path / "f0") == 400  # nothing was changed

    server.stop()
    out = in_process_macpacs("restore", "--data-dir", str(server.data_dir), str(backups[0]))
    assert out.exit_code == 0, out.output
    assert "macpacs verify --repair" in out.stdout and "kept as" in out.stdout
    (kept,) = [
        p for p in server.data_dir.glob("index.sqlite.before-restore-*") if not p.name.endswith(("-wal", "-shm"))
    ]
    assert consistent(kept)[0] == 400  # the index in use before, whole, beside it
    server.start()
    assert study_instances(server, tmp_path / "f1") == first
    out = in_process_macpacs("verify", "--repair", "--data-dir", str(server.data_dir))
    assert out.exit_code == 0, out.output
    assert f"{'files not in the index':<30} {400 - first:>8}  (indexed: {400 - first})" in out.stdout
    assert study_instances(server, tmp_path / "f2") == 400


def test_restore_refuses_a_damaged_or_foreign_backup_and_changes_nothing(archive, tmp_path: Path) -> None:
    for path in write_series(tmp_path / "in", 3, size=16):
        archive.ingestor.ingest_file(path)
    data_dir = str(archive.settings.data_dir)
    archive.close()
    dest = tmp_path / "b"
    assert in_process_macpacs("backup", "--data-dir", data_dir, str(dest)).exit_code == 0
    index = archive.settings.data_dir / "index.sqlite"
    before = index.read_bytes()

    out = in_process_macpacs("backup", "--data-dir", data_dir, str(dest))
    assert out.exit_code == 1 and "is not an empty folder" in out.stderr  # never over an earlier backup

    copy = dest / "index.sqlite"
    good = copy.read_bytes()
    page = 4096
    copy.write_bytes(good[:page] + b"\xff" * 64 + good[page + 64 :])  # a damaged b-tree page
    out = in_process_macpacs("restore", "--data-dir", data_dir, str(dest))
    assert out.exit_code == 1 and "its SHA-256 differs" in out.stderr, out.output

    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["sha256"] = hashlib.sha256(copy.read_bytes()).hexdigest()  # damaged, and the manifest agrees
    (dest / "manifest.json").write_text(json.dumps(manifest))
    out = in_process_macpacs("restore", "--data-dir", data_dir, str(dest))
    assert out.exit_code == 1 and "integrity check" in out.stderr, out.output

    copy.write_bytes(good)
    with sqlite3.connect(copy) as conn:  # a schema revision of a later version
        conn.execute("INSERT INTO alembic_version VALUES ('9999_future')")
    manifest["sha256"] = hashlib.sha256(copy.read_bytes()).hexdigest()
    (dest / "manifest.json").write_text(json.dumps(manifest))
    out = in_process_macpacs("restore", "--data-dir", data_dir, str(dest))
    assert out.exit_code == 1 and "9999_future is unknown" in out.stderr, out.output

    (dest / "manifest.json").unlink()
    out = in_process_macpacs("restore", "--data-dir", data_dir, str(dest))
    assert out.exit_code == 1 and "not a folder written by `macpacs backup`" in out.stderr
    assert index.read_bytes() == before and not list(index.parent.glob("*.before-restore-*"))


@pytest.mark.parametrize("name", ["backup", "restore"])
def test_postgresql_is_pg_dumps_job(tmp_path: Path, name: str) -> None:
    config = tmp_path / "macpacs.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\nindex_url = "postgresql://pacs@127.0.0.1:1/pacs"\n'
    )
    target = tmp_path / "b"
    target.mkdir()
    out = in_process_macpacs(name, "--config", str(config), str(target))
    assert out.exit_code == 1, out.output
    assert "pg_dump -Fc" in out.stderr and "pg_restore" in out.stderr
    assert isinstance(out.exception, SystemExit)  # a message, not a traceback
