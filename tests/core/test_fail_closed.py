"""DICOM access control fails closed (issue 15, finding 1).

pynetdicom runs the association check as a notification handler, which used to mean that an
error in it (here: the ``node`` table gone from under the running server) was logged and the
association accepted with full rights. Now any error rejects the association, whatever
``dicom.accept_unknown_nodes`` says, and the server goes on serving.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import requests

from tests.conftest import ServerProcess, run_tool
from tests.qr.conftest import macpacs

INTERNAL_ERROR = "internal error in the DICOM access check"


def _echo(server: ServerProcess, calling: str) -> tuple[int, str]:
    proc = run_tool("echoscu", "-aet", calling, *server.dicom_args(), check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _rename_table(database: Path, old: str, new: str) -> None:
    """Rename a table of the running server's index with SQLite itself, as another program could."""
    with sqlite3.connect(database, timeout=30) as conn:
        conn.execute(f"ALTER TABLE {old} RENAME TO {new}")


@pytest.mark.parametrize("accept_unknown", [False, True], ids=["registered-only", "unknown-allowed"])
def test_failing_node_lookup_rejects_the_association(make_server, tmp_path: Path, accept_unknown: bool):
    data = tmp_path / "data"
    macpacs("nodes", "add", "WS", "--ae-title", "WS", "--host", "127.0.0.1", "--port", "104", data_dir=data)
    server = make_server(
        data_dir=data, env={"MACPACS_DICOM_ACCEPT_UNKNOWN_NODES": "true" if accept_unknown else "false"}
    )
    assert _echo(server, "WS")[0] == 0
    assert server.logged("association accepted from WS@")
    accepted = server.log().count("association accepted from WS@")

    _rename_table(data / "index.sqlite", "node", "node_gone")
    try:
        code, output = _echo(server, "WS")
        assert code != 0
        assert "Association Rejected" in output, output  # an A-ASSOCIATE-RJ, not an abort
        assert server.logged(INTERNAL_ERROR)
        line = next(line for line in server.log().splitlines() if INTERNAL_ERROR in line)
        assert "association from WS@127.0.0.1:" in line and "no such table: node" in line, line
        assert server.log().count("association accepted from WS@") == accepted
        # The rest of the server still answers.
        alive = requests.get(f"http://127.0.0.1:{server.web_port}/testdbalive", timeout=30)
        assert alive.status_code == 200 and alive.text.strip() == "Test DB Alive succeeded"
    finally:
        _rename_table(data / "index.sqlite", "node_gone", "node")
    # Once the table is back, the same peer is admitted again, by the same server process.
    assert _echo(server, "WS")[0] == 0
    assert server.proc is not None and server.proc.poll() is None
