"""The two speed paths of WADO-RS against a real server: the single-frame short path
(``dicomweb/frames_fast.py``) and whole-series retrieval with sendfile (``web/zerocopy.py``).

Each must answer exactly what the plain route answers: same bytes, same errors, same access
rules, CORS headers; over HTTPS the series falls back to ordinary writes and is still exact.
"""

from __future__ import annotations

import io
import socket
import subprocess
import time

import pydicom
import requests

from macpacs.pacs_server.storage import blob_key
from tests.conftest import MACPACS, run_tool
from tests.synthetic import write_series

from .conftest import Loaded, get, self_signed_cert, start_server, uids

FRAME_ACCEPT = {"Accept": 'multipart/related; type="application/octet-stream"'}
SERIES_ACCEPT = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


def parts(response: requests.Response) -> list[tuple[bytes, bytes]]:
    """(headers, body) of each part of a multipart/related response."""
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"').encode()
    body = response.content
    assert body.endswith(b"--" + boundary + b"--\r\n")
    out = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, data = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        assert data.endswith(b"\r\n")
        out.append((head, data[:-2]))
    return out


def test_single_frame_answers_like_the_route(loaded: Loaded):
    st, se, sop = uids(loaded.series_dir / "00002.dcm")
    url = f"{loaded.dicomweb}/studies/{st}/series/{se}/instances/{sop}/frames"
    pixels = pydicom.dcmread(loaded.series_dir / "00002.dcm").PixelData
    short = get(f"{url}/1", headers=FRAME_ACCEPT)
    routed = get(f"{url}/1,1", headers=FRAME_ACCEPT)  # a frame list goes through the FastAPI route
    assert short.status_code == routed.status_code == 200
    assert int(short.headers["content-length"]) == len(short.content)
    assert [p[1] for p in parts(short)] == [pixels] and [p[1] for p in parts(routed)] == [pixels, pixels]
    assert parts(short)[0][0] == parts(routed)[0][0]
    # errors come from the route, with its messages
    assert get(f"{url}/2", headers=FRAME_ACCEPT).status_code == 404
    missing = get(f"{loaded.dicomweb}/studies/{st}/series/{se}/instances/1.2.3.999/frames/1", headers=FRAME_ACCEPT)
    assert missing.status_code == 404 and "not found" in missing.json()["detail"]
    wrong_series = get(f"{loaded.dicomweb}/studies/{st}/series/1.2.3/instances/{sop}/frames/1", headers=FRAME_ACCEPT)
    assert wrong_series.status_code == 404
    refused = get(f"{url}/1", headers={"Accept": "image/gif"})
    assert refused.status_code == 406 and "offers" in refused.json()["detail"]
    # a compressed instance: as stored with transfer-syntax=*, decoded otherwise
    original = pydicom.dcmread(loaded.files["JPEG2000.dcm"])
    st, se, sop = uids(loaded.files["JPEG2000.dcm"])
    url = f"{loaded.dicomweb}/studies/{st}/series/{se}/instances/{sop}/frames/1"
    stored = get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
    assert parts(stored)[0][1] == pydicom.encaps.get_frame(original.PixelData, 0, number_of_frames=1)
    assert f"transfer-syntax={original.file_meta.TransferSyntaxUID}".encode() in parts(stored)[0][0]
    decoded = get(url, headers=FRAME_ACCEPT)
    assert parts(decoded)[0][1] == original.pixel_array.astype("<i2").tobytes()


def test_series_with_sendfile_is_the_stored_files_and_survives_a_client_leaving(loaded: Loaded):
    study, series, first = uids(loaded.series_dir / "00001.dcm")
    url = f"{loaded.dicomweb}/studies/{study}/series/{series}"
    r = get(url, headers=SERIES_ACCEPT)
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
    got = parts(r)
    assert len(got) == 5
    for head, body in got:
        sop = str(pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID)
        assert body == loaded.stored_path(sop).read_bytes()
        assert b"Content-Location: " in head and sop.encode() in head
    # a client that asks and leaves at once: the server carries on
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", loaded.server.web_port)) as sock:
            path = url.split(str(loaded.server.web_port), 1)[1]
            # Host names this server: from loopback, any other name is a page through DNS rebinding.
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {SERIES_ACCEPT['Accept']}\r\n\r\n"
            sock.sendall(request.encode())
            sock.recv(100)
    with requests.Session() as session:  # keep-alive: the connection serves requests after a sendfile
        for _ in range(2):
            again = session.get(url, headers=SERIES_ACCEPT, timeout=30)
            assert [p[1] for p in parts(again)] == [p[1] for p in got]
        frame = session.get(f"{url}/instances/{first}/frames/1", headers=FRAME_ACCEPT, timeout=30)
        assert parts(frame)[0][1] == pydicom.dcmread(loaded.series_dir / "00001.dcm").PixelData


