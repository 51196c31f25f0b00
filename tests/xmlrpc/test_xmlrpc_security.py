"""Issue 14, finding 1: the XML-RPC port refuses what a web page in a browser could send, and the
calls that change or stop something need credentials. A real ``macpacs serve``; clients are curl,
``http.client`` and ``xmlrpc.client``.

Each test here fails on the code before the fix: a ``text/plain`` POST with an ``Origin`` and any
``Host`` could delete every study or stop the server.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from macpacs.supervisor.probes import XMLRPC_PARAMS, XmlRpcProbe
from tests.conftest import MACPACS, ServerProcess, store_studies

from .test_xmlrpc import ADMIN, add_admin, call_body, find, patient_ids, post, proxy, start

STUDIES = [
    ("DOE^JOHN", "PID001", "20240115", "CT", "ACC001", "CT CHEST", 1),
    ("DOE^JANE", "PID002", "20240220", "MR", "ACC002", "MR BRAIN", 1),
    ("SMITH^ANNA", "PID003", "20231201", "CT", "ACC003", "CT ABDOMEN", 1),
]
READER = ("reader", "reader password")
DELETE_ALL = {"request": "TRUEPREDICATE", "table": "Study", "execute": "Delete"}


def users(data_dir: Path, *args: str, password: str | None = None) -> str:
    done = subprocess.run(
        [MACPACS, "users", *args, "--data-dir", str(data_dir)],
        input=None if password is None else password + "\n",
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.strip()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("xmlrpc-security")
    add_admin(base / "data")
    users(base / "data", "add", READER[0], "--role", "read", "--password-stdin", password=READER[1])
    server = start(base)
    server.token = users(base / "data", "token", ADMIN[0], "--name", "ris")  # type: ignore[attr-defined]
    store_studies(server, base / "in", STUDIES)
    yield server
    server.stop()


def all_there(server: ServerProcess) -> None:
    assert patient_ids(find(server, "TRUEPREDICATE")) == {"PID001", "PID002", "PID003"}


def error_of(body: bytes) -> dict[str, Any]:
    (reply,), _ = xmlrpc.client.loads(body)
    return reply


# -- requests no XML-RPC client sends ------------------------------------------------------------------


def test_cross_site_delete_is_refused(pacs: ServerProcess) -> None:
    """What a page on another site can send without a preflight: text/plain, with its Origin."""
    status, reason, body = post(
        pacs,
        call_body("DBWindowFind", DELETE_ALL),
        headers={"Content-Type": "text/plain", "Origin": "http://evil.test"},
    )
    assert status == 403 and "Origin header" in reason
    assert error_of(body)["error"] == "403"
    all_there(pacs)
    assert pacs.logged("XML-RPC: refused a call from 127.0.0.1: refused a request with an Origin header")


@pytest.mark.parametrize("origin", ["http://evil.test", "null", "http://127.0.0.1:8080"])
def test_any_origin_is_refused(pacs: ServerProcess, origin: str) -> None:
    status, reason, _ = post(pacs, call_body("DBWindowFind", XMLRPC_PARAMS), headers={"Origin": origin})
    assert status == 403 and "web pages may not call this port" in reason


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json", ""],
)
def test_content_type_other_than_xml_is_refused(pacs: ServerProcess, content_type: str) -> None:
    status, reason, body = post(pacs, call_body("DBWindowFind", XMLRPC_PARAMS), headers={"Content-Type": content_type})
    assert status == 403 and "send the call as text/xml" in reason
    assert "text/xml" in error_of(body)["message"]


@pytest.mark.parametrize("content_type", ["text/xml", "text/xml; charset=utf-8", "application/xml", "TEXT/XML"])
def test_xml_content_types_are_served(pacs: ServerProcess, content_type: str) -> None:
    status, _reason, body = post(pacs, call_body("DBWindowFind", XMLRPC_PARAMS), headers={"Content-Type": content_type})
    assert status == 200 and error_of(body) == {"error": "0", "elements": []}


@pytest.mark.parametrize(
    "host", ["evil.test", "evil.test:8080", "localhost.evil.test", "127.0.0.1.evil.test", "[::2]:8080", "a b", ":80"]
)
def test_host_not_naming_the_server_is_refused(pacs: ServerProcess, host: str) -> None:
    """DNS rebinding: a name of the attacker's resolving to 127.0.0.1 arrives with its own Host."""
    status, reason, _ = post(pacs, call_body("DBWindowFind", XMLRPC_PARAMS), headers={"Host": host})
    assert status == 403 and "is not a name of this server" in reason and "xmlrpc.allowed_host_names" in reason


