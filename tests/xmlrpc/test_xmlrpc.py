"""OsiriX XML-RPC against a real ``macpacs serve`` loaded with DCMTK storescu (issue 4, XML-RPC part).

Clients are the standard library's ``xmlrpc.client`` and raw ``http.client`` (for bodies no
well-behaved client sends: XML bombs, oversized or malformed calls).
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
import xmlrpc.client
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from macpacs.supervisor.probes import XMLRPC_PARAMS, XmlRpcProbe
from tests.conftest import MACPACS, ServerProcess, findscu, free_port, run_tool, store_studies, wait_for_port

STUDIES = [
    # name, patient id, date, modality, accession, description, slices
    ("DOE^JOHN", "PID001", "20240115", "CT", "ACC001", "CT CHEST", 3),
    ("DOE^JANE", "PID002", "20240220", "MR", "ACC002", "MR BRAIN", 2),
    ("SMITH^ANNA", "PID003", "20231201", "CT", "ACC003", "CT ABDOMEN", 4),
    ('O\'BRIEN^"JIM"', "PID004", "20220704", "MR", "ACC004", "MR KNEE", 1),
]
ALL = {"PID001", "PID002", "PID003", "PID004"}
NSDATE_EPOCH = datetime(2001, 1, 1, tzinfo=UTC)


def start(base: Path, env: dict[str, str] | None = None) -> ServerProcess:
    # TZ=UTC: DICOM dates are local time; pinning the zone makes the NSDate strings predictable.
    server = ServerProcess(base / "data", free_port(), free_port(), free_port(), env={"TZ": "UTC", **(env or {})})
    server.start()
    wait_for_port(server.xmlrpc_port, proc=server.proc)
    return server


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("xmlrpc")
    server = start(base)
    server.uids = store_studies(server, base / "in", STUDIES)  # type: ignore[attr-defined]
    yield server
    server.stop()


ADMIN = ("admin", "admin password")


def add_admin(data_dir: Path) -> None:
    """An admin user (``ADMIN``) in the archive, for the calls that change or stop something."""
    subprocess.run(
        [MACPACS, "users", "add", ADMIN[0], "--data-dir", str(data_dir), "--password-stdin"],
        input=ADMIN[1] + "\n",
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )


def proxy(server: ServerProcess, auth: tuple[str, str] | None = None) -> xmlrpc.client.ServerProxy:
    credentials = f"{auth[0]}:{auth[1]}@" if auth else ""
    return xmlrpc.client.ServerProxy(f"http://{credentials}127.0.0.1:{server.xmlrpc_port}/")


def find(
    server: ServerProcess, request: str, table: str = "Study", auth: tuple[str, str] | None = None, **extra: str
) -> dict[str, Any]:
    return proxy(server, auth).DBWindowFind({"request": request, "table": table, **extra})


def patient_ids(reply: dict[str, Any]) -> set[str]:
    assert reply["error"] == "0", reply
    return {e["patientID"] for e in reply["elements"]}


def post(
    server: ServerProcess,
    body: bytes,
    *,
    path: str = "/",
    source: str | None = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, str, bytes]:
    """A raw HTTP request; returns (status, reason, body)."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", server.xmlrpc_port, timeout=15, source_address=(source, 0) if source else None
    )
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "text/xml", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.reason, response.read()
    finally:
        conn.close()


def call_body(method: str, params: Any) -> bytes:
    return xmlrpc.client.dumps((params,), methodname=method).encode()


def seconds_since_2001(text: str) -> float:
    return (datetime.fromisoformat(text).replace(tzinfo=UTC) - NSDATE_EPOCH).total_seconds()


# -- DBWindowFind ------------------------------------------------------------------------------------


