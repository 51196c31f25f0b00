"""Every DICOM upper-layer PDU and DIMSE message we encode or decode by hand, over bytes and sockets.

pynetdicom moves every P-DATA PDU through its DUL thread, a state machine and pydicom; on a
C-MOVE of CT slices that cost more than the network (docs/query-retrieve.md has the profile),
and on a C-STORE received from DCMTK ~2.5 ms (docs/archive.md, "Speed"). So the hot paths
(``store_scp``, ``subops``, ``find``) frame, encode, read and parse their messages with the
functions here: P-DATA-TF framing (PS3.8 9.3.5), command sets (PS3.7 E), the file meta group
(PS3.10 7.1), one command-set parser and one PDU reader. Only what those paths need is here;
everything else stays with pynetdicom. Nothing here touches pynetdicom's objects: how a message
reaches an association's socket beside pynetdicom's DUL is ``pynetdicom_ext``'s business.
tests/core/test_codec.py checks every encoder and the parser against pynetdicom's own, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import IO, BinaryIO, NamedTuple

from pydicom.filereader import read_dataset as read_elements
from pydicom.filereader import read_preamble
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from ..storage import ROOM_EVERY

# Command Field values (PS3.7 E.1).
C_STORE_RQ, C_CANCEL_RQ = 0x0001, 0x0FFF
C_STORE_RSP, C_FIND_RSP, C_GET_RSP, C_MOVE_RSP = 0x8001, 0x8020, 0x8010, 0x8021
# Command Data Set Type: any value but 0x0101 says a dataset follows; pynetdicom and DCMTK send 0x0001.
DATASET, NO_DATASET = 0x0001, 0x0101


class ProtocolError(ValueError):
    """The peer sent something other than the P-DATA the exchange needs (an A-ABORT, say)."""


# -- P-DATA-TF framing --------------------------------------------------------------------------
_PDV_HEADER = struct.Struct(">BBIIBB")  # PDU type, reserved, PDU length, PDV length, context ID, control
_PDV_TAIL = struct.Struct(">IBB")  # a further PDV in the same PDU: length, context ID, control


def pdus(context_id: int, data: bytes | memoryview, control: int, max_pdu: int) -> list[bytes | memoryview]:
    """P-DATA-TF PDUs (one PDV each) carrying ``data``; ``control`` is 1 for a command, 0 for a dataset."""
    step = max_pdu - 6 if max_pdu else max(len(data), 1)
    parts: list[bytes | memoryview] = []
    for start in range(0, max(len(data), 1), step):
        chunk = data[start : start + step]
        last = 0x02 if start + step >= len(data) else 0x00
        parts.append(_PDV_HEADER.pack(0x04, 0x00, len(chunk) + 6, len(chunk) + 2, context_id, control | last))
        parts.append(chunk)
    return parts


def message(
    context_id: int, command: bytes, dataset: bytes | memoryview | None, max_pdu: int
) -> list[bytes | memoryview]:
    """A DIMSE message as P-DATA-TF PDUs fragmented for the peer: the command's, then the dataset's."""
    parts = pdus(context_id, command, 0x01, max_pdu)
    if dataset is not None:
        parts += pdus(context_id, dataset, 0x00, max_pdu)
    return parts


def small_message(context_id: int, command: bytes, dataset: bytes | None, max_pdu: int) -> list[bytes | memoryview]:
    """A DIMSE message as P-DATA-TF PDUs, its command and dataset in one PDU when they fit.

    For the many small messages of a C-FIND answer: one PDU of two PDVs (PS3.8 9.3.5) instead
    of two PDUs. A PDU never holds PDVs of two messages: pynetdicom's requestor would drop the second.
    """
    size = 12 + len(command) + len(dataset) if dataset is not None else 0
    if dataset is None or (max_pdu and size > max_pdu):
        return message(context_id, command, dataset, max_pdu)
    return [
        _PDV_HEADER.pack(0x04, 0x00, size, len(command) + 2, context_id, 0x03),
        command,
        _PDV_TAIL.pack(len(dataset) + 2, context_id, 0x02),
        dataset,
    ]


_IOV_MAX = 512  # buffers per sendmsg (POSIX guarantees at least 16; Linux and macOS allow 1024)


def send_parts(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
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


# -- command sets (Implicit VR Little Endian, group 0000) ----------------------------------------
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
    """The command set of a C-STORE-RQ (PS3.7 9.3.1.1) at medium priority, byte for byte as
    pynetdicom encodes it.

    Building it through pynetdicom's primitives and pydicom took ~0.2 ms per instance, a
    fifth of a C-MOVE's time per CT slice.
    """
    us = _US.pack
    elements = [
        command_element(0x0002, uid_value(sop_class)),
        command_element(0x0100, us(C_STORE_RQ)),
        command_element(0x0110, us(msg_id)),
        command_element(0x0700, us(0x0000)),  # medium priority
        command_element(0x0800, us(DATASET)),
        command_element(0x1000, uid_value(sop_instance)),
    ]
    if originator_aet and originator_id is not None:
        aet = originator_aet.encode("ascii")[:16]
        elements.append(command_element(0x1030, aet + b" " if len(aet) % 2 else aet))
        elements.append(command_element(0x1031, us(originator_id)))
    return _command_set(elements)


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
        command_element(0x0800, us(DATASET if dataset else NO_DATASET)),
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


class Command(NamedTuple):
    """What ``parse_command`` reads from a command set: its US and UI elements by element number."""

    us: dict[int, int]
    ui: dict[int, str]


# Command Field, Message ID, ...Being Responded To, Priority, Data Set Type, Status, Error ID,
# the four sub-operation counts, Move Originator Message ID (PS3.7 E.1-1).
_US_ELEMENTS = frozenset(
    {0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x0903, 0x1020, 0x1021, 0x1022, 0x1023, 0x1031}
)
# Affected and Requested SOP Class UID, Affected and Requested SOP Instance UID.
_UI_ELEMENTS = frozenset({0x0002, 0x0003, 0x1000, 0x1001})
_ELEMENT_HEADER = struct.Struct("<HHI")


def parse_command(command: bytes) -> Command | None:
    """The US and UI elements of an Implicit VR Little Endian command set; None when malformed.

    Malformed: an element outside group 0000, a value running past the end, bytes left over, or
    a US element whose value is not 2 bytes. The hot paths hand such a command back to pynetdicom
    (or refuse it), so a peer's mistake is answered as pynetdicom answers it.
    """
    us: dict[int, int] = {}
    ui: dict[int, str] = {}
    end = len(command)
    pos = 0
    while pos + 8 <= end:
        group, element, size = _ELEMENT_HEADER.unpack_from(command, pos)
        start = pos + 8
        pos = start + size
        if group != 0 or pos > end:
            return None
        if element in _US_ELEMENTS:
            if size != 2:
                return None
            us[element] = command[start] | command[start + 1] << 8
        elif element in _UI_ELEMENTS:
            ui[element] = command[start:pos].rstrip(b"\0 ").decode("ascii", "replace")
    return Command(us, ui) if pos == end else None


# -- the file meta group ------------------------------------------------------------------------
def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


_VERSION = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
_IMPLEMENTATION = _meta_element(0x0012, b"UI", uid_value(PYNETDICOM_IMPLEMENTATION_UID)) + _meta_element(
    0x0013, b"SH", _VERSION + b" " if len(_VERSION) % 2 else _VERSION
)


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group, byte for byte as pynetdicom writes them.

    pynetdicom builds them with pydicom for every received instance (~0.3 ms); the layout is
    fixed (PS3.10 7.1), so it is encoded here.
    """
    group = b"".join(
        [
            struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _meta_element(0x0002, b"UI", uid_value(sop_class)),
            _meta_element(0x0003, b"UI", uid_value(sop_instance)),
            _meta_element(0x0010, b"UI", uid_value(transfer_syntax)),
            _IMPLEMENTATION,
        ]
    )
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(group)) + group


