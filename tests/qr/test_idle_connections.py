"""Idle and slow connections do not block DICOM (issue 15, finding 6): 100 TCP connections that
never send an A-ASSOCIATE-RQ, send half of one, or never finish a TLS handshake, while DCMTK's
echoscu and storescu get through; the server closes them after ``dicom.pre_association_timeout``;
a peer over ``dicom.max_associations_per_peer`` gets a clear rejection and a log line."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ServerProcess, free_port, run_tool
from tests.synthetic import write_series

TIMEOUT_S = 5  # dicom.pre_association_timeout in these tests (default 10)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cert")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return d / "cert.pem", d / "key.pem"


def _connect(port: int, source: str, first_bytes: bytes = b"") -> socket.socket:
    """A TCP connection from ``source`` (any 127.x.y.z address is this machine's) that sends ``first_bytes``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    if first_bytes:
        sock.sendall(first_bytes)
    return sock


@contextlib.contextmanager
def _held(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _dicom_health(server: ServerProcess) -> dict:
    return requests.get(f"http://127.0.0.1:{server.web_port}/health", timeout=10).json()["dicom"]


def test_hundred_idle_or_slow_connections_do_not_block_dicom(tmp_path: Path, cert: tuple[Path, Path]):
    tls_port = free_port()
    env = {
        "MACPACS_DICOM_PRE_ASSOCIATION_TIMEOUT": str(TIMEOUT_S),
        "MACPACS_DICOM_TLS_PORT": str(tls_port),
        "MACPACS_DICOM_TLS_CERT": str(cert[0]),
        "MACPACS_DICOM_TLS_KEY": str(cert[1]),
    }
    server = ServerProcess(tmp_path / "data", free_port(), free_port(), free_port(), env=env).start()
    port = server.dicom_port
    sources = write_series(tmp_path / "in", 5, size=16)
    try:
        idle = [_connect(port, f"127.0.1.{n}") for n in range(1, 51)]  # 50 silent peers
        slow = [_connect(port, "127.0.0.2", b"\x01\x00\x00\x00") for _ in range(20)]  # half a PDU header
        handshake = [_connect(tls_port, f"127.0.2.{n}") for n in range(1, 31)]  # no ClientHello
        with _held(idle + slow + handshake) as held:
            assert len(held) == 100  # as many as dicom.max_associations
            time.sleep(0.5)  # all accepted
            run_tool("echoscu", *server.dicom_args(), timeout=30)
            run_tool("storescu", *server.dicom_args(), *map(str, sources), timeout=30)
            assert server.logged("5 stored")
            # They got in while the 100 were still there (less the one closed to make room for each).
            assert _dicom_health(server)["awaiting_request"] >= 98
            # The server closes every one of them once its time is up (one log line for many).
            deadline = time.monotonic() + TIMEOUT_S + 5
            assert all(_closed_by_server(s, max(0.1, deadline - time.monotonic())) for s in held)
        assert server.logged(f"that sent no A-ASSOCIATE-RQ within {TIMEOUT_S} s of connecting")
        assert server.logged("127.0.0.2 (20)")
        # Each of the 100 is in a log line: closed after the timeout, or to make room for a client.
        assert sum(int(n) for n in re.findall(r"closed (\d+) DICOM connection", server.log())) == 100
        assert _dicom_health(server)["awaiting_request"] == 0
    finally:
        server.stop()


def test_waiting_limit_and_per_peer_limit(tmp_path: Path):
    env = {
        "MACPACS_DICOM_MAX_ASSOCIATIONS": "10",
        "MACPACS_DICOM_MAX_ASSOCIATIONS_PER_PEER": "3",
        "MACPACS_DICOM_PRE_ASSOCIATION_TIMEOUT": "60",
    }
    server = ServerProcess(tmp_path / "data", free_port(), free_port(), free_port(), env=env).start()
    try:
        with _held([_connect(server.dicom_port, f"127.0.3.{n}") for n in range(1, 16)]) as held:
            # 15 wait, 10 may: the 5 oldest are closed at once, long before the 60 s are up.
            assert all(_closed_by_server(s, 5) for s in held[:5])
            assert not any(_closed_by_server(s, 0.2) for s in held[5:])
            run_tool("echoscu", *server.dicom_args(), timeout=30)  # closes one more to get in
            assert server.logged("to make room for new ones (at most dicom.max_associations = 10 wait at once)")
        # A peer with 3 connections open gets a clear rejection for a 4th, whoever holds them.
        with _held([_connect(server.dicom_port, "127.0.0.1") for _ in range(3)]):
            time.sleep(0.3)
            refused = run_tool("echoscu", *server.dicom_args(), check=False, timeout=30)
            assert refused.returncode != 0
            assert "Local Limit Exceeded" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
            assert server.logged("more than dicom.max_associations_per_peer (3) connections from 127.0.0.1 are open")
        time.sleep(0.3)
        run_tool("echoscu", *server.dicom_args(), timeout=30)  # once they are gone, the peer gets in
    finally:
        server.stop()
