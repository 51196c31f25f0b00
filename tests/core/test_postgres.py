"""The index on PostgreSQL end to end (issue 17): ``macpacs serve`` with DCMTK's tools and QIDO-RS,
a database restart under a running server, and statement timeouts as clean failures.

Each test has its own cluster (tests/postgres.py): they stop it or hold locks in it.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests
from pydicom.uid import generate_uid

from tests.conftest import ServerProcess, findscu, free_port, run_macpacs, run_tool
from tests.postgres import Cluster, missing_binaries
from tests.qr.conftest import macpacs, received, storescp
from tests.synthetic import write_series


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    reason = missing_binaries()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    own = Cluster()
    yield own
    own.destroy()


def serve(tmp_path: Path, url: str, **env: str) -> ServerProcess:
    server = ServerProcess(tmp_path / "data", free_port(), free_port(), free_port(), index_url=url, env=env)
    return server.start()


def store(server: ServerProcess, folder: Path) -> str:
    """storescu's output (it exits 0 even when the archive refuses: the status is in what it prints)."""
    proc = run_tool("storescu", "-v", *server.dicom_args(), "+sd", "+r", str(folder), check=False)
    return proc.stdout + proc.stderr


def refused_out_of_resources(output: str) -> bool:
    """Whether a DCMTK tool's output shows a 0xA700-class answer (storescu: "OutOfResources")."""
    return re.search(r"out ?of ?resources|0xa7", output, re.IGNORECASE) is not None


