"""HTTPS on the XML-RPC port (``xmlrpc.tls``, with the web port's certificate): issue 14.

Real ``macpacs serve`` with a certificate made by openssl; real clients: ``xmlrpc.client`` over
https trusting it, curl, raw sockets for plain HTTP and for handshakes that never finish, the
supervisor's own probe, and ``macpacs supervise`` given the wrong certificate to trust.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

import pytest

from macpacs.installer.host import Host
from macpacs.installer.system import System
from macpacs.pacs_server.request_deadline import HEADER_S
from macpacs.pacs_server.xmlrpc.server import MAX_CONCURRENT
from macpacs.supervisor.probes import ProbeFailed, XmlRpcProbe
from tests.conftest import MACPACS, ServerProcess, free_port
from tests.slowloris import Slowloris, timed
from tests.web.conftest import self_signed_cert

BOUND_S = 2.0  # each call while the stalled handshakes are connected
PROBE = {"request": 'studyInstanceUID == "nothing"', "table": "Study"}
# A TLS record header announcing a 512-byte ClientHello, whose body never (or only slowly) follows.
HALF_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01])


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    folder = tmp_path_factory.mktemp("xmlrpc-tls")
    cert, key = self_signed_cert(folder)
    env = {"MACPACS_WEB_TLS_CERT": str(cert), "MACPACS_WEB_TLS_KEY": str(key), "MACPACS_XMLRPC_TLS": "true"}
    server = ServerProcess(folder / "data", free_port(), free_port(), free_port(), env=env).start()
    yield server, cert
    server.stop()


def _client(port: int, cert: Path, user: str = "") -> xmlrpc.client.ServerProxy:
    context = ssl.create_default_context(cafile=str(cert))
    return xmlrpc.client.ServerProxy(f"https://{user}127.0.0.1:{port}/", context=context)


def test_calls_over_https_and_plain_http_refused_with_a_message(tls_server: tuple[ServerProcess, Path]) -> None:
    server, cert = tls_server
    port = server.xmlrpc_port
    assert server.logged(f"XML-RPC (OsiriX) listening on 127.0.0.1:{port} (HTTPS)")
    pacs = _client(port, cert)
    assert pacs.DBWindowFind(PROBE) == {"error": "0", "elements": []}
    assert "DBWindowFind" in pacs.system.listMethods()
    # The header checks and credentials work through TLS as without it.
    with pytest.raises(xmlrpc.client.ProtocolError) as refused:
        pacs.KillOsiriX({})
    assert refused.value.errcode == 401
    # curl reads to the end of the stream: the session ends with close_notify, not a bare close.
    done = subprocess.run(
        ["curl", "-sS", "--cacert", str(cert), f"https://127.0.0.1:{port}/", "-H", "Content-Type: text/xml",
         "--data", xmlrpc.client.dumps((PROBE,), "DBWindowFind")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0 and "<name>error</name>" in done.stdout, done.stderr

    # Plain HTTP to the HTTPS port: 400 saying to use https, in plain HTTP that any client shows.
    with pytest.raises(xmlrpc.client.ProtocolError) as plain:
        xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/").DBWindowFind(PROBE)
    assert plain.value.errcode == 400
    assert "this port speaks HTTPS only (xmlrpc.tls is on): call it with an https:// URL" in plain.value.errmsg
    assert server.logged("refused a plain-HTTP request from 127.0.0.1: this port speaks HTTPS (xmlrpc.tls)")
    # Neither is an untrusted client served: its handshake fails, and the server says why.
    with pytest.raises(ssl.SSLCertVerificationError):
        xmlrpc.client.ServerProxy(f"https://127.0.0.1:{port}/").DBWindowFind(PROBE)
    assert server.logged("most likely because it does not trust our certificate")


def test_handshakes_never_finished_hold_no_slot_and_are_dropped_at_the_deadline(
    tls_server: tuple[ServerProcess, Path],
) -> None:
    server, cert = tls_server
    port = server.xmlrpc_port
    probe = XmlRpcProbe(f"https://127.0.0.1:{port}/", str(cert))
    pacs = _client(port, cert)

    def legitimate() -> None:
        assert pacs.DBWindowFind(PROBE)["error"] == "0"

    # More than there are call slots: TCP only (no ClientHello ever), half a ClientHello, and a
    # ClientHello that trickles in a byte every 2 s (its bytes do not extend the deadline).
    with (
        Slowloris(port, MAX_CONCURRENT + 8, b"", every=None) as silent,
        Slowloris(port, 10, HALF_HELLO, every=None) as half,
        Slowloris(port, 10, HALF_HELLO, every=2.0) as trickle,
    ):
        times = []
        while time.monotonic() - silent.started < HEADER_S - 1:
            times.append(timed(lambda: probe.check(BOUND_S), BOUND_S))
            times.append(timed(legitimate, BOUND_S))
            time.sleep(0.5)
        closed = [group.wait_all_closed(HEADER_S + 3) for group in (silent, half, trickle)]
    assert max(times) < BOUND_S
    for at in closed:  # closed at the deadline, not before, and without a word (no TLS session to answer in)
        assert at[0] > HEADER_S - 0.5 and at[-1] < HEADER_S + 2.5, at
    assert not silent.answers and not half.answers and not trickle.answers
    assert server.logged("TLS handshake not completed within 10 s")


def test_the_supervisor_probe_names_a_certificate_it_does_not_trust(
    tls_server: tuple[ServerProcess, Path], tmp_path: Path
) -> None:
    server, cert = tls_server
    url = f"https://127.0.0.1:{server.xmlrpc_port}/"
    assert XmlRpcProbe(url, str(cert)).check(BOUND_S) == 'error "0"'
    other, _key = self_signed_cert(tmp_path)
    with pytest.raises(ProbeFailed, match="not trusted by --ca-file"):
        XmlRpcProbe(url, str(other)).check(BOUND_S)
    # The watchdog's log says it, with what to do (kill mode without --pid-file stops nothing).
    log = tmp_path / "supervise.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [MACPACS, "supervise", "--xmlrpc-url", url, "--ca-file", str(other), "--interval", "0.5",
             "--timeout", "2", "--startup-grace", "0", "--failures", "1000"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "not trusted" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
    text = log.read_text()
    assert f"xmlrpc: TLS: the XML-RPC server's certificate is not trusted by --ca-file {other}" in text, text
    assert "give --ca-file the certificate the server serves (its web.tls_cert)" in text


def test_doctor_asks_the_https_port_trusting_the_supervisors_certificate(
    tls_server: tuple[ServerProcess, Path], tmp_path: Path
) -> None:
    server, cert = tls_server
    host = Host(System())
    url = f"https://127.0.0.1:{server.xmlrpc_port}/"
    assert host.xmlrpc_probe(url, ca_file=str(cert)) is None
    other, _key = self_signed_cert(tmp_path)
    problem = host.xmlrpc_probe(url, ca_file=str(other))
    assert problem is not None and problem.startswith(f"its certificate is not the one the supervisor trusts ({other})")
    assert "400" in (host.xmlrpc_probe(f"http://127.0.0.1:{server.xmlrpc_port}/") or "")


def test_an_https_client_on_the_plain_port_is_told_in_the_log(server: ServerProcess) -> None:
    """Without xmlrpc.tls, a ClientHello is refused at once instead of waiting 10 s for headers."""
    started = time.monotonic()
    with pytest.raises(ProbeFailed, match=r"is xmlrpc\.tls on"):
        XmlRpcProbe(f"https://127.0.0.1:{server.xmlrpc_port}/").check(BOUND_S)
    assert time.monotonic() - started < BOUND_S
    assert server.logged("refused an https:// client from 127.0.0.1: this port speaks plain HTTP")
    plain = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{server.xmlrpc_port}/")  # plain HTTP still served
    assert plain.DBWindowFind(PROBE)["error"] == "0"


def test_tls_without_a_web_certificate_stops_the_start_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [MACPACS, "serve", "--data-dir", str(tmp_path / "data"), "--dicom-port", str(free_port()),
         "--web-port", str(free_port()), "--xmlrpc-port", str(free_port())],
        env={**os.environ, "MACPACS_XMLRPC_TLS": "true"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "xmlrpc.tls needs web.tls_cert and web.tls_key" in proc.stderr and "Traceback" not in proc.stderr