def test_host_naming_the_server_is_served(pacs: ServerProcess) -> None:
    port = pacs.xmlrpc_port
    hostname = socket.gethostname()
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST.", hostname, f"{hostname}:{port}"):
        status, reason, _ = post(pacs, call_body("DBWindowFind", XMLRPC_PARAMS), headers={"Host": host})
        assert status == 200, (host, reason)


def test_request_without_host_is_served(pacs: ServerProcess) -> None:
    """HTTP/1.0 clients may send no Host at all; browsers always send one."""
    body = call_body("DBWindowFind", XMLRPC_PARAMS)
    head = f"POST / HTTP/1.0\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", pacs.xmlrpc_port), timeout=10) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 200")


def test_two_host_headers_are_refused(pacs: ServerProcess) -> None:
    body = call_body("DBWindowFind", XMLRPC_PARAMS)
    head = (
        "POST / HTTP/1.0\r\nHost: localhost\r\nHost: evil.test\r\nContent-Type: text/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", pacs.xmlrpc_port), timeout=10) as sock:
        sock.sendall(head + body)
        # The status line and the body may come in separate segments: read the whole answer.
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        detail = answer.read()
    assert answer.status == 403 and b"more than one Host" in detail, detail


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (["-H", "Content-Type: text/xml"], "200"),
        (["-H", "Content-Type: text/plain"], "403"),
        (["-H", "Content-Type: text/xml", "-H", "Origin: http://evil.test"], "403"),
        (["-H", "Content-Type: text/xml", "-H", "Host: rebound.evil.test:8080"], "403"),
    ],
)
def test_curl(pacs: ServerProcess, tmp_path: Path, headers: list[str], expected: str) -> None:
    body = tmp_path / "call.xml"
    body.write_bytes(call_body("DBWindowFind", XMLRPC_PARAMS))
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *headers, "--data-binary", f"@{body}",
         f"http://127.0.0.1:{pacs.xmlrpc_port}/"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert done.stdout == expected


# -- read-only calls and the watchdog: as before --------------------------------------------------------


def test_read_only_calls_need_no_credentials(pacs: ServerProcess) -> None:
    p = proxy(pacs)
    assert patient_ids(p.DBWindowFind({"request": 'name BEGINSWITH "DOE"', "table": "Study"})) == {"PID001", "PID002"}
    assert patient_ids(p.DisplayStudyListByPatientId({"PatientID": "PID003"})) == {"PID003"}
    assert "DBWindowFind" in p.system.listMethods()


def test_supervisor_probe_still_passes(pacs: ServerProcess) -> None:
    assert XmlRpcProbe(f"http://127.0.0.1:{pacs.xmlrpc_port}/").check(5.0) == 'error "0"'


# -- calls that change or stop something ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("DBWindowFind", DELETE_ALL),
        ("FindObject", {**DELETE_ALL, "execute": " DELETE "}),
        ("KillOsiriX", {}),
        ("killosirix", {}),
        ("Retrieve", {"serverName": "Remote", "filterKey": "PatientID", "filterValue": "1"}),
        ("CMove", {"accessionNumber": "ACC001", "server": "Remote"}),
    ],
)
def test_changing_calls_need_credentials(pacs: ServerProcess, method: str, params: dict[str, Any]) -> None:
    status, reason, body = post(pacs, call_body(method, params))
    assert status == 401 and "needs credentials" in reason and "xmlrpc.open_changes" in reason
    assert error_of(body)["error"] == "401"
    all_there(pacs)
    assert pacs.proc is not None and pacs.proc.poll() is None  # not stopped
    assert pacs.logged(f"XML-RPC: refused a call from 127.0.0.1: {method} changes the archive")


def test_wrong_credentials_are_refused_before_the_body_is_read(pacs: ServerProcess) -> None:
    with pytest.raises(xmlrpc.client.ProtocolError) as info:
        proxy(pacs, ("admin", "wrong password")).DBWindowFind(XMLRPC_PARAMS)
    assert info.value.errcode == 401 and "wrong user name or password" in info.value.errmsg
    with pytest.raises(xmlrpc.client.ProtocolError) as info:
        proxy(pacs, ("admin", "mpt_not-a-token")).DBWindowFind(XMLRPC_PARAMS)
    assert info.value.errcode == 401
    status, reason, _ = post(pacs, call_body("DBWindowFind", XMLRPC_PARAMS), headers={"Authorization": "Digest x"})
    assert status == 401 and "unsupported Authorization scheme" in reason


