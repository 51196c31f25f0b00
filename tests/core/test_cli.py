"""``macpacs import``, ``reindex`` and ``serve`` from the command line; settings (issue 2)."""

from __future__ import annotations

import os
import socket
import sqlite3
from pathlib import Path

import pytest

from macpacs.pacs_server import config
from tests.conftest import findscu, free_port, run_macpacs, run_tool
from tests.synthetic import write_series


def count(data_dir: Path, table: str = "instance") -> int:
    con = sqlite3.connect(data_dir / "index.sqlite")
    try:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # table name is a test constant
    finally:
        con.close()


def test_import_reports_non_dicom_and_is_idempotent(tmp_path, pydicom_test_files):
    source = pydicom_test_files[0].parent
    data = tmp_path / "data"
    first = run_macpacs("import", "--data-dir", str(data), "--jobs", "2", str(source))
    assert first.returncode == 0, first.stderr
    assert "Import finished:" in first.stdout
    assert "skipped (not DICOM): " in first.stderr and "README.txt" in first.stderr
    assert "no_meta.dcm" in first.stderr  # no file meta: refused, named
    assert "MR_truncated.dcm" in first.stderr and "truncated file" in first.stderr
    stored = count(data)
    assert stored >= 35
    second = run_macpacs("import", "--data-dir", str(data), str(source))
    assert second.returncode == 0
    assert count(data) == stored
    assert "stored" not in second.stdout.replace("duplicate", "")  # nothing new


def test_reindex_rebuilds_the_same_index(tmp_path):
    data = tmp_path / "data"
    write_series(tmp_path / "ct", 12, size=32)
    assert run_macpacs("import", "--data-dir", str(data), str(tmp_path / "ct")).returncode == 0
    before = [count(data, t) for t in ("patient", "study", "series", "instance")]
    for suffix in ("", "-wal", "-shm"):
        (data / f"index.sqlite{suffix}").unlink(missing_ok=True)
    proc = run_macpacs("reindex", "--data-dir", str(data))
    assert proc.returncode == 0, proc.stderr
    assert "12 instances indexed, 0 files skipped" in proc.stdout
    assert [count(data, t) for t in ("patient", "study", "series", "instance")] == before
    con = sqlite3.connect(data / "index.sqlite")
    assert con.execute("SELECT num_instances FROM study").fetchone() == (12,)


def test_corrupt_index_is_moved_aside_and_rebuilt(make_server, tmp_path):
    data = tmp_path / "data0"
    write_series(tmp_path / "ct", 5, size=32)
    assert run_macpacs("import", "--data-dir", str(data), str(tmp_path / "ct")).returncode == 0
    for suffix in ("-wal", "-shm"):
        (data / f"index.sqlite{suffix}").unlink(missing_ok=True)
    (data / "index.sqlite").write_bytes(b"this is not a database" * 100)
    server = make_server(data_dir=data)
    assert server.logged("unreadable") and server.logged("rebuilding")
    assert list(data.glob("index.sqlite.corrupt-*"))
    found = findscu(server, tmp_path / "rsp", "QueryRetrieveLevel=IMAGE", "SOPInstanceUID")
    for _ in range(50):
        if len(found) == 5:
            break
        found = findscu(server, tmp_path / "rsp", "QueryRetrieveLevel=IMAGE", "SOPInstanceUID")
    assert len(found) == 5


def test_without_server_mode_a_corrupt_index_stops_the_start_and_says_what_to_do(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "index.sqlite").write_bytes(b"this is not a database" * 100)
    env = {**os.environ, "MACPACS_SERVER_SERVER_MODE": "false"}
    proc = run_macpacs("serve", "--data-dir", str(data), "--dicom-port", str(free_port()), timeout=60, env=env)
    assert proc.returncode != 0
    assert "server.server_mode is false" in proc.stderr and "macpacs reindex" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(data.glob("index.sqlite.corrupt-*")), "nothing is moved without server mode"