def instances_in(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM instance").fetchone()[0]


def qido(server: ServerProcess, query: str) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{server.web_port}/dicom-web/studies?{query}", timeout=30)


def test_serve_stores_finds_retrieves_and_answers_qido(cluster: Cluster, tmp_path: Path) -> None:
    url = cluster.new_database()
    server = serve(tmp_path, url)
    try:
        study = str(generate_uid())
        write_series(tmp_path / "in", 3, study_uid=study, patient_name="PG^ONE", patient_id="PG1", modality="CT")
        store(server, tmp_path / "in")
        assert instances_in(url) == 3  # in PostgreSQL, not in an SQLite file beside the data
        assert not (server.data_dir / "index.sqlite").exists()

        found = findscu(server, tmp_path / "rsp", "QueryRetrieveLevel=STUDY", "PatientName=PG*",
                        "StudyInstanceUID", "NumberOfStudyRelatedInstances")  # fmt: skip
        assert [(r.StudyInstanceUID, int(r.NumberOfStudyRelatedInstances)) for r in found] == [(study, 3)]

        got = tmp_path / "get"
        got.mkdir()
        run_tool("getscu", "-S", *server.dicom_args(), "-od", str(got),
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")  # fmt: skip
        assert len(received(got)) == 3

        with storescp(tmp_path / "moved", "DEST") as port:
            env = {"MACPACS_INDEX_URL": url}
            macpacs("nodes", "add", "DEST", "--ae-title", "DEST", "--host", "127.0.0.1", "--port", str(port),
                    data_dir=server.data_dir, env=env)  # fmt: skip
            run_tool("movescu", "-S", *server.dicom_args(), "-aem", "DEST",
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")  # fmt: skip
        assert len(received(tmp_path / "moved")) == 3

        answer = qido(server, "PatientID=PG1&includefield=NumberOfStudyRelatedInstances")
        assert answer.status_code == 200, answer.text
        assert [s["0020000D"]["Value"][0] for s in answer.json()] == [study]
    finally:
        server.stop()


def test_a_database_restart_fails_cleanly_and_the_next_requests_work(cluster: Cluster, tmp_path: Path) -> None:
    url = cluster.new_database()
    server = serve(tmp_path, url, MACPACS_INDEX_CONNECT_TIMEOUT="2")
    try:
        write_series(tmp_path / "before", 2, patient_id="PG1")
        store(server, tmp_path / "before")
        assert instances_in(url) == 2

        cluster.stop("fast")  # every session ends, as when an administrator restarts PostgreSQL
        write_series(tmp_path / "during", 1, patient_id="PG2")
        out = store(server, tmp_path / "during")
        # The calling AE's access check reads the nodes table first: a transient rejection, which
        # a modality retries (a database lost mid-association costs a C-STORE 0xA700 instead).
        assert "Rejected Transient" in out, out
        assert server.logged("rejected (transient): the index database (PostgreSQL) is unavailable")
        down = qido(server, "PatientID=PG1")
        assert down.status_code == 503 and "PostgreSQL" in down.json()["detail"], down.text

        cluster.start()
        write_series(tmp_path / "after", 2, patient_id="PG3")
        store(server, tmp_path / "after")
        store(server, tmp_path / "during")  # the refused instance, sent again
        assert instances_in(url) == 5
        found = findscu(server, tmp_path / "rsp", "QueryRetrieveLevel=STUDY", "PatientID", "StudyInstanceUID")
        assert sorted(str(r.PatientID) for r in found) == ["PG1", "PG2", "PG3"]
        assert qido(server, "PatientID=PG1").status_code == 200
    finally:
        server.stop()


def test_a_statement_past_the_timeout_is_a_clean_failure(cluster: Cluster, tmp_path: Path) -> None:
    url = cluster.new_database()
    server = serve(tmp_path, url, MACPACS_INDEX_STATEMENT_TIMEOUT="1")
    try:
        write_series(tmp_path / "first", 1, patient_id="PG1")
        store(server, tmp_path / "first")
        locked, release = threading.Event(), threading.Event()

        def hold_lock() -> None:  # a stuck transaction elsewhere (a DBA's VACUUM FULL, say)
            with psycopg.connect(url) as conn:
                conn.execute("LOCK TABLE study IN ACCESS EXCLUSIVE MODE")
                locked.set()
                release.wait(60)

        holder = threading.Thread(target=hold_lock)
        holder.start()
        try:
            assert locked.wait(10)
            write_series(tmp_path / "second", 1, patient_id="PG1")
            out = store(server, tmp_path / "second")
            assert refused_out_of_resources(out), out
            assert server.logged("index.statement_timeout = 1 s")
            proc = run_tool("findscu", "-v", "-S", *server.dicom_args(), "-k", "QueryRetrieveLevel=STUDY",
                            "-k", "StudyInstanceUID", check=False)  # fmt: skip
            assert refused_out_of_resources(proc.stdout + proc.stderr), proc.stdout + proc.stderr
            answer = qido(server, "PatientID=PG1")
            assert answer.status_code == 503 and "statement_timeout" in answer.json()["detail"], answer.text
        finally:
            release.set()
            holder.join()
        store(server, tmp_path / "second")
        assert instances_in(url) == 2
    finally:
        server.stop()


def test_index_settings_and_their_former_name() -> None:
    from macpacs.pacs_server.config import ConfigError, load

    pg = "postgresql://macpacs@db.example.org/macpacs"
    assert load(environ={"MACPACS_INDEX_URL": pg}).index_url == pg
    assert load(environ={"MACPACS_STORAGE_INDEX_URL": pg}).index_url == pg  # the former name, still read
    both = {"MACPACS_INDEX_URL": pg, "MACPACS_STORAGE_INDEX_URL": "sqlite:////tmp/old.sqlite"}
    assert load(environ=both).index_url == pg
    with pytest.raises(ConfigError, match=r"index\.url 'mysql'"):
        load(environ={"MACPACS_INDEX_URL": "mysql://root:secret@db/pacs"})
    with pytest.raises(ConfigError, match=r"index\.pool_size"):
        load(environ={"MACPACS_INDEX_POOL_SIZE": "0"})


def test_a_command_says_when_the_database_server_is_down(tmp_path: Path) -> None:
    down = f"postgresql://macpacs:secret@127.0.0.1:{free_port()}/macpacs"
    # In a process of its own: what it logs reaches stderr there, and the password must not be in it.
    proc = run_macpacs("users", "list", "--data-dir", str(tmp_path / "data"),
                       env={"MACPACS_INDEX_URL": down, "MACPACS_INDEX_CONNECT_TIMEOUT": "2"})  # fmt: skip
    assert proc.returncode != 0
    assert "the index database (PostgreSQL) is unavailable" in proc.stderr and "Traceback" not in proc.stderr
    assert "secret" not in proc.stderr