def test_a_read_user_may_not_retrieve_delete_or_stop(pacs: ServerProcess) -> None:
    p = proxy(pacs, READER)  # role "read": read and download, not send, delete or admin
    calls = (
        ("Retrieve", {"serverName": "Nowhere", "filterKey": "PatientID", "filterValue": "1"}, "send"),
        ("CMove", {"accessionNumber": "ACC001", "server": "Nowhere"}, "send"),
        ("DBWindowFind", DELETE_ALL, "delete"),
        ("KillOsiriX", {}, "admin"),
    )
    for method, params, right in calls:
        with pytest.raises(xmlrpc.client.ProtocolError) as info:
            getattr(p, method)(params)
        assert info.value.errcode == 403 and f"'reader' lacks the '{right}' right" in info.value.errmsg
    all_there(pacs)


def test_an_admin_deletes_with_password_or_token(pacs: ServerProcess) -> None:
    token: str = pacs.token  # type: ignore[attr-defined]
    reply = find(pacs, 'patientID == "PID001"', auth=ADMIN, execute="Delete")
    assert patient_ids(reply) == {"PID001"}
    # The token as the Basic password (for clients that only take user:secret@ in a URL) ...
    reply = find(pacs, 'patientID == "PID002"', auth=(ADMIN[0], token), execute="Delete")
    assert patient_ids(reply) == {"PID002"}
    # ... or as a bearer token.
    status, _reason, body = post(
        pacs,
        call_body("DBWindowFind", {"request": 'patientID == "NOBODY"', "table": "Study", "execute": "Delete"}),
        headers={"Authorization": f"Bearer {token}"},
    )
    assert status == 200 and error_of(body) == {"error": "0", "elements": []}
    assert patient_ids(find(pacs, "TRUEPREDICATE")) == {"PID003"}
    assert pacs.logged("delete (XML-RPC DBWindowFind from admin@127.0.0.1): 1 studies")
    # The rest of the module expects the three patients.
    store_studies(pacs, pacs.data_dir.parent / "again", STUDIES)


def test_wrong_passwords_are_throttled(pacs: ServerProcess) -> None:
    users(pacs.data_dir, "add", "victim", "--password-stdin", password="victim password")
    codes = []
    for i in range(6):
        with pytest.raises(xmlrpc.client.ProtocolError) as info:
            proxy(pacs, ("victim", f"guess {i}")).KillOsiriX({})
        codes.append(info.value.errcode)
    assert codes == [401] * 5 + [429]
    assert pacs.proc is not None and pacs.proc.poll() is None


# -- settings ----------------------------------------------------------------------------------------------


def test_allowed_host_names_and_open_changes(tmp_path: Path) -> None:
    server = start(
        tmp_path, {"MACPACS_XMLRPC_ALLOWED_HOST_NAMES": "pacs.example.org", "MACPACS_XMLRPC_OPEN_CHANGES": "true"}
    )
    try:
        body = call_body("DBWindowFind", XMLRPC_PARAMS)
        assert post(server, body, headers={"Host": "pacs.example.org:8080"})[0] == 200
        assert post(server, body, headers={"Host": "other.example.org"})[0] == 403
        # open_changes opens the changing calls to clients without credentials, not to web pages.
        status, reason, _ = post(server, call_body("KillOsiriX", {}), headers={"Origin": "http://evil.test"})
        assert status == 403 and "Origin" in reason
        assert proxy(server).KillOsiriX({}) == {"error": "0"}
        assert server.proc is not None and server.proc.wait(20) == 0
    finally:
        server.stop()
    assert server.logged("KillOsiriX from 127.0.0.1: stopping the server")


def test_a_malformed_allowed_host_name_stops_the_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [MACPACS, "serve", "--data-dir", str(tmp_path / "data")],
        env={"PATH": "/usr/bin:/bin", "MACPACS_XMLRPC_ALLOWED_HOST_NAMES": "http://pacs.example.org:8080"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "xmlrpc.allowed_host_names: 'http://pacs.example.org:8080' is not a host name" in done.stderr
