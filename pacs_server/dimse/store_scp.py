"""Receiving C-STOREs without pynetdicom's per-PDU machinery, once an association is storing.

pynetdicom hands every incoming PDU from its DUL thread to the association thread through a
state machine and two polled queues, decodes each command with pydicom, and queues the
response back to the DUL: with DCMTK's storescu that was ~2.5 ms of every C-STORE, more than
our parse, fsync and index commit together (docs/archive.md, "Speed").

So the first C-STORE of an association goes through pynetdicom as usual; then, while the
peer keeps sending C-STORE requests, the association thread reads them from the socket
itself: it *peeks* at the next PDU (``MSG_PEEK``, nothing consumed) and takes it only when it
is a complete C-STORE-RQ command on an accepted storage context. The dataset fragments are
written to a temporary file laid out exactly as pynetdicom's ``STORE_RECV_CHUNKED_DATASET``
writes it, the same store function answers, and the C-STORE-RSP is framed and written by
``wire.write_message``. Anything else (a release or abort request, another service, a
command spread over several PDUs, a quiet peer) is left unread on the socket for pynetdicom,
which carries on from there. Not used over TLS.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import socket
import ssl
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.service_class import StorageServiceClass

from . import wire

log = logging.getLogger("macpacs.dicom")

# (association, temporary file path, SOP Instance UID) → a status code or a status dataset.
StoreFunction = Callable[[Any, Path, str], "int | Dataset"]

IDLE_HANDBACK = 1.0  # seconds without a request before pynetdicom takes the socket back
_MAX_COMMAND_PDU = 64 * 1024
_STATUS_HANDLER_FAILED = 0xC211  # pynetdicom's answer when the store handler raises


class FastStorageServiceClass(StorageServiceClass):
    """pynetdicom's Storage SCP for the first C-STORE, then ``serve_direct`` for the next ones."""

    def SCP(self, req: Any, context: Any) -> None:
        super().SCP(req, context)
        store: StoreFunction | None = getattr(self.assoc, "macpacs_store", None)
        if store is not None and self.assoc.is_established:
            serve_direct(self.assoc, store)


def serve_direct(assoc: Any, store: StoreFunction) -> None:
    """Serve C-STORE requests straight from the socket until something else comes (see module doc)."""
    dul = assoc.dul
    sock = dul.socket
    raw = getattr(sock, "socket", None)
    if raw is None or isinstance(raw, ssl.SSLSocket):
        return
    with sock.recv_lock:  # the DUL is not half-way through reading a PDU
        if not dul.event_queue.empty() or not dul.to_user_queue.empty():
            return
        sock.direct_reader = True
    try:
        while assoc.is_established:
            request = _take_store_request(raw, assoc)
            if request is None:
                return
            if not _serve_one(assoc, raw, request, store):
                return
            dul._idle_timer.restart()
    finally:
        sock.direct_reader = False


class _Request:
    __slots__ = ("context_id", "message_id", "sop_class", "sop_instance", "transfer_syntax")

    def __init__(self, context_id: int, message_id: int, sop_class: str, sop_instance: str, ts: str) -> None:
        self.context_id = context_id
        self.message_id = message_id
        self.sop_class = sop_class
        self.sop_instance = sop_instance
        self.transfer_syntax = ts


