"""``macpacs nodes`` and ``macpacs send`` through the real console script (issue 3)."""

from __future__ import annotations

import socket
import time

import pydicom

from tests.conftest import dataset_bytes, free_port
from tests.qr.conftest import CT_STUDY, macpacs, received, storescp


def test_add_list_edit_remove(tmp_path):
    data = tmp_path / "data"
    out = macpacs("nodes", "add", "OsiriX Lab", "--ae-title", "OSIRIX", "--host", "10.0.0.5", "--port", "11112",
                  "--allow", "query,retrieve", "--description", "reading room 2", data_dir=data)  # fmt: skip
    assert "added node OsiriX Lab: OSIRIX@10.0.0.5:11112, may query,retrieve" in out.stdout
    listing = macpacs("nodes", "list", data_dir=data).stdout
    assert "OsiriX Lab" in listing and "query,retrieve" in listing and "reading room 2" in listing
    out = macpacs("nodes", "edit", "OsiriX Lab", "--port", "104", "--allow", "none", "--name", "LAB", data_dir=data)
    assert "node LAB: OSIRIX@10.0.0.5:104, may none, active" in out.stdout
    macpacs("nodes", "remove", "LAB", data_dir=data)
    assert "no nodes registered" in macpacs("nodes", "list", data_dir=data).stdout


def test_errors_name_the_problem(tmp_path):
    data = tmp_path / "data"
    macpacs("nodes", "add", "A", "--ae-title", "AET1", "--host", "h1", "--port", "104", data_dir=data)

    def fails(*args: str) -> str:
        proc = macpacs("nodes", *args, data_dir=data, check=False)
        assert proc.returncode != 0, proc.stdout
        return proc.stderr

    assert "AE title 'AET1' is already used by node 'A'" in fails(
        "add", "B", "--ae-title", "AET1", "--host", "h2", "--port", "104"
    )
    assert "name 'A' is already used by node 'A'" in fails(
        "add", "A", "--ae-title", "AET2", "--host", "h2", "--port", "104"
    )
    assert "port 70000 of node 'C' is not a TCP port" in fails(
        "add", "C", "--ae-title", "AET3", "--host", "h", "--port", "70000"
    )
    assert "AE title 'THIS-IS-LONGER-THAN-16' of node 'D' is not valid" in fails(
        "add", "D", "--ae-title", "THIS-IS-LONGER-THAN-16", "--host", "h", "--port", "1"
    )
    assert "is not valid" in fails("add", "E", "--ae-title", "BACK\\SLASH", "--host", "h", "--port", "1")
    assert "unknown operation(s) delete" in fails(
        "add", "F", "--ae-title", "F", "--host", "h", "--port", "1", "--allow", "store,delete"
    )
    assert "no DICOM node named 'ZZ'" in fails("remove", "ZZ")
    assert "no DICOM node named 'ZZ'" in fails("edit", "ZZ", "--port", "5")
    assert "no DICOM node named 'ZZ'" in fails("echo", "ZZ")


def test_echo_prints_round_trip_and_explains_failures(server, tmp_path):
    data = server.data_dir
    macpacs("nodes", "add", "SELF", "--ae-title", server.ae_title, "--host", "127.0.0.1",
            "--port", str(server.dicom_port), data_dir=data)  # fmt: skip
    out = macpacs("nodes", "echo", "SELF", data_dir=data).stdout
    assert "C-ECHO SELF (MACPACS@127.0.0.1:" in out and "success in" in out
    macpacs("nodes", "add", "DOWN", "--ae-title", "DOWN", "--host", "127.0.0.1", "--port", str(free_port()),
            data_dir=data)  # fmt: skip
    proc = macpacs("nodes", "echo", "DOWN", data_dir=data, check=False)
    assert proc.returncode == 1
    assert "connection refused: nothing listens on that port" in proc.stderr
    macpacs("nodes", "add", "WRONGAE", "--ae-title", "NOTTHEM", "--host", "127.0.0.1",
            "--port", str(server.dicom_port), data_dir=data)  # fmt: skip
    proc = macpacs("nodes", "echo", "WRONGAE", data_dir=data, check=False)
    assert "rejected the association: its called AE title is not the one registered here" in proc.stderr


def test_send_a_study_to_a_node(loaded, tmp_path):
    server, sources, _base = loaded
    with storescp(tmp_path / "out", "SENDDEST", "+B") as port:
        macpacs("nodes", "add", "SENDDEST", "--ae-title", "SENDDEST", "--host", "127.0.0.1", "--port", str(port),
                data_dir=server.data_dir)  # fmt: skip
        out = macpacs("send", "SENDDEST", "--study", CT_STUDY, data_dir=server.data_dir)
    assert "sent to SENDDEST: 5 completed, 0 warning, 0 failed, 0 remaining" in out.stdout
    got = received(tmp_path / "out")
    assert len(got) == 5
    for uid, path in got.items():
        assert dataset_bytes(path) == dataset_bytes(sources[uid])
        assert pydicom.dcmread(path).StudyInstanceUID == CT_STUDY
    proc = macpacs("send", "SENDDEST", "--study", "1.2.3.404", data_dir=server.data_dir, check=False)
    assert proc.returncode == 1 and "nothing in this archive matches" in proc.stderr


def test_a_silent_node_times_out_with_the_setting_named(tmp_path):
    """A peer that accepts the TCP connection but never answers: dicom.client_timeout applies."""
    data = tmp_path / "data"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        macpacs("nodes", "add", "SILENT", "--ae-title", "SILENT", "--host", "127.0.0.1", "--port", str(port),
                data_dir=data)  # fmt: skip
        started = time.monotonic()
        proc = macpacs("nodes", "echo", "SILENT", data_dir=data, check=False, env={"MACPACS_DICOM_CLIENT_TIMEOUT": "1"})
    assert proc.returncode == 1
    assert "not answered within 1.0 s (dicom.client_timeout)" in proc.stderr
    assert time.monotonic() - started < 30
