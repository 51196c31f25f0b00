"""Slow and unwelcome clients on the XML-RPC port hold no call slot: the supervisor's probe and a
legitimate client are answered meanwhile, and the slow connections are closed at their deadline.

Real ``macpacs serve``, raw sockets (tests/slowloris.py) and the supervisor's own probe code.
"""

from __future__ import annotations

import time
import xmlrpc.client
from collections.abc import Iterator

import pytest

from macpacs.pacs_server.request_deadline import BODY_S, HEADER_S
from macpacs.pacs_server.xmlrpc.server import MAX_CONCURRENT
from macpacs.supervisor.probes import XmlRpcProbe, _TimeoutTransport
from tests.conftest import ServerProcess, free_port
from tests.slowloris import Slowloris, timed

SLOW_HEADERS = b"POST / HTTP/1.0\r\nContent-Type: text/xml\r\nX-Slow: "
SLOW_BODY = b"POST / HTTP/1.0\r\nContent-Type: text/xml\r\nContent-Length: 500\r\n\r\n<methodCall>"
BOUND_S = 2.0  # each call while the slow clients are connected
DRAIN_BOUND_S = 4.0  # a refused client: answered at once, its connection shut for writing


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for both tests: each starts with no slow client left from the other."""
    started = ServerProcess(
        tmp_path_factory.mktemp("xmlrpc-slowloris") / "data", free_port(), free_port(), free_port()
    ).start()
    yield started
    started.stop()


def test_slow_clients_hold_no_slot_and_are_closed_at_their_deadline(server: ServerProcess) -> None:
    url = f"http://127.0.0.1:{server.xmlrpc_port}/"
    probe = XmlRpcProbe(url)
    client = xmlrpc.client.ServerProxy(url, transport=_TimeoutTransport(BOUND_S, secure=False))

    def legitimate() -> None:
        reply = client.DBWindowFind({"request": 'patientID == "NOBODY"', "table": "Study"})
        assert reply["error"] == "0"

    # More slow clients than there are slots, each sending a byte every 2 s.
    with (
        Slowloris(server.xmlrpc_port, MAX_CONCURRENT + 8, SLOW_HEADERS) as headers,
        Slowloris(server.xmlrpc_port, 20, SLOW_BODY) as bodies,
    ):
        times = []
        while time.monotonic() - headers.started < HEADER_S + 1:
            times.append(timed(lambda: probe.check(BOUND_S), BOUND_S))
            times.append(timed(legitimate, BOUND_S))
            time.sleep(0.5)
        closed_headers = headers.wait_all_closed(HEADER_S + 3)
        closed_bodies = bodies.wait_all_closed(BODY_S + 3)
    assert max(times) < BOUND_S
    # Closed at the deadline (10 s, a few ms more for the bytes they sent), not before, and told why.
    assert closed_headers[0] > HEADER_S - 0.5 and closed_headers[-1] < HEADER_S + 2.5, closed_headers
    assert closed_bodies[0] > BODY_S - 0.5 and closed_bodies[-1] < BODY_S + 2.5, closed_bodies
    assert all(answer.startswith(b"HTTP/1.0 408") for answer in headers.answers.values()), headers.answers
    assert len(headers.answers) == headers.count
    assert server.logged("XML-RPC: closed", timeout=5)


def test_a_host_not_allowed_is_refused_on_accept(server: ServerProcess) -> None:
    """127.0.0.2 is not localhost and not in xmlrpc.allowed_hosts: answered 403 before it sends a byte."""
    probe = XmlRpcProbe(f"http://127.0.0.1:{server.xmlrpc_port}/")
    with Slowloris(server.xmlrpc_port, MAX_CONCURRENT + 8, b"", every=None, source="127.0.0.2") as strangers:
        closed = strangers.wait_all_closed(DRAIN_BOUND_S)
        timed(lambda: probe.check(BOUND_S), BOUND_S)
    assert all(b"403" in answer.split(b"\r\n")[0] for answer in strangers.answers.values())
    assert len(strangers.answers) == strangers.count
    assert closed[-1] < DRAIN_BOUND_S
