"""The DICOM upper layer by hand, for the C-STORE hot path, and pynetdicom's sockets tuned.

pynetdicom moves every P-DATA PDU through its DUL thread, a state machine and pydicom; on a
C-MOVE of CT slices that cost more than the network (docs/query-retrieve.md has the profile).
Here a whole message is framed and written in the caller's thread, and a C-STORE response is
read back from the socket directly, while pynetdicom's DUL is told the socket is not ready.
Only what a C-STORE sender needs is implemented; everything else stays with pynetdicom.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any

from pynetdicom.dsutils import split_dataset
from pynetdicom.transport import AssociationSocket


def _pdus(context_id: int, data: bytes | memoryview, control: int, max_pdu: int) -> list[bytes | memoryview]:
    """P-DATA-TF PDUs (one PDV each) carrying ``data``; ``control`` is 1 for a command, 0 for a dataset."""
    step = max_pdu - 6 if max_pdu else max(len(data), 1)
    parts: list[bytes | memoryview] = []
    for start in range(0, max(len(data), 1), step):
        chunk = data[start : start + step]
        last = 0x02 if start + step >= len(data) else 0x00
        parts.append(_PDV_HEADER.pack(0x04, 0x00, len(chunk) + 6, len(chunk) + 2, context_id, control | last))
        parts.append(chunk)
    return parts


_PDV_HEADER = struct.Struct(">BBIIBB")  # PDU type, reserved, PDU length, PDV length, context ID, control


def write_message(assoc: Any, context_id: int, command: bytes, dataset: bytes | memoryview | None) -> None:
    """Write one DIMSE message straight to the association's socket, fragmented for the peer.

    pynetdicom hands every P-DATA PDU (16 KB with most peers: 33 per CT slice) to its DUL
    thread through a queue, one PDU per reactor loop; that alone capped a C-MOVE at ~280 CT
    slices/s. Here the whole message is framed in this thread and sent by ``sendmsg`` (no copy),
    under the socket's send lock, once pynetdicom's own outgoing queue is empty, so that no
    other message's fragments interleave with ours (PS3.8 9.3.1).
    """
    max_pdu = assoc.dimse.maximum_pdu_size
    parts = _pdus(context_id, command, 0x01, max_pdu)
    if dataset is not None:
        parts += _pdus(context_id, dataset, 0x00, max_pdu)
    write_parts(assoc, parts)


def small_message(context_id: int, command: bytes, dataset: bytes | None, max_pdu: int) -> list[bytes | memoryview]:
    """A DIMSE message as P-DATA-TF PDUs, its command and dataset in one PDU when they fit.

    For the many small messages of a C-FIND answer: one PDU of two PDVs (PS3.8 9.3.5) instead
    of two PDUs. A PDU never holds PDVs of two messages: pynetdicom's requestor would drop the second.
    """
    size = 12 + len(command) + len(dataset) if dataset is not None else 0
    if dataset is None or (max_pdu and size > max_pdu):
        parts = _pdus(context_id, command, 0x01, max_pdu)
        if dataset is not None:
            parts += _pdus(context_id, dataset, 0x00, max_pdu)
        return parts
    return [
        _PDV_HEADER.pack(0x04, 0x00, size, len(command) + 2, context_id, 0x03),
        command,
        _PDV_TAIL.pack(len(dataset) + 2, context_id, 0x02),
        dataset,
    ]


_PDV_TAIL = struct.Struct(">IBB")  # a further PDV in the same PDU: length, context ID, control


def write_parts(assoc: Any, parts: list[bytes | memoryview]) -> None:
    """Write whole PDUs to the association's socket, in one go where the kernel takes them."""
    dul = assoc.dul
    deadline = time.monotonic() + (assoc.network_timeout or 60)
    while not dul.to_provider_queue.empty() and time.monotonic() < deadline:
        time.sleep(0.0002)
    sock = dul.socket
    with sock.send_lock:
        if isinstance(sock.socket, ssl.SSLSocket):  # no scatter-gather over TLS
            sock.socket.sendall(b"".join(parts))
        else:
            _send_parts(sock.socket, parts)