def test_study_elements_have_osirix_names(archive: ServerProcess) -> None:
    reply = find(archive, 'patientID == "PID001"')
    assert reply["error"] == "0"
    [study] = reply["elements"]
    assert study == {
        "name": "DOE^JOHN",
        "patientID": "PID001",
        "dateOfBirth": "1970-01-01 00:00:00 +0000",
        "patientSex": "M",
        "studyInstanceUID": archive.uids["PID001"],  # type: ignore[attr-defined]
        "accessionNumber": "ACC001",
        "id": "1",
        "studyName": "CT CHEST",
        "date": "2024-01-15 10:15:00 +0000",
        "modality": "CT",
        "referringPhysician": "WELBY^MARCUS",
        "numberOfImages": "3",
    }


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ('name LIKE "DOE*"', {"PID001", "PID002"}),
        ('name LIKE[c] "doe*"', {"PID001", "PID002"}),
        ('name LIKE "doe*"', set()),
        ('name LIKE "DOE^J?HN"', {"PID001"}),
        ('name BEGINSWITH "SMITH"', {"PID003"}),
        ('name ENDSWITH[c] "jane"', {"PID002"}),
        ('name CONTAINS[c] "o\'brien"', {"PID004"}),
        (r"name == 'O\'BRIEN^\"JIM\"'", {"PID004"}),
        ('name ==[c] "doe^john"', {"PID001"}),
        ('name CONTAINS "%"', set()),
        ('name CONTAINS "_"', set()),
        ('name LIKE "*%*"', set()),
        ('patientID == "PID001" OR patientID == "PID003"', {"PID001", "PID003"}),
        ('patientID == "PID001" || patientID == "PID003" && name == "nobody"', {"PID001"}),
        ('(patientID == "PID001" || patientID == "PID003") && name BEGINSWITH "S"', {"PID003"}),
        ('NOT patientID == "PID001"', {"PID002", "PID003", "PID004"}),
        ('patientID != "PID002" && !(modality == "CT")', {"PID004"}),
        ('modality == "MR"', {"PID002", "PID003", "PID004"}),
        ('modality IN {"US", "CT"}', {"PID001", "PID003"}),
        ('accessionNumber IN {"ACC002", "ACC004"}', {"PID002", "PID004"}),
        ('studyName CONTAINS "BRAIN"', {"PID002"}),
        ('StudyDescription LIKE "CT*"', {"PID001", "PID003"}),
        ("numberOfImages > 3", {"PID003"}),
        ("numberOfImages <= 2", {"PID002", "PID004"}),
        ('date >= CAST("2024-01-01", "NSDate")', {"PID001", "PID002"}),
        (f'date < CAST({seconds_since_2001("2024-01-01T00:00:00")}, "NSDate")', {"PID003", "PID004"}),
        ('date BETWEEN {"2023-12-01", "2024-01-15"}', {"PID001", "PID003"}),
        ('date > CAST("2024-01-15 10:15:00 +0000", "NSDate")', {"PID002"}),
        ('date >= CAST("2024-01-15 10:15:00 +0000", "NSDate")', {"PID001", "PID002"}),
        ('date <= CAST("2024-01-15 10:14:59 +0000", "NSDate")', {"PID003", "PID004"}),
        ('date == "2024-01-15"', {"PID001"}),
        ('date == "20240115"', {"PID001"}),
        ('dateOfBirth == "1970-01-01"', ALL),
        ("TRUEPREDICATE", ALL),
        ("FALSEPREDICATE", set()),
    ],
)
def test_study_predicates(archive: ServerProcess, request_: str, expected: set[str]) -> None:
    assert patient_ids(find(archive, request_)) == expected


