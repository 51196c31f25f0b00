"""The HL7 listener's doors, on real sockets in this process (no server needed): TLS and the allow-list."""

from __future__ import annotations

import logging
import socket
import ssl

import pytest

from macpacs.pacs_server.index.worklist_table import ProcedureTable
from macpacs.pacs_server.plugins.hl7 import Hl7Listener, Hl7Settings
from tests.conftest import free_port
from tests.integration.helpers import ack_code, orm
from tests.web.conftest import self_signed_cert


def _exchange(sock: socket.socket, text: str) -> str:
    """Send one message, read its ACK: "" when the listener closes (or resets) the connection instead."""
    reply = b""
    try:
        sock.sendall(b"\x0b" + text.encode() + b"\x1c\r")
        while not reply.endswith(b"\x1c\r"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    except ConnectionResetError:
        return ""
    return reply.strip(b"\x0b\x1c\r").decode() + "\r" if reply else ""


def _outside_address() -> str | None:
    """This machine's address on its outward interface (not loopback), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_mllp_over_tls(archive, tmp_path) -> None:
    cert, key = self_signed_cert(tmp_path)
    settings = Hl7Settings(port=free_port(), bind="127.0.0.1", tls_cert=str(cert), tls_key=str(key))
    listener = Hl7Listener(archive, settings)
    listener.start()
    try:
        context = ssl.create_default_context(cafile=str(cert))
        raw = socket.create_connection(("127.0.0.1", settings.port), timeout=10)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert ack_code(_exchange(tls, orm("T1", "NW", "TORD1", patient_id="T100")))[0] == "AA"
        # Plain text to the TLS port: no handshake, no ACK, nothing applied.
        with socket.create_connection(("127.0.0.1", settings.port), timeout=10) as plain:
            assert _exchange(plain, orm("T2", "NW", "TORD2", patient_id="T200")) == ""
    finally:
        listener.stop()
    rows = list(ProcedureTable(archive.index).find({"PatientID": "T*"}, case_insensitive=True))
    assert [row["patient_id"] for row in rows] == ["T100"]


def test_allow_list(archive, caplog) -> None:
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    settings = Hl7Settings(port=free_port(), bind="0.0.0.0", allowed_hosts=["198.51.100.0/24"])
    listener = Hl7Listener(archive, settings)
    assert listener.allowed("198.51.100.7") and listener.allowed("::ffff:198.51.100.7")
    assert listener.allowed("127.0.0.1") and not listener.allowed("203.0.113.5")
    listener.start()
    try:
        with caplog.at_level(logging.WARNING), socket.create_connection((outside, settings.port), timeout=10) as sock:
            assert _exchange(sock, orm("A1", "NW", "AORD1", patient_id="A100")) == ""
        assert any("not in plugins.hl7.allowed_hosts" in record.getMessage() for record in caplog.records)
        with socket.create_connection(("127.0.0.1", settings.port), timeout=10) as sock:  # this machine: always
            assert ack_code(_exchange(sock, orm("A2", "NW", "AORD2", patient_id="A200")))[0] == "AA"
    finally:
        listener.stop()
    with pytest.raises(ValueError, match="allowed_hosts"):
        Hl7Settings(allowed_hosts=["not-an-address"]).networks()