def test_access_rules_and_cors_on_the_short_path(tmp_path, loaded: Loaded):
    data = tmp_path / "data"
    add = subprocess.run(
        [MACPACS, "users", "add", "reader", "--role", "read", "--password-stdin", "--data-dir", str(data)],
        input="reader pass\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    token = subprocess.run(
        [MACPACS, "users", "token", "reader", "--name", "t", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    env = {"MACPACS_WEB_ANONYMOUS_READ": "off", "MACPACS_WEB_CORS_ORIGINS": "https://viewer.example.org"}
    server = start_server(data, env=env)
    try:
        path = loaded.series_dir / "00004.dcm"
        run_tool("storescu", *server.dicom_args(), str(path))
        st, se, sop = uids(path)
        url = f"http://127.0.0.1:{server.web_port}/dicom-web/studies/{st}/series/{se}/instances/{sop}/frames/1"
        anonymous = requests.get(url, headers=FRAME_ACCEPT, timeout=10)
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Basic")
        bad = requests.get(url, headers={**FRAME_ACCEPT, "Authorization": "Bearer mpt_nope"}, timeout=10)
        assert bad.status_code == 401
        pixels = pydicom.dcmread(path).PixelData
        bearer = {**FRAME_ACCEPT, "Authorization": f"Bearer {token}", "Origin": "https://viewer.example.org"}
        ok = requests.get(url, headers=bearer, timeout=10)
        assert ok.status_code == 200 and parts(ok)[0][1] == pixels
        assert ok.headers["access-control-allow-origin"] == "https://viewer.example.org"
        basic = requests.get(url, headers=FRAME_ACCEPT, auth=("reader", "reader pass"), timeout=10)
        assert basic.status_code == 200 and parts(basic)[0][1] == pixels
        wrong = requests.get(url, headers=FRAME_ACCEPT, auth=("reader", "wrong"), timeout=10)
        assert wrong.status_code == 401
    finally:
        server.stop()


def test_series_over_https_falls_back_to_ordinary_writes(tmp_path, loaded: Loaded):
    cert, key = self_signed_cert(tmp_path)
    server = start_server(tmp_path / "data", env={"MACPACS_WEB_TLS_CERT": str(cert), "MACPACS_WEB_TLS_KEY": str(key)})
    try:
        files = sorted(loaded.series_dir.glob("*.dcm"))
        run_tool("storescu", *server.dicom_args(), *map(str, files))
        study, series, sop = uids(files[0])
        base = f"https://127.0.0.1:{server.web_port}/dicom-web/studies/{study}/series/{series}"
        r = requests.get(base, headers=SERIES_ACCEPT, verify=str(cert), timeout=30)
        assert r.status_code == 200
        stored = {p.read_bytes() for p in (server.data_dir / "files").rglob("*") if p.is_file()}
        assert len(parts(r)) == 5 and {body for _head, body in parts(r)} == stored
        frame = requests.get(f"{base}/instances/{sop}/frames/1", headers=FRAME_ACCEPT, verify=str(cert), timeout=30)
        assert parts(frame)[0][1] == pydicom.dcmread(files[0]).PixelData
    finally:
        server.stop()


def test_series_with_a_file_gone_from_the_store_is_a_clear_error(tmp_path, loaded: Loaded):
    """The index lists an instance whose file was removed behind our back: the series request
    names the instance and the repair instead of sending a short or broken body."""
    server = start_server(tmp_path / "data")
    try:
        files = sorted(loaded.series_dir.glob("*.dcm"))
        run_tool("storescu", *server.dicom_args(), *map(str, files))
        study, series, sop = uids(files[0])
        (server.data_dir / "files" / blob_key(sop)).unlink()
        url = f"http://127.0.0.1:{server.web_port}/dicom-web/studies/{study}/series/{series}"
        r = requests.get(url, headers=SERIES_ACCEPT, timeout=30)
        assert r.status_code == 500
        assert sop in r.json()["detail"] and "macpacs reindex" in r.json()["detail"]
    finally:
        server.stop()


def test_a_client_that_stops_reading_holds_up_nothing_else(tmp_path):
    """While a series goes out, the sending thread runs the connection in blocking mode. A client
    that stops reading must not hold up the event loop (other requests are answered, and a
    request it pipelines meanwhile is read), and the transfer resumes, whole, when it reads again
    (the sender's blocked writes time out, EAGAIN, and carry on), followed by the pipelined
    request's answer."""
    server = start_server(tmp_path / "data")
    try:
        files = write_series(tmp_path / "big", 40, size=512, patient_id="WEBBIG")  # ~21 MB
        run_tool("storescu", *server.dicom_args(), *map(str, files))
        study, series, sop = uids(files[0])
        path = f"/dicom-web/studies/{study}/series/{series}"
        with socket.socket() as slow:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
            slow.connect(("127.0.0.1", server.web_port))
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {SERIES_ACCEPT['Accept']}\r\n\r\n"
            slow.sendall(request.encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += slow.recv(4096)
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            assert length > 20_000_000
            time.sleep(5)  # the sender is blocked on the full socket; its writes time out (EAGAIN) and retry
            # A pipelined request on the same connection: the loop reads it off the (blocking) socket.
            slow.sendall(b"GET /testdbalive HTTP/1.1\r\nHost: x\r\n\r\n")
            started = time.monotonic()
            base = f"http://127.0.0.1:{server.web_port}"
            assert requests.get(f"{base}/testdbalive", timeout=10).status_code == 200
            frame = requests.get(f"{base}{path}/instances/{sop}/frames/1", headers=FRAME_ACCEPT, timeout=10)
            assert parts(frame)[0][1] == pydicom.dcmread(files[0]).PixelData
            assert time.monotonic() - started < 5
            rest = bytearray(head.partition(b"\r\n\r\n")[2])
            slow.settimeout(30)
            while b"Test DB Alive succeeded" not in rest[length:] and (chunk := slow.recv(1 << 20)):
                rest += chunk
            assert rest[length:].startswith(b"HTTP/1.1 200 OK")  # the series was whole, then the next answer
    finally:
        server.stop()
