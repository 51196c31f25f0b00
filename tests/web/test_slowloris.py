"""Header and body read timeouts on the web port (web/request_timeouts.py), against a real ``macpacs serve``.

Slow clients over raw sockets (tests/slowloris.py): while they trickle, the supervisor's heartbeat
and ``/testdbalive`` probes (its own code) and a legitimate QIDO-RS are answered within a bound;
each slow connection is closed at its deadline; a slow but steady upload is not cut.
"""

from __future__ import annotations

import socket
import threading
import time

import requests

from macpacs.pacs_server.request_deadline import BODY_S, HEADER_S
from macpacs.supervisor.probes import HeartbeatProbe, HttpProbe
from tests.conftest import ServerProcess
from tests.slowloris import Slowloris, timed

BOUND_S = 2.0


def test_slow_clients_are_closed_at_their_deadline_while_probes_and_clients_are_served(make_server) -> None:
    server: ServerProcess = make_server()
    port = server.web_port
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    slow_headers = b"GET /dicom-web/studies HTTP/1.1\r\n" + host + b"X-Slow: "
    slow_body = (
        b"POST /dicom-web/studies HTTP/1.1\r\n"
        + host
        + b"Content-Type: application/dicom\r\nContent-Length: 100000\r\n\r\n"
    )
    heartbeat = HeartbeatProbe(f"http://127.0.0.1:{port}/heartbeat")
    alive = HttpProbe(f"http://127.0.0.1:{port}/testdbalive")
    session = requests.Session()
    session.trust_env = False

    def qido() -> None:
        response = session.get(f"http://127.0.0.1:{port}/dicom-web/studies", timeout=BOUND_S)
        assert response.status_code in (200, 204), response.text

    steady: dict[str, object] = {}
    with (
        Slowloris(port, 40, slow_headers) as headers,
        Slowloris(port, 20, slow_body) as bodies,
        Slowloris(port, 10, b"", every=None) as idle,
    ):
        uploader = threading.Thread(target=steady_upload, args=(port, steady), daemon=True)
        uploader.start()
        times = []
        while time.monotonic() - headers.started < HEADER_S + 1:
            for call in (lambda: heartbeat.check(BOUND_S), lambda: alive.check(BOUND_S), qido):
                times.append(timed(call, BOUND_S))
            time.sleep(0.5)
        closed = {name: s.wait_all_closed(HEADER_S + 3) for name, s in (("headers", headers), ("idle", idle))}
        closed["bodies"] = bodies.wait_all_closed(BODY_S + 3)
        uploader.join(20)
    assert max(times) < BOUND_S
    for name, when in closed.items():
        assert when[0] > HEADER_S - 0.5 and when[-1] < HEADER_S + 2.5, (name, when)
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in headers.answers.values()), headers.answers
    assert len(headers.answers) == headers.count
    # 12 s of upload at 1000 bytes/s, longer than BODY_S: each byte extends the deadline, so it is not cut.
    assert steady.get("sent") == STEADY_BYTES, steady
    assert not str(steady.get("status", "")).startswith("408"), steady
    assert server.logged("web: closed", timeout=5)


STEADY_BYTES = 12_000


def steady_upload(port: int, out: dict[str, object]) -> None:
    """A form POST whose body comes at 1000 bytes/s: slow, not stalled (the form is read whole
    before the login is even looked at, so the answer waits for the last byte)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"POST /login HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {STEADY_BYTES}\r\nConnection: close\r\n\r\nusername=".encode()
        )
        sent = len("username=")
        try:
            while sent < STEADY_BYTES:
                chunk = b"x" * min(100, STEADY_BYTES - sent)
                sock.sendall(chunk)
                sent += len(chunk)
                time.sleep(0.1)
        except OSError as exc:
            out["error"] = repr(exc)
        out["sent"] = sent
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:
            pass
        out["status"] = answer.split(b"\r\n", 1)[0].decode(errors="replace").removeprefix("HTTP/1.1 ")
