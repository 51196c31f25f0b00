"""Probes against real misbehaving peers: each fault is reported as a failure, on time."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from macpacs.supervisor.probes import EchoProbe, HttpProbe, ProbeRunner, XmlRpcProbe, build_probes

from .conftest import Peer, free_port, wait_until


def start_peer(peer: Peer, procs: list[subprocess.Popen[bytes]], mode: str) -> None:
    procs.append(subprocess.Popen(peer.argv(mode, pid_file=False)))
    if mode not in ("refuse", "sleep"):
        wait_until(lambda: _listening(peer.web) and _listening(peer.xmlrpc), 10)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def runner_for(peer: Peer, timeout: float) -> ProbeRunner:
    return ProbeRunner(
        [HttpProbe(f"http://127.0.0.1:{peer.web}/testdbalive"), XmlRpcProbe(f"http://127.0.0.1:{peer.xmlrpc}/")],
        timeout,
    )


@pytest.mark.parametrize(
    ("mode", "web", "xmlrpc"),
    [
        ("healthy", "HTTP 200", 'error "0"'),
        ("refuse", "connection refused", "connection refused"),
        ("hang", "timed out", "timed out"),
        ("wrongbody", "unexpected body 'Test DB Alive failed'", 'error "0"'),
        ("xmlrpc-fault", "HTTP 200", "XML-RPC fault 7: database is locked"),
        ("trickle", "no answer within 0.5 s", "no answer within 0.5 s"),
    ],
)
def test_each_fault_is_reported(peer: Peer, procs: list[subprocess.Popen[bytes]], mode: str, web: str, xmlrpc: str):
    start_peer(peer, procs, mode)
    started = time.monotonic()
    results = runner_for(peer, timeout=0.5).run_round()
    elapsed = time.monotonic() - started
    by_name = {r.probe: r for r in results}
    assert web in by_name["web"].detail
    assert xmlrpc in by_name["xmlrpc"].detail
    assert by_name["web"].ok == (web == "HTTP 200")
    assert by_name["xmlrpc"].ok == (xmlrpc == 'error "0"')
    # Concurrent probes under one deadline: a round never takes much longer than the timeout.
    assert elapsed < 0.5 + 0.3


def test_a_probe_stuck_past_its_deadline_is_never_started_twice(peer: Peer, procs: list[subprocess.Popen[bytes]]):
    """A trickling server defeats socket timeouts; stuck probe threads must still stay bounded."""
    start_peer(peer, procs, "trickle")
    runner = runner_for(peer, timeout=0.2)
    rounds = [runner.run_round() for _ in range(8)]
    stuck = [t for t in threading.enumerate() if t.name.startswith("probe-")]
    assert len(stuck) <= 2, stuck
    later = [r.detail for round_ in rounds[1:] for r in round_]
    assert set(later) == {"previous probe still hung"}


def test_c_echo_probe_against_a_real_listener():
    port = free_port()
    scp = AE(ae_title="ECHOSCP")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda _e: 0x0000)])
    try:
        ok = ProbeRunner([EchoProbe("127.0.0.1", port, "ECHOSCP")], 5).run_round()[0]
        assert ok.ok, ok
        assert ok.detail == "C-ECHO 0x0000"
    finally:
        server.shutdown()
    refused = ProbeRunner([EchoProbe("127.0.0.1", port, "ECHOSCP")], 2).run_round()[0]
    assert not refused.ok
    assert "not established" in refused.detail


def test_dicom_option_is_parsed():
    (probe,) = build_probes(None, None, "pacs.example:11112:MACPACS")
    assert isinstance(probe, EchoProbe)
    assert (probe.host, probe.port, probe.ae_title) == ("pacs.example", 11112, "MACPACS")
    with pytest.raises(ValueError, match="HOST:PORT:AET"):
        build_probes(None, None, "pacs.example:MACPACS")


def test_the_web_probe_never_reuses_a_connection_the_server_may_be_closing():
    """The installed probe interval (5 s) equals uvicorn's keep-alive time-out: a reused idle
    connection may be closed by the server just as the next probe is sent (seen once in the soak:
    "connection reset by peer", one failed round of a healthy server). This peer answers the first
    request of a connection and resets the connection at a second one, as that race does."""
    import socket
    import struct

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 23\r\nContent-Type: text/html\r\n\r\nTest DB Alive succeeded"

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(answer)
            if conn.recv(65536):  # a second request on this connection: reset, do not answer
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def accept() -> None:
        with listener:
            for _ in range(3):
                conn, _address = listener.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    probe = HttpProbe(f"http://127.0.0.1:{port}/testdbalive")
    assert [probe.check(2.0) for _ in range(3)] == ["HTTP 200"] * 3