def _send_parts(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """``sendall`` of the concatenated parts without building it: one ``sendmsg`` per kernel write."""
    pending = [memoryview(p) for p in parts]
    while pending:
        sent = sock.sendmsg(pending[:_IOV_MAX])
        while sent and pending:
            if sent >= len(pending[0]):
                sent -= len(pending.pop(0))
            else:
                pending[0] = pending[0][sent:]
                sent = 0


_IOV_MAX = 512  # buffers per sendmsg (POSIX guarantees at least 16; Linux and macOS allow 1024)


_US = struct.Struct("<H")


def command_element(group_element: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element of group 0000 (values padded to even length by the caller)."""
    return struct.pack("<HHI", 0x0000, group_element, len(value)) + value


def _command_set(elements: list[bytes]) -> bytes:
    """A command set: its elements (in tag order) after the group length that counts them."""
    body = b"".join(elements)
    return command_element(0x0000, struct.pack("<I", len(body))) + body


def uid_value(value: str) -> bytes:
    """A UID value padded with NUL to even length (PS3.5 6.2)."""
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def store_command(
    sop_class: str, sop_instance: str, msg_id: int, originator_aet: str | None, originator_id: int | None
) -> bytes:
    """The command set of a C-STORE-RQ (PS3.7 9.3.1.1), encoded by hand.

    Building it through pynetdicom's primitives and pydicom took ~0.2 ms per instance, a
    fifth of a C-MOVE's time per CT slice.
    """
    us = _US.pack
    elements = [
        command_element(0x0002, uid_value(sop_class)),
        command_element(0x0100, us(0x0001)),  # C-STORE-RQ
        command_element(0x0110, us(msg_id)),
        command_element(0x0700, us(0x0000)),  # medium priority
        command_element(0x0800, us(0x0000)),  # a dataset follows
        command_element(0x1000, uid_value(sop_instance)),
    ]
    if originator_aet and originator_id is not None:
        elements.append(command_element(0x1030, originator_aet.encode("ascii").ljust(16)[:16]))
        elements.append(command_element(0x1031, us(originator_id)))
    return _command_set(elements)


C_STORE_RSP, C_FIND_RSP, C_GET_RSP, C_MOVE_RSP = 0x8001, 0x8020, 0x8010, 0x8021


def response_command(
    command_field: int,
    sop_class: str,
    msg_id: int,
    status: int,
    *,
    dataset: bool,
    comment: str | None = None,
    sop_instance: str | None = None,
    counts: tuple[int | None, int | None, int | None, int | None] = (None, None, None, None),
) -> bytes:
    """A C-STORE, C-FIND, C-GET or C-MOVE response command set (PS3.7 9.3), byte for byte as
    pynetdicom encodes it. ``sop_instance`` is a C-STORE-RSP's Affected SOP Instance UID;
    ``counts`` are the remaining, completed, failed and warning sub-operations (None: left out).
    Through pynetdicom's primitives and pydicom one took ~1 ms, and a retrieve sends one every
    ``subops.PENDING_EVERY``, a store one per instance.
    """
    us = _US.pack
    elements = [
        command_element(0x0002, uid_value(sop_class)),
        command_element(0x0100, us(command_field)),
        command_element(0x0120, us(msg_id)),
        command_element(0x0800, us(0x0001 if dataset else 0x0101)),
        command_element(0x0900, us(status)),
    ]
    if comment:
        text = str(comment)[:64].encode("ascii", "replace")
        elements.append(command_element(0x0902, text + b" " if len(text) % 2 else text))
    if sop_instance is not None:
        elements.append(command_element(0x1000, uid_value(sop_instance)))
    for element, count in zip((0x1020, 0x1021, 0x1022, 0x1023), counts, strict=True):
        if count is not None:
            elements.append(command_element(element, us(count)))
    return _command_set(elements)


def read_dataset(path: Path) -> memoryview:
    """The encoded dataset of a stored Part-10 file: everything after its file meta group.

    Files written by this archive start with the preamble, ``DICM`` and a group length, so the
    offset is read from the header; anything else goes through pynetdicom's ``split_dataset``.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    if data[128:132] == b"DICM" and data[132:138] == b"\x02\x00\x00\x00UL":
        offset = 144 + int.from_bytes(data[140:144], "little")
        if data[offset : offset + 2] != b"\x02\x00":
            return memoryview(data)[offset:]
    _meta, offset = split_dataset(path)
    return memoryview(data)[offset:]


# Linux: acknowledge at once instead of up to 40 ms later. A peer with Nagle on (DCMTK without
# TCP_NODELAY=1) holds the second write of its C-STORE response until our ACK of the first.
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def read_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        if _QUICKACK is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # the kernel clears it after a while
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise OSError("connection closed by the peer")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = read_exact(sock, 6)
    return header[0], read_exact(sock, int.from_bytes(header[2:6], "big"))


def command_us(command: bytes) -> dict[int, int]:
    """The US elements (element number → value) of an Implicit VR Little Endian command set."""
    fields = {}
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, pos)
        if group == 0 and length == 2:
            fields[element] = int.from_bytes(command[pos + 8 : pos + 10], "little")
        pos += 8 + length
    return fields


def command_status(command: bytes) -> tuple[int | None, int | None]:
    """(Command Field, Status) of an Implicit VR Little Endian command set."""
    field = status = None
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, pos)
        value = command[pos + 8 : pos + 8 + length]
        pos += 8 + length
        if group == 0 and element == 0x0100:
            field = int.from_bytes(value, "little")
        elif group == 0 and element == 0x0900:
            status = int.from_bytes(value, "little")
    return field, status


_original_socket_init = AssociationSocket.__init__


_original_socket_send = AssociationSocket.send


def _socket_init(self: AssociationSocket, *args: Any, **kwargs: Any) -> None:
    self.send_lock = threading.Lock()  # shared with write_message: whole PDUs, never interleaved
    self.recv_lock = threading.Lock()  # held by the DUL while it reads a PDU (store_scp.serve_direct)
    _original_socket_init(self, *args, **kwargs)
    if self.socket is not None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_original_ready = AssociationSocket.ready


def _ready(self: AssociationSocket) -> bool:
    """pynetdicom's DUL polls this; False while a Channel reads the socket itself."""
    if getattr(self, "direct_reader", False):
        return False
    return _original_ready.fget(self)  # type: ignore[attr-defined]


def _socket_send(self: AssociationSocket, bytestream: bytes) -> None:
    with self.send_lock:
        _original_socket_send(self, bytestream)


def tune_sockets() -> None:
    """Turn Nagle's algorithm off on every pynetdicom socket, accepted or opened; add a send lock.

    pynetdicom leaves it on. When we send a dataset and wait for the C-STORE response, the last
    partial segment then waits for the peer's delayed ACK: ~40 ms per instance (a C-MOVE of 20
    small instances took 1 s instead of 0.1 s). See shared/reference/performance.md.
    The lock lets ``write_message`` send whole messages beside pynetdicom's DUL thread.
    """
    AssociationSocket.__init__ = _socket_init  # type: ignore[method-assign]
    AssociationSocket.send = _socket_send  # type: ignore[method-assign]
    AssociationSocket.ready = property(_ready)  # type: ignore[method-assign,assignment]
