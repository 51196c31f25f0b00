"""STOW-RS and upload limits (issue 14, finding 10): a request size limit that is sane by
default (1 GB, not 4), and a cap on uploads received at once (more get 503 with Retry-After),
on a real ``macpacs serve``. The free-space guard while parts stream in is in
tests/core/test_disk_full.py (it needs a small file system of its own)."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pydicom.data import get_testdata_file

from macpacs.pacs_server.config import Settings
from tests.conftest import ServerProcess, free_port

BOUNDARY = "uploadLimits"
HEADERS = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}


def body(data: bytes) -> bytes:
    return (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(
        data_dir=tmp_path_factory.mktemp("uploads") / "data",
        dicom_port=free_port(),
        web_port=free_port(),
        xmlrpc_port=free_port(),
        env={"MACPACS_WEB_MAX_CONCURRENT_UPLOADS": "1"},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def url(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.web_port}/dicom-web/studies"


def staged(server: ServerProcess) -> list[str]:
    return sorted(p.name for p in (server.data_dir / "tmp").iterdir())


def test_the_default_size_limit_is_one_gigabyte(server: ServerProcess) -> None:
    assert Settings().web.max_upload_mb == 1024
    assert Settings().web.max_concurrent_uploads == 4
    # A 1.5 GB upload is refused from its headers, before a byte of its body is read.
    with socket.create_connection(("127.0.0.1", server.web_port), timeout=10) as sock:
        sock.sendall(
            b"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Content-Type: {HEADERS['Content-Type']}\r\nContent-Length: {1536 * 1024 * 1024}\r\n\r\n".encode()
        )
        # The status line and the body may come in separate segments: read the whole answer.
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        detail = answer.read().decode(errors="replace")
    assert answer.status == 413, detail
    assert "web.max_upload_mb = 1024" in detail


def test_uploads_beyond_the_cap_get_503_with_retry_after(server: ServerProcess) -> None:
    instance = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    slow = socket.create_connection(("127.0.0.1", server.web_port), timeout=10)
    try:
        # The one allowed upload: headers and the start of its body, then nothing for a while.
        payload = body(instance)
        slow.sendall(
            b"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Content-Type: {HEADERS['Content-Type']}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload[:1000]
        )
        # Until the server is receiving it (it has staged the first part). Only then: a request
        # sent earlier could take the one slot first, and the slow upload would be the one refused.
        deadline = time.monotonic() + 30
        while not staged(server):
            assert time.monotonic() < deadline, "the slow upload was never received"
            time.sleep(0.05)
        refused = requests.post(url(server), data=body(instance), headers=HEADERS, timeout=30)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "5"
        assert "web.max_concurrent_uploads = 1" in refused.json()["detail"]
        slow.sendall(payload[1000:])
        assert slow.recv(65536).startswith(b"HTTP/1.1 200"), "the upload that held the slot completes"
    finally:
        slow.close()
    # The slot is free again.
    assert requests.post(url(server), data=body(instance), headers=HEADERS, timeout=30).status_code == 200
    assert staged(server) == []
