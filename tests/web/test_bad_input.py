"""Issue 14, findings 5 and 8 (web): every UID in a URL is checked in every route, and every bad
parameter is a 400 with a message, never a 500 or a broken response. A real ``macpacs serve``
with two stored studies; clients are requests and raw sockets; hypothesis generates QIDO-RS and
study-list parameters.

The first tests fail on the code before the fix: ``DELETE /api/ui/studies/*`` deleted the whole
archive and ``GET /api/ui/studies/*/zip`` sent every patient.
"""

from __future__ import annotations

import io
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pydicom
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from tests.conftest import MACPACS, ServerProcess, run_tool
from tests.synthetic import write_series

from .accounts import page_token
from .conftest import start_server

ADMIN = ("admin", "admin password")


@dataclass
class Site:
    server: ServerProcess
    base: str
    study: str  # kept throughout
    series: str
    sop: str
    other: str  # deleted by the last UID test
    csrf: str
    session: requests.Session

    def dicom_web(self, path: str) -> str:
        return f"{self.base}/dicom-web{path}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("bad-input")
    data = root / "data"
    subprocess.run(
        [MACPACS, "users", "add", ADMIN[0], "--data-dir", str(data), "--password-stdin"],
        input=ADMIN[1] + "\n", check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    study, other = str(generate_uid()), str(generate_uid())
    kept = write_series(root / "a", 2, study_uid=study, size=16, patient_id="KEEP1")
    write_series(root / "b", 1, study_uid=other, size=16, patient_id="GONE1")
    server = start_server(data)
    try:
        run_tool("storescu", *server.dicom_args(), "+sd", "+r", str(root / "a"), str(root / "b"))
        ds = pydicom.dcmread(kept[0], stop_before_pixels=True)
        base = f"http://127.0.0.1:{server.web_port}"
        session = requests.Session()
        csrf = page_token(session, f"{base}/login")  # this browser's token (bound to its cookie)
        yield Site(server, base, study, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), other, csrf, session)
    finally:
        server.stop()


def studies(site: Site) -> set[str]:
    r = requests.get(site.dicom_web("/studies"), timeout=30)
    r.raise_for_status()
    return {s["0020000D"]["Value"][0] for s in r.json()}


# -- every UID in every route ------------------------------------------------------------------------

BAD_UIDS = ["*", "1.2.3*", "1.2.?", "1.2.3\\1.2.4", "1.2.3,1.2.4", "1.2 3", " ", "abc", "1.2.3'", "1.2\x00", "1." * 40]
ROUTES = [
    ("DELETE", "/api/ui/studies/{bad}"),
    ("GET", "/api/ui/studies/{bad}/zip"),
    ("POST", "/api/ui/studies/{bad}/send"),
    ("GET", "/api/ui/studies/{bad}/series/{series}/transfer-syntaxes"),
    ("GET", "/api/ui/studies/{study}/series/{bad}/transfer-syntaxes"),
    ("GET", "/studies/{bad}"),
    ("GET", "/viewer/{bad}"),
    ("GET", "/viewer/{study}?series={bad}"),
    ("GET", "/dicom-web/studies/{bad}/series"),
    ("GET", "/dicom-web/studies/{bad}/metadata"),
    ("GET", "/dicom-web/studies/{study}/series/{bad}/instances"),
    ("GET", "/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={bad}&contentType=application/dicom"),
]