def test_series_and_image_tables(archive: ServerProcess) -> None:
    series = find(archive, 'study.patientID == "PID003"', "Series")["elements"]
    assert sorted(s["modality"] for s in series) == ["CT", "MR"]
    assert {s["numberOfImages"] for s in series} == {"4", "2"}
    assert all(s["seriesDICOMUID"] == s["seriesInstanceUID"] for s in series)
    [mr] = find(archive, 'modality == "MR" AND study.name BEGINSWITH "SMITH"', "series")["elements"]
    assert mr["name"] == "MR T1"

    images = find(archive, f'series.seriesDICOMUID == "{mr["seriesDICOMUID"]}"', "Image")["elements"]
    assert sorted(i["instanceNumber"] for i in images) == ["1", "2"]
    assert {i["width"] for i in images} == {"32"} and {i["modality"] for i in images} == {"MR"}
    some = find(archive, 'series.study.patientID == "PID001" AND instanceNumber >= 2', "IMAGE")["elements"]
    assert sorted(i["instanceNumber"] for i in some) == ["2", "3"]
    uid = some[0]["sopInstanceUID"]
    assert [i["sopInstanceUID"] for i in find(archive, f'sopInstanceUID == "{uid}"', "Image")["elements"]] == [uid]


def test_execute_values_and_aliases(archive: ServerProcess) -> None:
    p = proxy(archive)
    for execute in ("Select", "Open", "Nothing", "", "select"):
        assert patient_ids(
            p.DBWindowFind({"request": 'patientID == "PID001"', "table": "Study", "execute": execute})
        ) == {"PID001"}
    # Method names are case-insensitive; FindObject is DBWindowFind.
    for name in ("dbwindowfind", "DBWINDOWFIND", "FindObject", "findobject"):
        assert patient_ids(getattr(p, name)({"request": 'patientID == "PID002"', "table": "Study"})) == {"PID002"}


def test_supervisor_probe_passes(archive: ServerProcess) -> None:
    """supervisor/probes.py's check: DBWindowFind on Study matching nothing must answer error "0"."""
    assert find(archive, XMLRPC_PARAMS["request"]) == {"error": "0", "elements": []}
    assert XmlRpcProbe(f"http://127.0.0.1:{archive.xmlrpc_port}/").check(5.0) == 'error "0"'


# -- bad input -----------------------------------------------------------------------------------------


def refused(
    server: ServerProcess, params: Any, method: str = "DBWindowFind", auth: tuple[str, str] | None = None
) -> xmlrpc.client.ProtocolError:
    with pytest.raises(xmlrpc.client.ProtocolError) as info:
        getattr(proxy(server, auth), method)(params)
    return info.value


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"request": 'name == "x" OR 1=1', "table": "Study"}, "comparison between two constants (1 = 1)"),
        ({"request": "name == 'x' OR name == name", "table": "Study"}, "comparing two attributes"),
        ({"request": 'name == \'x" OR "1"="1', "table": "Study"}, "never closed"),
        ({"request": 'name == "x"; DELETE FROM study', "table": "Study"}, "unexpected ';'"),
        ({"request": 'name == "' + "x" * 200_000 + '"', "table": "Study"}, "characters long"),
        ({"request": "(" * 100 + "name == 'x'" + ")" * 100, "table": "Study"}, "levels deep"),
        ({"request": 'name LIKE "' + "x" * 2000 + '"', "table": "Study"}, "limit 1024"),
        ({"request": 'name == "x"', "table": "Patient"}, "not one of Study, Series, Image"),
        ({"request": 'name == "x"', "table": "Study", "execute": "Drop"}, "not one of Select"),
        ({"request": 'name == "x"', "table": ""}, "needs request"),
        ({"table": "Study"}, "needs request"),
        ({"request": 'sopInstanceUID == "1"', "table": "Study"}, "not an attribute of Study"),
        ({"request": 'name MATCHES ".*"', "table": "Study"}, "MATCHES"),
        ({"request": "date > 12", "table": "Study"}, "is a date"),
        ({"request": 'numberOfImages > "many"', "table": "Study"}, "not a number"),
        ("just a string", "needs request"),
    ],
)
def test_bad_requests_get_400_with_a_message(archive: ServerProcess, params: Any, message: str) -> None:
    error = refused(archive, params)
    assert error.errcode == 400
    assert message in error.errmsg


