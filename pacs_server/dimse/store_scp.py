"""Receiving C-STOREs without pynetdicom's per-PDU machinery, once an association is storing.

pynetdicom hands every incoming PDU from its DUL thread to the association thread through a
state machine and two polled queues, decodes each command with pydicom, and queues the
response back to the DUL: with DCMTK's storescu that was ~2.5 ms of every C-STORE, more than
our parse, fsync and index commit together (docs/archive.md, "Speed").

So the first C-STORE of an association goes through pynetdicom as usual; then, while the
peer keeps sending C-STORE requests, the association thread reads them from the socket
itself: it *peeks* at the next PDU (``MSG_PEEK``, nothing consumed) and takes it only when it
is a complete C-STORE-RQ command on an accepted storage context (``codec.peek_command``). The
dataset fragments are written to a staged file (``pynetdicom_ext.staged_file``, where
pynetdicom's own go) laid out exactly as pynetdicom's ``STORE_RECV_CHUNKED_DATASET`` writes it,
the same store function answers, and the C-STORE-RSP is framed and written by
``pynetdicom_ext.write_message``. Anything else (a release or abort request, another service, a
command spread over several PDUs, a quiet peer) is left unread on the socket for pynetdicom,
which carries on from there. Not used over TLS. The dataset's content hash is computed as its
fragments arrive (``codec.receive_dataset``) and handed to ingest, which then need not read the
staged file again.

A full disk costs a C-STORE its answer 0xA700, never the association: on either path a write
that fails, or free space below ``storage.min_free_mb`` (asked once per 16 MB received), stops
the writing, the partial file goes at once, the rest of the dataset is read and dropped, and
the failure status is sent (``_refuse_unwritten``). The peer goes on with its next instance,
and stores succeed again as soon as space is freed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynetdicom.association
from pydicom.dataset import Dataset
from pynetdicom.service_class import StorageServiceClass

from .. import dicom_status
from ..storage import is_disk_full
from . import codec, pynetdicom_ext

log = logging.getLogger(__name__)

# (association, staged file path, SOP Instance UID, content hash or "") → a status code or dataset.
StoreFunction = Callable[[Any, Path, str, str], "int | Dataset"]

IDLE_HANDBACK = 1.0  # seconds without a request before pynetdicom takes the socket back
_MAX_COMMAND_PDU = 64 * 1024


class FastStorageServiceClass(StorageServiceClass):
    """pynetdicom's Storage SCP for the first C-STORE, then ``serve_direct`` for the next ones."""

    def SCP(self, req: Any, context: Any) -> None:
        failure = pynetdicom_ext.write_failure(req)
        if failure is None:
            super().SCP(req, context)
        else:
            request = _Request(
                context.context_id, req.MessageID, req.AffectedSOPClassUID, req.AffectedSOPInstanceUID, ""
            )
            _refuse_unwritten(self.assoc, request, failure)
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
        pynetdicom_ext.take_socket(dul)
    try:
        while assoc.is_established:
            request = _take_store_request(raw, assoc)
            if request is None:
                return
            if not _serve_one(assoc, raw, request, store):
                return
            dul._idle_timer.restart()
    finally:
        pynetdicom_ext.give_back_socket(dul)


class _Request:
    __slots__ = ("context_id", "message_id", "sop_class", "sop_instance", "transfer_syntax")

    def __init__(self, context_id: int, message_id: int, sop_class: str, sop_instance: str, ts: str) -> None:
        self.context_id = context_id
        self.message_id = message_id
        self.sop_class = sop_class
        self.sop_instance = sop_instance
        self.transfer_syntax = ts


