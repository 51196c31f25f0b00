"""Roles and per-user rights: every route checks the right it needs, the pages show only what the
user may do, and ``macpacs users rights`` changes them at once (issue 14, "Roles").

Before, a user was ``admin`` or ``read``, and any user could upload (STOW-RS), download and send.
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from tests.conftest import run_tool

from .accounts import add_user, page_token, token, users
from .conftest import start_server, uids

DICOM_FILES = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
PASSWORD = "a long password"


def stow_body(boundary: str = "rolesbound") -> tuple[bytes, dict[str, str]]:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + buffer.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("roles")
    data = root / "data"
    for name, role in (("ada", "admin"), ("uma", "user"), ("upton", "uploader"), ("rita", "read")):
        add_user(data, name, PASSWORD, role)
    server = start_server(data, env={"MACPACS_WEB_ANONYMOUS_READ": "off"})
    path = Path(get_testdata_file("CT_small.dcm"))
    run_tool("storescu", *server.dicom_args(), str(path))
    tokens = {name: token(data, name) for name in ("ada", "uma", "upton", "rita")}
    yield server, f"http://127.0.0.1:{server.web_port}", tokens, uids(path)
    server.stop()


def code(method: str, url: str, headers: dict[str, str], **kwargs: object) -> int:
    return requests.request(method, url, headers=headers, timeout=30, **kwargs).status_code  # type: ignore[arg-type]


def test_each_route_needs_its_right(site) -> None:
    _server, base, tokens, (study, series, sop) = site
    instance = f"{base}/dicom-web/studies/{study}/series/{series}/instances/{sop}"
    expected = {  # user: (search, metadata, DICOM files, ZIP, STOW-RS, node list)
        "ada": (200, 200, 200, 200, 200, 200),
        "uma": (200, 200, 200, 200, 403, 403),
        "upton": (403, 403, 403, 403, 200, 403),
        "rita": (200, 200, 200, 200, 403, 403),
    }
    for name, codes in expected.items():
        h = tokens[name]
        body, stow_headers = stow_body()
        got = (
            code("GET", f"{base}/dicom-web/studies", h),
            code("GET", f"{instance}/metadata", h),
            code("GET", instance, {**h, **DICOM_FILES}),
            code("GET", f"{base}/api/ui/studies/{study}/zip", h),
            code("POST", f"{base}/dicom-web/studies", {**h, **stow_headers}, data=body),
            code("GET", f"{base}/api/ui/nodes", h),
        )
        assert got == codes, name
    refused = requests.get(f"{base}/dicom-web/studies", headers=tokens["upton"], timeout=10).json()["detail"]
    assert refused == (
        "user 'upton' may not search and view studies: an admin can allow it with "
        "`macpacs users rights upton --grant read`"
    )


def test_send_and_delete_need_their_rights(site) -> None:
    _server, base, tokens, (study, _series, _sop) = site
    browser = requests.Session()  # the CSRF token of a browser without a session: its cookie's
    csrf = {"X-CSRF-Token": page_token(browser, f"{base}/login")}
    send = f"{base}/api/ui/studies/{study}/send"
    for name, status in (("uma", 404), ("rita", 403), ("upton", 403)):  # 404: past the check, no such node
        r = browser.post(send, json={"node": "nowhere"}, headers={**tokens[name], **csrf}, timeout=10)
        assert r.status_code == status, (name, r.text)
    for name, status in (("ada", 404), ("uma", 403), ("rita", 403)):  # 404: past the check, no such study
        r = browser.delete(f"{base}/api/ui/studies/1.2.3", headers={**tokens[name], **csrf}, timeout=10)
        assert r.status_code == status, (name, r.text)


def test_pages_show_only_what_the_user_may_do(site) -> None:
    _server, base, tokens, (study, _series, _sop) = site

    def page(name: str, path: str) -> requests.Response:
        return requests.get(base + path, headers=tokens[name], allow_redirects=False, timeout=10)

    admin, user, reader = (page(n, f"/studies/{study}").text for n in ("ada", "uma", "rita"))
    for text in (admin, user, reader):
        assert 'id="open-viewer"' in text
    assert 'id="delete"' in admin and 'id="send"' in admin and 'id="download-zip"' in admin
    assert 'id="delete"' not in user and 'id="send"' in user and 'id="download-zip"' in user
    assert 'id="delete"' not in reader and 'id="send"' not in reader and 'id="download-zip"' in reader
    assert 'href="/nodes"' in admin and 'href="/nodes"' not in user
    assert ">Upload</a>" not in user and ">Studies</a>" in user
    upload = page("upton", "/upload")
    assert upload.status_code == 200 and ">Upload</a>" in upload.text and ">Studies</a>" not in upload.text
    denied = page("upton", "/studies")
    assert denied.status_code == 403 and "may not search and view studies" in denied.text
    assert page("uma", "/nodes").status_code == 403


def test_rights_are_changed_with_the_cli_at_once(site) -> None:
    server, base, tokens, (study, _series, _sop) = site
    data = server.data_dir
    zip_url = f"{base}/api/ui/studies/{study}/zip"
    assert users(data, "rights", "rita", "--revoke", "download").strip() == "rita\tread\tread"
    assert code("GET", zip_url, tokens["rita"]) == 403
    assert code("GET", f"{base}/dicom-web/studies", tokens["rita"]) == 200
    assert users(data, "rights", "upton", "--grant", "read,download").strip() == "upton\tuploader\tdownload,read,upload"
    assert code("GET", zip_url, tokens["upton"]) == 200
    assert users(data, "rights", "rita", "--role", "user").strip() == "rita\tuser\tdownload,read,send"
    listing = users(data, "list")
    assert "upton\tuploader\tdownload,read,upload\t" in listing
    assert "ada\tadmin\tadmin,delete,download,read,send,upload\t" in listing
    bad = users(data, "rights", "rita", "--grant", "everything", check=False)
    assert "unknown right 'everything': the rights are read, download, send, upload, delete, admin" in bad
    made = users(data, "add", "kiosk", "--role", "uploader", "--password-stdin", password=PASSWORD)
    assert "user kiosk added (uploader: upload)" in made
    who = requests.get(f"{base}/api/whoami", auth=("kiosk", PASSWORD), timeout=30)
    assert who.status_code == 403  # whoami is a read