def test_injection_strings_are_only_values(archive: ServerProcess) -> None:
    for request in (
        "name == \"x' OR '1'='1\"",
        r'name == "x\"; DROP TABLE study; --"',
        'name LIKE "*\') OR 1=1 --"',
        "patientID IN {\"1) OR (1=1\", 'x'}",
    ):
        assert find(archive, request) == {"error": "0", "elements": []}
    assert patient_ids(find(archive, "TRUEPREDICATE")) == ALL  # nothing dropped, nothing changed


def test_error_body_is_an_osirix_struct(archive: ServerProcess) -> None:
    status, reason, body = post(archive, call_body("DBWindowFind", {"request": "1 == 1", "table": "Study"}))
    assert status == 400 and "two constants" in reason
    (reply,), _ = xmlrpc.client.loads(body)
    assert reply["error"] == "400" and "two constants" in reply["message"]
    # OsiriX's 400 for a missing parameter (DisplaySeries with neither key).
    assert refused(archive, {}, "DisplaySeries").errcode == 400


def test_unknown_method_is_http_500(archive: ServerProcess) -> None:
    error = refused(archive, {}, "OpenDB")
    assert error.errcode == 500 and "unknown XML-RPC method 'OpenDB'" in error.errmsg
    status, _reason, body = post(archive, call_body("NoSuchThing", {}))
    assert status == 500
    with pytest.raises(xmlrpc.client.Fault, match="unknown XML-RPC method"):
        xmlrpc.client.loads(body)


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<methodCall><methodName>DBWindowFind</methodName><params><param><value><struct>
<member><name>request</name><value>name == "&lol9;"</value></member>
<member><name>table</name><value>Study</value></member>
</struct></value></param></params></methodCall>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE x [ <!ENTITY ext SYSTEM "file:///etc/passwd"> ]>
<methodCall><methodName>DBWindowFind</methodName><params><param><value><string>&ext;</string></value></param>
</params></methodCall>"""


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (BILLION_LAUGHS, 400, "entities and DTDs are not accepted"),
        (EXTERNAL_ENTITY, 400, "entities and DTDs are not accepted"),
        (b'<?xml version="1.0"?><!DOCTYPE methodCall><methodCall/>', 400, "entities and DTDs"),
        (b"<methodCall><methodName>DBWindowFind</methodName><params>", 400, "not a valid XML-RPC"),
        (b"this is not xml", 400, "not a valid XML-RPC"),
        (b"<methodCall><params/></methodCall>", 400, "not a valid XML-RPC"),
        (b"<foo/>", 400, "not a valid XML-RPC"),
        (
            b"<methodCall><methodName>x</methodName><params><param><value><int>x</int></value></param>"
            b"</params></methodCall>",
            400,
            "not a valid XML-RPC",
        ),
    ],
)
def test_hostile_bodies(archive: ServerProcess, body: bytes, status: int, reason: str) -> None:
    started = time.monotonic()
    got_status, got_reason, _ = post(archive, body)
    assert (got_status, reason in got_reason) == (status, True), got_reason
    assert time.monotonic() - started < 10
    assert find(archive, XMLRPC_PARAMS["request"])["error"] == "0"  # still serving


def test_oversized_body_is_refused_before_it_is_read(archive: ServerProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", archive.xmlrpc_port, timeout=15)
    try:
        conn.putrequest("POST", "/")
        conn.putheader("Content-Type", "text/xml")
        conn.putheader("Content-Length", str(1024 * 1024 + 1))
        conn.endheaders()  # no body sent: the answer must not wait for it
        response = conn.getresponse()
        assert response.status == 413 and "limit 1048576" in response.reason
    finally:
        conn.close()
    assert post(archive, b"<methodCall/>", headers={"Content-Encoding": "gzip"})[0] == 415


def test_any_path_but_only_post(archive: ServerProcess) -> None:
    body = call_body("DBWindowFind", XMLRPC_PARAMS)
    for path in ("/", "/RPC2", "/anything/at/all"):
        status, _reason, reply = post(archive, body, path=path)
        assert status == 200 and xmlrpc.client.loads(reply)[0][0]["error"] == "0"
    assert post(archive, b"", method="GET")[0] == 405


# An XML-RPC call whose body never arrives: its headers pass every check, then the server waits.
STUCK_REQUEST = b"POST / HTTP/1.0\r\nContent-Type: text/xml\r\nContent-Length: 500\r\n\r\n<methodCall>"


def test_a_slow_client_does_not_block_others(archive: ServerProcess) -> None:
    """A client stuck halfway through its request holds no call slot (many of them: test_slowloris.py)."""
    with socket.create_connection(("127.0.0.1", archive.xmlrpc_port)) as stuck:
        stuck.sendall(STUCK_REQUEST)
        started = time.monotonic()
        assert find(archive, XMLRPC_PARAMS["request"])["error"] == "0"
        assert time.monotonic() - started < 5


# -- the Display methods ---------------------------------------------------------------------------------


def test_display_study(archive: ServerProcess) -> None:
    p = proxy(archive)
    uid = archive.uids["PID002"]  # type: ignore[attr-defined]
    for params in (
        {"PatientID": "PID002"},
        {"StudyInstanceUID": uid},
        {"AccessionNumber": "ACC002"},
        {"patientID": "PID002", "StudyID": "1"},
    ):
        reply = p.DisplayStudy(params)
        assert reply["error"] == "0" and [e["studyInstanceUID"] for e in reply["elements"]] == [uid]
    assert p.DisplayStudy({"PatientID": "NOBODY"}) == {"error": "-1"}
    assert refused(archive, {"PatientID": ""}, "DisplayStudy").errcode == 400


def test_display_series(archive: ServerProcess) -> None:
    p = proxy(archive)
    reply = p.DisplaySeries({"PatientID": "PID003"})
    assert reply["error"] == "0" and len(reply["elements"]) == 2
    uid = reply["elements"][0]["seriesDICOMUID"]
    assert [e["seriesDICOMUID"] for e in p.displayseries({"SeriesInstanceUID": uid})["elements"]] == [uid]
    assert p.DisplaySeries({"PatientID": "PID001", "SeriesInstanceUID": uid}) == {"error": "-1"}
    assert refused(archive, {"PatientID": "", "SeriesInstanceUID": ""}, "DisplaySeries").errcode == 400


def test_display_study_lists(archive: ServerProcess) -> None:
    p = proxy(archive)
    assert patient_ids(p.DisplayStudyListByPatientName({"PatientName": "doe"})) == {"PID001", "PID002"}
    assert patient_ids(p.DisplayStudyListByPatientId({"PatientID": "PID004"})) == {"PID004"}
    assert refused(archive, {}, "DisplayStudyListByPatientName").errcode == 400
    assert refused(archive, {"PatientID": ""}, "DisplayStudyListByPatientId").errcode == 400


def test_list_methods(archive: ServerProcess) -> None:
    methods = set(proxy(archive).system.listMethods())
    assert {
        "DBWindowFind",
        "FindObject",
        "DisplayStudy",
        "DisplaySeries",
        "DisplayStudyListByPatientName",
        "DisplayStudyListByPatientId",
        "KillOsiriX",
        "system.listMethods",
    } <= methods
    assert set(getattr(proxy(archive), "SYSTEM.LISTMETHODS")()) == methods


# -- servers of their own: delete, access, shutdown ----------------------------------------------------


def stored_files(server: ServerProcess) -> int:
    return sum(1 for _ in (server.data_dir / "files").glob("??/??/*.dcm"))


def test_delete_removes_rows_and_files(tmp_path: Path) -> None:
    add_admin(tmp_path / "data")
    server = start(tmp_path)
    try:
        store_studies(server, tmp_path / "in", STUDIES)
        assert stored_files(server) == 12
        # One image of DOE^JOHN's series.
        [image] = find(server, 'series.study.patientID == "PID001" AND instanceNumber == 2', "Image")["elements"]
        reply = find(server, f'sopInstanceUID == "{image["sopInstanceUID"]}"', "Image", ADMIN, execute="Delete")
        assert reply["error"] == "0" and len(reply["elements"]) == 1
        assert stored_files(server) == 11
        assert find(server, 'patientID == "PID001"')["elements"][0]["numberOfImages"] == "2"

        # The MR series of SMITH^ANNA: the study stays, with its CT series, counts and modalities updated.
        reply = find(server, 'study.patientID == "PID003" AND modality == "MR"', "Series", ADMIN, execute="Delete")
        assert [e["modality"] for e in reply["elements"]] == ["MR"]
        assert stored_files(server) == 9
        [study] = find(server, 'patientID == "PID003"')["elements"]
        assert (study["modality"], study["numberOfImages"]) == ("CT", "4")

        # Whole studies: patients disappear with their last study; C-FIND agrees.
        reply = find(server, 'name BEGINSWITH "DOE"', "Study", ADMIN, execute="delete")
        assert patient_ids(reply) == {"PID001", "PID002"}
        assert stored_files(server) == 5
        assert patient_ids(find(server, "TRUEPREDICATE")) == {"PID003", "PID004"}
        found = findscu(server, tmp_path / "rsp", "QueryRetrieveLevel=PATIENT", "PatientID", model="-P")
        assert sorted(ds.PatientID for ds in found) == ["PID003", "PID004"]
        counts = findscu(
            server,
            tmp_path / "rsp",
            "QueryRetrieveLevel=STUDY",
            "PatientID=PID003",
            "NumberOfStudyRelatedInstances",
            "NumberOfStudyRelatedSeries",
            "ModalitiesInStudy",
        )
        assert [(int(d.NumberOfStudyRelatedInstances), int(d.NumberOfStudyRelatedSeries)) for d in counts] == [(4, 1)]
        assert counts[0].ModalitiesInStudy == "CT"

        # Matching nothing deletes nothing; the deleted study can be stored again.
        assert find(server, 'patientID == "NOBODY"', auth=ADMIN, execute="Delete") == {"error": "0", "elements": []}
        run_tool("storescu", *server.dicom_args(), "+sd", "+r", str(tmp_path / "in" / "PID002"))
        assert patient_ids(find(server, 'patientID == "PID002"')) == {"PID002"}
        assert stored_files(server) == 7
    finally:
        server.stop()
    assert "delete (XML-RPC DBWindowFind from admin@127.0.0.1): 2 studies, 2 series, 4 instances, 2 patients" in (
        server.log()
    )


def test_access_localhost_only_unless_allowed(tmp_path: Path) -> None:
    """127.0.0.2 is a loopback address but not "localhost" (127.0.0.1/::1): refused until allowed."""
    body = call_body("DBWindowFind", XMLRPC_PARAMS)
    server = start(tmp_path / "a")
    try:
        status, reason, reply = post(server, body, source="127.0.0.2")
        assert status == 403 and "127.0.0.2" in reason and "xmlrpc.allowed_hosts" in reason
        assert xmlrpc.client.loads(reply)[0][0]["error"] == "403"
        assert post(server, body)[0] == 200
    finally:
        server.stop()
    assert server.logged("refused a call from 127.0.0.2")

    allowing = start(tmp_path / "b", {"MACPACS_XMLRPC_ALLOWED_HOSTS": "10.9.8.0/24, 127.0.0.2"})
    try:
        assert post(allowing, body, source="127.0.0.2")[0] == 200
        assert post(allowing, body, source="127.0.0.3")[0] == 403
    finally:
        allowing.stop()


def test_kill_osirix_stops_the_server_gracefully(tmp_path: Path) -> None:
    add_admin(tmp_path / "data")
    server = start(tmp_path)
    assert proxy(server, ADMIN).KillOsiriX({}) == {"error": "0"}
    assert server.proc is not None
    assert server.proc.wait(20) == 0
    assert not server.pid_file_path().exists()
    assert server.logged("KillOsiriX from admin@127.0.0.1: stopping the server")


def test_disabled(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "data", free_port(), free_port(), free_port(), env={"MACPACS_XMLRPC_ENABLED": "false"}
    ).start()
    try:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.xmlrpc_port), timeout=2).close()
    finally:
        server.stop()


# -- Retrieve and CMove: our archive (A) pulls from another macpacs (B) ---------------------------------


def add_node(server: ServerProcess, name: str, peer: ServerProcess) -> None:
    subprocess.run(
        [
            MACPACS,
            "nodes",
            "add",
            name,
            "--data-dir",
            str(server.data_dir),
            "--ae-title",
            peer.ae_title,
            "--host",
            "127.0.0.1",
            "--port",
            str(peer.dicom_port),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def wait_for_images(server: ServerProcess, patient_id: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find(server, f'patientID == "{patient_id}"')["elements"]
        if found and found[0]["numberOfImages"] == str(count):
            return
        time.sleep(0.2)
    raise AssertionError(f"{patient_id}: {count} images did not arrive within {timeout} s\n{server.log()[-3000:]}")


def test_retrieve_and_cmove_from_another_node(tmp_path: Path) -> None:
    ours = ServerProcess(tmp_path / "a" / "data", free_port(), free_port(), free_port(), ae_title="PACSA").start()
    remote = ServerProcess(tmp_path / "b" / "data", free_port(), free_port(), free_port(), ae_title="PACSB").start()
    try:
        wait_for_port(ours.xmlrpc_port, proc=ours.proc)
        store_studies(remote, tmp_path / "b" / "in", STUDIES)
        add_node(ours, "Remote", remote)
        add_node(remote, "ArchiveA", ours)  # C-MOVE destination PACSA
        unreachable = ServerProcess(tmp_path / "c", free_port(), 0, 0, ae_title="GONE")
        add_node(ours, "Gone", unreachable)
        add_admin(ours.data_dir)
        p = proxy(ours, ADMIN)

        assert p.Retrieve({"serverName": "Remote", "filterKey": "PatientID", "filterValue": "PID001"}) == {"error": "0"}
        wait_for_images(ours, "PID001", 3)
        # Several filters, C-GET (retrieveMode 1): no registration needed, instances come back on the association.
        assert p.retrieve(
            {
                "serverName": "Remote",
                "filterKey": "PatientName",
                "filterValue": "DOE*",
                "filterKey2": "StudyDate",
                "filterValue2": "20240220",
                "retrieveMode": 1,
            }
        ) == {"error": "0"}
        wait_for_images(ours, "PID002", 2)
        assert p.CMove({"accessionNumber": "ACC003", "server": "Remote"}) == {"error": "0"}
        wait_for_images(ours, "PID003", 6)

        assert p.Retrieve({"serverName": "Nowhere", "filterKey": "PatientID", "filterValue": "1"}) == {"error": "-2"}
        assert p.Retrieve({"serverName": "Remote", "filterKey": "PatientID", "filterValue": "NOBODY"}) == {
            "error": "-3"
        }
        assert p.Retrieve({"serverName": "Gone", "filterKey": "PatientID", "filterValue": "PID004"}) == {"error": "-1"}
        assert p.CMove({"accessionNumber": "ACC004", "server": "Nowhere"}) == {"error": "-1"}
        assert refused(ours, {"filterKey": "PatientID", "filterValue": "1"}, "Retrieve", ADMIN).errcode == 400
        bad_key = {"serverName": "Remote", "filterKey": "Patient'ID", "filterValue": "1"}
        error = refused(ours, bad_key, "Retrieve", ADMIN)
        assert error.errcode == 400 and "not a DICOM keyword" in error.errmsg
        assert refused(ours, {"accessionNumber": "", "server": "Remote"}, "CMove", ADMIN).errcode == 400
    finally:
        ours.stop()
        remote.stop()