def _peek(raw: socket.socket, size: int, deadline: float) -> bytes | None:
    """The next ``size`` bytes on the socket without consuming them, or None (closed, too slow)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([raw], [], [], remaining)
        if not ready:
            return None
        data = raw.recv(size, socket.MSG_PEEK)
        if not data:
            return None
        if len(data) >= size:
            return data
        time.sleep(0.0001)  # part of it arrived: select would return at once


def _take_store_request(raw: socket.socket, assoc: Any) -> _Request | None:
    """Consume the next PDU if it is a whole C-STORE-RQ command we serve; None leaves it unread."""
    header = _peek(raw, 6, time.monotonic() + IDLE_HANDBACK)
    if header is None or header[0] != 0x04:
        return None
    length = int.from_bytes(header[2:6], "big")
    if length > _MAX_COMMAND_PDU:
        return None
    pdu = _peek(raw, 6 + length, time.monotonic() + (assoc.network_timeout or 60))
    if pdu is None:
        return None
    pdv_length = int.from_bytes(pdu[6:10], "big")
    if pdv_length + 4 != length or pdv_length < 2 or pdu[11] & 0x03 != 0x03:
        return None  # not exactly one PDV holding a whole command
    context_id = pdu[10]
    fields = _command_fields(pdu[12:])
    if fields is None or fields.get(0x0100) != 0x0001 or fields.get(0x0800) == 0x0101:
        return None
    cx = assoc._accepted_cx.get(context_id)
    sop_class = fields.get(0x0002)
    if cx is None or not cx.as_scp or cx.abstract_syntax != sop_class or 0x1000 not in fields or 0x0110 not in fields:
        return None
    if pynetdicom.association.uid_to_service_class(sop_class) is not FastStorageServiceClass:
        return None
    wire.read_exact(raw, 6 + length)  # now ours
    return _Request(context_id, fields[0x0110], sop_class, fields[0x1000], cx.transfer_syntax[0])


_US = {0x0100, 0x0110, 0x0700, 0x0800}
_UI = {0x0002, 0x1000}


def _command_fields(command: bytes) -> dict[int, Any] | None:
    """The C-STORE-RQ elements we need from an Implicit VR Little Endian command set."""
    fields: dict[int, Any] = {}
    pos = 0
    while pos + 8 <= len(command):
        group, element, size = struct.unpack_from("<HHI", command, pos)
        value = command[pos + 8 : pos + 8 + size]
        pos += 8 + size
        if group != 0 or len(value) != size:
            return None
        if element in _US and size == 2:
            fields[element] = int.from_bytes(value, "little")
        elif element in _UI:
            fields[element] = value.rstrip(b"\0 ").decode("ascii", "replace")
    return fields if pos == len(command) else None


def _serve_one(assoc: Any, raw: socket.socket, request: _Request, store: StoreFunction) -> bool:
    """Receive the dataset, store it, answer; False when the association had to be aborted."""
    path = Path(tempfile.gettempdir()) / f"in-{os.getpid()}-{next(_serial)}-{os.urandom(4).hex()}.dcm"
    try:
        with open(path, "xb") as fh:
            fh.write(file_meta(request.sop_class, request.sop_instance, request.transfer_syntax))
            _receive_dataset(raw, request.context_id, fh)
    except (OSError, ValueError) as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        log.error("C-STORE of %s: receiving the dataset failed (%s); aborting", request.sop_instance, exc)
        assoc._abort_blocking(block=False)
        return False
    try:
        result = store(assoc, path, request.sop_instance)
    except Exception:
        log.exception("C-STORE handler failed")
        result = _STATUS_HANDLER_FAILED
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # normally moved into the store by ingest already
    if not assoc.is_established:
        return False
    wire.write_message(assoc, request.context_id, store_response(request, result), None)
    return True


_serial = itertools.count()


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


_VERSION = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
_IMPLEMENTATION = _meta_element(0x0012, b"UI", wire.uid_value(PYNETDICOM_IMPLEMENTATION_UID)) + _meta_element(
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
            _meta_element(0x0002, b"UI", wire.uid_value(sop_class)),
            _meta_element(0x0003, b"UI", wire.uid_value(sop_instance)),
            _meta_element(0x0010, b"UI", wire.uid_value(transfer_syntax)),
            _IMPLEMENTATION,
        ]
    )
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(group)) + group


def _receive_dataset(raw: socket.socket, context_id: int, fh: Any) -> None:
    """Write the PDV payloads of the dataset that follows a command, up to its last fragment."""
    while True:
        pdu_type, body = wire.read_pdu(raw)
        if pdu_type != 0x04:
            raise ValueError("the peer aborted" if pdu_type == 0x07 else f"unexpected PDU type {pdu_type:#x}")
        view = memoryview(body)
        pos = 0
        while pos + 6 <= len(body):
            length = int.from_bytes(body[pos : pos + 4], "big")
            if body[pos + 4] != context_id or body[pos + 5] & 0x01 or length < 2:
                raise ValueError("a dataset fragment is not in the C-STORE's presentation context")
            fh.write(view[pos + 6 : pos + 4 + length])
            if body[pos + 5] & 0x02:
                if pos + 4 + length != len(body):
                    raise ValueError("data after the last fragment of a dataset")
                return
            pos += 4 + length


def store_response(request: _Request, result: int | Dataset) -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2) for a handler's status or status dataset."""
    comment: str | None = None
    if isinstance(result, Dataset):
        status = int(result.Status)
        comment = result.get("ErrorComment")
    else:
        status = int(result)
    return wire.response_command(
        wire.C_STORE_RSP,
        request.sop_class,
        request.message_id,
        status,
        dataset=False,
        comment=comment,
        sop_instance=request.sop_instance,
    )


# -- the DUL side: never read a PDU while the association thread does --------------------------
_original_transport_event = pynetdicom.dul.DULServiceProvider._is_transport_event


def _transport_event(self: Any) -> bool:
    lock = getattr(self.socket, "recv_lock", None)
    if lock is None:
        return _original_transport_event(self)
    with lock:
        return _original_transport_event(self)


def install() -> None:
    """Serve storage SOP classes with FastStorageServiceClass (direct only where ``macpacs_store`` is set)."""
    pynetdicom.dul.DULServiceProvider._is_transport_event = _transport_event  # type: ignore[method-assign]
    lookup = pynetdicom.association.uid_to_service_class
    if getattr(lookup, "macpacs_fast_store", False):
        return

    def fast_lookup(uid: str) -> type:
        service_class = lookup(uid)
        return FastStorageServiceClass if service_class is StorageServiceClass else service_class

    fast_lookup.macpacs_fast_store = True  # type: ignore[attr-defined]
    pynetdicom.association.uid_to_service_class = fast_lookup  # type: ignore[assignment]