def read_dataset(fh: BinaryIO) -> memoryview:
    """The encoded dataset of a stored Part-10 file (open, from ``retrieve.open_instance``):
    everything after its file meta group.

    Files written by this archive start with the preamble, ``DICM`` and a group length, so the
    offset is read from the header; anything else is parsed as pynetdicom's ``split_dataset``
    parses it (preamble, then the group 0002 elements).
    """
    fh.seek(0)
    data = fh.read()
    if data[128:132] == b"DICM" and data[132:138] == b"\x02\x00\x00\x00UL":
        offset = 144 + int.from_bytes(data[140:144], "little")
        if data[offset : offset + 2] != b"\x02\x00":
            return memoryview(data)[offset:]
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    read_elements(fp, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, _vr, _length: tag.group != 2)
    return memoryview(data)[fp.tell() :]


# -- reading PDUs -------------------------------------------------------------------------------
# Linux: acknowledge at once instead of up to 40 ms later. A peer with Nagle on (DCMTK without
# TCP_NODELAY=1) holds the second write of its C-STORE response until our ACK of the first.
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def read_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes from a blocking socket; OSError when the peer closes first."""
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
    """The next PDU: its type and its body (everything after the 6-byte header)."""
    header = read_exact(sock, 6)
    return header[0], read_exact(sock, int.from_bytes(header[2:6], "big"))


def peek(sock: socket.socket, size: int, timeout: float) -> bytes | None:
    """The next ``size`` bytes on the socket without consuming them, or None (closed, not within ``timeout``).

    Looks at least once, so a ``timeout`` of 0 takes what has already arrived. ``poll``, not
    ``select``: no limit on the descriptor number.
    """
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            return None
        data = sock.recv(size, socket.MSG_PEEK)
        if not data:
            return None
        if len(data) >= size:
            return data
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.0001)  # part of it arrived: poll would return at once


class PeekedCommand(NamedTuple):
    """A whole command waiting on the socket: its context, its fields, and how many bytes to take."""

    context_id: int
    command: Command
    size: int


def peek_command(sock: socket.socket, max_length: int, wait: float, timeout: float) -> PeekedCommand | None:
    """The next PDU, without consuming it, when it is a P-DATA-TF of one PDV holding a whole command.

    None when it is anything else (another PDU type, a command in fragments, a dataset, a
    malformed command), longer than ``max_length``, or when its header does not come within
    ``wait`` seconds or its body within ``timeout`` more. The caller takes it with
    ``read_exact(sock, peeked.size)`` once it knows the command is its own.
    """
    header = peek(sock, 6, wait)
    if header is None or header[0] != 0x04:
        return None
    length = int.from_bytes(header[2:6], "big")
    if length > max_length:
        return None
    pdu = peek(sock, 6 + length, timeout)
    if pdu is None:
        return None
    pdv_length = int.from_bytes(pdu[6:10], "big")
    if pdv_length + 4 != length or pdv_length < 2 or pdu[11] & 0x03 != 0x03:
        return None  # not exactly one PDV holding a whole command
    command = parse_command(pdu[12:])
    return None if command is None else PeekedCommand(pdu[10], command, 6 + length)


def _abort_or_unexpected(pdu_type: int) -> ProtocolError:
    return ProtocolError(
        "the peer aborted the association" if pdu_type == 0x07 else f"unexpected PDU type {pdu_type:#x}"
    )


def read_command(sock: socket.socket) -> bytes:
    """The command set of the next DIMSE message, whose dataset fragments (if any) are skipped.

    ProtocolError for an A-ABORT or any other PDU that has no place between DIMSE messages.
    """
    command = bytearray()
    while True:
        pdu_type, body = read_pdu(sock)
        if pdu_type != 0x04:
            raise _abort_or_unexpected(pdu_type)
        pos, control = 0, 0
        while pos + 6 <= len(body):
            length = int.from_bytes(body[pos : pos + 4], "big")
            control = body[pos + 5]
            if control & 0x01:
                command += body[pos + 6 : pos + 4 + length]
            pos += 4 + length
        if control & 0x03 == 0x03:  # the last fragment of a command
            return bytes(command)


class Received(NamedTuple):
    """What ``receive_dataset`` read: the dataset's content hash, and why it could not all be written."""

    # SHA-256 (hex) of the dataset's bytes: ingest.dataset_hash of a file of the file meta and
    # them. "" when that would differ: a dataset that itself begins with group 0002 bytes, which
    # dataset_hash takes for more of the meta.
    content_hash: str
    # The first OSError of a write, or of ``room``: from there on the rest was read, not written.
    write_error: OSError | None


