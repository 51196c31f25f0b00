"""``macpacs migrate`` of a real SQLite-plus-files archive (``macpacs import`` of synthetic series
and pydicom's test files, a registered DICOM node) onto PostgreSQL and SeaweedFS's S3: killed
with SIGKILL half-way and run again, it copies only what the first run had not, is verified, and
leaves the archive untouched; a target that holds data is refused; a later run copies only what
arrived since; and a node served from the new settings finds (C-FIND) and retrieves (C-GET)
every instance, byte for byte, and stores new ones."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.conftest import MACPACS, ServerProcess, dataset_bytes, dcmtk, findscu, free_port, run_macpacs, run_tool
from tests.postgres import Cluster
from tests.s3gateway import Gateway
from tests.synthetic import write_series

from .conftest import Shared, new_shared

CHUNK = 10
TEST_FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")


def archive_state(data_dir: Path) -> tuple[dict[str, str], list[str]]:
    """The archive as a reader sees it: each stored file's SHA-256, and every index row."""
    files = {
        str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((data_dir / "files").rglob("*.dcm"))
    }
    with sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True) as conn:
        rows = list(conn.iterdump())
    return files, rows


def target_instances(shared: Shared) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(shared.index_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM instance")).scalar_one()
    except Exception:  # the schema is not there yet
        return 0
    finally:
        engine.dispose()


def copied(output: str) -> int:
    found = re.search(r"files: (\d+) copied", output)
    assert found, output
    return int(found.group(1))


@pytest.mark.timeout(300)
def test_migrate_interrupted_resumed_verified_and_served(postgres: Cluster, gateway: Gateway, tmp_path: Path):
    shared = new_shared(postgres, gateway, tmp_path)
    source = tmp_path / "old"
    incoming = tmp_path / "incoming"
    for n in range(2):
        write_series(incoming / f"s{n}", 30, patient_id=f"MIG{n}", size=128)
    for name in TEST_FILES:
        (incoming / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    no_env: dict[str, str] = {}
    imported = run_macpacs("import", "--data-dir", str(source), str(incoming), env=no_env)
    assert imported.returncode == 0, imported.stderr
    added = run_macpacs("nodes", "add", "ws1", "--data-dir", str(source), "--ae-title", "WS1",
                    "--host", "127.0.0.1", "--port", "104", env=no_env)  # fmt: skip
    assert added.returncode == 0, added.stderr
    total = 60 + len(TEST_FILES)
    before = archive_state(source)
    assert len(before[0]) == total

    argv = [MACPACS, "migrate", "--data-dir", str(source), "--index", shared.index_url,
            "--storage", shared.storage_url, "--chunk", str(CHUNK), "--jobs", "2"]  # fmt: skip
    env = {**os.environ, **gateway.env()}
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    while target_instances(shared) < 2 * CHUNK and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    out, _ = first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL, f"the first run ended before its kill:\n{out}"
    done = target_instances(shared)
    assert 0 < done < total, done

    second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "VERIFIED" in second.stdout and "NOT VERIFIED" not in second.stdout
    assert copied(second.stdout) == total - done, "what the killed run had copied is not copied again"
    assert f'url = "{shared.storage_url}"' in second.stdout, "it says what to change in the settings"
    assert archive_state(source) == before, "the archive is untouched"

    # A target that holds data, named by no migration begun from here, is refused.
    other = subprocess.run([*argv, "--work-dir", str(tmp_path / "elsewhere")], capture_output=True, text=True, env=env)
    assert other.returncode != 0 and "the target is not empty" in other.stderr, other.stderr

    # What arrives after a run is what the next run copies.
    write_series(incoming / "later", 3, patient_id="LATER", size=16)
    assert run_macpacs("import", "--data-dir", str(source), str(incoming / "later"), env=no_env).returncode == 0
    third = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert third.returncode == 0 and copied(third.stdout) == 3, third.stdout + third.stderr
    total += 3

    node = shared.node("new", MACPACS_DICOM_WORKERS="1").start()
    try:
        studies = findscu(node, tmp_path / "find", "QueryRetrieveLevel=STUDY", "StudyInstanceUID")
        assert len(studies) == len({str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                                    for p in incoming.rglob("*.dcm")})  # fmt: skip
        received: dict[str, bytes] = {}
        for n, study in enumerate(studies):
            out_dir = tmp_path / f"get{n}"
            out_dir.mkdir()
            run_tool("getscu", "-S", "-od", str(out_dir), *node.dicom_args(),
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.StudyInstanceUID}")  # fmt: skip
            for path in out_dir.iterdir():
                received[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = dataset_bytes(path)
        originals = {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p)
            for p in (source / "files").rglob("*.dcm")
        }
        assert len(received) == total and received.keys() == originals.keys()
        synthetic = [uid for uid in originals if uid not in {str(pydicom.dcmread(get_testdata_file(n)).SOPInstanceUID)
                                                             for n in TEST_FILES}]  # fmt: skip
        assert all(received[uid] == originals[uid] for uid in synthetic), "byte for byte the archive's files"
        assert node.index_query("SELECT name, ae_title FROM node") == [("ws1", "WS1")]
        # New rows get keys past the copied ones (PostgreSQL's sequences were moved on).
        (new,) = write_series(tmp_path / "new", 1, patient_id="AFTER", size=16)
        run_tool("storescu", *node.dicom_args(), str(new))
        assert node.index_query("SELECT count(*) FROM instance") == [(total + 1,)]
    finally:
        node.stop()


@pytest.mark.timeout(240)
def test_a_run_during_ingest_is_caught_up_by_the_next(postgres: Cluster, gateway: Gateway, tmp_path: Path):
    """The server keeps storing (two storescu) while a first run copies: that run ends NOT
    VERIFIED, and the next one, after the senders finished, copies the rest and is verified."""
    shared = new_shared(postgres, gateway, tmp_path)
    # The archive to move: SQLite and files, as today.
    ports = {name: free_port() for name in ("dicom_port", "web_port", "xmlrpc_port")}
    server = ServerProcess(data_dir=tmp_path / "old", env={"MACPACS_DICOM_WORKERS": "1"}, **ports).start()
    try:
        senders = [
            subprocess.Popen([dcmtk("storescu"), *server.dicom_args(),
                              *map(str, write_series(tmp_path / f"in{n}", 150, patient_id=f"LIVE{n}", size=16))])
            for n in range(2)
        ]  # fmt: skip
        deadline = time.monotonic() + 60
        while not server.index_query("SELECT count(*) FROM instance")[0][0] and time.monotonic() < deadline:
            time.sleep(0.05)
        argv = [MACPACS, "migrate", "--data-dir", str(server.data_dir), "--index", shared.index_url,
                "--storage", shared.storage_url, "--chunk", "20"]  # fmt: skip
        env = {**os.environ, **gateway.env()}
        first = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert all(sender.wait(120) == 0 for sender in senders)
        second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 0 and "VERIFIED" in second.stdout, second.stdout + second.stderr
        assert copied(first.stdout) + copied(second.stdout) == 300, "each file copied once"
        if first.returncode != 0:  # it saw the archive grow (else the senders were done before it read)
            assert "NOT VERIFIED: the archive changed during this run" in first.stderr, first.stderr
    finally:
        server.stop()