@pytest.mark.parametrize("bad", BAD_UIDS)
@pytest.mark.parametrize(("method", "route"), ROUTES)
def test_every_route_refuses_a_bad_uid(site: Site, method: str, route: str, bad: str) -> None:
    url = site.base + route.format(bad=quote(bad, safe=""), study=site.study, series=site.series)
    headers = {"X-CSRF-Token": site.csrf}
    r = site.session.request(method, url, auth=ADMIN, headers=headers, json={"node": "NOWHERE"}, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    if r.headers["content-type"].startswith("text/html"):
        assert "Not a valid UID" in r.text and "is not a valid UID (digits and dots" in r.text
    elif route.startswith("/wado") and len(bad) > 64:  # refused by the parameter's declared length
        assert "objectUID: String should have at most 64 characters" in r.json()["detail"]
    else:
        assert "is not a valid UID (digits and dots" in r.json()["detail"]


def test_nothing_was_deleted_and_a_good_uid_still_works(site: Site) -> None:
    """Runs after the refusals above: both studies are still there; then one is deleted by UID."""
    assert studies(site) == {site.study, site.other}
    zipped = site.session.get(f"{site.base}/api/ui/studies/{site.study}/zip", timeout=30)
    assert zipped.status_code == 200 and zipped.content.startswith(b"PK")
    r = site.session.delete(
        f"{site.base}/api/ui/studies/{site.other}", auth=ADMIN, headers={"X-CSRF-Token": site.csrf}, timeout=30
    )
    assert r.status_code == 200, r.text
    assert studies(site) == {site.study}


# -- numbers out of range, text that is not Unicode ----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/dicom-web/series?SeriesNumber=" + "9" * 23, "out of range"),
        ("/dicom-web/series?SeriesNumber=" + "9" * 5000, "is not a whole number"),
        ("/dicom-web/instances?InstanceNumber=1e400", "is not a whole number"),
        ("/dicom-web/instances?Rows=-" + "9" * 20, "out of range"),
        ("/dicom-web/studies?limit=" + "9" * 30, "limit must be between"),
        ("/dicom-web/studies?limit=" + "9" * 5000, "limit must be a whole number"),
        ("/dicom-web/studies?limit=-1", "limit must be between"),
        ("/dicom-web/studies?offset=" + "9" * 30, "offset must be between"),
        ("/dicom-web/studies?limit=1e3", "limit must be a whole number"),
        ("/api/ui/studies?offset=" + "9" * 30, "offset 0-"),
        ("/api/ui/studies?limit=" + "9" * 30, "limit must be 1-"),
    ],
)
def test_numbers_out_of_range_are_400(site: Site, path: str, message: str) -> None:
    r = requests.get(site.base + path, timeout=30)
    assert r.status_code == 400 and message in r.json()["detail"], (r.status_code, r.text[:300])


def test_numbers_in_range_are_served(site: Site) -> None:
    assert requests.get(site.dicom_web("/series?SeriesNumber=1"), timeout=30).status_code == 200
    assert requests.get(site.dicom_web(f"/instances?Rows={2**63 - 1}"), timeout=30).json() == []
    assert requests.get(site.base + "/api/ui/studies?offset=1000000000", timeout=30).json()["studies"] == []


@pytest.mark.parametrize("value", ["%ED%A0%80", "%FF%FE", "%C3", "%00", "%E9t%E9"])
def test_text_that_is_not_utf8_in_a_query_is_not_a_server_error(site: Site, value: str) -> None:
    for path in (f"/dicom-web/studies?PatientName={value}", f"/api/ui/studies?name={value}"):
        r = requests.get(site.base + path, timeout=30)
        assert r.status_code in (200, 400), (path, r.status_code, r.text[:300])


def raw_request(site: Site, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", site.server.web_port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "target", [b"/dicom-web/studies?PatientName=\xff\xfe", b"/api/ui/studies/\xff/zip", b"/studies/\xc3\x28"]
)
def test_raw_bytes_that_are_not_utf8_are_not_a_server_error(site: Site, target: bytes) -> None:
    answer = raw_request(site, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500 or status == 200, answer[:300]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/ui/studies/{study}/send", b'{"node": "\\ud800"}'),
        ("POST", "/api/ui/nodes", b'{"name": "N\\udc00", "ae_title": "X", "host": "127.0.0.1", "port": 104}'),
        ("PUT", "/api/ui/nodes/N", b'{"description": "a\\ud800b"}'),
    ],
)
def test_a_lone_surrogate_in_json_is_400(site: Site, method: str, path: str, body: bytes) -> None:
    r = site.session.request(
        method,
        site.base + path.format(study=site.study),
        data=body,
        auth=ADMIN,
        headers={"X-CSRF-Token": site.csrf, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and "valid string" in r.json()["detail"], (r.status_code, r.text[:300])


def test_json_that_is_not_utf8_is_refused(site: Site) -> None:
    r = site.session.post(
        f"{site.base}/api/ui/studies/{site.study}/send",
        data=b'{"node": "\xff"}',
        headers={"X-CSRF-Token": site.csrf, "Content-Type": "application/json"},
        timeout=30,
    )
    assert 400 <= r.status_code < 500, r.text[:300]


def test_form_text_that_is_not_utf8_is_not_a_server_error(site: Site) -> None:
    boundary = "B0undary"
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
            for name, value in (("username", b"\xff\xfe"), ("password", b"x\xc3"), ("csrf_token", site.csrf.encode()))
        )
        + f"--{boundary}--\r\n".encode()
    )
    r = site.session.post(
        f"{site.base}/login",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        allow_redirects=False,
        timeout=30,
    )
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])