def receive_dataset(
    sock: socket.socket,
    context_id: int,
    fh: IO[bytes],
    room: Callable[[], None] | None = None,
    on_write_error: Callable[[], None] | None = None,
) -> Received:
    """Write the PDV payloads of the dataset that follows a command to ``fh``, up to its last
    fragment, hashing them as they come.

    A failed write (disk full), or ``room`` raising OSError (it is asked before the first write
    and every ``ROOM_EVERY`` bytes: one statvfs per 16 MB, never one per PDU), stops the writing
    but not the reading: the dataset is read to its end, so that the C-STORE can be answered
    with a failure status instead of aborting the association; ``on_write_error`` is called at
    once when that happens (to free what was written before the rest arrives). ProtocolError
    when a fragment is not the dataset's (another context, a command) or another PDU comes (an
    A-ABORT); OSError when the connection fails.
    """
    digest = hashlib.sha256()
    write = fh.write
    failed: OSError | None = None
    written, next_check, lead = 0, 0, b""
    while True:
        pdu_type, body = read_pdu(sock)
        if pdu_type != 0x04:
            raise _abort_or_unexpected(pdu_type)
        view = memoryview(body)
        pos = 0
        while pos + 6 <= len(body):
            length = int.from_bytes(body[pos : pos + 4], "big")
            if body[pos + 4] != context_id or body[pos + 5] & 0x01 or length < 2:
                raise ProtocolError("a dataset fragment is not in the C-STORE's presentation context")
            payload = view[pos + 6 : pos + 4 + length]
            digest.update(payload)
            if len(lead) < 2:
                lead += bytes(payload[: 2 - len(lead)])
            if failed is None:
                try:
                    if room is not None and written >= next_check:
                        room()
                        next_check = written + ROOM_EVERY
                    write(payload)
                    written += len(payload)
                except OSError as exc:
                    failed = exc
                    if on_write_error is not None:
                        on_write_error()
            if body[pos + 5] & 0x02:
                if pos + 4 + length != len(body):
                    raise ProtocolError("data after the last fragment of a dataset")
                return Received("" if lead == b"\x02\x00" else digest.hexdigest(), failed)
            pos += 4 + length