def test_reindex_rebuilds_an_unreadable_index_and_other_commands_say_so(tmp_path):
    data = tmp_path / "data"
    write_series(tmp_path / "ct", 4, size=16)
    assert run_macpacs("import", "--data-dir", str(data), str(tmp_path / "ct")).returncode == 0
    for suffix in ("-wal", "-shm"):
        (data / f"index.sqlite{suffix}").unlink(missing_ok=True)
    (data / "index.sqlite").write_bytes(b"this is not a database" * 100)
    listed = run_macpacs("nodes", "list", "--data-dir", str(data))
    assert listed.returncode != 0 and "Traceback" not in listed.stderr
    assert "is unreadable" in listed.stderr and "`macpacs reindex`" in listed.stderr
    done = run_macpacs("reindex", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    assert "The index was unreadable: moved it aside as" in done.stderr
    assert "4 instances indexed" in done.stdout
    assert count(data) == 4 and list(data.glob("index.sqlite.corrupt-*"))


def test_serve_explains_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_macpacs(
            "serve",
            "--data-dir",
            str(tmp_path / "d"),
            "--dicom-port",
            str(port),
            "--web-port",
            str(free_port()),
            "--xmlrpc-port",
            str(free_port()),
            timeout=60,
        )
    assert proc.returncode != 0
    assert "already in use" in proc.stderr and str(port) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_explains_a_bad_config(tmp_path):
    bad = tmp_path / "macpacs.toml"
    bad.write_text('[dicom]\nae_title = "THIS TITLE IS FAR TOO LONG"\n')
    proc = run_macpacs("serve", "--config", str(bad))
    assert proc.returncode != 0
    assert "dicom.ae_title" in proc.stderr and "1 to 16" in proc.stderr
    bad.write_text("[dicom]\nprot = 104\n")
    proc = run_macpacs("serve", "--config", str(bad))
    assert "unknown setting dicom.prot" in proc.stderr


def test_second_server_on_same_data_is_refused(server):
    proc = run_macpacs(
        "serve",
        "--data-dir",
        str(server.data_dir),
        "--dicom-port",
        str(free_port()),
        "--web-port",
        str(free_port()),
        "--xmlrpc-port",
        str(free_port()),
        timeout=60,
    )
    assert proc.returncode != 0
    assert "another macpacs server" in proc.stderr
    run_tool("echoscu", *server.dicom_args())


def test_settings_layering(tmp_path):
    path = tmp_path / "macpacs.toml"
    path.write_text('[dicom]\nae_title = "FROMFILE"\nport = 11113\n[storage]\ndata_dir = "rel/data"\n')
    settings = config.load(
        path,
        environ={"MACPACS_DICOM_PORT": "11114", "MACPACS_STORAGE_ON_CONFLICT": "overwrite"},
        overrides={"dicom": {"ae_title": None}, "web": {"port": 4444}},
    )
    assert settings.dicom.ae_title == "FROMFILE"
    assert settings.dicom.port == 11114  # environment beats file
    assert settings.web.port == 4444  # flags beat both
    assert settings.storage.on_conflict == "overwrite"
    assert settings.data_dir == (tmp_path / "rel" / "data").resolve()  # relative to the file
    assert config.load(None, environ={}).dicom.port == 11112


def test_plugin_settings(tmp_path):
    path = tmp_path / "macpacs.toml"
    path.write_text('[plugins]\nenable = ["example"]\n[plugins.example]\nlog = "x.jsonl"\nlimit = 3\n')
    settings = config.load(path, environ={})
    assert settings.plugins.enable == ["example"]
    assert settings.plugins.options == {"example": {"log": "x.jsonl", "limit": 3}}
    assert config.load(path, environ={"MACPACS_PLUGINS_ENABLE": "a, b"}).plugins.enable == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[dicom]\nport = 70000\n", "not a TCP port"),
        ("[dicom]\nport = 3333\n", "must differ"),
        ('[storage]\non_conflict = "merge"\n', "on_conflict"),
        ("[dicom\n", "not valid TOML"),
        ("[nonsense]\na = 1\n", "unknown section"),
        ('[dicom]\nmax_associations = "many"\n', "whole number"),
    ],
)
def test_settings_errors_say_what_to_fix(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=message):
        config.load(path, environ={})