def _take_store_request(raw: socket.socket, assoc: Any) -> _Request | None:
    """Consume the next PDU if it is a whole C-STORE-RQ command we serve; None leaves it unread."""
    peeked = codec.peek_command(raw, _MAX_COMMAND_PDU, IDLE_HANDBACK, assoc.network_timeout or 60)
    if peeked is None:
        return None
    us, ui = peeked.command
    if us.get(0x0100) != codec.C_STORE_RQ or us.get(0x0800) == codec.NO_DATASET:
        return None
    cx = assoc._accepted_cx.get(peeked.context_id)
    sop_class = ui.get(0x0002)
    if cx is None or not cx.as_scp or cx.abstract_syntax != sop_class or 0x1000 not in ui or 0x0110 not in us:
        return None
    if pynetdicom.association.uid_to_service_class(sop_class) is not FastStorageServiceClass:
        return None
    codec.read_exact(raw, peeked.size)  # now ours
    return _Request(peeked.context_id, us[0x0110], sop_class, ui[0x1000], cx.transfer_syntax[0])


class _Nowhere:
    """Where the rest of a dataset goes once it cannot be written."""

    @staticmethod
    def write(data: bytes | memoryview) -> int:
        return len(data)


def _serve_one(assoc: Any, raw: socket.socket, request: _Request, store: StoreFunction) -> bool:
    """Receive the dataset, store it, answer; False when the association had to be aborted."""
    failure: OSError | None = None
    staged: Any = None
    try:
        staged = pynetdicom_ext.staged_file()
    except OSError as exc:  # no file at all (no descriptor left...)
        failure = exc
    try:
        sink: Any = _Nowhere
        if staged is not None:
            sink = getattr(staged, "file", staged)  # the file itself: no wrapper call per PDU
            try:
                sink.write(codec.file_meta(request.sop_class, request.sop_instance, request.transfer_syntax))
            except OSError as exc:
                failure, sink = exc, _Nowhere
        discard = None if staged is None else lambda: _discard(staged)  # frees the space at once
        received = codec.receive_dataset(raw, request.context_id, sink, getattr(staged, "room", None), discard)
        failure = failure or received.write_error
        if staged is not None and failure is None:
            try:
                staged.close()
            except OSError as exc:
                failure = exc
    except (OSError, ValueError) as exc:  # the connection, or the peer
        if staged is not None:
            _discard(staged)
        log.error("C-STORE of %s: receiving the dataset failed (%s); aborting", request.sop_instance, exc)
        assoc._abort_blocking(block=False)
        return False
    if failure is not None:
        if staged is not None:
            _discard(staged)
        if not assoc.is_established:
            return False
        _refuse_unwritten(assoc, request, failure)
        return True
    path = Path(staged.name)
    try:
        result = store(assoc, path, request.sop_instance, received.content_hash)
    except Exception:
        log.exception("C-STORE handler failed")
        result = dicom_status.STORE_HANDLER_FAILED
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # normally moved into the store by ingest already
    if not assoc.is_established:
        return False
    pynetdicom_ext.write_message(assoc, request.context_id, store_response(request, result), None)
    return True


def _discard(staged: Any) -> None:
    """Close and remove a staged file whose content is not wanted."""
    with contextlib.suppress(OSError):
        staged.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staged.name)


def _refuse_unwritten(assoc: Any, request: _Request, failure: OSError) -> None:
    """Answer 0xA700 for a dataset that was read but could not be written (both paths)."""
    full = is_disk_full(failure)
    log.error(
        "C-STORE of %s from %s refused with 0xA700, nothing kept: cannot write it (%s)%s",
        request.sop_instance,
        assoc.requestor.ae_title,
        failure.strerror or failure,
        ". The data volume is full: free space or add storage; stores resume by themselves" if full else "",
    )
    comment = "out of disk space on the archive" if full else "the archive cannot write the file"
    status = Dataset()
    status.Status = dicom_status.OUT_OF_RESOURCES
    status.ErrorComment = comment
    pynetdicom_ext.write_message(assoc, request.context_id, store_response(request, status), None)


def store_response(request: _Request, result: int | Dataset) -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2) for a handler's status or status dataset."""
    comment: str | None = None
    if isinstance(result, Dataset):
        status = int(result.Status)
        comment = result.get("ErrorComment")
    else:
        status = int(result)
    return codec.response_command(
        codec.C_STORE_RSP,
        request.sop_class,
        request.message_id,
        status,
        dataset=False,
        comment=comment,
        sop_instance=request.sop_instance,
    )
