"""Access control: unknown nodes, addresses, pending nodes, per-node rights, called AE title (issue 3)."""

from __future__ import annotations

import pytest

from tests.conftest import ServerProcess, free_port, run_tool
from tests.qr.conftest import CT_STUDY, macpacs
from tests.synthetic import write_series


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server with dicom.accept_unknown_nodes = false and a few registered nodes."""
    base = tmp_path_factory.mktemp("access")
    data = base / "data"
    for args in (
        ("WS", "--ae-title", "WS", "--host", "127.0.0.1", "--allow", "store,query"),
        ("FAR", "--ae-title", "FAR", "--host", "10.255.1.2"),
        ("NEW", "--ae-title", "NEW", "--host", "localhost", "--status", "pending"),
        ("LOADER", "--ae-title", "LOADER", "--host", "localhost"),
    ):
        macpacs("nodes", "add", *args, "--port", "104", data_dir=data)
    server = ServerProcess(
        data, free_port(), free_port(), free_port(), env={"MACPACS_DICOM_ACCEPT_UNKNOWN_NODES": "false"}
    ).start()
    write_series(base / "in", 2, study_uid=CT_STUDY, size=32)
    run_tool("storescu", "-aet", "LOADER", *server.dicom_args(), "+sd", str(base / "in"))
    yield server
    server.stop()


def echo(server: ServerProcess, calling: str, called: str | None = None):
    args = ["-aet", calling, "-aec", called or server.ae_title, "127.0.0.1", str(server.dicom_port)]
    return run_tool("echoscu", *args, check=False)


def test_unregistered_ae_is_rejected_at_association_time(guarded):
    proc = echo(guarded, "STRANGER")
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stdout + proc.stderr
    assert guarded.logged("calling AE title 'STRANGER' is not a registered node")


def test_registered_node_is_accepted(guarded):
    assert echo(guarded, "WS").returncode == 0


def test_node_from_another_address_is_rejected(guarded):
    proc = echo(guarded, "FAR")
    assert "Calling AE Title Not Recognized" in proc.stdout + proc.stderr
    assert guarded.logged("registered at 10.255.1.2, not this address")


def test_pending_node_is_rejected(guarded):
    proc = echo(guarded, "NEW")
    assert "Calling AE Title Not Recognized" in proc.stdout + proc.stderr
    assert guarded.logged("awaiting approval")


def test_wrong_called_ae_is_rejected(guarded):
    proc = echo(guarded, "WS", called="NOTUS")
    assert "Called AE Title Not Recognized" in proc.stdout + proc.stderr


def test_node_without_retrieve_right_is_refused(guarded, tmp_path):
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={CT_STUDY}"]
    proc = run_tool("movescu", "-S", "-aet", "WS", "-aem", "LOADER", *guarded.dicom_args(), *keys, check=False)
    assert "0x124" in proc.stdout + proc.stderr  # Refused: Not Authorized (PS3.7 C.5); DCMTK has no name for it
    proc = run_tool("getscu", "-S", "-aet", "WS", "-od", str(tmp_path), *guarded.dicom_args(), *keys, check=False)
    assert not list(tmp_path.iterdir())
    assert guarded.logged("node WS (WS) is not allowed to retrieve")


def test_rights_change_applies_to_the_next_association(guarded, tmp_path):
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={CT_STUDY}"]
    assert run_tool("findscu", "-S", "-aet", "WS", *guarded.dicom_args(), *keys, check=False).returncode == 0
    macpacs("nodes", "edit", "WS", "--allow", "store", data_dir=guarded.data_dir)
    try:
        proc = run_tool("findscu", "-v", "-S", "-aet", "WS", *guarded.dicom_args(), *keys, check=False)
        assert "Find Response" in proc.stdout + proc.stderr
        assert "Pending" not in proc.stdout + proc.stderr  # no match returned
        assert guarded.logged("node WS (WS) is not allowed to query")
    finally:
        macpacs("nodes", "edit", "WS", "--allow", "store,query", data_dir=guarded.data_dir)


def test_accept_any_called_ae(make_server):
    server = make_server(env={"MACPACS_DICOM_ACCEPT_ANY_CALLED_AE": "true"})
    assert echo(server, "ANYONE", called="WHATEVER").returncode == 0
