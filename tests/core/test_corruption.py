"""A corrupt index, at run time and on disk (issue 15, finding 4).

While ``macpacs serve`` runs with DICOM worker processes, the instance table's pages are
overwritten in the live SQLite file. A C-FIND served by a worker meets the corruption; from then
on ``/testdbalive`` and ``/health`` fail, the server moves the file aside by itself, stores go on
being acknowledged into a fresh index while it is rebuilt from the files, and afterwards every
instance ever acknowledged is found by DCMTK's findscu. ``macpacs reindex`` repairs an index
damaged in each of the ways a disk or a person damages one.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests

from macpacs.pacs_server.index.corruption import in_use, is_corruption
from tests.conftest import ServerProcess, acknowledged, dcmtk, findscu, run_macpacs, run_tool
from tests.synthetic import write_series

STORED = 300  # instances in the index when it is corrupted
DURING = 40  # instances sent while it is rebuilt
REINDEXED = 30  # instances of the damaged indexes that `macpacs reindex` repairs


def count(data: Path) -> int:
    con = sqlite3.connect(data / "index.sqlite")
    try:
        return con.execute("SELECT count(*) FROM instance").fetchone()[0]
    finally:
        con.close()


def corrupt_table_pages(database: Path, table: str) -> int:
    """Overwrite every leaf page of ``table`` in the live file with 0xFF; returns how many.

    The WAL is folded into the file first, so that no newer copy of those pages hides the damage,
    and a commit afterwards makes every open connection drop the pages it has cached.
    """
    con = sqlite3.connect(database)
    try:
        busy, _log, _done = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0, "the server kept the WAL busy"
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        pages = [p for (p,) in con.execute("SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf'", (table,))]
    finally:
        con.close()
    with open(database, "r+b") as f:
        for page in pages:
            f.seek((page - 1) * page_size)
            f.write(b"\xff" * page_size)
        f.flush()
        os.fsync(f.fileno())
    con = sqlite3.connect(database)
    try:
        con.execute("PRAGMA user_version = 7")  # a commit: page 1 only
        con.commit()
    finally:
        con.close()
    return len(pages)


def uids(paths: list[Path]) -> dict[str, str]:
    return {str(p): str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


class HealthWatch(threading.Thread):
    """Polls ``/testdbalive`` and ``/health`` every 20 ms; remembers when each first failed."""

    def __init__(self, server: ServerProcess) -> None:
        super().__init__(daemon=True)
        self.base = f"http://127.0.0.1:{server.web_port}"
        self.alive_failed: tuple[float, str] | None = None
        self.health_failed: tuple[float, dict] | None = None
        self.health_status = "ok"
        self.seen: list[str] = []  # every /health status in order, without repeats
        self.detail = ""
        self.halt = threading.Event()
        self.session = requests.Session()
        self.session.trust_env = False

    def run(self) -> None:
        while not self.halt.is_set():
            alive = self.session.get(f"{self.base}/testdbalive", timeout=10)
            if alive.status_code != 200 and self.alive_failed is None:
                self.alive_failed = (time.monotonic(), alive.text)
            health = self.session.get(f"{self.base}/health", timeout=10)
            body = health.json()
            if health.status_code != 200 and self.health_failed is None and body["status"] == "failing":
                self.health_failed = (time.monotonic(), body)
            self.health_status = body["status"]
            if not self.seen or self.seen[-1] != body["status"]:
                self.seen.append(body["status"])
            if body.get("index_recovery"):
                self.detail = body["index_recovery"].get("detail", "")
            time.sleep(0.02)

    def wait_for(self, status: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.health_status != status:
            assert time.monotonic() < deadline, f"/health never said {status!r}: {self.seen}"
            time.sleep(0.01)


def test_corrupt_instance_table_while_running_is_rebuilt_by_the_server_and_nothing_is_lost(make_server, tmp_path):
    server = make_server(env={"MACPACS_DICOM_WORKERS": "2"})
    data = server.data_dir
    assert run_macpacs("nodes", "add", "VIEWER", "--ae-title", "VIEWER", "--host", "127.0.0.1", "--port", "104",
                   "--data-dir", str(data)).returncode == 0  # fmt: skip
    before = write_series(tmp_path / "before", STORED, patient_id="CORRUPT1", size=16)
    sent = uids(before)
    run_tool("storescu", *server.dicom_args(), "+sd", str(tmp_path / "before"))
    assert count(data) == STORED

    watch = HealthWatch(server)
    watch.start()
    pages = corrupt_table_pages(data / "index.sqlite", "instance")
    assert pages > 1
    started = time.monotonic()
    # A C-FIND of every instance, served by a worker process, meets the damaged pages.
    run_tool("findscu", "-S", *server.dicom_args(), "-k", "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID",
             check=False)  # fmt: skip
    watch.wait_for("rebuilding", timeout=20)
    assert watch.alive_failed is not None and watch.health_failed is not None, watch.seen
    assert "Test DB Alive failed: index: the database is corrupt" in watch.alive_failed[1]
    assert "corrupt" in watch.health_failed[1]["index"]

    # While it is rebuilt: the supervisor's probe answers alive, stores are acknowledged and kept.
    alive = requests.get(f"http://127.0.0.1:{server.web_port}/testdbalive", timeout=10)
    assert (alive.status_code, alive.text) == (200, "Test DB Alive succeeded")
    assert watch.detail.startswith("rebuilding: ")
    during = write_series(tmp_path / "during", DURING, patient_id="CORRUPT2", size=16)
    uid_of = uids(during)
    sending = subprocess.run(
        [dcmtk("storescu"), "-v", *server.dicom_args(), *map(str, during)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert acknowledged(sending.stdout + sending.stderr, uid_of) == set(uid_of.values()), sending.stderr[-2000:]
    overlap = "all" if watch.health_status == "rebuilding" else "the start"
    sent |= uid_of
    watch.wait_for("ok", timeout=120)
    rebuilt = time.monotonic()
    watch.halt.set()
    watch.join(5)

    found = findscu(server, tmp_path / "rsp", "QueryRetrieveLevel=IMAGE", "SOPInstanceUID")
    assert {str(ds.SOPInstanceUID) for ds in found} == set(sent.values())
    copies = [p for p in data.glob("index.sqlite.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(copies) == 1, "the corrupt file is kept"
    assert not in_use(copies[0]), "no process of the server still has the corrupt file open"
    con = sqlite3.connect(data / "index.sqlite")
    assert con.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    con.close()
    assert not (data / "index.sqlite.recovery").exists()
    assert "VIEWER" in run_macpacs("nodes", "list", "--data-dir", str(data)).stdout, "the node table was copied over"
    log = server.log()
    assert "is corrupt (database disk image is malformed)" in log
    assert "moved the corrupt database to" in log and "kept for inspection" in log
    assert "rebuild finished" in log and "Traceback" not in log
    print(
        f"\ncorruption figures: {STORED} instances, {pages} instance pages overwritten; "
        f"/testdbalive failed after {watch.alive_failed[0] - started:.2f} s, /health after "
        f"{watch.health_failed[0] - started:.2f} s (from the start of the C-FIND that met it); "
        f"healthy again {rebuilt - started:.1f} s after; {overlap} of the {DURING} stores during the rebuild; "
        + next(line for line in log.splitlines() if "rebuild finished" in line).split("index: ", 1)[1]
    )


def test_a_restart_in_the_middle_of_a_rebuild_finishes_it(make_server, imported, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(imported, data)
    # As the server leaves things when killed after the replacement: a fresh index, not yet filled.
    for suffix in ("", "-wal", "-shm"):
        (data / f"index.sqlite{suffix}").unlink(missing_ok=True)
    (data / "index.sqlite.recovery").write_text('{"state": "rebuilding", "error": "test"}')
    server = make_server(data_dir=data, env={"MACPACS_DICOM_WORKERS": "1"})
    assert server.logged("rebuild finished", timeout=30), server.log()[-2000:]
    assert len(findscu(server, tmp_path / "rsp", "QueryRetrieveLevel=IMAGE", "SOPInstanceUID")) == REINDEXED
    assert not (data / "index.sqlite.recovery").exists()
    assert server.stop(signal.SIGTERM) == 0


def _garbage(db: Path) -> None:
    db.write_bytes(b"this is not a database" * 100)


def _truncated(db: Path) -> None:
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 3)


def _instance_pages(db: Path) -> None:
    corrupt_table_pages(db, "instance")


def _table_dropped(db: Path) -> None:
    con = sqlite3.connect(db)
    con.execute("DROP TABLE instance_metadata")
    con.commit()
    con.close()


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with REINDEXED instances imported, its WAL folded into the file."""
    base = tmp_path_factory.mktemp("reindex")
    write_series(base / "ct", REINDEXED, size=16)
    assert run_macpacs("import", "--data-dir", str(base / "data"), str(base / "ct")).returncode == 0
    con = sqlite3.connect(base / "data" / "index.sqlite")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return base / "data"


@pytest.mark.parametrize("damage", [_garbage, _truncated, _instance_pages, _table_dropped], ids=lambda f: f.__name__)
def test_reindex_repairs_every_kind_of_damaged_index(imported, tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(imported, data)
    damage(data / "index.sqlite")
    done = run_macpacs("reindex", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{REINDEXED} instances indexed, 0 files skipped" in done.stdout
    assert count(data) == REINDEXED
    assert list(data.glob("index.sqlite.corrupt-*")), "the damaged file is kept beside the new one"
    assert not (data / "index.sqlite.recovery").exists()


def test_corruption_is_told_from_other_database_errors():
    con = sqlite3.connect(":memory:")
    try:
        con.execute("SELECT * FROM nothing_here")
    except sqlite3.OperationalError as exc:
        assert not is_corruption(exc)
    assert is_corruption(sqlite3.DatabaseError("database disk image is malformed"))
    assert is_corruption(sqlite3.DatabaseError("file is not a database"))
    assert not is_corruption(sqlite3.OperationalError("database is locked"))
    assert not is_corruption(sqlite3.OperationalError("disk I/O error"))
    assert not is_corruption(RuntimeError("database disk image is malformed"))  # not from SQLite: not ours