# -- header values are never built from unchecked text ------------------------------------------------


def _file_with_study_uid(folder: Path, study_uid: str) -> bytes:
    ds = pydicom.dcmread(write_series(folder, 1, size=8)[0])
    with pydicom.config.disable_value_validation():
        ds.StudyInstanceUID = study_uid
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("target", ["/studies/1.2.3.4", "/studies"])
def test_stow_warning_header_survives_cr_lf_in_a_uid(site: Site, target: str, tmp_path: Path) -> None:
    boundary = "XXbound"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + _file_with_study_uid(tmp_path, '1.2.3\r\nX-Injected: yes\r\n\r\n"quoted"\\')
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    r = requests.post(site.dicom_web(target), data=body, headers=headers, timeout=30)
    assert r.status_code == 409, r.text[:300]
    assert "x-injected" not in r.headers
    warning = r.headers["warning"]
    assert warning.startswith('299 macpacs "') and "\r" not in warning and "\n" not in warning
    assert r.json()["00081198"]["Value"]  # the refusal itself is in the body


# -- generated parameters ---------------------------------------------------------------------------------

QIDO_KEYS = ["PatientName", "PatientID", "StudyDate", "StudyTime", "SeriesNumber", "InstanceNumber", "Rows",
             "StudyInstanceUID", "SeriesInstanceUID", "ModalitiesInStudy", "AccessionNumber", "00100010",
             "0020000D", "includefield", "limit", "offset", "fuzzymatching", "PatientBirthDate",
             "ReferencedSOPSequence.x"]  # fmt: skip
LIST_KEYS = ["name", "patient_id", "accession", "description", "modality", "date_from", "date_to", "sort", "order",
             "limit", "offset"]  # fmt: skip
VALUES = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats().map(str),
    st.binary(max_size=20),
    st.sampled_from(["*", "", "2024-01-01-02", "20240101-", "-", "1\\2", "true", "all", "9" * 5000, "1e400"]),
)


def _encode(value: str | bytes) -> str:
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    return quote(raw, safe="")


def _query(pairs: list[tuple[str, str | bytes]]) -> str:
    return "&".join(f"{_encode(k)}={_encode(v)}" for k, v in pairs)


def _no_server_error(site: Site, url: str) -> None:
    started = time.monotonic()
    r = requests.get(url, timeout=15)
    assert time.monotonic() - started < 15
    assert r.status_code < 500, (url[:300], r.status_code, r.text[:300])
    if r.status_code == 400:
        assert r.text  # the reason


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(
        ["/studies", "/series", "/instances", "/studies/{study}/series", "/studies/{study}/instances"]
    ),
    pairs=st.lists(st.tuples(st.one_of(st.sampled_from(QIDO_KEYS), st.text(max_size=10)), VALUES), max_size=5),
)
def test_generated_qido_parameters(site: Site, path: str, pairs: list[tuple[str, str | bytes]]) -> None:
    _no_server_error(site, site.dicom_web(path.format(study=site.study)) + "?" + _query(pairs))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(st.sampled_from(LIST_KEYS), VALUES), max_size=5))
def test_generated_study_list_parameters(site: Site, pairs: list[tuple[str, str | bytes]]) -> None:
    _no_server_error(site, f"{site.base}/api/ui/studies?{_query(pairs)}")
